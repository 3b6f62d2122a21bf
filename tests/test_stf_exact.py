"""Exact wherever the data sits: the stable target on data far from the origin, on every backend.

The matmul form d_ij = ||x_i||^2 - 2 x_i . r_j + ||r_j||^2 rounds at the scale of ||x||^2, not of the
distances that decide the weights: on a tight cluster offset from the origin it loses every digit at
small sigma (eager PyTorch float32 does, and these tests check that the data show it). The kernels
shift both operands by a centre inside the references first (docs/math.md, "Exact distances"), so
their error follows the data's spread:
  * mu within 1e-5 of the data's spread (the RMS distance of the references from their mean) per
    element, at every sigma in [0.002, 80], for offsets up to 1000 x the spread, in float32 "ieee"
    and "tf32x3";
  * translation covariance, mu(x + v, r + v) = mu(x, r) + v, to float32 rounding;
  * float64 lse and mu to a relative 1e-12;
  * gradients on offset data within twice eager float32's error on the same data centred.
"""

from __future__ import annotations

import judges
import pytest
import torch
from matrix import cases, rel, run_stf
from problems import offset_cluster

from cdm_kernels import stf_target

SIGMAS = [0.002, 0.05, 1.0, 80.0]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_the_offset_data_defeat_the_matmul_form(sigma):
    # Without this, the tests below could pass on data where any arithmetic is exact.
    x, ref, radius = offset_cluster(16, 300, 512, sigma)
    err = (judges.eager_float32(x, sigma, ref).double() - judges.stf(x, sigma, ref)["mu"]).abs().max().item()
    if sigma <= 0.05:
        assert err > 1e-2 * radius, f"eager float32 error {err:.2e} at sigma = {sigma}: the data are too easy"


@pytest.mark.parametrize("case", cases("stf_target"))
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("offset", [10.0, 1000.0])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_mu_follows_the_spread_not_the_offset(case, precision, offset, sigma):
    if precision not in case.precisions():
        pytest.skip(f"{case} has no precision {precision!r}")
    B, D, n = (16, 300, 512) if case.heavy_ok else (6, 300, 96)
    x, ref, radius = offset_cluster(B, D, n, sigma, offset=offset)
    exact = judges.stf(x, sigma, ref)["mu"]
    got = run_stf(case, x, torch.full((B,), sigma), ref, precision=precision, chunk=128)["mu"]
    err = (got.double() - exact).abs().max().item()
    assert err <= 1e-5 * radius, f"max error of mu {err:.2e} = {err / radius:.1e} of the spread {radius:.3g}"


@pytest.mark.parametrize("case", cases("stf_target"))
def test_translation_covariance_to_float32_rounding(case):
    B, n, D = 8, 200, 300
    g = torch.Generator().manual_seed(11)
    ref = torch.randn(n, D, generator=g)
    x = ref[:B] + 0.7 * torch.randn(B, D, generator=g)
    v = 3 * torch.randn(D, generator=g)
    s = torch.full((B,), 0.7)
    mu = run_stf(case, x, s, ref)["mu"]
    mu_shifted = run_stf(case, x + v, s, ref + v)["mu"]
    ulp = torch.finfo(torch.float32).eps * (ref + v).abs().max().item()
    err = (mu_shifted - (mu + v)).abs().max().item()
    assert err <= 8 * ulp, f"mu(x + v, r + v) - (mu(x, r) + v) = {err:.2e}, more than 8 ulps ({8 * ulp:.2e})"


@pytest.mark.parametrize("case", cases("stf_target"))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_float64_is_exact_on_offset_data(case, sigma):
    x, ref, _ = offset_cluster(6, 64, 200, sigma, offset=1000.0, dtype=torch.float64)
    exact = judges.stf(x, sigma, ref)
    got = run_stf(case, x, torch.full((6,), sigma, dtype=torch.float64), ref, chunk=64)
    assert rel(got["lse"], exact["lse"]) <= 1e-12
    assert rel(got["mu"], exact["mu"]) <= 1e-12


@pytest.mark.parametrize("case", cases("stf_target"))
@pytest.mark.parametrize("sigma", [0.05, 1.0, 80.0])
def test_gradients_on_offset_data_as_good_as_eager_on_centred_data(case, sigma):
    B, D, n = 6, 200, 128
    x, ref, _ = offset_cluster(B, D, n, sigma, offset=1000.0)
    g = torch.Generator().manual_seed(3)
    grad_mu = torch.randn(B, D, generator=g)
    exact = judges.stf(x, sigma, ref, grad_mu, torch.zeros(B, dtype=torch.float64))
    # Eager float32 autograd on the same data moved to the origin (the gradients in x and sigma do
    # not depend on where the data sit): the budget the shifted operands must reach.
    o = ref.double().mean(0)
    xc, rc = (x.double() - o).float(), (ref.double() - o).float()
    xe, se = xc.clone().requires_grad_(), torch.full((B,), float(sigma), requires_grad=True)
    w = torch.softmax((xe @ rc.T - 0.5 * (rc * rc).sum(1)) / se[:, None] ** 2, dim=1)
    gx_e, gs_e = torch.autograd.grad(((w @ rc) * grad_mu).sum(), (xe, se))
    got = run_stf(case, x, torch.full((B,), sigma), ref, chunk=64, grad_mu=grad_mu, grad_lse=torch.zeros(B))
    floor = 16 * torch.finfo(torch.float32).eps
    for name, ours, eager in (("gx", got["gx"], gx_e), ("gs", got["gs"], gs_e)):
        err, budget = rel(ours, exact[name]), rel(eager, exact[name])
        assert err <= 2 * budget + floor, f"{name}: {err:.2e} against float64, eager on centred data {budget:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaled_copies_of_offset_data_keep_their_digits(dtype):
    # A practical case: images in [0, 1] rather than [-1, 1] (an offset of one spread), and latents
    # with a mean offset: the target is that of the centred data, moved back.
    x, ref, radius = offset_cluster(8, 96, 300, 0.01, offset=50.0, dtype=dtype)
    o = ref.double().mean(0).to(dtype)
    mu = stf_target(x, 0.01, ref)
    mu_c = stf_target(x - o, 0.01, ref - o) + o
    eps = torch.finfo(dtype).eps
    assert (mu.double() - mu_c.double()).abs().max().item() <= 16 * eps * ref.abs().max().item()
