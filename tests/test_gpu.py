"""The GPU backends of the stable target on a real GPU: `cuda` (csrc/cuda/stf.cu) and `triton`.

Every test here is marked `gpu` and is skipped (reported as skipped) on a machine without one; run
them with `pytest -m gpu tests/test_gpu.py`. Judge: the float64 direct formula
softmax_j(-||x_i - r_j||^2 / (2 sigma_i^2)) with autograd. Tolerance (FlashAttention's rule): every
output's (mu, lse, n_eff, w_max, d_bar, dL/dx, dL/dsigma, dL/dref) normwise error against the judge
is at most FACTOR times the error of the same matmul-form math done by PyTorch in float32 on the
same GPU (`stf_reference`, worst of three summation orders; `float32_budget`), plus 16 ulps: twice
for `cuda`, four times for `triton` (as in tests/test_triton_stf.py). The two backends are also held
to each other by PyTorch's own float32 noise (the largest difference between two of its three
computations), not by the sum of their errors against the judge. These checks also run on the CPU
in CI, with the host emulation of the CUDA kernels and the Triton interpreter in place of the GPU
(tests/test_cuda_emulation.py::test_gpu_suite_checks_pass_on_the_host, and ..._can_fail); there the
cuda emulation measured at most 1.5 x its budget.

Data (`problem`, tests/test_cuda_emulation.py's `spread_problem`): references in clusters whose
copies are perturbed at log-spaced scales, so that at every sigma in [0.002, 80] the weights spread
over several references (the construction of benchmarks/stf_precision_table.py); x = a centre +
sigma z. The earlier x = r_k + sigma z / sqrt(D) made ~90 % of the rows one-hot at D = 3072, where
any kernel returns r_k exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

import cdm_kernels
from cdm_kernels import stf_reference, stf_target
from cdm_kernels.stf import available_backends
from test_cuda_emulation import problem as peaked_problem
from test_cuda_emulation import spread_problem

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
EPS = torch.finfo(torch.float32).eps

# (B, D, n, chunk): one of everything; tile edges (64) crossed; D = 3073 and 12289; many chunks.
SHAPES = [
    (1, 1, 1, None),
    (3, 7, 5, 2),
    (65, 67, 257, 100),
    (17, 3073, 300, None),
    (4, 12289, 33, 8),
    (130, 3072, 1000, 256),
]


@pytest.fixture(autouse=True)
def _exact_float32():
    # The judge's float32 PyTorch products must be exact float32, not TF32.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _backend(name):
    if name not in available_backends(DEVICE):
        pytest.skip(f"backend {name!r} is not available on this GPU build ({cdm_kernels.extension_status()})")
    return name


def problem(B, D, n, dtype=torch.float32, sigma_lo=0.002, sigma_hi=80.0, device=None, seed=0, peaked=False):
    """tests/test_cuda_emulation.py's `spread_problem` (spread weights at every sigma, checked there on
    the CPU) or, with peaked=True, its `problem` (x next to one reference: the limits), on the GPU."""
    if peaked:
        x, sigma, ref = peaked_problem(B, D, n, dtype, sigma_lo, sigma_hi)
    else:
        x, sigma, ref = spread_problem(B, D, n, dtype, sigma_lo, sigma_hi, seed=seed)
    device = device or DEVICE
    return x.to(device), sigma.to(device), ref.to(device)


def judge(x, sigma, ref, grad_mu=None, grad_lse=None):
    """float64 direct formula in blocks of rows (no B x n x D tensor larger than ~64 MB)."""
    x = x.double().detach().requires_grad_(grad_mu is not None)
    sigma = sigma.double().detach().requires_grad_(grad_mu is not None)
    ref = ref.double().detach().requires_grad_(grad_mu is not None)
    rows = max(1, (8 << 20) // max(1, ref.shape[0] * ref.shape[1]))
    mus, lses, stats = [], [], []
    for i in range(0, x.shape[0], rows):
        d = ((x[i : i + rows, None, :] - ref[None]) ** 2).sum(-1)
        logit = -d / (2 * sigma[i : i + rows, None] ** 2)
        w = torch.softmax(logit, 1)
        mus.append(w @ ref)
        lses.append(torch.logsumexp(logit, 1))
        stats.append(torch.stack((1 / (w * w).sum(1), w.amax(1), (w * d).sum(1)), 1).detach())
    mu, lse = torch.cat(mus), torch.cat(lses)
    n_eff, w_max, d_bar = torch.cat(stats).unbind(1)
    out = {"mu": mu.detach(), "lse": lse.detach(), "n_eff": n_eff, "w_max": w_max, "d_bar": d_bar}
    if grad_mu is not None:
        g = torch.autograd.grad((mu * grad_mu.double()).sum() + (lse * grad_lse.double()).sum(), (x, sigma, ref))
        out.update(gx=g[0], gs=g[1], gr=g[2])
    return out


def maxerr(a, b):
    return (a.double() - b.double()).abs().max().item()


def run_backend(backend, x, sigma, ref, chunk, grad_mu=None, grad_lse=None):
    """The public op: mu, lse, the three weight statistics and, with grad_mu, dL/d(x, sigma, ref)."""
    xs, ss, rs = (t.clone().requires_grad_(grad_mu is not None) for t in (x, sigma, ref))
    mu, lse, st = stf_target(xs, ss, rs, return_lse=True, return_stats=True, chunk_size=chunk, backend=backend)
    out = {"mu": mu, "lse": lse, "n_eff": st.n_eff, "w_max": st.w_max, "d_bar": st.d_bar}
    if grad_mu is not None:
        g = torch.autograd.grad((mu * grad_mu).sum() + (lse * grad_lse).sum(), (xs, ss, rs))
        out.update(gx=g[0], gs=g[1], gr=g[2])
    return {k: v.detach() for k, v in out.items()}


def run_torch_float32(x, sigma, ref, chunk, grad_mu=None, grad_lse=None, perm=None):
    """The same math in PyTorch float32 (`stf_reference`, matmul form, streamed), optionally with the
    feature axis permuted: another, equally valid float32 summation order."""
    if perm is not None:
        x, ref = x[:, perm], ref[:, perm]
        grad_mu = grad_mu[:, perm] if grad_mu is not None else None
    rn = (ref * ref).sum(1)
    mu, lse, aux = stf_reference.stf_forward(x, sigma, ref, rn, chunk)
    out = {"mu": mu, "lse": lse, "n_eff": aux[:, stf_reference.AUX_NEFF], "w_max": aux[:, stf_reference.AUX_WMAX],
           "d_bar": aux[:, stf_reference.AUX_DBAR]}
    if grad_mu is not None:
        gx, gs, gr = stf_reference.stf_backward(grad_mu, grad_lse, x, sigma, ref, rn, mu, aux, chunk, True)
        out.update(gx=gx, gs=gs, gr=gr)
    if perm is not None:
        inv = torch.argsort(perm)
        out.update({k: out[k][:, inv] for k in ("mu", "gx", "gr") if k in out})
    return out


def rel(a, b):
    """Normwise relative error of a against b."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


FLOOR = 16 * EPS  # for quantities the float32 math gets exactly (n = 1: mu = r)
# The budget factor per backend. cuda: FlashAttention's 2. triton: 4, the factor of
# tests/test_triton_stf.py: its float32 sums run in tile order (||x||^2 over D in BLOCK_D slices)
# where PyTorch sums pairwise, which measured up to 3.5 x PyTorch's lse error at D = 12289 under the
# interpreter. The two backends must agree within FACTOR["triton"] x the largest difference between
# two of the PyTorch computations.
FACTOR = {"cuda": 2, "triton": 4}


def float32_budget(x, sigma, ref, chunk, j, grad_mu=None, grad_lse=None):
    """Per quantity, the worst normwise error against the judge of three float32 PyTorch computations
    of the same math (`stf_reference` with the test's chunk, and in one chunk with the features in
    two permuted orders), and the largest normwise difference between two of them (the float32
    noise between two valid computations). One realisation of rounding noise is not a budget.
    lse = zlse - ||x||^2 / (2 sigma^2) and d_bar = ||x||^2 - 2 sigma^2 z_bar are resolved only to a
    float32 ulp of their terms (~||x||^2 / sigma^2 and ~||x||^2, math.md: the matmul form), and
    dL/dsigma carries g_lse d_bar / sigma^3: their budgets are at least that representation error."""
    n, D = ref.shape
    g = torch.Generator().manual_seed(1)
    outs = [run_torch_float32(x, sigma, ref, chunk, grad_mu, grad_lse)]
    for _ in range(2):
        perm = torch.randperm(D, generator=g).to(x.device)
        outs.append(run_torch_float32(x, sigma, ref, n, grad_mu, grad_lse, perm))
    budget = {k: max(rel(o[k], j[k]) for o in outs) for k in outs[0]}
    spread = {k: max(rel(a[k], b[k]) for a in outs for b in outs if a is not b) for k in outs[0]}
    x64, s64 = x.double(), sigma.double()
    xn, rn_max = (x64 * x64).sum(1), (ref.double() ** 2).sum(1).max()
    terms = {"lse": 1 + j["lse"].abs() + xn / (2 * s64 * s64), "d_bar": xn + rn_max}
    if grad_mu is not None:
        terms["gs"] = (xn + rn_max) * grad_lse.double().abs() / s64**3
    for k, t in terms.items():
        budget[k] = max(budget[k], rel(j[k] + EPS * t, j[k]))
        spread[k] = max(spread[k], budget[k])
    return budget, spread


def assert_within(name, got, want, budget, factor, what="the float64 judge"):
    """FlashAttention's rule: normwise error <= factor x the float32 budget + FLOOR."""
    err = rel(got, want)
    assert err <= factor * budget + FLOOR, (
        f"{name} against {what}: relative error {err:.3e} > {factor} x {budget:.3e} (the same math in "
        f"PyTorch float32) + {FLOOR:.1e}; worst element at {(got.double() - want.double()).abs().argmax().item()}"
    )


def test_cuda_backend_is_registered_and_preferred():
    assert cdm_kernels.has_cuda_kernels(), cdm_kernels.extension_status()
    assert available_backends("cuda")[0] == "cuda"
    assert cdm_kernels.resolve_backend("cuda") == "cuda"


def test_auto_takes_triton_for_tensor_core_modes():
    # "cuda" is ieee-only; "auto" must skip it for "tf32" / "bf16" instead of failing.
    _backend("triton")
    x, sigma, ref = problem(4, 64, 40)
    for precision in ("tf32", "bf16"):
        assert cdm_kernels.resolve_backend("cuda", "auto", precision) == "triton"
        mu = stf_target(x, sigma, ref, precision=precision)
        assert maxerr(mu, stf_target(x, sigma, ref, backend="triton", precision=precision)) == 0


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("B,D,n,chunk", SHAPES)
def test_forward_against_float64_judge(backend, B, D, n, chunk):
    _backend(backend)
    x, sigma, ref = problem(B, D, n)
    got = run_backend(backend, x, sigma, ref, chunk)
    j = judge(x, sigma, ref)
    budget, _ = float32_budget(x, sigma, ref, chunk or n, j)
    for name, value in got.items():
        assert_within(name, value, j[name], budget[name], FACTOR[backend])


@pytest.mark.parametrize("B,D,n,chunk", SHAPES)
def test_cuda_float64_is_exact(B, D, n, chunk):
    _backend("cuda")
    x, sigma, ref = problem(B, D, n, torch.float64, sigma_lo=0.05)
    mu, lse = stf_target(x, sigma, ref, return_lse=True, chunk_size=chunk, backend="cuda")
    j = judge(x, sigma, ref)
    assert maxerr(mu, j["mu"]) < 1e-10 * (1 + D)
    # lse cancels terms of ~||x||^2 / (2 sigma^2), each a D-term dot product: a few sqrt(D) ulps of them.
    terms = 1 + j["lse"].abs() + (x * x).sum(1) / (2 * sigma * sigma)
    assert ((lse - j["lse"]).abs() <= (8 + 2 * math.sqrt(D)) * torch.finfo(torch.float64).eps * terms).all()


@pytest.mark.parametrize("B,D,n,chunk", SHAPES[:5])
def test_cuda_and_triton_agree(B, D, n, chunk):
    """Forward (mu, lse, the weight statistics) and backward (x, sigma, ref) of both backends: each
    within 2 x the float32 budget of the judge, and within 2 x that budget of each other."""
    _backend("cuda"), _backend("triton")
    x, sigma, ref = problem(B, D, n, sigma_lo=0.002, sigma_hi=80.0, seed=1)
    g = torch.Generator().manual_seed(2)
    grad_mu = torch.randn(x.shape, generator=g).to(x.device)
    grad_lse = torch.randn(x.shape[0], generator=g).to(x.device)
    c = run_backend("cuda", x, sigma, ref, chunk, grad_mu, grad_lse)
    t = run_backend("triton", x, sigma, ref, chunk, grad_mu, grad_lse)
    j = judge(x, sigma, ref, grad_mu, grad_lse)
    budget, spread = float32_budget(x, sigma, ref, chunk or n, j, grad_mu, grad_lse)
    for name in c:
        assert_within(name, c[name], j[name], budget[name], FACTOR["cuda"], "the judge (cuda)")
        assert_within(name, t[name], j[name], budget[name], FACTOR["triton"], "the judge (triton)")
        # Not the triangle inequality: the bound is PyTorch's float32 noise, not the two errors.
        assert_within(name, c[name], t[name], spread[name], FACTOR["triton"], "triton (cuda)")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("B,D,n,chunk", SHAPES[:5])
def test_gradients_against_float64_judge(backend, B, D, n, chunk):
    _backend(backend)
    x, sigma, ref = problem(B, D, n)
    g = torch.Generator().manual_seed(3)
    grad_mu = torch.randn(x.shape, generator=g).to(x.device)
    grad_lse = torch.randn(x.shape[0], generator=g).to(x.device)
    got = run_backend(backend, x, sigma, ref, chunk, grad_mu, grad_lse)
    j = judge(x, sigma, ref, grad_mu, grad_lse)
    budget, _ = float32_budget(x, sigma, ref, chunk or n, j, grad_mu, grad_lse)
    for name in ("gx", "gs", "gr"):
        assert_within(name, got[name], j[name], budget[name], FACTOR[backend])


def test_cuda_float64_gradcheck():
    _backend("cuda")
    x, sigma, ref = problem(3, 70, 67, torch.float64, sigma_lo=0.3, sigma_hi=3.0)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, sigma, ref))

    def f(a, s, r):
        mu, lse = stf_target(a, s, r, return_lse=True, chunk_size=16, backend="cuda")
        return mu, lse

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_cuda_limits():
    _backend("cuda")
    x, _, ref = problem(8, 300, 500, torch.float32, peaked=True)
    nearest = ref[torch.cdist(x.double(), ref.double()).argmin(1)]
    mu = stf_target(x, 1e-4, ref, backend="cuda")
    assert torch.equal(mu, nearest)
    mu = stf_target(x, 1e6, ref, backend="cuda")
    assert maxerr(mu, ref.double().mean(0).expand(8, -1)) < 1e-5


def test_many_references_and_chunks():
    # n in the hundreds of thousands: many chunks, each with P parts per row, merged exactly.
    _backend("cuda")
    x, sigma, ref = problem(32, 64, 300_000, sigma_lo=0.5, sigma_hi=5.0, peaked=True)
    mu = stf_target(x, sigma, ref, backend="cuda")
    mu_chunked = stf_target(x, sigma, ref, chunk_size=7777, backend="cuda")
    j = judge(x, sigma, ref)
    assert maxerr(mu, j["mu"]) < 1e-5 and maxerr(mu_chunked, j["mu"]) < 1e-5


def test_cuda_refuses_tensor_core_precisions_and_mixed_devices():
    _backend("cuda")
    x, sigma, ref = problem(2, 8, 4)
    with pytest.raises(ValueError, match="precision 'tf32' is not supported by the 'cuda' backend"):
        stf_target(x, sigma, ref, backend="cuda", precision="tf32")
    rn = (ref * ref).sum(1)
    with pytest.raises(RuntimeError, match="ref_sqnorm must be a CUDA tensor"):
        torch.ops.cdm_kernels_C.stf_forward_cuda(x, sigma, ref, rn.cpu(), 4)
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="all tensors must be on one GPU"):
            torch.ops.cdm_kernels_C.stf_forward_cuda(x, sigma, ref.to("cuda:1"), rn, 4)


def test_second_gpu_and_current_stream():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _backend("cuda")
    x, sigma, ref = problem(5, 40, 50, device="cuda:1", peaked=True)
    stream = torch.cuda.Stream(device="cuda:1")
    with torch.cuda.stream(stream):
        mu = stf_target(x, sigma, ref, backend="cuda")
    stream.synchronize()
    assert mu.device == x.device
    assert maxerr(mu, judge(x, sigma, ref)["mu"]) < 1e-5


def test_opcheck():
    _backend("cuda")
    x, sigma, ref = problem(5, 33, 70)
    rn = (ref * ref).sum(1)
    xs = x.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.cdm_kernels.stf_forward.default, (xs, sigma, ref, rn, 16, "cuda", "ieee"))


def test_torch_compile():
    _backend("cuda")
    x, sigma, ref = problem(6, 50, 90)

    def f(a, s, r):
        return stf_target(a, s, r, backend="cuda", chunk_size=32)

    compiled = torch.compile(f, fullgraph=True)
    # Inductor may sum ||r_j||^2 in another order than eager: equal up to float32 rounding.
    assert maxerr(compiled(x, sigma, ref), f(x, sigma, ref)) <= 1e-5
