"""The stable target on every backend (the op x backend matrix of tests/matrix.py), judged by the
float64 broadcast formula (tests/judges.py): values and gradients over the whole noise range, odd
sizes, the limits and invariances of docs/math.md, every precision mode, registration (opcheck,
torch.compile), memory, and every bad input's message."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import judges
import pytest
import torch
from matrix import Case, RecordOps, assert_within_budget, cases, float32_budget, mode_cases, rel, run_stf
from problems import cluster_problem, peaked_case, spread_case

import cdm_kernels
from cdm_kernels import stf_reference, stf_score, stf_target
from cdm_kernels.contract import AUX_COLS

SIGMAS = [0.002, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0]
ULP64 = torch.finfo(torch.float64).eps  # one ulp of data in [-1, 1]
CASES = cases("stf_target")


def _err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def _check_float32(case: Case, x, sigma, ref, chunk):
    """FlashAttention's rule on mu: the float32 error against float64 is at most twice the error of the
    same math done eagerly by PyTorch in float32 (plus a few ulps of the data's magnitude)."""
    mu_j = judges.stf(x, sigma, ref)["mu"]
    budget = _err(judges.eager_float32(x, sigma, ref), mu_j)
    mu = run_stf(case, x.float(), torch.as_tensor(sigma).float().expand(x.shape[0]), ref.float(), chunk=chunk)["mu"]
    assert mu.dtype == torch.float32
    ulps = 8 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item())
    err = _err(mu.reshape(x.shape[0], -1), mu_j)
    assert err <= 2 * budget + ulps, f"float32 error {err:.3g} > 2 x eager {budget:.3g} + {ulps:.3g}"


def test_cpu_backend_is_built_and_chosen_by_auto():
    # CI builds the extension; without it the suite would silently test only the reference.
    assert cdm_kernels.has_cpu_kernels(), cdm_kernels.extension_status()
    assert cdm_kernels.resolve_backend("stf_target", "cpu") == "cpu"
    assert "loaded" in cdm_kernels.extension_status()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_spread_weights_match_judge(case, sigma):
    B, n, D = 5, (1000 if case.heavy_ok else 300), 7
    x, ref = spread_case(B, n, D, sigma)
    j = judges.stf(x, sigma, ref)
    assert (j["n_eff"] >= 2).all() and (j["n_eff"] <= n / 2).all(), "the data must spread the weights"
    got = run_stf(case, x, torch.full((B,), sigma, dtype=torch.float64), ref, chunk=333)
    scale = ref.abs().max().item()
    assert _err(got["mu"], j["mu"]) <= 1e-12 * scale
    assert _err(got["lse"], j["lse"]) <= 1e-12 * max(1.0, j["lse"].abs().max().item())
    torch.testing.assert_close(got["n_eff"], j["n_eff"], rtol=1e-10, atol=0)
    torch.testing.assert_close(got["w_max"], j["w_max"], rtol=1e-10, atol=0)
    torch.testing.assert_close(got["d_bar"], j["d_bar"], rtol=1e-9, atol=1e-12 * scale**2)
    _check_float32(case, x, sigma, ref, chunk=333)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_peaked_image_data_match_judge(case, sigma):
    B, n, D = 6, 300, 3 * 8 * 8
    x, ref = peaked_case(B, n, D)
    j = judges.stf(x, sigma, ref)
    got = run_stf(case, x, torch.full((B,), sigma, dtype=torch.float64), ref, chunk=128)
    assert _err(got["mu"], j["mu"]) <= 1e-10
    # lse is about -||x - r||^2 / (2 sigma^2): large at small sigma, so compare relatively.
    assert _err(got["lse"], j["lse"]) <= 1e-10 * max(1.0, j["lse"].abs().max().item())
    _check_float32(case, x, sigma, ref, chunk=128)


@pytest.mark.parametrize("case,precision", mode_cases())
def test_spread_weights_at_every_sigma_in_every_mode(case, precision):
    """Values and gradients (x, sigma, ref) within FACTOR x the float32 budget of the same mode, on data
    whose weights spread over several references at every sigma in [0.002, 80] (one sigma per row)."""
    B, D, n, chunk = (65, 67, 257, 100) if case.heavy_ok else (9, 67, 57, 20)
    x, sigma, ref = cluster_problem(B, D, n)
    g = torch.Generator().manual_seed(5)
    grad_mu, grad_lse = torch.randn(B, D, generator=g), torch.randn(B, generator=g)
    exact = judges.stf(x, sigma, ref, grad_mu, grad_lse)
    got = run_stf(case, x, sigma, ref, precision=precision, chunk=chunk, grad_mu=grad_mu, grad_lse=grad_lse)
    budget = float32_budget(exact, x, sigma, ref, precision=precision, chunk=chunk, grad_mu=grad_mu,
                            grad_lse=grad_lse)
    assert_within_budget(got, exact, budget, f"{case} {precision}")


@pytest.mark.parametrize("case", CASES)
def test_image_sized_rows_in_float32(case):
    """D = 3073 (not a multiple of any tile) and B across 64: float32 values and gradients within budget."""
    B, D, n, chunk = (17, 3073, 300, 128) if case.heavy_ok else (3, 3073, 40, 17)
    x, sigma, ref = cluster_problem(B, D, n, seed=2)
    grad_mu, grad_lse = torch.randn(B, D), torch.randn(B)
    exact = judges.stf(x, sigma, ref, grad_mu, grad_lse)
    got = run_stf(case, x, sigma, ref, chunk=chunk, grad_mu=grad_mu, grad_lse=grad_lse)
    budget = float32_budget(exact, x, sigma, ref, chunk=chunk, grad_mu=grad_mu, grad_lse=grad_lse)
    assert_within_budget(got, exact, budget, str(case))


ODD_SIZES = [(5, n, D) for D in (1, 7, 3073) for n in (1, 3, 1000, 4099)] + [
    (1, 1000, 7),
    (64, 1000, 7),
    (1, 3, 3073),
    (64, 4099, 3073),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("B,n,D", ODD_SIZES)
def test_odd_sizes(case, B, n, D):
    if not case.heavy_ok and B * n * D > 2_000_000:
        pytest.skip(f"{case} emulates GPU kernels on the host: B n D = {B * n * D} is for the native backends")
    sigma = torch.tensor([0.3, 1.0, 2.5, 7.0, 40.0]).repeat(13)[:B].double()
    x, ref = spread_case(B, n, D, 1.0)
    j = judges.stf(x, sigma, ref)
    got = run_stf(case, x, sigma, ref)
    assert _err(got["mu"], j["mu"]) <= 1e-11 * ref.abs().max().item()
    assert _err(got["lse"], j["lse"]) <= 1e-11 * max(1.0, j["lse"].abs().max().item())


@pytest.mark.parametrize("case", CASES)
def test_images_with_edm_sigma_shape(case):
    B, n = 4, 50
    ref = torch.rand(n, 3, 32, 32, dtype=torch.float64) * 2 - 1
    x = ref[:B] + 0.5 * torch.randn(B, 3, 32, 32, dtype=torch.float64)
    sigma = torch.tensor([0.2, 1.0, 5.0, 80.0], dtype=torch.float64).reshape(B, 1, 1, 1)
    x, sigma, ref = case.to(x, sigma, ref)
    mu = stf_target(x, sigma, ref, backend=case.backend)
    assert mu.shape == x.shape
    assert _err(mu.reshape(B, -1), judges.stf(x, sigma.reshape(B), ref)["mu"]) <= 1e-12
    score = stf_score(x, sigma, ref, backend=case.backend)
    assert _err(score, (mu - x) / sigma**2) == 0


@pytest.mark.parametrize("case", CASES)
def test_non_contiguous_inputs(case):
    big_x = torch.randn(6, 20, 3, dtype=torch.float64)
    big_r = torch.randn(40, 3, 20, dtype=torch.float64)
    big_x, big_r = case.to(big_x, big_r)
    x = big_x[::2].transpose(1, 2)  # (3, 3, 20), strided
    ref = big_r[::3]  # (14, 3, 20), strided
    sigma = torch.tensor([0.5, 0.5, 1.0, 1.0, 4.0, 4.0], dtype=torch.float64, device=case.device)[::2]
    assert not x.is_contiguous() and not ref.is_contiguous() and not sigma.is_contiguous()
    mu = stf_target(x, sigma, ref, backend=case.backend, chunk_size=5)
    assert _err(mu.reshape(3, -1), judges.stf(x, sigma, ref)["mu"]) <= 1e-12


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk_size", [1, 7, 333, 999, 1001, 5000])
def test_chunk_sizes_not_dividing_n(case, chunk_size):
    if not case.heavy_ok and chunk_size < 7:
        pytest.skip(f"{case}: a chunk of one reference means 1000 emulated chunk passes")
    x, ref = spread_case(3, 1000, 9, 0.7)
    sigma = torch.tensor([0.2, 0.7, 3.0], dtype=torch.float64)
    got = run_stf(case, x, sigma, ref, chunk=chunk_size)
    j = judges.stf(x, sigma, ref)
    assert _err(got["mu"], j["mu"]) <= 1e-12 * ref.abs().max().item()
    assert _err(got["lse"], j["lse"]) <= 1e-10
    torch.testing.assert_close(got["n_eff"], j["n_eff"], rtol=1e-10, atol=0)


# ---- limits and invariances (docs/math.md) ----


@pytest.mark.parametrize("case", CASES)
def test_small_sigma_gives_nearest_reference(case):
    ref = torch.rand(200, 48, dtype=torch.float64) * 2 - 1
    x = ref[torch.tensor([3, 150, 77])] + 0.01 * torch.randn(3, 48, dtype=torch.float64)
    nearest = ref[torch.cdist(x, ref).argmin(1)]
    got = run_stf(case, x, torch.full((3,), 0.002, dtype=torch.float64), ref)
    # mu = c + (r_k - c) for the centre c: the nearest reference to within its last bit.
    assert _err(got["mu"], nearest) <= ULP64
    assert (got["w_max"] == 1).all() and (got["n_eff"] == 1).all()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sigma_past_the_dtype_range_gives_the_nearest_reference(case, dtype):
    # 1/sigma^2 overflows the compute dtype (float32 below ~1e-19, float64 below ~1e-154): the target
    # is the sigma -> 0 limit, the nearest reference, not NaN.
    tiny = {torch.float64: 1e-300, torch.float16: 2.0**-24}.get(dtype, 1e-30)  # the smallest float16 is 6e-8
    ref = (torch.rand(50, 12, dtype=torch.float64) * 2 - 1).to(dtype)
    x = (ref[torch.tensor([4, 31])].double() + 0.01 * torch.randn(2, 12, dtype=torch.float64)).to(dtype)
    nearest = ref[torch.cdist(x.double(), ref.double()).argmin(1)]
    x, ref = case.to(x, ref)
    mu, lse, st = stf_target(x, torch.full((2,), tiny, dtype=dtype, device=case.device), ref, backend=case.backend,
                             return_lse=True, return_stats=True)
    assert mu.dtype == dtype and _err(mu, nearest) <= (torch.finfo(dtype).eps if dtype in (torch.float32, torch.float64)
                                                        else 0.0)
    assert (st.w_max == 1).all() and (st.n_eff == 1).all()
    assert (lse == -torch.inf).all() or torch.isfinite(lse).all(), "lse is -inf or finite, never NaN"


@pytest.mark.parametrize("case", CASES)
def test_large_sigma_gives_mean_of_references(case):
    ref = torch.rand(300, 12, dtype=torch.float64) * 2 - 1
    x = torch.rand(4, 12, dtype=torch.float64) * 2 - 1
    got = run_stf(case, x, torch.full((4,), 1e5, dtype=torch.float64), ref)
    # The deviation from the mean is O(||x - r||^2 / sigma^2) ~ 1e-9 at sigma = 1e5.
    assert _err(got["mu"], ref.mean(0).expand_as(got["mu"])) <= 1e-8
    torch.testing.assert_close(got["n_eff"], torch.full((4,), 300.0, dtype=torch.float64), rtol=1e-8, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_invariances(case):
    x, ref = spread_case(4, 257, 11, 1.0)
    sigma = torch.tensor([0.5, 1.0, 2.0, 9.0], dtype=torch.float64)
    x, ref, sigma = case.to(x, ref, sigma)

    def f(x, s, r):
        return stf_target(x, s, r, backend=case.backend, chunk_size=64)

    mu = f(x, sigma, ref)
    perm = torch.randperm(ref.shape[0], device=case.device)
    assert _err(f(x, sigma, ref[perm]), mu) <= 1e-13
    shift = torch.randn(11, dtype=torch.float64, device=case.device)
    assert _err(f(x + shift, sigma, ref + shift), mu + shift) <= 1e-12
    c = 3.7
    assert _err(f(c * x, c * sigma, c * ref), c * mu) <= 1e-12


# ---- gradients ----


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ref_grad", [False, True])
@pytest.mark.parametrize("keep", [False, True])
def test_gradcheck_float64(case, ref_grad, keep):
    x, ref = spread_case(3, 11, 5, 1.0)
    sigma = torch.tensor([0.6, 1.0, 2.5], dtype=torch.float64)
    x, ref, sigma = case.to(x, ref, sigma)
    x.requires_grad_(), sigma.requires_grad_(), ref.requires_grad_(ref_grad)

    def f(x, sigma, ref):
        return stf_target(x, sigma, ref, backend=case.backend, return_lse=True, chunk_size=4, keep_distances=keep)

    assert torch.autograd.gradcheck(f, (x, sigma, ref), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sigma", [0.002, 0.1, 1.0, 80.0])
@pytest.mark.parametrize("keep", [False, True])
def test_float32_gradients_against_float64_autograd_of_judge(case, sigma, keep):
    x, ref = spread_case(4, 500 if case.heavy_ok else 120, 33, sigma)
    g, gl = torch.randn(4, 33, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    s = torch.full((4,), sigma, dtype=torch.float64)
    j = judges.stf(x, s, ref, g, gl)
    got = run_stf(case, x.float(), s.float(), ref.float(), chunk=128, grad_mu=g.float(), grad_lse=gl.float(),
                  keep_distances=keep)
    # Both gradients scale like 1/sigma^2 (x) and ||x||^2/sigma^3 (sigma): compare relatively.
    assert _err(got["gx"], j["gx"]) <= 2e-4 * j["gx"].abs().max().item()
    assert _err(got["gs"], j["gs"]) <= 2e-4 * j["gs"].abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_float32_sigma_gradient_on_image_sized_rows(case):
    # Images in [-1, 1], D = 3072, x = r_k + sigma z: at sigma ~ 10-40 the weights spread over the
    # references while ||x - r||^2 ~ 2000. The distances' rounding must not cost dL/dsigma more than
    # twice eager autograd's error.
    torch.manual_seed(7)
    B, n, D = (6, 300, 3072) if case.heavy_ok else (3, 60, 3072)
    sigma = torch.tensor([9.1, 12.0, 18.8, 25.0, 38.7, 80.0], dtype=torch.float64)[:B]
    ref = torch.rand(n, D, dtype=torch.float64) * 2 - 1
    x = ref[:B] + sigma[:, None] * torch.randn(B, D, dtype=torch.float64)
    g = torch.randn(B, D, dtype=torch.float64)

    def grad_sigma(fn, dtype, device="cpu"):
        xs = x.to(device, dtype).detach().clone().requires_grad_()
        ss = sigma.to(device, dtype).detach().clone().requires_grad_()
        (fn(xs, ss, ref.to(device, dtype)) * g.to(device, dtype)).sum().backward()
        return ss.grad.double().cpu()

    def eager(x, s, r):
        return torch.softmax((x @ r.T - 0.5 * (r * r).sum(1)) / s[:, None] ** 2, dim=1) @ r

    want = grad_sigma(eager, torch.float64)
    assert (want.abs() > 1e-6 * want.abs().max()).all(), "every row must have a sigma gradient"
    err_eager = (grad_sigma(eager, torch.float32) - want).abs() / want.abs()
    got = grad_sigma(lambda a, b, c: stf_target(a, b, c, backend=case.backend, chunk_size=128), torch.float32,
                     case.device)
    err = (got - want).abs() / want.abs()
    # Per row both are one realisation of float32 noise (eager's vary 10x between rows by luck):
    # compare the worst rows. Recovering d from the logits' scale cost 50x eager's error here.
    bound = 2 * err_eager.max() + 4 * torch.finfo(torch.float32).eps
    assert err.max() <= bound, f"relative errors {err.tolist()} > 2 x eager's worst {err_eager.tolist()} + 4 eps"


@pytest.mark.parametrize("case", CASES)
def test_score_is_gradient_of_lse(case):
    # docs/math.md: d lse_i / d x_i = (mu_i - x_i) / sigma_i^2, the score of the smoothed reference set.
    x, ref = spread_case(3, 40, 6, 1.0)
    sigma = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    x, ref, sigma = case.to(x, ref, sigma)
    x.requires_grad_()
    _, lse = stf_target(x, sigma, ref, backend=case.backend, return_lse=True)
    (g,) = torch.autograd.grad(lse.sum(), x)
    torch.testing.assert_close(g, stf_score(x.detach(), sigma, ref, backend=case.backend), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_low_precision_inputs_compute_in_float32(case):
    x, ref = spread_case(4, 100, 16, 1.0)
    mu_j = judges.stf(x, 1.0, ref)["mu"]
    for dtype in (torch.float16, torch.bfloat16):
        xl, rl = case.to(x.to(dtype), ref.to(dtype))
        mu = stf_target(xl.requires_grad_(), 1.0, rl, backend=case.backend)
        assert mu.dtype == dtype
        # The inputs' own rounding dominates: judge the rounded inputs, within the output's rounding.
        mu_jl = judges.stf(xl, 1.0, rl)["mu"]
        assert _err(mu, mu_jl) <= 2 * torch.finfo(dtype).eps * rl.abs().max().item()
        mu.float().sum().backward()
        assert xl.grad is not None and xl.grad.dtype == dtype and torch.isfinite(xl.grad).all()
    xf, rf = case.to(x.float(), ref.float())
    assert _err(stf_target(xf, 1.0, rf, backend=case.backend), mu_j) <= 1e-5


# ---- precision modes ----


def _rounded_inputs_case(B=24, n=200, D=96):
    x, sigma, ref = cluster_problem(B, D, n, sigma_lo=0.05, sigma_hi=5.0, seed=3)
    return x, sigma, ref


@pytest.mark.parametrize("case,precision", [p for p in mode_cases() if p.values[1] != "ieee"])
def test_modes_round_their_operands(case, precision):
    # An upper bound passes for a kernel that forgets to round: each mode must sit on its own
    # emulation (stf_reference in that mode) much closer than to the exact float32 result.
    x, sigma, ref = _rounded_inputs_case()
    got = run_stf(case, x, sigma, ref, precision=precision, chunk=64)["mu"]
    mode = stf_reference.stf_forward(x, sigma, ref, stf_reference.centre_of(ref), 64, precision)[0]
    ieee = stf_reference.stf_forward(x, sigma, ref, stf_reference.centre_of(ref), 64, "ieee")[0]
    assert rel(mode, ieee) > 0, "the mode must change the result on these inputs"
    if precision == "tf32x3":  # float32-grade: close to both
        assert rel(got, mode) <= 1e-5 and rel(got, ieee) <= 1e-5
    else:  # the products' float32 rounding flips a few operands' roundings: not bit-equal to the emulation
        d_mode, d_ieee = rel(got, mode), rel(got, ieee)
        assert d_mode <= 0.5 * d_ieee, f"{precision}: {d_mode:.2e} from its emulation, {d_ieee:.2e} from ieee"


@pytest.mark.parametrize("case,precision", [p for p in mode_cases() if p.values[1] in ("tf32", "bf16")])
@pytest.mark.parametrize("sigma_value", [0.002, 0.1])
@pytest.mark.parametrize("keep", [False, True])
def test_backward_corrects_the_rounding_of_mg(case, precision, sigma_value, keep):
    # mg = mu . g is not rounded like the mode's products g . r_j; at small sigma their difference,
    # divided by sigma^2, would be the whole x gradient without the first-order correction.
    B, D, n = 8, 48, 64
    x, ref = peaked_case(B, n, D, dtype=torch.float32)
    g, gl = torch.randn(B, D), torch.zeros(B)
    s = torch.full((B,), sigma_value)
    j = judges.stf(x, s, ref, g, gl)
    got = run_stf(case, x, s, ref, precision=precision, chunk=32, grad_mu=g, grad_lse=gl, keep_distances=keep)
    scale = g.abs().max().item() * ref.abs().max().item() * D**0.5 / sigma_value**2
    assert _err(got["gx"], j["gx"]) <= 0.02 * scale


def test_float64_refuses_tensor_core_modes():
    x, ref = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"precision 'tf32' rounds float32 operands.*float64 inputs take only 'ieee'"):
        stf_target(x, 1.0, ref, precision="tf32")


# ---- registration: opcheck and torch.compile ----


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(case, dtype):
    x, ref = spread_case(4, 30, 6, 1.0, dtype=dtype)
    sigma = torch.tensor([0.5, 1.0, 2.0, 8.0], dtype=dtype)
    x, ref, sigma = case.to(x, ref, sigma)
    c = stf_reference.centre_of(ref)
    for keep in (False, True):
        args = (x, sigma, ref, c, 7, "ieee", keep, case.backend)
        torch.library.opcheck(torch.ops.cdm_kernels.stf_forward.default, args)
        x.requires_grad_(), sigma.requires_grad_()
        torch.library.opcheck(torch.ops.cdm_kernels.stf_forward.default, args)
        mu, lse, aux, dist = torch.ops.cdm_kernels.stf_forward(*args)
        assert dist.shape == ((4 * 30,) if keep else (0,))
        bargs = (torch.randn_like(mu), torch.randn_like(lse), x.detach(), sigma.detach(), ref, c, mu.detach(), aux,
                 dist, 7, "ieee", True, case.backend)
        torch.library.opcheck(torch.ops.cdm_kernels.stf_backward.default, bargs)
        x, sigma = x.detach(), sigma.detach()


@pytest.mark.parametrize("case", [p for p in CASES if p.values[0].device == "cpu" and p.values[0].backend == "cpu"]
                         + [p for p in CASES if p.values[0].device == "cuda" and p.values[0].backend != "reference"])
def test_torch_compile_forward_and_backward(case):
    x, ref = spread_case(4, 60, 10, 1.0, dtype=torch.float32)
    sigma = torch.tensor([0.5, 1.0, 2.0, 8.0])
    x, ref, sigma = case.to(x, ref, sigma)

    def loss(x, sigma, ref):
        mu, lse = stf_target(x, sigma, ref, return_lse=True, chunk_size=16, backend=case.backend)
        return ((mu - x) ** 2).sum() + lse.sum()

    compiled = torch.compile(loss, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    le, lc = loss(xe, sigma, ref), compiled(xc, sigma, ref)
    le.backward(), lc.backward()
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B", [2, 15, 16, 17])
def test_cpu_accumulator_layouts_either_side_of_their_switch(B):
    # The CPU kernel keeps its per-row sums (D, B) from 16 rows on and (B, D) below (BLAS's narrow
    # product is slow the other way): both layouts, with several chunks to rebase across and a
    # centre to shift by, give the float64 reference's mu and gradients of x, sigma and ref.
    x, ref = spread_case(B, 1000, 33, 0.7)
    x, ref = x + 3.0, ref + 3.0  # a non-zero centre
    sigma = torch.logspace(-1, 1, B, dtype=torch.float64)
    grad = torch.randn(B, 33, dtype=torch.float64)
    out = {}
    for backend in ("cpu", "reference"):
        leaves = [v.clone().requires_grad_() for v in (x, sigma, ref)]
        mu = stf_target(*leaves, chunk_size=300, backend=backend)
        out[backend] = (mu.detach(), *torch.autograd.grad((mu * grad).sum(), leaves))
    for name, got, want in zip(("mu", "dx", "dsigma", "dref"), out["cpu"], out["reference"]):
        assert rel(got, want) <= 1e-11, (name, rel(got, want))


# ---- memory: never B x n, beyond one chunk ----


_PEAK_SCRIPT = """
import sys, torch
import cdm_kernels
torch.set_num_threads(1)

def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

B, n, D, method = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
x, ref = torch.randn(B, D), torch.randn(n, D)
rn = (ref * ref).sum(1)
cdm_kernels.stf_target(x[:2], 1.0, ref[:300], chunk_size=256, backend="cpu" if method == "eager" else method)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets this process's resident high-water mark (VmHWM) to its current RSS
before = status_kib("VmRSS")
if method == "eager":
    mu = torch.softmax(x @ ref.T - 0.5 * rn, dim=1) @ ref
else:
    mu = cdm_kernels.stf_target(x, 1.0, ref, chunk_size=256, backend=method)
print((status_kib("VmHWM") - before) * 1024)
"""


def _peak_extra_bytes(B, n, D, method):
    """Growth of the resident high-water mark of a fresh process during one call.

    (Not ru_maxrss: Linux carries the forking parent's high-water mark across exec into it.)"""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(B), str(n), str(D), method],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_extra_memory_is_not_b_by_n(backend):
    B, n, D = 64, 262144, 8
    tile = B * n * 4  # one B x n float32 tensor: 64 MiB
    eager = _peak_extra_bytes(B, n, D, "eager")
    ours = _peak_extra_bytes(B, n, D, backend)
    assert eager >= tile, f"the probe must see the eager composition's B x n tensors ({eager} B)"
    assert ours < tile / 8, f"{backend}: peak extra memory {ours} B is of the order of B x n ({tile} B)"


def _saved_numels(fn) -> list[int]:
    """The sizes of the tensors autograd saves while `fn` runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32", "bf16"])
def test_keeping_the_distances_leaves_the_forward_bits(case, precision):
    # The kept distances are stored beside the forward's own work, which is the same with or without
    # them: a call that records a gradient returns what a no_grad call returns, to the bit.
    if precision not in cdm_kernels.registry.precisions("stf_target", case.backend, case.device):
        pytest.skip(f"{case} has no precision {precision!r}")
    x, sigma, ref = (t.to(case.device) for t in cluster_problem(13, 67, 300, seed=4))
    outs = []
    for keep in (False, True):
        xg = x.clone().requires_grad_()
        outs.append(stf_target(xg, sigma, ref, chunk_size=64, precision=precision, backend=case.backend,
                               return_lse=True, keep_distances=keep))
    with torch.no_grad():
        outs.append(stf_target(x, sigma, ref, chunk_size=64, precision=precision, backend=case.backend,
                               return_lse=True))
    for name, recomputed, kept, plain in zip(("mu", "lse"), *outs):
        assert torch.equal(recomputed, kept) and torch.equal(kept, plain), f"{precision}: keeping changes {name}"


@pytest.mark.parametrize("case", CASES)
def test_distances_are_kept_for_the_backward_only_within_the_streaming_memory(case):
    # keep_distances=None keeps the forward's B x n distances when B n <= (B + chunk) D: memory stays
    # O((B + chunk) D) whatever n is. True keeps them, False does not, and nothing is kept (or saved)
    # without a gradient to record.
    B, n, chunk = 4, 30, 7
    for D, kept_by_default in ((6, False), (40, True)):  # (4 + 7) 6 = 66 < 120 <= (4 + 7) 40 = 440
        x, ref = spread_case(B, n, D, 1.0, dtype=torch.float32)
        x, ref = case.to(x, ref)
        xg = x.clone().requires_grad_()
        for keep, kept in ((None, kept_by_default), (True, True), (False, False)):
            saved = _saved_numels(lambda: stf_target(xg, 1.0, ref, chunk_size=chunk, backend=case.backend,
                                                     keep_distances=keep))
            assert (B * n in saved) == kept, f"D = {D}, keep_distances={keep}: saved {saved}"
        assert _saved_numels(lambda: stf_target(x, 1.0, ref, chunk_size=chunk, backend=case.backend,
                                                keep_distances=True)) == []
    with pytest.raises(ValueError, match="keep_distances must be None, True or False, got 'yes'"):
        stf_target(x, 1.0, ref, keep_distances="yes")


def test_precomputed_ref_norms_are_deprecated_and_ignored():
    x, ref = spread_case(3, 64, 5, 1.0)
    with pytest.warns(DeprecationWarning, match="cdm_kernels.ref_sqnorm is deprecated"):
        rn = cdm_kernels.ref_sqnorm(ref)
    assert rn.shape == (64,)
    with pytest.warns(DeprecationWarning, match="ref_sqnorm is deprecated and ignored"):
        mu = stf_target(x, 1.0, ref, ref_sqnorm=rn * 0 + 123.0)  # wrong norms change nothing
    torch.testing.assert_close(mu, stf_target(x, 1.0, ref), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stf_target(x, 1.0, ref)  # no warning without it


# ---- empty, NaN, bad input ----


@pytest.mark.parametrize("case", CASES)
def test_empty_batch_returns_empty(case):
    x = torch.zeros(0, 3, 4, device=case.device, requires_grad=True)
    mu, lse, st = stf_target(x, torch.ones(0, device=case.device), torch.randn(5, 3, 4, device=case.device),
                             backend=case.backend, return_lse=True, return_stats=True)
    assert mu.shape == (0, 3, 4) and lse.shape == (0,) and st.n_eff.shape == (0,)
    mu.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("case", CASES)
def test_nan_in_x_stays_in_its_row(case):
    x, ref = spread_case(4, 100, 6, 1.0)
    x[2, 3] = math.nan
    got = run_stf(case, x, torch.ones(4, dtype=torch.float64), ref, chunk=30)
    assert torch.isnan(got["mu"][2]).all() and torch.isnan(got["lse"][2])
    keep = torch.tensor([0, 1, 3])
    assert _err(got["mu"][keep], judges.stf(x[keep], 1.0, ref)["mu"]) <= 1e-12


@pytest.mark.parametrize("case", CASES)
def test_nan_in_ref_makes_rows_nan_without_crashing(case):
    # Every mu_i is a weighted sum over every r_j, so a NaN reference affects every row, as NaN.
    x, ref = spread_case(3, 50, 4, 1.0)
    ref[17, 1] = math.nan
    got = run_stf(case, x, torch.ones(3, dtype=torch.float64), ref, chunk=8)
    assert torch.isnan(got["mu"]).all(dim=1).all() and torch.isnan(got["lse"]).all()


BAD_INPUTS = [
    (lambda x, s, r: (x, s, r[:, :3]), ValueError, r"ref must have shape \(n, \*S\) with the trailing shape"),
    (lambda x, s, r: (x, s[:2], r), ValueError, r"sigma must have shape \(B,\)"),
    (lambda x, s, r: (x, s.reshape(4, 1).expand(4, 2), r), ValueError, r"sigma must have shape"),
    (lambda x, s, r: (x, s * 0, r), ValueError, r"sigma must be positive and finite for every sample; sigma\[0\] = 0"),
    (lambda x, s, r: (x, torch.tensor([1.0, -1.0, 1.0, 1.0]), r), ValueError, r"sigma\[1\] = -1"),
    (lambda x, s, r: (x, torch.tensor([1.0, 1.0, math.nan, 1.0]), r), ValueError, r"sigma\[2\] = nan"),
    (lambda x, s, r: (x, torch.tensor([1.0, 1.0, 1.0, math.inf]), r), ValueError, r"sigma\[3\] = inf"),
    (lambda x, s, r: (x, -2.0, r), ValueError, r"sigma must be positive and finite, got -2.0"),
    (lambda x, s, r: (x, s, r[:0]), ValueError, r"ref is empty"),
    (lambda x, s, r: (x.long(), s, r), TypeError, r"x must have a floating dtype"),
    (lambda x, s, r: (x, s, r.int()), TypeError, r"ref must have a floating dtype"),
    (lambda x, s, r: (x, s.long(), r), TypeError, r"sigma must have a floating dtype"),
    (lambda x, s, r: (x, s, r.double()), TypeError, r"ref has dtype torch.float64 but x has dtype torch.float32"),
    (lambda x, s, r: (x, s, r.to("meta")), ValueError, r"ref is on meta but x is on cpu"),
    (lambda x, s, r: (x.numpy(), s, r), TypeError, r"x must be a torch.Tensor"),
]


@pytest.mark.parametrize("make,exc,match", BAD_INPUTS)
def test_bad_input_errors(make, exc, match):
    x, s, r = torch.randn(4, 6), torch.ones(4), torch.randn(10, 6)
    with pytest.raises(exc, match=match):
        stf_target(*make(x, s, r))


def test_bad_options_errors():
    x, s, r = torch.randn(4, 6), torch.ones(4), torch.randn(10, 6)
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of"):
        stf_target(x, s, r, backend="fast")
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int or None, got 0"):
        stf_target(x, s, r, chunk_size=0)
    with pytest.raises(ValueError, match=r"precision 'tf32' is not supported by the 'cpu' backend"):
        stf_target(x, s, r, backend="cpu", precision="tf32")
    with pytest.raises(ValueError, match=r"precision must be one of"):
        stf_target(x, s, r, precision="fp8")
    with pytest.raises(ValueError, match=r"ref_sqnorm must be a tensor of shape \(n,\) = \(10,\), got \(9,\)"):
        stf_target(x, s, r, ref_sqnorm=torch.ones(9))
    with pytest.raises(ValueError, match=r"stf_score does not take return_lse"):
        stf_score(x, s, r, return_lse=True)


def test_bf16_asks_for_bf16_tensor_cores(monkeypatch):
    # "bf16" multiplies on bf16 tensor cores (compute capability 8.0 on); an older GPU gets a clear
    # error before any launch instead of cuBLAS's. The check reads the device's capability only.
    from cdm_kernels.stf import check_chunk_and_precision

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ValueError, match=r"precision 'bf16' .* compute capability 8.0 or higher; cuda:0 has 7.5"):
        check_chunk_and_precision(None, "bf16", torch.float32, 4, 10, 6, cuda)
    assert check_chunk_and_precision(None, "tf32", torch.float32, 4, 10, 6, cuda) == 10
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert check_chunk_and_precision(None, "bf16", torch.float32, 4, 10, 6, cuda) == 10


# ---- regressions: float32 cancellations found in review ----


@pytest.mark.parametrize("case", CASES)
def test_float32_weights_of_nearly_one_hot_rows(case):
    # At sigma ~ 8 on image data one reference holds ~0.9999 of the weight; a float32 running sum
    # that starts at its e = 1 rounded every later e at 1's ulp (15% off, 10x eager's mu error).
    B, n, D = (130, 1000, 3072) if case.heavy_ok else (9, 120, 768)
    x, ref = peaked_case(B, n, D)
    _check_float32(case, x, 8.0, ref, chunk=256)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sigma", [0.002, 0.2, 8.0])
def test_float32_x_gradient_when_one_reference_holds_the_weight(case, sigma):
    # dL/dx = sum_j w (c - mg) r / sigma^2 with c = g . r_j (a product) and mg = g . mu (another):
    # for a one-hot row their rounding difference, divided by sigma^2 = 4e-6, was the whole result.
    B, n = (40, 500) if case.heavy_ok else (8, 100)
    x, ref = peaked_case(B, n, 3 * 16 * 16)
    g = torch.randn_like(x)
    j = judges.stf(x, sigma, ref, g, torch.zeros(B, dtype=torch.float64))
    got = run_stf(case, x.float(), torch.full((B,), sigma), ref.float(), chunk=128, grad_mu=g.float(),
                  grad_lse=torch.zeros(B))
    scale = g.abs().max().item() * ref.abs().max().item() * x.shape[1] ** 0.5 / sigma**2
    assert _err(got["gx"], j["gx"]) <= 1e-9 * scale + 1e-5 * j["gx"].abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("case", [p for p in CASES if p.values[0].device == "cuda"])
def test_many_references_and_chunks_on_the_gpu(case):
    x, sigma, ref = cluster_problem(7, 96, 300_000, seed=4)
    exact = judges.stf(x, sigma, ref)
    got = run_stf(case, x, sigma, ref, chunk=4096)
    budget = float32_budget(exact, x, sigma, ref, chunk=4096)
    assert_within_budget(got, exact, budget, str(case))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32", "bf16"])
@pytest.mark.parametrize("keep", [False, True])
def test_the_chunk_pipeline_gives_the_one_stream_bits_on_the_gpu(precision, keep, monkeypatch):
    # CDM_STF_OVERLAP=1 shifts the next chunk on a side stream beside this chunk's products (the
    # CUDA backend's chunk pipeline): the same arithmetic in the same order on each stream, so the
    # same bits as one stream, forward and every gradient, over many chunks, with the distances kept
    # for the backward or recomputed.
    x, sigma, ref = (t.cuda() for t in cluster_problem(37, 3072, 20_000, seed=5))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).cuda()

    def run():
        xr, sr, rr = (t.clone().requires_grad_() for t in (x, sigma, ref))
        mu, lse = stf_target(xr, sr, rr, chunk_size=1024, precision=precision, backend="cuda", return_lse=True,
                             keep_distances=keep)
        return (mu, lse, *torch.autograd.grad((mu * g).sum() + lse.sum(), (xr, sr, rr)))

    monkeypatch.delenv("CDM_STF_OVERLAP", raising=False)
    one_stream, again = run(), run()
    monkeypatch.setenv("CDM_STF_OVERLAP", "1")
    pipelined = run()
    assert all(torch.equal(a, b) for a, b in zip(one_stream, again)), "one stream does not repeat its own bits"
    for name, a, b in zip(("mu", "lse", "dL/dx", "dL/dsigma", "dL/dref"), one_stream, pipelined):
        assert torch.equal(a, b), f"{precision}: the chunk pipeline changes {name}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", [p for p in CASES if p.values[0].device == "cuda"])
@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
@pytest.mark.parametrize("user", ["new", "legacy"])
def test_the_users_tf32_setting_changes_no_bit_on_the_gpu(case, precision, user):
    # Each product runs in its mode's math whatever the user set: the same bits with torch's TF32 on
    # (by either API) as with it off, and the user's setting reads the same afterwards.
    x, sigma, ref = cluster_problem(37, 3072, 5000, seed=7)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))

    def run():
        xr, sr, rr = (t.clone().requires_grad_() for t in case.to(x, sigma, ref))
        mu, lse = stf_target(xr, sr, rr, chunk_size=1024, precision=precision, backend=case.backend, return_lse=True)
        return (mu, lse, *torch.autograd.grad((mu * case.to(g)[0]).sum() + lse.sum(), (xr, sr, rr)))

    m = torch.backends.cuda.matmul
    try:
        m.fp32_precision = "ieee"
        off = run()
        if user == "new":
            m.fp32_precision = "tf32"
            on = run()
            assert m.fp32_precision == "tf32"
        else:
            m.allow_tf32 = True
            on = run()
            assert m.allow_tf32 is True and m.fp32_precision == "tf32"
    finally:
        m.fp32_precision = "none"
    for name, a, b in zip(("mu", "lse", "dL/dx", "dL/dsigma", "dL/dref"), off, on):
        assert torch.equal(a, b), f"{case} {precision}: the user's TF32 setting changes {name}"


def test_aux_has_its_documented_columns():
    x, ref = spread_case(3, 20, 4, 1.0)
    s = torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64)
    mu, lse, aux, _ = torch.ops.cdm_kernels.stf_forward(x, s, ref, stf_reference.centre_of(ref), 7, "ieee", False,
                                                        "cpu")
    assert aux.shape == (3, AUX_COLS)
    j = judges.stf(x, s, ref)
    d = ((x[:, None] - ref[None]) ** 2).sum(-1)
    xn = ((x - stf_reference.centre_of(ref)) ** 2).sum(1)  # the row constant between d and delta
    torch.testing.assert_close(aux[:, 0], d.amin(1) - xn)  # m = min_j delta_ij
    torch.testing.assert_close(aux[:, 5], d.amin(1), rtol=1e-15, atol=0)  # d_min, exact
    torch.testing.assert_close(lse, aux[:, 1] - aux[:, 5] / (2 * s * s))  # log l - d_min / (2 sigma^2)
    torch.testing.assert_close(aux[:, 2], j["d_bar"])
    torch.testing.assert_close(aux[:, 3], j["n_eff"])
    torch.testing.assert_close(aux[:, 4], j["w_max"])


@pytest.mark.parametrize("backend", cdm_kernels.available_backends("stf_target", "cpu"))
def test_without_a_gradient_to_record_the_launcher_gives_the_ops_result(backend):
    # stf_target skips the op's Python dispatch when nothing needs a gradient (registry.plain_call):
    # the same bits as through the op, which a dispatch mode or a gradient to record still goes through.
    g = torch.Generator().manual_seed(5)
    x, ref = torch.randn(5, 3, 4, 4, generator=g), torch.randn(40, 3, 4, 4, generator=g) + 3.0
    sigma = torch.rand(5, generator=g) + 0.3
    with torch.no_grad():
        plain = stf_target(x, sigma, ref, return_lse=True, backend=backend)
    with RecordOps() as mode:
        via_op = stf_target(x, sigma, ref, return_lse=True, backend=backend)
    assert "cdm_kernels.stf_forward.default" in mode.ops
    assert torch.equal(plain[0], via_op[0]) and torch.equal(plain[1], via_op[1])
    xg = x.clone().requires_grad_()
    mu = stf_target(xg, sigma, ref, backend=backend)
    assert mu.grad_fn is not None and torch.equal(mu.detach(), plain[0])


def test_the_default_centre():
    # The mean of the first 64 references; on the CPU 0 where that mean is within their spread of the
    # origin (the CPU kernel then reads them without a shifted copy); on a GPU always the mean.
    g = torch.Generator().manual_seed(6)
    near, far = torch.randn(100, 12, generator=g), torch.randn(100, 12, generator=g) + 10.0
    assert torch.equal(stf_reference.centre_of(near), torch.zeros(12))
    torch.testing.assert_close(stf_reference.centre_of(far), far[:64].mean(0), rtol=0, atol=0)
    if torch.cuda.is_available():
        torch.testing.assert_close(stf_reference.centre_of(near.cuda()).cpu(), near[:64].mean(0))


def test_default_chunk_size_takes_one_chunk_rather_than_two_short_ones():
    from cdm_kernels.stf import default_chunk_size

    # The cap: 2048 references, fewer for a large batch (a (B, chunk) tile of at most 2^22 elements).
    assert default_chunk_size(512, 50000, 3072) == 2048
    assert default_chunk_size(64, 16384, 12288) == 2048
    assert default_chunk_size(4096, 50000, 3072) == 1024
    # Up to twice the cap when that makes the whole set one chunk and the tile stays in budget.
    assert default_chunk_size(64, 4096, 3072) == 4096
    assert default_chunk_size(512, 4096, 3072) == 4096
    assert default_chunk_size(64, 4097, 3072) == 2048
    assert default_chunk_size(4096, 2048, 10) == 1024  # 4096 x 2048 is over the tile's budget
    assert default_chunk_size(8, 100, 3) == 100
