"""The GPU backends of the stable target on a real GPU: `cuda` (csrc/cuda/stf.cu) and `triton`.

Every test here is marked `gpu` and is skipped (reported as skipped) on a machine without one; run
them with `pytest -m gpu tests/test_gpu.py`. Each backend is judged against the float64 direct
formula softmax_j(-||x_i - r_j||^2 / (2 sigma_i^2)) with autograd, with a tolerance of twice the error
of the same matmul-form math done by PyTorch in float32 on the same GPU (FlashAttention's rule),
and the two backends are compared with each other.
"""

from __future__ import annotations

import math

import pytest
import torch

import cdm_kernels
from cdm_kernels import stf_reference, stf_target
from cdm_kernels.stf import available_backends

pytestmark = pytest.mark.gpu

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
    if name not in available_backends("cuda"):
        pytest.skip(f"backend {name!r} is not available on this GPU build ({cdm_kernels.extension_status()})")
    return name


def problem(B, D, n, dtype=torch.float32, sigma_lo=0.002, sigma_hi=80.0, device="cuda"):
    ref = torch.rand(n, D, dtype=torch.float64) * 2 - 1
    sigma = torch.exp(torch.empty(B, dtype=torch.float64).uniform_(math.log(sigma_lo), math.log(sigma_hi)))
    x = ref[torch.randint(0, n, (B,))] + sigma[:, None] * torch.randn(B, D, dtype=torch.float64) / math.sqrt(D)
    return x.to(device, dtype), sigma.to(device, dtype), ref.to(device, dtype)


def judge(x, sigma, ref, grad_mu=None, grad_lse=None):
    """float64 direct formula in blocks of rows (no B x n x D tensor larger than ~64 MB)."""
    x = x.double().detach().requires_grad_(grad_mu is not None)
    sigma = sigma.double().detach().requires_grad_(grad_mu is not None)
    ref = ref.double().detach().requires_grad_(grad_mu is not None)
    rows = max(1, (8 << 20) // max(1, ref.shape[0] * ref.shape[1]))
    mus, lses = [], []
    for i in range(0, x.shape[0], rows):
        d = ((x[i : i + rows, None, :] - ref[None]) ** 2).sum(-1)
        logit = -d / (2 * sigma[i : i + rows, None] ** 2)
        mus.append(torch.softmax(logit, 1) @ ref)
        lses.append(torch.logsumexp(logit, 1))
    mu, lse = torch.cat(mus), torch.cat(lses)
    out = {"mu": mu.detach(), "lse": lse.detach()}
    if grad_mu is not None:
        g = torch.autograd.grad((mu * grad_mu.double()).sum() + (lse * grad_lse.double()).sum(), (x, sigma, ref))
        out.update(gx=g[0], gs=g[1], gr=g[2])
    return out


def maxerr(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_cuda_backend_is_registered_and_preferred():
    assert cdm_kernels.has_cuda_kernels(), cdm_kernels.extension_status()
    assert available_backends("cuda")[0] == "cuda"
    assert cdm_kernels.resolve_backend("cuda") == "cuda"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("B,D,n,chunk", SHAPES)
def test_forward_against_float64_judge(backend, B, D, n, chunk):
    _backend(backend)
    x, sigma, ref = problem(B, D, n)
    mu, lse = stf_target(x, sigma, ref, return_lse=True, chunk_size=chunk, backend=backend)
    j = judge(x, sigma, ref)
    rn = (ref * ref).sum(1)
    mu_t, lse_t, _ = stf_reference.stf_forward(x, sigma, ref, rn, chunk or n)
    assert maxerr(mu, j["mu"]) <= 2 * maxerr(mu_t, j["mu"]) + 1e-6
    # lse cancels two terms of ~||x||^2 / (2 sigma^2): judged relative to them (math.md).
    terms = 1 + j["lse"].abs() + (x.double() ** 2).sum(1) / (2 * sigma.double() ** 2)
    eps = torch.finfo(torch.float32).eps
    assert ((lse.double() - j["lse"]).abs() <= 2 * (lse_t.double() - j["lse"]).abs() + 8 * eps * terms).all()


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


@pytest.mark.parametrize("B,D,n,chunk", SHAPES)
def test_cuda_and_triton_agree(B, D, n, chunk):
    _backend("cuda"), _backend("triton")
    x, sigma, ref = problem(B, D, n)
    mu_c = stf_target(x, sigma, ref, chunk_size=chunk, backend="cuda")
    mu_t = stf_target(x, sigma, ref, chunk_size=chunk, backend="triton")
    j = judge(x, sigma, ref)
    # Each within its own error of the judge, so within the sum of both of each other.
    assert maxerr(mu_c, mu_t) <= maxerr(mu_c, j["mu"]) + maxerr(mu_t, j["mu"]) + 1e-7
    assert maxerr(mu_c, mu_t) <= 1e-3


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("B,D,n,chunk", SHAPES[:5])
def test_gradients_against_float64_judge(backend, B, D, n, chunk):
    _backend(backend)
    x, sigma, ref = problem(B, D, n, sigma_lo=0.05, sigma_hi=20.0)
    grad_mu, grad_lse = torch.randn_like(x), torch.randn_like(sigma)
    j = judge(x, sigma, ref, grad_mu, grad_lse)

    def grads(fn_backend):
        xs, ss, rs = (t.clone().requires_grad_(True) for t in (x, sigma, ref))
        if fn_backend == "torch":
            rn = (rs.detach() ** 2).sum(1)
            mu, lse, aux = stf_reference.stf_forward(xs.detach(), ss.detach(), rs.detach(), rn, chunk or n)
            return stf_reference.stf_backward(grad_mu, grad_lse, x, sigma, ref, rn, mu, aux, chunk or n, True)
        mu, lse = stf_target(xs, ss, rs, return_lse=True, chunk_size=chunk, backend=fn_backend)
        return torch.autograd.grad((mu * grad_mu).sum() + (lse * grad_lse).sum(), (xs, ss, rs))

    got, torch32 = grads(backend), grads("torch")
    for name, g, t, want in zip(("x", "sigma", "ref"), got, torch32, (j["gx"], j["gs"], j["gr"])):
        tol = 2 * maxerr(t, want) + 1e-5 * (1 + want.abs().max().item())
        if name == "sigma":  # d = ||x||^2 - 2 sigma^2 z cancels (math.md): judged per row, as on the CPU
            eps = torch.finfo(torch.float32).eps
            terms = (x.double() ** 2).sum(1) + (ref.double() ** 2).sum(1).max()
            row_tol = 2 * (t.double() - want).abs() + 8 * eps * terms * grad_lse.double().abs() / sigma.double() ** 3
            assert ((g.double() - want).abs() <= row_tol + 1e-5 * (1 + want.abs())).all(), name
        else:
            assert maxerr(g, want) <= tol, name


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
    x, _, ref = problem(8, 300, 500, torch.float32)
    nearest = ref[torch.cdist(x.double(), ref.double()).argmin(1)]
    mu = stf_target(x, 1e-4, ref, backend="cuda")
    assert torch.equal(mu, nearest)
    mu = stf_target(x, 1e6, ref, backend="cuda")
    assert maxerr(mu, ref.double().mean(0).expand(8, -1)) < 1e-5


def test_many_references_and_chunks():
    # n in the hundreds of thousands: many chunks, each with P parts per row, merged exactly.
    _backend("cuda")
    x, sigma, ref = problem(32, 64, 300_000, sigma_lo=0.5, sigma_hi=5.0)
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
    x, sigma, ref = problem(5, 40, 50, device="cuda:1")
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
