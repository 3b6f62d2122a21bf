"""The CUDA stable-target kernels, executed on the host.

There is no GPU here. tests/cuda_emulator.cpp runs the launch sequences of csrc/cuda/stf.cu with
every thread of csrc/cuda/stf_kernels.h executed on the CPU (per-thread kernels index by index, the
tiled product block by block and phase by phase between its barriers), over the shared arithmetic
of csrc/stf_math.h. These tests compile it with the system C++ compiler and compare it with an
independent float64 judge: the direct formula softmax_j(-||x_i - r_j||^2 / (2 sigma_i^2)) with
PyTorch autograd. Only the __global__ wrappers and the <<<...>>> launches are not executed.

Data: `spread_problem` (weights spread over several references at every sigma in [0.002, 80]) for
the accuracy tests, and `problem` (x next to one reference, mostly one-hot rows) for the limits, the
exact small-sigma cancellation and, alongside the spread data, the float32 comparisons.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch

from cdm_kernels import stf_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")

# (B, D, n, chunk): one of everything; B and D across the 64-wide tiles; several chunks and several
# parts per row (P = 5 at c = 130); D = 3073 and 12289 (many K slices, many column tiles). On a
# 132-SM plan, the logits products of D = 3073 / 12289 split K in 22 / 86 ranges and the
# accumulate product of (70, 67, 700, 300) in 2 (its last chunk of 100 in 1).
SHAPES = [
    (1, 1, 1, 1),
    (3, 7, 5, 2),
    (70, 67, 130, 130),
    (70, 67, 130, 48),
    (70, 67, 700, 300),
    (5, 3073, 40, 17),
    (2, 12289, 9, 4),
]
SM_COUNTS = [132, 1]  # an H100 (split-K on small problems) and one SM (2 blocks fill it: few splits)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (g++/c++) to build the host emulation of the CUDA kernels")
    out = tmp_path_factory.mktemp("cuda_emulator") / "libcdm_cuda_emu.so"
    cmd = [CXX, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror",
           "-I", os.path.join(ROOT, "csrc"), os.path.join(ROOT, "tests", "cuda_emulator.cpp"), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(out))
    for name in ("cdm_emu_parts", "cdm_emu_forward_f32", "cdm_emu_forward_f64", "cdm_emu_backward_f32",
                 "cdm_emu_backward_f64", "cdm_emu_logits_splits", "cdm_emu_accumulate_splits"):
        getattr(lib, name).restype = ctypes.c_int64
    lib.cdm_emu_set_sm_count(ctypes.c_int64(132))
    return lib


@pytest.fixture(params=SM_COUNTS, ids=lambda s: f"sm{s}")
def emu_sm(emu, request):
    """The emulator with plans made for `request.param` multiprocessors."""
    emu.cdm_emu_set_sm_count(ctypes.c_int64(request.param))
    yield emu
    emu.cdm_emu_set_sm_count(ctypes.c_int64(132))


def _p(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def emu_forward(lib, x, sigma, ref, chunk):
    B, D = x.shape
    n = ref.shape[0]
    rn = (ref * ref).sum(1)
    mu, lse, aux = torch.empty_like(x), x.new_empty(B), x.new_empty(B, 4)
    fn = lib.cdm_emu_forward_f64 if x.dtype == torch.float64 else lib.cdm_emu_forward_f32
    i64 = ctypes.c_int64
    fn(i64(B), i64(D), i64(n), i64(chunk), _p(x), _p(sigma), _p(ref), _p(rn), _p(mu), _p(lse), _p(aux))
    return mu, lse, aux


def emu_backward(lib, grad_mu, grad_lse, x, sigma, ref, mu, aux, chunk, ref_grad=True):
    B, D = x.shape
    n = ref.shape[0]
    rn = (ref * ref).sum(1)
    gx, gs = torch.empty_like(x), torch.empty_like(sigma)
    gr = torch.empty_like(ref) if ref_grad else None
    fn = lib.cdm_emu_backward_f64 if x.dtype == torch.float64 else lib.cdm_emu_backward_f32
    i64 = ctypes.c_int64
    fn(i64(B), i64(D), i64(n), i64(chunk), _p(grad_mu), _p(grad_lse), _p(x), _p(sigma), _p(ref), _p(rn),
       _p(mu), _p(aux), _p(gx), _p(gs), _p(gr))
    return gx, gs, gr


def judge(x, sigma, ref, grad_mu=None, grad_lse=None):
    """float64 direct formula (no matmul form, no streaming) and its autograd gradients."""
    x = x.double().detach().requires_grad_(True)
    sigma = sigma.double().detach().requires_grad_(True)
    ref = ref.double().detach().requires_grad_(True)
    d = ((x[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    logit = -d / (2 * sigma[:, None] ** 2)
    w = torch.softmax(logit, dim=1)
    mu = w @ ref
    lse = torch.logsumexp(logit, dim=1)
    out = {"mu": mu.detach(), "lse": lse.detach(), "dbar": (w * d).sum(1).detach(),
           "neff": (1 / (w * w).sum(1)).detach(), "wmax": w.amax(1).detach()}
    if grad_mu is not None:
        gx, gs, gr = torch.autograd.grad((mu * grad_mu.double()).sum() + (lse * grad_lse.double()).sum(),
                                         (x, sigma, ref))
        out.update(gx=gx, gs=gs, gr=gr)
    return out


def problem(B, D, n, dtype, sigma_lo=0.002, sigma_hi=80.0):
    """Peaked weights: references in [-1, 1]; each x near one reference, x = r_k + sigma z / sqrt(D),
    sigma log-uniform. At D = 3072 about 90 % of the rows are one-hot (mu = r_k exactly, whatever
    the arithmetic): the regime of the limits and of the exact small-sigma cancellation, not a
    test of accuracy on its own (`spread_problem` is)."""
    ref = torch.rand(n, D, dtype=torch.float64) * 2 - 1
    sigma = torch.exp(torch.empty(B, dtype=torch.float64).uniform_(math.log(sigma_lo), math.log(sigma_hi)))
    x = ref[torch.randint(0, n, (B,))] + sigma[:, None] * torch.randn(B, D, dtype=torch.float64) / math.sqrt(D)
    return x.to(dtype), sigma.to(dtype), ref.to(dtype)


def spread_problem(B, D, n, dtype=torch.float32, sigma_lo=0.002, sigma_hi=80.0, *, seed=0):
    """Spread weights at every sigma (the construction of benchmarks/stf_precision_table.py):
    clusters of at most 32 references (sizes within one of each other), a centre in [-1, 1]^D and
    copies moved by eps / 3 per coordinate, eps log-spaced from 1e-5 to 3, so that the copies within
    about sigma sqrt(18 / D) of the centre share the weight at that sigma; x_i = a centre + sigma_i z,
    sigma_i log-uniform in [sigma_lo, sigma_hi]. Also used by tests/test_gpu.py."""
    g = torch.Generator().manual_seed(seed)
    C = -(-n // 32)
    per = -(-n // C)
    centres = torch.rand(C, D, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-5, 0.5, per - 1, dtype=torch.float64)])
    moves = eps[None, :, None] * torch.randn(C, per, D, generator=g, dtype=torch.float64) / 3
    ref = (centres[:, None, :] + moves).reshape(C * per, D)[:n]
    u = torch.rand(B, generator=g, dtype=torch.float64)
    sigma = torch.exp(math.log(sigma_lo) + u * (math.log(sigma_hi) - math.log(sigma_lo)))
    k = torch.randint(0, C, (B,), generator=g)
    x = centres[k] + sigma[:, None] * torch.randn(B, D, generator=g, dtype=torch.float64)
    return x.to(dtype), sigma.to(dtype), ref.to(dtype)


PROBLEMS = {"peaked": problem, "spread": spread_problem}


def maxerr(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_emulation_builds_and_splits_rows_into_parts(emu):
    # The shapes above must exercise several parts per row (P > 1) and several chunks, or the
    # part merge and the chunk merge would go untested.
    i64 = ctypes.c_int64
    assert emu.cdm_emu_parts(i64(70), i64(67), i64(130), i64(130)) == 5
    assert emu.cdm_emu_parts(i64(1), i64(1), i64(1), i64(1)) == 1
    assert emu.cdm_emu_parts(i64(70), i64(67), i64(130), i64(48)) == 2


def test_emulation_splits_products_on_a_large_gpu_only(emu):
    # Split-K must be exercised by SHAPES on the 132-SM plan; one SM needs only 2 blocks.
    i64 = ctypes.c_int64
    assert emu.cdm_emu_logits_splits(i64(5), i64(3073), i64(40), i64(17)) == 22
    assert emu.cdm_emu_logits_splits(i64(2), i64(12289), i64(9), i64(4)) == 86
    assert emu.cdm_emu_accumulate_splits(i64(70), i64(67), i64(700), i64(300)) == 2
    assert emu.cdm_emu_logits_splits(i64(512), i64(3072), i64(50000), i64(4096)) == 1  # 512 tiles: enough
    emu.cdm_emu_set_sm_count(i64(1))
    try:
        assert emu.cdm_emu_logits_splits(i64(5), i64(3073), i64(40), i64(17)) == 2
        assert emu.cdm_emu_accumulate_splits(i64(70), i64(67), i64(700), i64(300)) == 1
    finally:
        emu.cdm_emu_set_sm_count(i64(132))


def test_spread_problem_spreads_the_weights():
    # The accuracy tests' data must not make the kernels' job trivial (one-hot rows give mu = r_k
    # exactly): nearly every row of every shape shares its weight, at every sigma in [0.002, 80].
    for B, D, n, _ in SHAPES[2:]:
        x, sigma, ref = spread_problem(B, D, n, torch.float64)
        j = judge(x, sigma, ref)
        assert (j["wmax"] < 0.99).double().mean() >= 0.9, (B, D, n, j["wmax"])
        assert j["neff"].median() >= 4, (B, D, n, j["neff"])
    x, sigma, ref = spread_problem(64, 3072, 256, torch.float64)
    j = judge(x, sigma, ref)
    assert (j["wmax"] < 0.99).all() and j["neff"].min() >= 2, (sigma, j["neff"])


@pytest.mark.parametrize("B,D,n,chunk", SHAPES)
def test_forward_float64_matches_judge(emu_sm, B, D, n, chunk):
    x, sigma, ref = spread_problem(B, D, n, torch.float64, sigma_lo=0.05)
    mu, lse, aux = emu_forward(emu_sm, x, sigma, ref, chunk)
    j = judge(x, sigma, ref)
    scale = 1e-10 * (1 + D)
    assert maxerr(mu, j["mu"]) < scale
    assert maxerr(lse, j["lse"]) / (1 + j["lse"].abs().max().item()) < scale
    assert maxerr(aux[:, stf_reference.AUX_NEFF], j["neff"]) / n < scale
    assert maxerr(aux[:, stf_reference.AUX_WMAX], j["wmax"]) < scale
    assert maxerr(aux[:, stf_reference.AUX_DBAR], j["dbar"]) / (1 + j["dbar"].abs().max().item()) < scale


@pytest.mark.parametrize("kind", PROBLEMS)
@pytest.mark.parametrize("B,D,n,chunk", SHAPES)
def test_forward_float32_within_twice_torch_float32_error(emu, B, D, n, chunk, kind):
    # FlashAttention's rule: the kernel's error against float64 is at most twice that of the same
    # math (the matmul form, streamed) done by PyTorch in float32, over sigma in [0.002, 80].
    x, sigma, ref = PROBLEMS[kind](B, D, n, torch.float32)
    mu, lse, _ = emu_forward(emu, x, sigma, ref, chunk)
    j = judge(x, sigma, ref)
    mu_t, lse_t, _ = stf_reference.stf_forward(x, sigma, ref, (ref * ref).sum(1), chunk)
    floor = 1e-6
    assert maxerr(mu, j["mu"]) <= 2 * maxerr(mu_t, j["mu"]) + floor
    # lse = zlse - ||x||^2 / (2 sigma^2) cancels two terms of ~1e8 at sigma = 0.002: in float32 it is
    # accurate relative to those terms (as for PyTorch), not to lse itself.
    x64, s64 = x.double(), sigma.double()
    terms = 1 + j["lse"].abs() + (x64 * x64).sum(1) / (2 * s64 * s64)
    eps = torch.finfo(torch.float32).eps
    err, err_t = (lse.double() - j["lse"]).abs(), (lse_t.double() - j["lse"]).abs()
    assert (err <= 2 * err_t + 8 * eps * terms).all(), (err, err_t, terms)


@pytest.mark.parametrize("B,D,n,chunk", SHAPES)
@pytest.mark.parametrize("ref_grad", [True, False])
def test_backward_float64_matches_autograd_judge(emu_sm, B, D, n, chunk, ref_grad):
    x, sigma, ref = spread_problem(B, D, n, torch.float64, sigma_lo=0.05, sigma_hi=20.0)
    grad_mu, grad_lse = torch.randn(B, D, dtype=torch.float64), torch.randn(B, dtype=torch.float64)
    mu, _, aux = emu_forward(emu_sm, x, sigma, ref, chunk)
    gx, gs, gr = emu_backward(emu_sm, grad_mu, grad_lse, x, sigma, ref, mu, aux, chunk, ref_grad)
    j = judge(x, sigma, ref, grad_mu, grad_lse)
    for got, want in ((gx, j["gx"]), (gs, j["gs"])) + (((gr, j["gr"]),) if ref_grad else ()):
        assert maxerr(got, want) <= 1e-8 * (1 + want.abs().max().item()), (got, want)


@pytest.mark.parametrize("kind", PROBLEMS)
@pytest.mark.parametrize("B,D,n,chunk", SHAPES[1:6])
def test_backward_float32_within_twice_torch_float32_error(emu, B, D, n, chunk, kind):
    # Spread data over the whole range of sigma; the peaked data's one-hot rows at small sigma are
    # test_small_sigma_x_gradient_cancels_exactly's case.
    lo, hi = (0.002, 80.0) if kind == "spread" else (0.05, 20.0)
    x, sigma, ref = PROBLEMS[kind](B, D, n, torch.float32, sigma_lo=lo, sigma_hi=hi)
    grad_mu, grad_lse = torch.randn(B, D), torch.randn(B)
    rn = (ref * ref).sum(1)
    # Each backward gets its own forward's (mu, aux): w = exp(z - zlse) with z ~ 1e5 at small sigma
    # is only consistent when z is recomputed by the same products that produced zlse.
    mu, _, aux = emu_forward(emu, x, sigma, ref, chunk)
    gx, gs, gr = emu_backward(emu, grad_mu, grad_lse, x, sigma, ref, mu, aux, chunk)
    mu_t, _, aux_t = stf_reference.stf_forward(x, sigma, ref, rn, chunk)
    tx, ts, tr = stf_reference.stf_backward(grad_mu, grad_lse, x, sigma, ref, rn, mu_t, aux_t, chunk, True)
    j = judge(x, sigma, ref, grad_mu, grad_lse)
    for got, torch32, want in ((gx, tx, j["gx"]), (gr, tr, j["gr"])):
        floor = 1e-5 * (1 + want.abs().max().item())
        assert maxerr(got, want) <= 2 * maxerr(torch32, want) + floor
    # dL/dsigma carries g_lse d_bar / sigma^3, and d = ||x||^2 - 2 sigma^2 z recovers a distance of
    # ~sigma^2 from terms of ~||x||^2 + ||r||^2 (math.md, the matmul form): per row, its float32
    # error is a few ulps of those terms times |g_lse| / sigma^3, for PyTorch as for the kernel.
    eps = torch.finfo(torch.float32).eps
    x64, s64 = x.double(), sigma.double()
    terms = (x64 * x64).sum(1) + rn.double().max()
    err, err_t = (gs.double() - j["gs"]).abs(), (ts.double() - j["gs"]).abs()
    tol = 2 * err_t + 8 * eps * terms * grad_lse.double().abs() / s64**3 + 1e-5 * (1 + j["gs"].abs())
    assert (err <= tol).all(), (err, err_t, tol)


def test_limits_small_and_large_sigma(emu):
    # sigma -> 0: the nearest reference; sigma -> infinity: the plain mean of the references.
    x, _, ref = problem(6, 33, 70, torch.float64)
    nearest = ref[torch.cdist(x, ref).argmin(1)]
    mu, _, aux = emu_forward(emu, x, torch.full((6,), 1e-4, dtype=torch.float64), ref, 16)
    assert maxerr(mu, nearest) < 1e-12
    assert maxerr(aux[:, stf_reference.AUX_WMAX], torch.ones(6)) < 1e-12
    mu, _, aux = emu_forward(emu, x, torch.full((6,), 1e7, dtype=torch.float64), ref, 16)
    assert maxerr(mu, ref.mean(0).expand(6, -1)) < 1e-8
    assert maxerr(aux[:, stf_reference.AUX_NEFF], torch.full((6,), 70.0)) < 1e-6


def test_chunking_and_permutation_invariance(emu):
    x, sigma, ref = problem(9, 70, 100, torch.float64, sigma_lo=0.05)
    base = emu_forward(emu, x, sigma, ref, 100)
    perm = torch.randperm(100)
    for chunk, r in ((1, ref), (33, ref), (100, ref[perm]), (7, ref[perm])):
        for got, want in zip(emu_forward(emu, x, sigma, r, chunk), base):
            assert maxerr(got, want) <= 1e-12 * (1 + want.abs().max().item())


def test_nan_row_stays_nan_and_other_rows_are_untouched(emu):
    x, sigma, ref = problem(4, 20, 50, torch.float64, sigma_lo=0.1)
    x[2, 5] = float("nan")
    mu, lse, _ = emu_forward(emu, x, sigma, ref, 16)
    assert torch.isnan(mu[2]).all() and torch.isnan(lse[2])
    keep = [0, 1, 3]
    j = judge(x[keep], sigma[keep], ref)
    assert maxerr(mu[keep], j["mu"]) < 1e-10


def test_small_sigma_x_gradient_cancels_exactly(emu_sm):
    emu = emu_sm
    # At sigma = 0.002 each x has one reference of weight 1, where dL/dx_i = g_lse (mu - x) / sigma^2
    # and the covariance term sum_j w (c - mg) r_j / sigma^2 vanishes. The kernel computes mu . g as
    # its product computes g . r_j (gemm_dot), so c - mg is exactly 0 there; one ulp of c (~50)
    # would add ~1 to dL/dx here.
    x, _, ref = problem(8, 3073, 24, torch.float32)
    sigma = torch.full((8,), 0.002)
    x = (ref[:8].double() + 0.002 * torch.randn(8, 3073, dtype=torch.float64) / math.sqrt(3073)).float()
    grad_mu, grad_lse = torch.randn(8, 3073), torch.randn(8)
    mu, _, aux = emu_forward(emu, x, sigma, ref, 10)
    assert torch.equal(mu, ref[:8])  # one-hot weights: the accumulator is the reference itself
    gx, _, _ = emu_backward(emu, grad_mu, grad_lse, x, sigma, ref, mu, aux, 10, ref_grad=False)
    want = judge(x, sigma, ref, grad_mu, grad_lse)["gx"]
    # grad_x(px, mu, x, g_lse, 1/sigma^2) = (px + g_lse (mu - x)) / sigma^2 with px == 0 exactly:
    assert torch.equal(gx, (0 + grad_lse[:, None] * (mu - x)) * (1 / (sigma * sigma))[:, None])
    assert maxerr(gx, want) <= 1e-6 * want.abs().max().item()


# ----------------------------------------------------------------------------------------------
# tests/test_gpu.py's checks, run here: this emulation stands in for the cuda backend and the
# Triton interpreter for the GPU's triton backend, so the comparisons a GPU user runs are known to
# pass on the kernels' arithmetic and known to be able to fail.
# ----------------------------------------------------------------------------------------------


def _host_gpu_suite(emu, monkeypatch, corrupt_mu=1.0):
    import test_gpu

    from cdm_kernels.stf import available_backends

    if "triton" not in available_backends("cpu"):
        pytest.skip("the Triton interpreter is not registered for CPU tensors (TRITON_INTERPRET unset)")
    public = test_gpu.run_backend

    def run_backend(backend, x, sigma, ref, chunk, grad_mu=None, grad_lse=None):
        if backend == "triton":
            return public("triton", x, sigma, ref, chunk, grad_mu, grad_lse)
        mu, lse, aux = emu_forward(emu, x, sigma, ref, chunk)
        cols = stf_reference
        out = {"mu": mu * corrupt_mu, "lse": lse, "n_eff": aux[:, cols.AUX_NEFF], "w_max": aux[:, cols.AUX_WMAX],
               "d_bar": aux[:, cols.AUX_DBAR]}
        if grad_mu is not None:
            out["gx"], out["gs"], out["gr"] = emu_backward(emu, grad_mu, grad_lse, x, sigma, ref, mu, aux, chunk)
        return out

    monkeypatch.setattr(test_gpu, "DEVICE", "cpu")
    monkeypatch.setattr(test_gpu, "_backend", lambda name: name)
    monkeypatch.setattr(test_gpu, "run_backend", run_backend)
    return test_gpu


@pytest.mark.parametrize("B,D,n,chunk", [(3, 7, 5, 2), (65, 67, 257, 100)])
def test_gpu_suite_checks_pass_on_the_host(emu, monkeypatch, B, D, n, chunk):
    test_gpu = _host_gpu_suite(emu, monkeypatch)
    test_gpu.test_forward_against_float64_judge("cuda", B, D, n, chunk)
    test_gpu.test_gradients_against_float64_judge("cuda", B, D, n, chunk)
    test_gpu.test_cuda_and_triton_agree(B, D, n, chunk)  # both against the judge, and each other


def test_gpu_suite_checks_can_fail(emu, monkeypatch):
    # mu off by 1e-3 relative (about 70 x the float32 budget on this case) must be caught.
    test_gpu = _host_gpu_suite(emu, monkeypatch, corrupt_mu=1.001)
    with pytest.raises(AssertionError, match=r"mu against the float64 judge"):
        test_gpu.test_forward_against_float64_judge("cuda", 65, 67, 257, 100)
