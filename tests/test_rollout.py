"""Rollout steps, consistency_rollout, martingale_loss and edm_schedule against float64
transcriptions of docs/math.md, on every backend (the op x backend matrix of tests/matrix.py);
autograd by gradcheck; opcheck and torch.compile of the registered ops; bad input."""

import math

import pytest
import torch

import judges
from matrix import RecordOps, cases
from problems import levels

import cdm_kernels
from cdm_kernels import rollout_reference as ref
from cdm_kernels.rollout import KINDS, _loss_backward_op, _loss_op, _rollout_step_op, step_coefficients

CASES = cases("rollout_step")
LOSS_CASES = cases("martingale_loss")
SHAPES = [(3, 1), (4, 3, 7, 7), (2, 1100)]  # M = 1, 147 and 1100: not multiples of any tile
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def test_backends_present():
    names = cdm_kernels.available_backends("rollout_step", "cpu")
    assert "reference" in names and ("cpu" in names) == cdm_kernels.has_cpu_kernels()
    assert cdm_kernels.available_backends("martingale_loss", "cpu") == names


_levels = levels
_expected = judges.rollout_step


def _inputs(shape, dtype, kind):
    x = torch.randn(shape, dtype=torch.float64) * 3
    D = torch.randn(shape, dtype=torch.float64)
    xe = torch.randn(shape, dtype=torch.float64) * 2 if kind == "heun" else None
    De = torch.randn(shape, dtype=torch.float64) if kind == "heun" else None
    z = torch.randn(shape, dtype=torch.float64)
    cast = lambda v: None if v is None else v.to(dtype)  # noqa: E731
    return cast(x), cast(D), cast(xe), cast(De), cast(z)


def _call(kind, x, D, xe, De, t, tn, case, **kw):
    """rollout_step on the case's device and backend, results back on the CPU."""
    x, D, xe, De, t, tn = case.to(x, D, xe, De, t, tn)
    if "noise" in kw:
        kw["noise"] = case.to(kw["noise"])[0]
    if kind == "churn":
        out = cdm_kernels.rollout_step(
            x, None, t, kind="churn", num_steps=kw.pop("num_steps", 4), S_churn=kw.pop("S_churn", 40.0),
            backend=case.backend, **kw,
        )
        return tuple(o.cpu() for o in out)
    return cdm_kernels.rollout_step(
        x, D, t, tn, kind=kind, x_euler=xe, denoised_euler=De, backend=case.backend, **kw
    ).cpu()


def _assert_close(out, expected, bound, dtype, what):
    # Each of the few roundings is at most one ulp of the largest term: 8 eps * (sum of |terms|).
    err = (out.double() - expected).abs()
    tol = 8 * EPS[dtype] * bound + 1e-300
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"{what}: error {err.max().item():.3g}, {worst:.2f}x the float rounding bound"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_step_explicit_noise(case, kind, dtype, shape):
    x, D, xe, De, z = _inputs(shape, dtype, kind)
    t, tn = _levels(shape[0], dtype)
    if kind == "euler":
        tn[-1] = 0.0  # EDM's last step goes to t_N = 0
    noise = z if kind in ("sde", "churn") else None
    out = _call(kind, x, D, xe, De, t, tn, case, noise=noise)
    if kind == "churn":
        out, t_hat = out
        gamma = min(40.0 / 4, math.sqrt(2) - 1)
        assert torch.allclose(t_hat.double(), t.double() * (1 + gamma), rtol=4 * EPS[dtype], atol=0)
        tn = t_hat
    assert out.dtype == dtype and out.shape == x.shape
    expected, bound = _expected(kind, x, D, xe, De, t, tn, z)
    _assert_close(out, expected, bound, dtype, f"{kind} on {case}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["sde", "churn"])
@pytest.mark.parametrize("shape", [(4, 3, 7, 7), (2, 1100)])
def test_step_in_kernel_noise_is_the_generators(case, kind, shape):
    dtype = torch.float32
    x, D, _, _, _ = _inputs(shape, dtype, kind)
    t, tn = _levels(shape[0], dtype)
    seed, offset = 2**33 + 5, 2**32 - 1000  # counters cross 2^32 inside the tensor
    out = _call(kind, x, D, None, None, t, tn, case, seed=seed, offset=offset)
    if kind == "churn":
        out, tn = out
    # The same backend's noise kernel (the reference draws with the reference generator).
    noise_backend = case.backend if case.backend in cdm_kernels.available_backends("randn", case.device) else "auto"
    z = cdm_kernels.randn(x.shape, seed, offset, backend=noise_backend, device=case.device).cpu()
    expected, bound = _expected(kind, x, D, None, None, t, tn, z)
    _assert_close(out, expected, bound, dtype, f"{kind} on {case} with in-kernel noise")
    # A different offset gives different noise (and the same offset the same).
    again = _call(kind, x, D, None, None, t, tn if kind != "churn" else None, case, seed=seed, offset=offset)
    again = again[0] if kind == "churn" else again
    assert torch.equal(out, again)
    other = _call(kind, x, D, None, None, t, tn if kind != "churn" else None, case, seed=seed, offset=offset + x.numel())
    other = other[0] if kind == "churn" else other
    assert not torch.allclose(out, other)


def test_in_kernel_noise_agrees_across_backends():
    x, D, _, _, _ = _inputs((3, 500), torch.float32, "sde")
    t, tn = _levels(3, torch.float32)
    names = cdm_kernels.available_backends("rollout_step", "cpu")
    outs = {b: cdm_kernels.rollout_step(x, D, t, tn, kind="sde", seed=77, offset=3, backend=b) for b in names}
    base = outs["reference"].double()
    for b, o in outs.items():
        # Only log/cos roundings of the noise differ (<= 1.5e-6 per unit of noise scale).
        scale = torch.sqrt(2 * (t - tn).abs() * t).double().unsqueeze(1)
        assert ((o.double() - base).abs() <= 2e-6 * scale + 8 * EPS[torch.float32] * (x.abs() + 10)).all(), b


def _cancelling_inputs(kind, dtype):
    """Inputs whose step cancels: x ~ 50, D ~ 0 and a step factor 2h/t (sde) or h/t (euler) of -0.95,
    so x' = D + 0.05 (x - D) + noise ~ 2.5 is the small difference of terms ~ 50. Rounding in the
    input precision costs a multiple of the result's ulp; float32 rounded once to it costs half a one."""
    shape = (2, 3, 8, 8)
    g = torch.Generator().manual_seed(3)
    x = 40 + 20 * torch.rand(shape, generator=g, dtype=torch.float64)
    D = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.04, 0.0371], dtype=torch.float32)  # noise scale sqrt(2 |h| t) ~ 0.04
    tn = (t.double() * (0.525 if kind == "sde" else 0.05)).float()
    return (*(v.to(dtype) for v in (x, D, z)), t, tn)


def _step_in(dtype, kind, x, D, z, t, tn):
    """The step's formula with every operation in `dtype` (levels rounded to it too)."""
    x, D, z = x.to(dtype), D.to(dtype), z.to(dtype)
    t, tn = t.to(dtype).reshape(-1, 1, 1, 1), tn.to(dtype).reshape(-1, 1, 1, 1)
    h = tn - t
    return x + 2 * h * (x - D) / t + torch.sqrt(2 * h.abs() * t) * z if kind == "sde" else x + h * (x - D) / t


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["sde", "euler"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32(case, kind, dtype):
    x, D, z, t, tn = _cancelling_inputs(kind, dtype)
    expected, terms = _expected(kind, x, D, None, None, t, tn, z)
    # One rounding to `dtype` (at most half its eps relative) plus float32 arithmetic on the terms.
    bound = torch.finfo(dtype).eps * expected.abs() + 8 * EPS[torch.float32] * terms

    def worst(out):
        return ((out.double() - expected).abs() / bound).max().item()

    # The test can tell: the same formula computed in `dtype` fails the bound by far, and computed in
    # float32 then rounded once to `dtype` passes it.
    assert worst(_step_in(dtype, kind, x, D, z, t, tn)) > 4
    assert worst(_step_in(torch.float32, kind, x, D, z, t, tn).to(dtype)) <= 1
    out = _call(kind, x, D, None, None, t, tn, case, noise=z if kind == "sde" else None)
    assert out.dtype == dtype and out.shape == x.shape
    assert worst(out) <= 1, f"{kind} on {case} in {dtype}: {worst(out):.2f}x the bound"


def test_t_as_edm_broadcast_shape_and_float():
    x, D, _, _, z = _inputs((3, 2, 2), torch.float64, "sde")
    t, tn = _levels(3)
    a = cdm_kernels.rollout_step(x, D, t, tn, kind="euler")
    b = cdm_kernels.rollout_step(x, D, t.reshape(3, 1, 1), tn.reshape(3, 1, 1), kind="euler")
    assert torch.equal(a, b)
    c = cdm_kernels.rollout_step(x, D, 2.0, 1.5, kind="euler")
    assert torch.equal(c, cdm_kernels.rollout_step(x, D, torch.full((3,), 2.0, dtype=torch.float64), torch.full((3,), 1.5, dtype=torch.float64), kind="euler"))


def test_heun_is_second_order_on_a_linear_ode():
    # dx/dt = (x - D)/t with the Gaussian denoiser D = m + s^2/(s^2 + t^2)(x - m) has the solution
    # x(t) - m = (x(t0) - m) sqrt((s^2 + t^2)/(s^2 + t0^2)). Halving the step halves Euler's global
    # error and quarters Heun's.
    m, s2 = 0.5, 0.3**2
    x0 = torch.tensor([[1.7]], dtype=torch.float64)

    def den(x, t):
        return m + s2 / (s2 + t**2) * (x - m)

    def integrate(n, kind):
        ts = torch.linspace(2.0, 1.0, n + 1, dtype=torch.float64)
        x = x0.clone()
        for k in range(n):
            t, tn = ts[k : k + 1], ts[k + 1 : k + 2]
            D = den(x, t)
            xe = cdm_kernels.rollout_step(x, D, t, tn, kind="euler")
            if kind == "heun":
                x = cdm_kernels.rollout_step(x, D, t, tn, kind="heun", x_euler=xe, denoised_euler=den(xe, tn))
            else:
                x = xe
        return x.item()

    exact = m + (x0.item() - m) * math.sqrt((s2 + 1.0) / (s2 + 4.0))
    e_heun = [abs(integrate(n, "heun") - exact) for n in (4, 8)]
    e_euler = [abs(integrate(n, "euler") - exact) for n in (4, 8)]
    assert e_euler[0] / e_euler[1] == pytest.approx(2, rel=0.2)
    assert e_heun[0] / e_heun[1] == pytest.approx(4, rel=0.2)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(case, kind):
    shape = (2, 3)
    x, D, xe, De, z = (
        None if v is None else v.requires_grad_() for v in _inputs(shape, torch.float64, kind)
    )
    t, tn = _levels(2)
    if kind in ("sde", "churn"):
        fn = lambda x, D, z: _call(kind, x, D, None, None, t, tn, case, noise=z)  # noqa: E731
        fn2 = (lambda x, D, z: fn(x, D, z)[0]) if kind == "churn" else fn  # noqa: E731
        args = (x, z) if kind == "churn" else (x, D, z)
        f = (lambda x, z: fn2(x, None, z)) if kind == "churn" else fn2  # noqa: E731
        assert torch.autograd.gradcheck(f, args)
    elif kind == "euler":
        assert torch.autograd.gradcheck(lambda x, D: _call(kind, x, D, None, None, t, tn, case), (x, D))
    else:
        assert torch.autograd.gradcheck(lambda x, D, xe, De: _call(kind, x, D, xe, De, t, tn, case), (x, D, xe, De))


def test_gradient_is_math_md_per_sample_scale():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    D = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t, tn = _levels(3)
    cdm_kernels.rollout_step(x, D, t, tn, kind="sde", seed=1).sum().backward()
    g = (2 * (tn - t) / t).unsqueeze(1)
    assert torch.allclose(x.grad, (1 + g).expand(3, 4))
    assert torch.allclose(D.grad, (-g).expand(3, 4))
    cx, cd, *_ = step_coefficients("sde", t, tn, 1.0)
    assert torch.allclose(cx, 1 + g[:, 0]) and torch.allclose(cd, -g[:, 0])


# ----------------------------------------------------------------------------------------------
# consistency_rollout on the exact denoiser of a Gaussian data set N(m, s^2 I)
# ----------------------------------------------------------------------------------------------

M_DATA, S_DATA = 0.3, 0.5


def gaussian_denoiser(x, sigma, labels=None):
    """D(x; sigma) = m + s^2 / (s^2 + sigma^2) (x - m), the exact E[x0 | x] for N(m, s^2 I)."""
    return M_DATA + S_DATA**2 / (S_DATA**2 + sigma**2) * (x - M_DATA)


def _closed_form(sched):
    """For one sample's schedule: x_final - m = A (x_t - m) + sqrt(V) N(0, 1) per element."""
    A, V = 1.0, 0.0
    for k in range(len(sched) - 1):
        t, tn = float(sched[k]), float(sched[k + 1])
        r = S_DATA**2 / (S_DATA**2 + t**2)
        a = 1 + 2 * (tn - t) / t * (1 - r)
        V = a * a * V + 2 * abs(t - tn) * t
        A = a * A
    return A, V


@pytest.mark.parametrize("case", CASES)
def test_consistency_rollout_matches_closed_form_moments(case):
    B, D = 2, 3000
    x_t = torch.randn(B, D) * 2
    sigma = torch.tensor([2.0, 0.4])
    sigma_min = torch.tensor([1.96, 0.38])
    K = 4
    x_final, s_final = cdm_kernels.consistency_rollout(
        gaussian_denoiser, *case.to(x_t, sigma, sigma_min), num_steps=6, num_trajectories=K, seed=5,
        backend=case.backend,
    )
    x_final, s_final = x_final.cpu(), s_final.cpu()
    assert x_final.shape == (K, B, D) and torch.equal(s_final, sigma_min)
    sched = cdm_kernels.edm_schedule(sigma.double(), sigma_min.double(), 6)
    for b in range(B):
        A, V = _closed_form(sched[b])
        resid = (x_final[:, b].double() - M_DATA - A * (x_t[b].double() - M_DATA)) / math.sqrt(V)
        n = resid.numel()
        assert abs(resid.mean().item()) < 5 / math.sqrt(n)
        assert abs(resid.var().item() - 1) < 5 * math.sqrt(2 / n)
        # Trajectories are independent of one another.
        r = torch.corrcoef(resid.reshape(K, D))
        assert (r - torch.eye(K, dtype=r.dtype)).abs().max() < 5 / math.sqrt(D)


def test_consistency_rollout_equals_its_steps_exactly():
    # The rollout is the loop of docs/math.md section 3 step 4 with Philox noise at offsets offset + k K numel.
    B, K, N = 3, 2, 4
    x_t = torch.randn(B, 2, 5, dtype=torch.float64)
    sigma, smin = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64), torch.tensor([2.9, 0.99, 0.45], dtype=torch.float64)
    out, _ = cdm_kernels.consistency_rollout(gaussian_denoiser, x_t, sigma, smin, N, K, seed=9, offset=100)
    sched = cdm_kernels.edm_schedule(sigma, smin, N)
    x = x_t.repeat(K, 1, 1).double()
    for k in range(N - 1):
        t, tn = sched[:, k].repeat(K), sched[:, k + 1].repeat(K)
        z = cdm_kernels.randn(x.shape, 9, 100 + k * K * x_t.numel(), dtype=torch.float64)
        x = ref.sde_step(x, gaussian_denoiser(x, t.reshape(-1, 1, 1)), t, tn, z)
    assert torch.allclose(out.reshape(K * B, 2, 5), x, rtol=1e-12, atol=1e-12)


def test_consistency_rollout_labels_and_unconditional():
    B, K = 3, 2
    x_t = torch.randn(B, 4)
    seen = {}

    def net(x, sigma, labels):
        seen["labels"] = labels
        seen["sigma_shape"] = tuple(sigma.shape)
        return gaussian_denoiser(x, sigma)

    labels = torch.tensor([0, 1, 2])
    a, _ = cdm_kernels.consistency_rollout(net, x_t, 1.0, 0.9, 3, K, labels=labels, seed=1)
    assert torch.equal(seen["labels"], labels.repeat(K)) and seen["sigma_shape"] == (K * B, 1)
    b, _ = cdm_kernels.consistency_rollout(net, x_t, 1.0, 0.9, 3, K, seed=1)
    assert seen["labels"] is None and torch.equal(a, b)
    with pytest.raises(ValueError, match=r"labels must be a tensor with first dimension B = 3, got \(2,\)"):
        cdm_kernels.consistency_rollout(net, x_t, 1.0, 0.9, 3, K, labels=torch.zeros(2))


def test_consistency_rollout_runs_without_grad():
    x_t = torch.randn(2, 3, requires_grad=True)
    out, _ = cdm_kernels.consistency_rollout(gaussian_denoiser, x_t, 1.0, 0.95, 3, seed=0)
    assert not out.requires_grad


# ----------------------------------------------------------------------------------------------
# martingale_loss
# ----------------------------------------------------------------------------------------------


def _loss_inputs(shape, dtype):
    return [torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(4)]


@pytest.mark.parametrize("case", LOSS_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wshape", ["float", "per_sample", "full", "per_channel"])
def test_martingale_loss_and_grads(case, dtype, wshape):
    shape = (3, 2, 5, 7)
    D0, D1a, D1b, y = _loss_inputs(shape, dtype)
    weight = {
        "float": 2.5,
        "per_sample": torch.rand(3, 1, 1, 1, dtype=dtype) + 0.5,
        "full": torch.rand(shape, dtype=dtype) + 0.5,
        "per_channel": torch.rand(1, 2, 1, 1, dtype=dtype) + 0.5,
    }[wshape]
    leaves = [v.clone().to(case.device).requires_grad_() for v in (D0, D1a, D1b)]
    wd = weight if isinstance(weight, float) else weight.to(case.device)
    loss = cdm_kernels.martingale_loss(*leaves, y.to(case.device), wd, lambda_m=1.7, backend=case.backend).cpu()
    w = weight if isinstance(weight, float) else weight.double()
    d0, da, db, yy = (v.double() for v in (D0, D1a, D1b, y))
    expected = w * (d0 - yy) ** 2 + 1.7 * (da - d0) * (db - d0)  # docs/math.md section 3 step 1 and step 6
    bound = abs(w if isinstance(w, float) else w) * (d0 - yy) ** 2 + 1.7 * ((da - d0) * (db - d0)).abs() + 1
    assert loss.dtype == dtype
    assert ((loss.double() - expected).abs() <= 16 * EPS[dtype] * bound * 4).all()
    g = torch.randn(shape, dtype=dtype)
    loss.backward(g)
    gd = g.double()
    leaves = [v.cpu() for v in leaves]
    exp_g0 = gd * (2 * w * (d0 - yy) - 1.7 * ((da - d0) + (db - d0)))
    exp_ga, exp_gb = gd * 1.7 * (db - d0), gd * 1.7 * (da - d0)
    for got, exp in zip((v.grad.cpu() for v in leaves), (exp_g0, exp_ga, exp_gb)):
        scale = gd.abs() * (2 * abs(w if isinstance(w, float) else w) * (d0.abs() + yy.abs()) + 1.7 * (da.abs() + db.abs() + 2 * d0.abs()))
        assert ((got.double() - exp).abs() <= 16 * EPS[dtype] * scale + 1e-300).all()


@pytest.mark.parametrize("case", LOSS_CASES)
def test_martingale_loss_gradcheck_all_inputs(case):
    D0, D1a, D1b, y = (v.to(case.device).requires_grad_() for v in _loss_inputs((2, 3), torch.float64))
    w = (torch.rand(2, 1, dtype=torch.float64, device=case.device) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: cdm_kernels.martingale_loss(*a, lambda_m=2.0, backend=case.backend), (D0, D1a, D1b, y, w)
    )
    wf = (torch.rand(2, 3, dtype=torch.float64, device=case.device) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: cdm_kernels.martingale_loss(*a, backend=case.backend), (D0, D1a, D1b, y, wf)
    )


def test_martingale_term_is_unbiased_for_the_squared_bias():
    # E[(D1a - D0)(D1b - D0)] = ||E D1 - D0||^2 for independent D1a, D1b (docs/math.md section 3 step 6).
    n = 200_000
    D0 = torch.zeros(n, 1, dtype=torch.float64)
    mu = 0.7
    D1a, D1b = mu + torch.randn(n, 1, dtype=torch.float64), mu + torch.randn(n, 1, dtype=torch.float64)
    loss = cdm_kernels.martingale_loss(D0, D1a, D1b, D0, 0.0, lambda_m=1.0)
    assert abs(loss.mean().item() - mu**2) < 5 * math.sqrt((1 + 2 * mu**2) / n)


# ----------------------------------------------------------------------------------------------
# edm_schedule
# ----------------------------------------------------------------------------------------------


def test_edm_schedule_formula_and_endpoints():
    hi = torch.tensor([80.0, 2.0, 0.5], dtype=torch.float64)
    lo = torch.tensor([0.002, 1.9, 0.5], dtype=torch.float64)
    t = cdm_kernels.edm_schedule(hi, lo, 6, rho=7)
    assert t.shape == (3, 6) and t.dtype == torch.float64
    for b in range(3):
        for k in range(6):
            a, c = float(hi[b]) ** (1 / 7), float(lo[b]) ** (1 / 7)
            assert t[b, k].item() == pytest.approx((a + k / 5 * (c - a)) ** 7, rel=1e-14)
    assert torch.equal(t[:, 0], hi) and torch.equal(t[:, -1], lo)
    assert (t[:, 1:] <= t[:, :-1]).all()
    f = cdm_kernels.edm_schedule(80.0, 0.002, 18)
    assert f.shape == (18,) and f[0].item() == 80.0 and f[-1].item() == 0.002
    assert cdm_kernels.edm_schedule(hi.float(), 0.002, 3).dtype == torch.float32


@pytest.mark.parametrize(
    "args,match",
    [
        ((80.0, 0.002, 1), "num_steps must be an int >= 2"),
        ((80.0, 0.0, 4), "sigma_min must be positive and finite, got 0.0"),
        ((torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0]), 4), "sample 1 has sigma_max = 2.0, sigma_min = 3.0"),
        ((torch.tensor([1.0, float("nan")]), 0.5, 4), "sample 1 has sigma_max = nan"),
        ((torch.ones(2), torch.ones(3), 4), r"one batch size B, got shapes \(2,\) and \(3,\)"),
    ],
)
def test_edm_schedule_errors(args, match):
    with pytest.raises(ValueError, match=match):
        cdm_kernels.edm_schedule(*args)


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors before any kernel runs
# ----------------------------------------------------------------------------------------------


def _xD():
    return torch.randn(2, 3), torch.randn(2, 3)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x, D: cdm_kernels.rollout_step(x, D, 1.0, 2.0, kind="sde"), ValueError,
         r"t_next <= t_cur; sample 0 has t_cur = 1.0, t_next = 2.0"),
        (lambda x, D: cdm_kernels.rollout_step(x, D, torch.tensor([1.0, -1.0]), 0.5, kind="euler"), ValueError,
         r"t_cur must be positive and finite for every sample; t_cur\[1\] = -1.0"),
        (lambda x, D: cdm_kernels.rollout_step(x, D, torch.tensor([1.0, float("inf")]), 0.5, kind="euler"), ValueError,
         r"t_cur\[1\] = inf"),
        (lambda x, D: cdm_kernels.rollout_step(x, D, 1.0, float("nan"), kind="sde"), ValueError,
         r"t_next must be finite and non-negative for every sample; t_next\[0\] = nan"),
        (lambda x, D: cdm_kernels.rollout_step(x, D[:, :2], 1.0, 0.5, kind="sde"), ValueError,
         r"denoised must have the shape of x, \(2, 3\); got \(2, 2\)"),
        (lambda x, D: cdm_kernels.rollout_step(x, D, 1.0, 0.5, kind="ddim"), ValueError,
         r"kind must be one of \('sde', 'euler', 'heun', 'churn'\), got 'ddim'"),
        (lambda x, D: cdm_kernels.rollout_step(x, D, 1.0, 0.5, kind="heun"), ValueError,
         "kind='heun' needs x_euler"),
        (lambda x, D: cdm_kernels.rollout_step(x, D, 1.0, 0.0, kind="heun", x_euler=x, denoised_euler=D), ValueError,
         r"t_next must be finite and positive \(the Heun correction divides by t_next\)"),
        (lambda x, D: cdm_kernels.rollout_step(x, D, 1.0, 0.5, kind="euler", noise=x), ValueError,
         "noise is only used by kind='sde' or 'churn'"),
        (lambda x, D: cdm_kernels.rollout_step(x, D, torch.ones(3), 0.5, kind="sde"), ValueError,
         r"t_cur must be a float or have shape \(B,\) or \(B, 1, ..., 1\) with B = 2 \(x.shape\[0\]\); got shape \(3,\)"),
        (lambda x, D: cdm_kernels.rollout_step(x, D, 1.0, 0.5, kind="sde", seed=-2), ValueError,
         r"seed must be an int in \[0, 2\*\*63\), got -2"),
        (lambda x, D: cdm_kernels.rollout_step(x, None, 1.0, kind="churn"), ValueError,
         "kind='churn' needs num_steps"),
        # churn takes neither denoised nor t_next: silently ignoring them would hide a wrong kind.
        (lambda x, D: cdm_kernels.rollout_step(x, D, 1.0, kind="churn", num_steps=4, S_churn=10.0), ValueError,
         r"kind='churn' does not use denoised"),
        (lambda x, D: cdm_kernels.rollout_step(x, None, 1.0, 0.5, kind="churn", num_steps=4, S_churn=10.0), ValueError,
         r"kind='churn' does not use t_next"),
        (lambda x, D: cdm_kernels.rollout_step(x, None, 1.0, kind="churn", num_steps=4, S_churn=10.0, S_min=math.nan),
         ValueError, r"S_min must be a number \(not NaN; \+-inf allowed\), got nan"),
        (lambda x, D: cdm_kernels.rollout_step(x, None, 1.0, kind="churn", num_steps=4, S_churn=10.0, S_max=math.nan),
         ValueError, r"S_max must be a number \(not NaN; \+-inf allowed\), got nan"),
        (lambda x, D: cdm_kernels.rollout_step(x, None, 1.0, kind="churn", num_steps=4, S_churn=math.nan), ValueError,
         r"S_churn must be a number >= 0 \(not NaN\), got nan"),
        (lambda x, D: cdm_kernels.rollout_step(x, None, 1.0, kind="churn", num_steps=4, S_noise=math.inf), ValueError,
         r"S_noise must be a finite number >= 0, got inf"),
        (lambda x, D: cdm_kernels.rollout_step(x, None, 1.0, kind="churn", num_steps=4, S_min="0"), ValueError,
         r"S_min must be a number \(not NaN; \+-inf allowed\), got '0'"),
        (lambda x, D: cdm_kernels.rollout_step(x.int(), D, 1.0, 0.5, kind="sde"), TypeError,
         r"x must have a floating dtype \(float16, bfloat16, float32 or float64\), got torch.int32"),
        (lambda x, D: cdm_kernels.rollout_step(x, D, 1.0, 0.5, kind="sde", backend="cuda"), ValueError,
         r"backend 'cuda' is not available for cpu tensors"),
        (lambda x, D: cdm_kernels.consistency_rollout(gaussian_denoiser, x, 1.0, 0.5, num_steps=1), ValueError,
         "num_steps must be an int >= 2"),
        (lambda x, D: cdm_kernels.consistency_rollout(gaussian_denoiser, x, 1.0, 2.0), ValueError,
         "consistency_rollout needs sigma_min <= sigma, got sigma = 1.0, sigma_min = 2.0"),
        (lambda x, D: cdm_kernels.consistency_rollout(gaussian_denoiser, x, 1.0, 0.5, num_trajectories=0), ValueError,
         "num_trajectories must be a positive int, got 0"),
        (lambda x, D: cdm_kernels.martingale_loss(x, D, D[:1], x, 1.0), ValueError,
         r"D1b must have the shape of D0, \(2, 3\); got \(1, 3\)"),
        (lambda x, D: cdm_kernels.martingale_loss(x, D, D, x, torch.ones(3, 1)), ValueError,
         r"weight must broadcast to D0's shape \(2, 3\) \(e.g. \(B, 1, ..., 1\)\), got \(3, 1\)"),
        (lambda x, D: cdm_kernels.martingale_loss(x, D, D.double(), x, 1.0), TypeError,
         "D1b has dtype torch.float64 but D0 has dtype torch.float32"),
    ],
)
def test_bad_input_errors(call, exc, match):
    x, D = _xD()
    with pytest.raises(exc, match=match):
        call(x, D)


def test_churn_accepts_infinite_bounds_and_churn():
    # inf is meaningful where NaN is refused: S_churn = inf is the largest gamma (sqrt 2 - 1), and
    # S_min = -inf, S_max = inf churn every level.
    x = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.5, 3.0], dtype=torch.float64)
    z = torch.randn(2, 3, dtype=torch.float64)
    out, t_hat = cdm_kernels.rollout_step(x, None, t, kind="churn", num_steps=4, S_churn=math.inf, S_min=-math.inf,
                                          S_max=math.inf, noise=z)
    torch.testing.assert_close(t_hat, t * math.sqrt(2), rtol=1e-15, atol=0)
    torch.testing.assert_close(out, x + t[:, None] * z, rtol=1e-14, atol=1e-14)  # sqrt(2 t^2 - t^2) = t
    _, t_hat = cdm_kernels.rollout_step(x, None, t, kind="churn", num_steps=4, S_churn=10.0, S_min=1.0, S_max=2.0,
                                        noise=z)
    assert torch.equal(t_hat, t)  # neither level is in [S_min, S_max]: no churn


def test_t_requiring_grad_is_refused():
    x, D = _xD()
    t = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="t_cur must not require grad"):
        cdm_kernels.rollout_step(x, D, t, 0.5, kind="sde")


@pytest.mark.skipif(not cdm_kernels.has_cpu_kernels(), reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_levels_check_agrees_with_the_reductions(dtype):
    # rollout_step checks CPU levels in one C++ pass and other devices' with torch reductions; both
    # must accept and refuse the same levels, including NaN, +-inf, 0 and equal levels, and strided views.
    from cdm_kernels.rollout import _EXT, _levels_valid_by_reductions

    gen = torch.Generator().manual_seed(3)
    specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-30, 2.0, 80.0], dtype=dtype)
    decisions = set()
    for trial in range(400):
        B = 1 + trial % 5
        t_cur = torch.rand(B, generator=gen, dtype=dtype) * 3 + 0.01
        t_next = t_cur * torch.rand(B, generator=gen, dtype=dtype)
        for t in (t_cur, t_next):  # a special value somewhere, in about half of the trials
            if torch.rand(1, generator=gen).item() < 0.3:
                t[torch.randint(B, (1,), generator=gen)] = specials[torch.randint(len(specials), (1,), generator=gen)]
        if trial % 7 == 0:
            t_next = t_cur.clone()  # t_next = t_cur is allowed
        if trial % 11 == 0:
            t_cur, t_next = t_cur[:1].expand(B), t_next[:1].expand(B)  # stride 0, as a 0-d level gives
        for kind in ("euler", "heun", "churn"):
            tn = None if kind == "churn" else t_next
            want = _levels_valid_by_reductions(kind, t_cur, tn)
            assert _EXT.rollout_levels_valid(t_cur, tn, kind == "heun") == want, (kind, t_cur, tn)
            decisions.add(want)
    assert decisions == {True, False}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_eager_no_grad_launch_equals_the_op(case, kind):
    # Without autograd or any mode, rollout_step calls the launcher itself instead of going through
    # cdm_kernels::rollout_step (whose dispatch would only call that launcher): same bits.
    from cdm_kernels.registry import plain_call

    shape = (3, 2, 5, 7)
    x, D, xe, De, z = _inputs(shape, torch.float32, kind)
    t, tn = _levels(3, torch.float32)
    if kind == "churn":
        out, t_hat = _call(kind, x, D, xe, De, t, tn, case, noise=z)
        args = (x.reshape(3, -1), x.reshape(3, -1), t, t_hat, None, None, z.reshape(3, -1), 0, 0, kind, 1.0)
    else:
        out = _call(kind, x, D, xe, De, t, tn, case, seed=7, offset=5)
        flat = lambda v: None if v is None else v.reshape(3, -1)  # noqa: E731
        args = (flat(x), flat(D), t, tn, flat(xe), flat(De), None, 7 if kind == "sde" else 0,
                5 if kind == "sde" else 0, kind, 1.0)
    args = case.to(*args)
    assert plain_call(args)
    assert torch.equal(out, _rollout_step_op(*args, case.backend).reshape(shape).cpu())


def test_rollout_step_goes_through_the_op_when_dispatch_matters():
    from cdm_kernels.registry import plain_call

    x, D = torch.randn(2, 3), torch.randn(2, 3)
    t, tn = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0])
    args = (x, D, t, tn, None, None, None, 0, 0, "euler", 1.0)
    assert plain_call(args)
    xg = x.clone().requires_grad_()
    assert not plain_call((xg,) + args[1:])  # autograd needs the op's formula
    with torch.no_grad():
        assert plain_call((xg,) + args[1:])
    with RecordOps() as mode:
        assert not plain_call(args)
        cdm_kernels.rollout_step(x, D, t, tn, kind="euler")
    assert "cdm_kernels.rollout_step.default" in mode.ops
    with torch.profiler.profile() as prof:
        assert not plain_call(args)
        cdm_kernels.rollout_step(x, D, t, tn, kind="euler", backend="reference")
    assert "cdm_kernels::rollout_step" in {e.name for e in prof.events()}
    with torch._subclasses.fake_tensor.FakeTensorMode() as fake:
        fx, fD = fake.from_tensor(x), fake.from_tensor(D)
        assert not plain_call((fx, fD) + args[2:])
    # The gradient still flows through the op's autograd formula.
    out = cdm_kernels.rollout_step(xg, D, t, tn, kind="euler")
    out.sum().backward()
    torch.testing.assert_close(xg.grad, (1 + (tn - t) / t)[:, None].expand(2, 3))


@pytest.mark.skipif(not cdm_kernels.has_cpu_kernels(), reason="the C++ extension is not built")
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_step_rounds_like_its_float32_formula(kind):
    # The CPU kernel's loops are compiled for AVX-512, AVX2 and baseline x86-64 (picked at load
    # time) without FMA contraction: each clone rounds every operation of rollout_math.h as float32
    # torch ops do, so results are the same bits on every CPU. Odd M: vector body and remainder.
    shape = (5, 1100)
    x, D, xe, De, z = _inputs(shape, torch.float32, kind)
    t, tn = _levels(5, torch.float32)
    h = tn - t
    col = lambda v: v[:, None]  # noqa: E731
    # sqrtf is correctly rounded; torch.sqrt's float32 CPU kernel is not always (1 ulp off for
    # 38.3363838), while the float64 root of a float32 rounds correctly to float32.
    sqrt = lambda v: torch.sqrt(v.double()).float()  # noqa: E731
    if kind == "sde":
        out = cdm_kernels.rollout_step(x, D, t, tn, kind="sde", noise=z, backend="cpu")
        want = x + col(2 * h / t) * (x - D) + col(sqrt(2 * h.abs() * t)) * z
    elif kind == "euler":
        out = cdm_kernels.rollout_step(x, D, t, tn, kind="euler", backend="cpu")
        want = x + col(h / t) * (x - D)
    elif kind == "heun":
        out = cdm_kernels.rollout_step(x, D, t, tn, kind="heun", x_euler=xe, denoised_euler=De, backend="cpu")
        want = x + col(0.5 * h / t) * (x - D) + col(0.5 * h / tn) * (xe - De)
    else:
        out, t_hat = cdm_kernels.rollout_step(x, None, t, kind="churn", num_steps=4, S_churn=40.0, noise=z,
                                              backend="cpu")
        want = x + col(sqrt(t_hat * t_hat - t * t) * 1.0) * z
    assert torch.equal(out, want)


# ----------------------------------------------------------------------------------------------
# The registered ops: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    B, M = 2, 5
    backend = case.backend
    x, D, xe, De, z = (torch.randn(B, M, dtype=torch.float64, device=case.device, requires_grad=True)
                       for _ in range(5))
    t = torch.tensor([1.0, 2.0], dtype=torch.float64, device=case.device)
    tn = t * 0.5
    for kind, noise in (("sde", z), ("sde", None), ("euler", None)):
        torch.library.opcheck(_rollout_step_op, (x, D, t, tn, None, None, noise, 3, 0, kind, 1.0, backend))
    t_hat = t * 1.2  # churn's t_next is t_hat >= t_cur
    torch.library.opcheck(_rollout_step_op, (x, D, t, t_hat, None, None, z, 0, 0, "churn", 1.0, backend))
    torch.library.opcheck(_rollout_step_op, (x, D, t, t_hat, None, None, None, 5, 7, "churn", 1.0, backend))
    torch.library.opcheck(_rollout_step_op, (x, D, t, tn, xe, De, None, 0, 0, "heun", 1.0, backend))
    w = torch.rand(B, dtype=torch.float64, device=case.device)
    torch.library.opcheck(_loss_op, (x, D, xe, De, w, 2.0, backend))
    torch.library.opcheck(_loss_op, (x, D, xe, De, torch.rand(B, M, dtype=torch.float64, device=case.device), 2.0,
                                     backend))
    g = torch.randn(B, M, dtype=torch.float64, device=case.device)
    torch.library.opcheck(_loss_backward_op, (g, x.detach(), D.detach(), xe.detach(), De.detach(), w, 2.0, backend))


def test_torch_compile():
    backend = cdm_kernels.resolve_backend("rollout_step", "cpu")
    x, D, _, _, z = _inputs((2, 3, 4), torch.float32, "sde")
    y = torch.randn_like(x)
    t, tn = _levels(2, torch.float32)

    def f(x, D, y):
        x1 = cdm_kernels.rollout_step(x, D, t, tn, kind="sde", seed=4, offset=0, backend=backend)
        return cdm_kernels.martingale_loss(D, x1, x1 * 0.5, y, t.reshape(2, 1, 1), backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    Dg = D.clone().requires_grad_()
    Dc = D.clone().requires_grad_()
    eager, comp = f(x, Dg, y), compiled(x, Dc, y)
    assert torch.allclose(eager, comp, rtol=1e-6, atol=1e-6)
    eager.sum().backward()
    comp.sum().backward()
    assert torch.allclose(Dg.grad, Dc.grad, rtol=1e-6, atol=1e-6)
