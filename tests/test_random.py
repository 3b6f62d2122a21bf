"""Philox 4x32-10 noise (cdm_kernels.randn): the published known answers, Triton's tl.randn bit for
bit, agreement of every backend, the moments of N(0, 1) and independence across counters and seeds."""

import math

import numpy as np
import pytest
import torch
from matrix import cases

import cdm_kernels
from cdm_kernels.backends import triton_interpreted
from cdm_kernels.random import philox4x32_10, philox_randn_reference

CASES = cases("randn")
# (seed, offset): small, one that takes the int64 path in Triton, and counters crossing 2^32 (the
# high counter word in use) with a seed using both key words.
SEEDS = [(0, 0), (1, 7), (123456789, 1000), (2**40 + 17, 2**32 - 300)]
# log/cos are each platform's float32 ones (the CPU kernel's branch-free polynomials, numpy's in
# the Triton interpreter): measured differences are <= 5e-7; radius <= 5.7, so this is ~3 ulps.
ATOL = 1.5e-6


@pytest.fixture
def triton_device():
    """Where Triton kernels run in this process: on the GPU, or on the CPU under the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    if triton_interpreted():
        return "cpu"
    pytest.skip("Triton needs a GPU or the interpreter (tests/conftest.py sets it without a GPU)")


def test_backends_cover_the_compiled_kernels():
    names = cdm_kernels.available_backends("randn", "cpu")
    assert names[: 1 + cdm_kernels.has_cpu_kernels()] == (["cpu"] if cdm_kernels.has_cpu_kernels() else []) + [
        "reference"
    ]


@pytest.mark.parametrize(
    "counter,key,expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_reference_philox_known_answers(counter, key, expected):
    # Random123's known-answer vectors for philox4x32_10 (kat_vectors).
    out = philox4x32_10(*counter, *key)
    assert tuple(int(v) for v in out) == expected


@pytest.mark.parametrize("seed,offset", SEEDS)
def test_triton_randn_matches_reference_bit_for_bit(triton_device, seed, offset):
    n = 2000
    ours = cdm_kernels.randn(n, seed, offset, backend="triton", device=triton_device).cpu()
    ref = torch.from_numpy(philox_randn_reference(n, seed, offset))
    if triton_device == "cpu":  # the interpreter's log/cos are numpy's, the reference's too
        assert torch.equal(ours, ref)
    else:
        assert (ours.double() - ref.double()).abs().max() <= ATOL


@pytest.mark.parametrize("seed,offset", SEEDS)
def test_triton_kernel_tl_randn_directly(triton_device, seed, offset):
    # Independent of our launcher: a bare kernel calling tl.randn on explicit offsets.
    import triton
    import triton.language as tl

    @triton.jit
    def k(out_ptr, seed, off_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, tl.randn(seed, tl.load(off_ptr + i)))

    offs = torch.arange(256, dtype=torch.int64, device=triton_device) * 3 + offset  # strided counters
    out = torch.empty(256, device=triton_device)
    k[(1,)](out, seed, offs, N=256)
    full = torch.from_numpy(philox_randn_reference(3 * 256, seed, offset)[::3].copy())
    assert (out.cpu().double() - full.double()).abs().max() <= (0 if triton_device == "cpu" else ATOL)


@pytest.mark.skipif(not cdm_kernels.has_cpu_kernels(), reason="the C++ extension is not built")
@pytest.mark.parametrize("seed,offset", SEEDS)
def test_cpu_randn_matches_tl_randn(seed, offset):
    n = 5000
    ours = cdm_kernels.randn((50, 100), seed, offset, backend="cpu").reshape(-1).double()
    ref = torch.from_numpy(philox_randn_reference(n, seed, offset)).double()
    err = (ours - ref).abs()
    assert err.max() <= ATOL, f"max |cpu - tl.randn| = {err.max():.3g} at {int(err.argmax())}"
    # The integer part is exact, so almost every value is within one float32 ulp.
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(2**-10)
    assert (err <= ulp).double().mean() > 0.98


@pytest.mark.skipif(not cdm_kernels.has_cpu_kernels(), reason="the C++ extension is not built")
def test_cpu_log_and_cos_polynomials_against_float64():
    # Where the CPU's branch-free log/cos matter most: u0 near 1e-7 and near 1, theta near the zeros
    # of cos. Checked through randn itself against a float64 Box-Muller of the same uniforms.
    n = 200_000
    seed = 99
    idx = np.arange(n, dtype=np.uint64)
    w0, w1, _, _ = philox4x32_10(idx & np.uint64(0xFFFFFFFF), idx >> np.uint64(32), 0 * idx, 0 * idx, seed, 0)

    def uniform(r):
        s = r.astype(np.uint32).view(np.int32)
        return np.where(s < 0, ~s, s).astype(np.float32) * np.float32(4.6566127342e-10)

    u0, u1 = np.maximum(np.float32(1e-7), uniform(w0)), uniform(w1)
    theta = (np.float32(6.283185307179586) * u1).astype(np.float64)  # the float32 angle, as Triton
    exact = np.sqrt(-2.0 * np.log(u0.astype(np.float64))) * np.cos(theta)
    ours = cdm_kernels.randn(n, seed, 0, backend="cpu").double().numpy()
    radius = np.sqrt(-2.0 * np.log(u0.astype(np.float64)))
    # <= 4 float32 ulps of the radius (the scale of every rounding in r cos theta).
    assert np.max(np.abs(ours - exact) / (radius * 2.0**-23)) <= 4.0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed,offset", SEEDS)
def test_every_backend_matches_tl_randn(case, seed, offset):
    z = cdm_kernels.randn((40, 50), seed, offset, backend=case.backend, device=case.device)
    assert z.device.type == case.device and z.dtype == torch.float32
    ref = torch.from_numpy(philox_randn_reference(2000, seed, offset)).double()
    assert (z.reshape(-1).cpu().double() - ref).abs().max() <= ATOL


@pytest.mark.parametrize("case", CASES)
def test_consecutive_offsets_continue_one_stream(case):
    a = cdm_kernels.randn(600, 5, 100, backend=case.backend, device=case.device)
    b = cdm_kernels.randn(200, 5, 500, backend=case.backend, device=case.device)
    assert torch.equal(a[400:], b)


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    anchor = torch.empty(0, device=case.device)
    torch.library.opcheck(torch.ops.cdm_kernels.philox_randn.default, (anchor, [3, 5], 7, 11, case.backend))


def test_moments_of_standard_normal():
    n = 400_000
    z = cdm_kernels.randn(n, 2024, 0).double()
    mean, var = z.mean().item(), z.var().item()
    kurt = (((z - mean) ** 4).mean() / var**2).item()
    # Five standard errors: mean 1/sqrt(n), variance sqrt(2/n), kurtosis sqrt(24/n).
    assert abs(mean) < 5 / math.sqrt(n)
    assert abs(var - 1) < 5 * math.sqrt(2 / n)
    assert abs(kurt - 3) < 5 * math.sqrt(24 / n)
    p = math.erf(1 / math.sqrt(2))  # P(|z| < 1)
    frac = (z.abs() < 1).double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    # Box-Muller with u0 >= 1e-7 caps |z| at sqrt(-2 log 1e-7) = 5.68.
    assert z.abs().max().item() <= 5.7


def test_independence_across_offsets_and_seeds():
    n = 200_000
    a = cdm_kernels.randn(n, 11, 0).double()
    b = cdm_kernels.randn(n, 11, n).double()  # disjoint counters, same seed
    c = cdm_kernels.randn(n, 12, 0).double()  # same counters, next seed
    bound = 5 / math.sqrt(n)
    for u, v in ((a, b), (a, c), (a[:-1], a[1:])):  # the last pair: lag-one autocorrelation
        r = torch.corrcoef(torch.stack([u, v]))[0, 1].item()
        assert abs(r) < bound


def test_dtype_device_shape():
    z = cdm_kernels.randn((2, 3, 4), 1, dtype=torch.float64)
    assert z.shape == (2, 3, 4) and z.dtype == torch.float64
    assert torch.equal(z.float(), cdm_kernels.randn(24, 1).reshape(2, 3, 4))
    assert cdm_kernels.randn(0, 1).shape == (0,)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seed=-1), r"seed must be an int in \[0, 2\*\*63\), got -1"),
        (dict(seed=1.5), r"seed must be an int in \[0, 2\*\*63\), got 1.5"),
        (dict(seed=1, offset=-3), "offset must be a non-negative int, got -3"),
        (dict(seed=1, offset=2**63 - 5), "exceeds the 2\\*\\*63 - 1 counter range"),
        (dict(seed=1, backend="nope"), r"backend must be 'auto' or one of \('reference', 'cpu', 'cuda', 'triton'\), got 'nope'"),
        (dict(seed=1, backend="cuda"), r"backend 'cuda' is not available for cpu tensors"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cdm_kernels.randn(10, **kwargs)
