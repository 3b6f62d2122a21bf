"""EDM, STF, CDM and STF+CDM losses against float64 transcriptions of docs/math.md with the same draws.

Every loss takes a torch.Generator; the tests replay its draws in the documented order (ln sigma,
n, the bank's randperm, eps, the rollout's Philox seed) and recompute the loss from the formulas:
the stable target by the naive (B, n) distance matrix, the schedule by the rho formula, the
trajectories by the Euler-Maruyama step with the Philox numbers of `cdm_kernels.randn` at the
documented counters (the numbers the rollout kernels draw; they match the numpy transcription
`philox_randn_reference` to a few float32 ulps, checked here once).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from cdm_kernels import CDMLoss, EDMLoss, ReferenceBank, STFCDMLoss, STFLoss, randn
from cdm_kernels.random import philox_randn_reference

F64 = torch.float64
SD = 0.5  # sigma_data
# The transcription tests run on the CPU here and on a GPU where there is one (same code, the
# draws replayed from a generator on that device).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


class TinyDenoiser(nn.Module):
    """An EDM-preconditioned D(x; sigma) with a 1x1 convolution as F, conditioned on the noise level,
    class labels and augmentation labels; records every call (x, sigma, labels, augment_labels)."""

    def __init__(self, channels=2, label_dim=3, aug_dim=2, dtype=F64):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.conv = nn.Conv2d(channels, channels, 1).to(dtype)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g, dtype=dtype) * 0.5)
            self.conv.bias.copy_(torch.randn(channels, generator=g, dtype=dtype) * 0.1)
        self.noise = nn.Parameter(torch.randn(channels, generator=g, dtype=dtype) * 0.3)
        self.label = nn.Parameter(torch.randn(label_dim, channels, generator=g, dtype=dtype) * 0.2)
        self.aug = nn.Parameter(torch.randn(aug_dim, channels, generator=g, dtype=dtype) * 0.2)
        self.calls = []

    def forward(self, x, sigma, labels=None, augment_labels=None):
        self.calls.append((x.detach().clone(), sigma.detach().clone(), labels, augment_labels))
        c_skip = SD**2 / (sigma**2 + SD**2)
        c_out = sigma * SD / (sigma**2 + SD**2).sqrt()
        c_in = 1 / (sigma**2 + SD**2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.conv(c_in * x) + c_noise * self.noise[None, :, None, None]
        if labels is not None:
            F_x = F_x + (labels @ self.label)[:, :, None, None]
        if augment_labels is not None:
            F_x = F_x + (augment_labels @ self.aug)[:, :, None, None]
        return c_skip * x + c_out * F_x


def flip_pipe(images):
    """A deterministic augmentation: horizontal flip of odd samples; labels [flipped, 1]."""
    flipped = torch.arange(images.shape[0], device=images.device) % 2 == 1
    y = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    labels = torch.stack([flipped.to(images.dtype), torch.ones(images.shape[0], dtype=images.dtype)], 1)
    return y, labels


def _images(B=4, shape=(2, 4, 4), seed=11, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((B, *shape), generator=g, dtype=F64) * 2 - 1).to(device)


def _labels(B, seed=12, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.one_hot(torch.randint(0, 3, (B,), generator=g), 3).to(device, F64)


def _weight(sigma):
    return (sigma**2 + SD**2) / (sigma * SD) ** 2


def _naive_target(x, sigma, refs):
    """docs/math.md section 1 with the full distance matrix: mu_i = sum_j softmax_j(-d_ij / 2 sigma_i^2) r_j."""
    B, n = x.shape[0], refs.shape[0]
    d = ((x.reshape(B, 1, -1) - refs.reshape(1, n, -1)) ** 2).sum(-1)
    w = torch.softmax(-d / (2 * sigma.reshape(B, 1) ** 2), dim=1)
    return (w @ refs.reshape(n, -1)).reshape(x.shape)


def _replay_noise(g, images, P_mean, P_std, augment_pipe=None):
    rnd = torch.randn((images.shape[0], 1, 1, 1), generator=g, dtype=F64, device=images.device)
    sigma = torch.exp(rnd * P_std + P_mean)
    y, aug = augment_pipe(images) if augment_pipe else (images, None)
    n = torch.randn(y.shape, generator=g, dtype=F64, device=y.device) * sigma
    return sigma, y, aug, y + n


# ------------------------------------------------------------------------------------------------
# EDM and STF
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_edm_loss_matches_transcription_with_augmentation_and_labels(device):
    images, labels, net = _images(device=device), _labels(4, device=device), TinyDenoiser().to(device)
    loss = EDMLoss()(net, images, labels, flip_pipe, generator=_gen(7, device))
    sigma, y, aug, x = _replay_noise(_gen(7, device), images, -1.2, 1.2, flip_pipe)
    want = _weight(sigma) * (net(x, sigma, labels, augment_labels=aug) - y) ** 2
    assert loss.shape == images.shape and loss.dtype == F64
    torch.testing.assert_close(loss, want, rtol=1e-13, atol=0)
    x_seen, sigma_seen, labels_seen, aug_seen = net.calls[0]
    torch.testing.assert_close(sigma_seen, sigma, rtol=0, atol=0)
    assert labels_seen is labels and torch.equal(aug_seen, aug)


def test_edm_loss_draws_from_the_global_generator_without_one():
    images, net = _images(), TinyDenoiser()
    torch.manual_seed(3)
    a = EDMLoss()(net, images)
    torch.manual_seed(3)
    b = EDMLoss()(net, images)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, EDMLoss()(net, images))


@pytest.mark.parametrize("device", DEVICES)
def test_stf_loss_with_ref_matches_transcription(device):
    images, net = _images(device=device), TinyDenoiser().to(device)
    ref = _images(B=10, seed=21, device=device)
    ref_before = ref.clone()
    loss = STFLoss(rbatch=10)(net, images, augment_pipe=flip_pipe, ref=ref, generator=_gen(8, device))
    sigma, y, aug, x = _replay_noise(_gen(8, device), images, -1.2, 1.2, flip_pipe)
    # The minibatch's own (augmented) images replace the first B rows of the reference batch.
    mu = _naive_target(x, sigma, torch.cat([y, ref[4:]]))
    want = _weight(sigma) * (net(x, sigma, None, augment_labels=aug) - mu) ** 2
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    assert torch.equal(ref, ref_before)  # the caller's tensor is not written to


@pytest.mark.parametrize("device", DEVICES)
def test_stf_loss_with_bank_matches_transcription(device):
    images, net = _images(device=device), TinyDenoiser().to(device)
    pool = _images(B=20, seed=22, device=device)
    loss_fn = STFLoss(P_mean=-0.5, P_std=1.0, rbatch=9, bank=ReferenceBank(pool))
    loss = loss_fn(net, images, generator=_gen(9, device))
    g = _gen(9, device)
    sigma, y, _, x = _replay_noise(g, images, -0.5, 1.0)
    rest = pool[torch.randperm(20, generator=g, device=device)[:5]]
    mu = _naive_target(x, sigma, torch.cat([y, rest]))
    torch.testing.assert_close(loss, _weight(sigma) * (net(x, sigma) - mu) ** 2, rtol=1e-12, atol=1e-14)


def test_stf_loss_is_edm_loss_for_a_minibatch_only_reference_at_tiny_sigma():
    # sigma = e^-12: every noisy sample's nearest reference is its own clean image, with weight 1.
    images, net = _images(), TinyDenoiser()
    edm = EDMLoss(P_mean=-12.0, P_std=0.0)(net, images, generator=torch.Generator().manual_seed(1))
    stf = STFLoss(P_mean=-12.0, P_std=0.0)(net, images, ref=images, generator=torch.Generator().manual_seed(1))
    # The target is y to within its last bit (mu = c + (y - c) for the kernels' centre c).
    torch.testing.assert_close(stf, edm, rtol=1e-9, atol=0)
    # ... and not at sigma = 1, where the other samples pull the target away from y.
    edm1 = EDMLoss(P_mean=0.0, P_std=0.0)(net, images, generator=torch.Generator().manual_seed(1))
    stf1 = STFLoss(P_mean=0.0, P_std=0.0)(net, images, ref=images, generator=torch.Generator().manual_seed(1))
    assert (stf1 - edm1).abs().max() > 1e-2


def test_reference_bank_samples_distinct_rows():
    pool = _images(B=12, seed=23)
    bank = ReferenceBank()
    assert len(bank) == 0
    with pytest.raises(RuntimeError, match=r"ReferenceBank is empty: call refresh\(images\)"):
        bank.sample(2)
    bank.refresh(pool)
    refs = bank.sample(12, torch.Generator().manual_seed(0))
    rows = [int(torch.nonzero((pool == r).all(dim=(1, 2, 3)))[0, 0]) for r in refs]
    assert sorted(rows) == list(range(12))  # a permutation: every row once
    with pytest.raises(ValueError, match="cannot sample k = 13 distinct references from a bank of 12"):
        bank.sample(13)
    with pytest.raises(ValueError, match="k must be a non-negative int, got -1"):
        bank.sample(-1)
    bank.refresh(pool[:3])
    assert len(bank) == 3 and torch.equal(bank.refs, pool[:3])


def test_reference_bank_samples_into_out_what_it_returns_otherwise():
    pool = _images(B=12, seed=23)
    bank = ReferenceBank(pool)
    batch = torch.full((9, *pool.shape[1:]), -7.0, dtype=pool.dtype)
    got = bank.sample(7, torch.Generator().manual_seed(4), out=batch[2:])
    assert got.data_ptr() == batch[2:].data_ptr()
    assert torch.equal(batch[2:], bank.sample(7, torch.Generator().manual_seed(4)))
    assert (batch[:2] == -7.0).all()  # the rows before out are not written
    S = tuple(pool.shape[1:])
    for out, got in ((torch.empty(6, *S, dtype=pool.dtype), f"got (6, {S[0]}, {S[1]}, {S[2]})"),
                     (torch.empty(7, *S, dtype=torch.float32), "torch.float32 on cpu"),
                     (torch.empty(*S[::-1], 7, dtype=pool.dtype).permute(3, 2, 1, 0), "not contiguous")):
        with pytest.raises(ValueError, match=rf"out must be a contiguous \(7, {S[0]}, {S[1]}, {S[2]}\) "
                                             rf"torch.float64 tensor on cpu.*{re.escape(got)}"):
            bank.sample(7, out=out)


def test_stf_loss_with_a_bank_of_another_dtype_matches_transcription():
    # The bank's rows are gathered straight into the reference batch when they have the images' dtype
    # and device, converted otherwise: the same reference batch either way.
    images, net = _images(), TinyDenoiser()
    pool = _images(B=20, seed=22).float()
    loss = STFLoss(P_mean=-0.5, P_std=1.0, rbatch=9, bank=ReferenceBank(pool))(net, images, generator=_gen(9, "cpu"))
    g = _gen(9, "cpu")
    sigma, y, _, x = _replay_noise(g, images, -0.5, 1.0)
    rest = pool[torch.randperm(20, generator=g)[:5]].double()
    mu = _naive_target(x, sigma, torch.cat([y, rest]))
    torch.testing.assert_close(loss, _weight(sigma) * (net(x, sigma) - mu) ** 2, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# CDM and STF+CDM
# ------------------------------------------------------------------------------------------------


def _edm_schedule_f64(hi, lo, N, rho=7.0):
    k = torch.arange(N, dtype=F64, device=hi.device) / (N - 1)
    a, b = hi[:, None] ** (1 / rho), lo[:, None] ** (1 / rho)
    return (a + k * (b - a)) ** rho


def _philox(numel, seed, offset, device="cpu"):
    z = randn(numel, seed, offset, dtype=F64, device=device)
    ref = torch.from_numpy(philox_randn_reference(numel, seed, offset).astype(np.float64))
    torch.testing.assert_close(z.cpu(), ref, rtol=0, atol=2e-6)  # the numbers are the Philox spec's
    return z


def _cdm_transcription(net, images, labels, augment_pipe, seed, *, num_steps, lambda_m, eps_min, eps_max,
                       P_mean, P_std, ref=None):
    """docs/math.md section 3, steps 1-6, in float64, replaying the loss's draws from Generator(seed)."""
    g = _gen(seed, images.device)
    sigma, y, aug, x_t = _replay_noise(g, images, P_mean, P_std, augment_pipe)
    B, K = images.shape[0], 2
    target = y if ref is None else _naive_target(x_t, sigma, torch.cat([y, ref[B:]]))
    eps = eps_min + (eps_max - eps_min) * torch.rand(sigma.shape, generator=g, dtype=F64, device=g.device)
    sigma_min = torch.minimum((sigma - eps).clamp_min(0.002), sigma)
    philox_seed = int(torch.randint(0, 1 << 62, (1,), generator=g, device=g.device))
    t = _edm_schedule_f64(sigma.reshape(B), sigma_min.reshape(B), num_steps)
    rep = lambda v: None if v is None else torch.cat([v] * K)  # noqa: E731  trajectory-major
    D0 = net(x_t, sigma, labels, augment_labels=aug)
    x = rep(x_t)
    numel = x_t.numel()
    for k in range(num_steps - 1):
        t0, t1 = rep(t[:, k]).reshape(-1, 1, 1, 1), rep(t[:, k + 1]).reshape(-1, 1, 1, 1)
        z = _philox(K * numel, philox_seed, k * K * numel, images.device)
        x = x + 2 * (t1 - t0) * (x - net(x, t0, rep(labels), augment_labels=rep(aug))) / t0 \
            + torch.sqrt(2 * (t1 - t0).abs() * t0) * z.reshape(x.shape)
    D1 = net(x, rep(sigma_min), rep(labels), augment_labels=rep(aug))
    D1a, D1b = D1[:B], D1[B:]
    return _weight(sigma) * (D0 - target) ** 2 + lambda_m * (D1a - D0) * (D1b - D0)


CDM_ARGS = dict(num_steps=4, lambda_m=1.5, eps_min=0.1, eps_max=0.6, P_mean=-0.3, P_std=1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_cdm_loss_matches_transcription_with_labels_and_augmentation(device):
    images, labels, net = _images(B=3, device=device), _labels(3, device=device), TinyDenoiser().to(device)
    loss = CDMLoss(**CDM_ARGS)(net, images, labels, flip_pipe, generator=_gen(4, device))
    calls = net.calls
    # D0, then num_steps - 1 rollout evaluations of 2B rows, then one 2B evaluation at sigma_min.
    assert [c[0].shape[0] for c in calls] == [3, 6, 6, 6, 6]
    for _, _, lab, aug in calls[1:]:
        assert lab.shape == (6, 3) and aug.shape == (6, 2)
    net.calls = []
    want = _cdm_transcription(net, images, labels, flip_pipe, 4, **CDM_ARGS)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    # The first rollout call starts both trajectories from the same x_t = y + n (one noise draw).
    x0 = calls[1][0]
    torch.testing.assert_close(x0[:3], calls[0][0], rtol=0, atol=0)
    torch.testing.assert_close(x0[3:], calls[0][0], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_stfcdm_loss_matches_transcription(device):
    images, net = _images(B=3, device=device), TinyDenoiser().to(device)
    ref = _images(B=7, seed=24, device=device)
    loss = STFCDMLoss(**CDM_ARGS)(net, images, augment_pipe=flip_pipe, ref=ref, generator=_gen(6, device))
    net.calls = []
    want = _cdm_transcription(net, images, None, flip_pipe, 6, ref=ref, **CDM_ARGS)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)


def test_stfcdm_with_bank_draws_the_bank_before_eps():
    images, net = _images(B=3), TinyDenoiser()
    pool = _images(B=9, seed=25)
    loss = STFCDMLoss(**CDM_ARGS, rbatch=6, bank=ReferenceBank(pool))(net, images, generator=torch.Generator().manual_seed(2))
    # Replay in the documented order: sigma, n, the bank's randperm, eps, the Philox seed.
    g2 = torch.Generator().manual_seed(2)
    sigma, y, _, x_t = _replay_noise(g2, images, CDM_ARGS["P_mean"], CDM_ARGS["P_std"])
    rest = pool[torch.randperm(9, generator=g2)[:3]]
    B, K, N = 3, 2, CDM_ARGS["num_steps"]
    mu = _naive_target(x_t, sigma, torch.cat([y, rest]))
    eps = CDM_ARGS["eps_min"] + (CDM_ARGS["eps_max"] - CDM_ARGS["eps_min"]) * torch.rand(sigma.shape, generator=g2, dtype=F64)
    sigma_min = torch.minimum((sigma - eps).clamp_min(0.002), sigma)
    philox_seed = int(torch.randint(0, 1 << 62, (1,), generator=g2))
    t = _edm_schedule_f64(sigma.reshape(B), sigma_min.reshape(B), N)
    net.calls = []
    D0 = net(x_t, sigma)
    x = torch.cat([x_t, x_t])
    for k in range(N - 1):
        t0, t1 = t[:, k].repeat(K).reshape(-1, 1, 1, 1), t[:, k + 1].repeat(K).reshape(-1, 1, 1, 1)
        z = _philox(K * x_t.numel(), philox_seed, k * K * x_t.numel())
        x = x + 2 * (t1 - t0) * (x - net(x, t0)) / t0 + torch.sqrt(2 * (t1 - t0).abs() * t0) * z.reshape(x.shape)
    D1 = net(x, sigma_min.repeat(K, 1, 1, 1))
    want = _weight(sigma) * (D0 - mu) ** 2 + CDM_ARGS["lambda_m"] * (D1[:B] - D0) * (D1[B:] - D0)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)


def test_cdm_with_a_zero_length_rollout_is_the_edm_loss():
    # eps = 0: sigma_min = sigma, every step has h = 0, so x_final = x_t and D1a = D1b = D0. The
    # draws of sigma and n come first in both losses, so the same generator gives the same samples.
    images, net = _images(B=3), TinyDenoiser()
    cdm = CDMLoss(num_steps=3, eps_min=0.0, eps_max=0.0)(net, images, generator=torch.Generator().manual_seed(3))
    edm = EDMLoss()(net, images, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cdm, edm, rtol=1e-14, atol=0)


def test_sigma_min_is_floored_at_0002_and_capped_at_sigma():
    loss_fn = CDMLoss(eps_min=0.01, eps_max=0.05)
    sigma = torch.tensor([1e-4, 0.002, 0.01, 0.04, 1.0, 80.0], dtype=F64)
    g = torch.Generator().manual_seed(0)
    got = loss_fn.sample_sigma_min(sigma, g)
    eps = 0.01 + 0.04 * torch.rand(sigma.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    want = torch.tensor([max(min(s - e, s), 0.002) if s >= 0.002 else s for s, e in zip(sigma.tolist(), eps.tolist())], dtype=F64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[0] == sigma[0] and got[1] == 0.002 and (got[4:] < sigma[4:]).all()
    # A sample drawn below the floor still trains: its rollout has length zero (no consistency term).
    images, net = _images(B=2), TinyDenoiser()
    args = dict(P_mean=-10.0, P_std=0.0)
    cdm = CDMLoss(num_steps=3, **args)(net, images, generator=torch.Generator().manual_seed(4))
    edm = EDMLoss(**args)(net, images, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(cdm, edm, rtol=1e-14, atol=0)


class GaussianDenoiser(nn.Module):
    """The exact denoiser of data y ~ N(m, s^2 I): D(x; sigma) = m + s^2 / (s^2 + sigma^2) (x - m)."""

    def __init__(self, m, s):
        super().__init__()
        self.m, self.s = m, s
        self.first_x = None

    def forward(self, x, sigma, labels=None, augment_labels=None):
        if self.first_x is None:
            self.first_x = x.detach().clone()
        return self.m + self.s**2 / (self.s**2 + sigma**2) * (x - self.m)


def test_cdm_martingale_term_estimates_the_known_drift_of_the_linear_denoiser():
    """For the Gaussian's exact (linear) denoiser the Euler-Maruyama rollout is linear in x with
    Gaussian noise, so given x_t: E[x_final - m] = P (x_t - m), P = prod_k (1 + 2 (t_{k+1} - t_k)
    t_k / (s^2 + t_k^2)), and Var[x_final] = V = sum_k 2 |t_{k+1} - t_k| t_k prod_{j>k} f_j^2 per
    element. With c(t) = s^2 / (s^2 + t^2): E[D1] - D0 = (c(sigma_min) P - c(sigma)) (x_t - m) =: d,
    and each element of the martingale term (D1a - D0)(D1b - D0) has mean d^2 and variance
    2 d^2 v + v^2 with v = c(sigma_min)^2 V (independent trajectories)."""
    m, s = 0.3, 0.4
    B, shape, N, lambda_m = 256, (1, 8, 8), 3, 2.0
    g = torch.Generator().manual_seed(31)
    images = m + s * torch.randn((B, *shape), generator=g, dtype=F64)
    net = GaussianDenoiser(m, s)
    args = dict(num_steps=N, lambda_m=lambda_m, eps_min=0.6, eps_max=1.0, P_mean=-0.3, P_std=0.2)
    loss_fn = CDMLoss(**args)
    loss = loss_fn(net, images, generator=torch.Generator().manual_seed(32))
    # Replay sigma and eps (the noise n is read back from the net's first call: x_t).
    g = torch.Generator().manual_seed(32)
    sigma, y, _, x_t = _replay_noise(g, images, -0.3, 0.2)
    torch.testing.assert_close(net.first_x, x_t, rtol=0, atol=0)
    eps = 0.6 + 0.4 * torch.rand(sigma.shape, generator=g, dtype=F64)
    sigma_min = torch.minimum((sigma - eps).clamp_min(0.002), sigma).reshape(B)
    t = _edm_schedule_f64(sigma.reshape(B), sigma_min, N)
    c = lambda u: s**2 / (s**2 + u**2)  # noqa: E731
    P, V = torch.ones(B, dtype=F64), torch.zeros(B, dtype=F64)
    for k in range(N - 1):
        f = 1 + 2 * (t[:, k + 1] - t[:, k]) * t[:, k] / (s**2 + t[:, k] ** 2)
        P, V = P * f, V * f**2 + 2 * (t[:, k] - t[:, k + 1]).abs() * t[:, k]
    per = lambda v: v.reshape(B, 1, 1, 1)  # noqa: E731
    d = per(c(sigma_min) * P - c(sigma.reshape(B))) * (x_t - m)
    v = per(c(sigma_min) ** 2 * V).expand_as(d)
    D0 = net(x_t, sigma)
    term2 = (loss - _weight(sigma) * (D0 - y) ** 2) / lambda_m
    count = term2.numel()
    se = math.sqrt((2 * d**2 * v + v**2).sum().item()) / count
    gap = term2.mean().item() - (d**2).mean().item()
    assert abs(gap) < 4 * se, f"martingale term mean off by {gap / se:.1f} standard errors"
    # The test can tell: one shared noise for both trajectories would add v to every element.
    assert v.mean().item() > 10 * se
    # ... and the drift is measurable, not zero.
    assert (d**2).mean().item() > 10 * se


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------


def _conv_net():
    torch.manual_seed(0)
    net = TinyDenoiser(dtype=torch.float32)
    return net


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["edm", "stf", "cdm", "stfcdm"])
def test_gradients_reach_every_parameter(kind, device):
    images = _images(device=device).float()
    labels = _labels(4, device=device).float()
    ref = _images(B=8, seed=26, device=device).float()
    net = _conv_net().to(device)
    fns = {
        "edm": lambda: EDMLoss()(net, images, labels, flip_pipe),
        "stf": lambda: STFLoss()(net, images, labels, flip_pipe, ref=ref),
        "cdm": lambda: CDMLoss(num_steps=3)(net, images, labels, flip_pipe),
        "stfcdm": lambda: STFCDMLoss(num_steps=3)(net, images, labels, flip_pipe, ref=ref),
    }
    loss = fns[kind]()
    assert loss.shape == images.shape and loss.dtype == torch.float32
    loss.mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_cdm_gradient_includes_the_martingale_term_through_D1():
    # With a D1 path in the graph, the gradient depends on lambda_m; the rollout itself is no_grad.
    images = _images(B=3)
    grads = []
    for lambda_m in (0.0, 2.0):
        net = TinyDenoiser()
        loss = CDMLoss(num_steps=3, lambda_m=lambda_m, eps_min=0.2, eps_max=0.5, P_mean=0.0)(
            net, images, generator=torch.Generator().manual_seed(5)
        )
        loss.sum().backward()
        grads.append(net.conv.weight.grad.clone())
    assert (grads[0] - grads[1]).abs().max() > 1e-6


class Float32OutNet(nn.Module):
    """The dtype behaviour of EDM's preconditioned net (EDMPrecond, and cdm_kernels.edm's): x, sigma
    and the labels are cast to float32 and D(x; sigma) is float32, whatever the images' dtype."""

    def __init__(self):
        super().__init__()
        self.inner = TinyDenoiser(dtype=torch.float32)

    def forward(self, x, sigma, labels=None, augment_labels=None):
        f32 = lambda v: None if v is None else v.to(torch.float32)  # noqa: E731
        return self.inner(f32(x), f32(sigma), f32(labels), augment_labels=f32(augment_labels))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["cdm", "stfcdm"])
def test_cdm_losses_with_a_float32_net_and_images_of_another_dtype(kind, dtype):
    # The images' dtype (the target y, or mu(x_t) in the images' dtype) differs from the net's
    # output (D0, D1): the loss must promote them as EDMLoss / STFLoss do, not raise.
    images, labels = _images(B=3).to(dtype), _labels(3)
    ref = _images(B=7, seed=24).to(dtype)
    extra = {} if kind == "cdm" else {"ref": ref}
    cdm_cls, edm_cls = (CDMLoss, EDMLoss) if kind == "cdm" else (STFCDMLoss, STFLoss)
    edm_args = {k: CDM_ARGS[k] for k in ("P_mean", "P_std")}
    net = Float32OutNet()
    loss = cdm_cls(**CDM_ARGS)(net, images, labels, flip_pipe, generator=_gen(9), **extra)
    calls = list(net.inner.calls)  # D0, the rollout's num_steps - 1 calls, D1
    assert len(calls) == CDM_ARGS["num_steps"] + 1
    want_dtype = torch.promote_types(torch.float32, dtype)
    assert loss.shape == images.shape and loss.dtype == want_dtype
    # First term: EDM's (or STF's) loss with the same draws of sigma and n; second term: the
    # martingale product of the net's own D0 and D1 (its first and last calls), promoted likewise.
    first = edm_cls(**edm_args)(net, images, labels, flip_pipe, generator=_gen(9), **extra)
    assert first.dtype == want_dtype
    D0, D1 = (net.inner(*c[:3], augment_labels=c[3]).detach().to(want_dtype) for c in (calls[0], calls[-1]))
    B = images.shape[0]
    want = first + CDM_ARGS["lambda_m"] * (D1[:B] - D0) * (D1[B:] - D0)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert (D1[:B] - D0).abs().max() > 1e-3  # the martingale term is not trivially zero
    # Gradients flow through the casts to every parameter.
    loss.sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"num_steps must be an int >= 2 .*got 1"):
        CDMLoss(num_steps=1)
    with pytest.raises(ValueError, match=r"num_steps must be an int >= 2 .*got 2.5"):
        CDMLoss(num_steps=2.5)
    with pytest.raises(ValueError, match="0 <= eps_min <= eps_max, got eps_min = 0.1, eps_max = 0.05"):
        CDMLoss(eps_min=0.1)
    with pytest.raises(ValueError, match="0 <= eps_min <= eps_max, got eps_min = -0.1"):
        CDMLoss(eps_min=-0.1)
    with pytest.raises(ValueError, match="eps_max must be a finite number, got inf"):
        CDMLoss(eps_max=float("inf"))
    with pytest.raises(ValueError, match="lambda_m must be >= 0, got -1"):
        CDMLoss(lambda_m=-1)
    with pytest.raises(ValueError, match=r"P_std must be >= 0 \(the std of ln sigma\), got -1"):
        EDMLoss(P_std=-1)
    with pytest.raises(ValueError, match="sigma_data must be > 0, got 0"):
        STFLoss(sigma_data=0)
    with pytest.raises(ValueError, match=r"rbatch must be a positive int .*got 0"):
        STFLoss(rbatch=0)
    with pytest.raises(ValueError, match="rbatch is required with a bank"):
        STFCDMLoss(bank=ReferenceBank())
    with pytest.raises(TypeError, match="bank must be a ReferenceBank or None, got Tensor"):
        STFLoss(rbatch=4, bank=torch.zeros(3))


def test_call_errors_are_raised_before_the_net_runs():
    net = TinyDenoiser()
    images = _images()
    with pytest.raises(ValueError, match=r"ref has 3 rows but the minibatch has B = 4.*rbatch >= B"):
        STFLoss()(net, images, ref=images[:3])
    with pytest.raises(ValueError, match=r"ref must have shape \(rbatch, \*S\) with S = \(2, 4, 4\).*got \(6, 2, 4, 2\)"):
        STFCDMLoss()(net, images, ref=torch.zeros(6, 2, 4, 2, dtype=F64))
    with pytest.raises(ValueError, match="ref has 6 rows but this loss was built with rbatch = 5"):
        STFLoss(rbatch=5)(net, images, ref=_images(B=6))
    with pytest.raises(ValueError, match="no reference batch: pass ref= to the call"):
        STFLoss()(net, images)
    with pytest.raises(ValueError, match=r"rbatch = 3 is smaller than the minibatch B = 4"):
        STFLoss(rbatch=3, bank=ReferenceBank(_images(B=10)))(net, images)
    with pytest.raises(ValueError, match="cannot sample k = 7 distinct references from a bank of 5"):
        STFLoss(rbatch=11, bank=ReferenceBank(_images(B=5)))(net, images)
    with pytest.raises(ValueError, match=r"the bank holds references of shape \(2, 4, 2\) but the images have shape "
                                         r"\(2, 4, 4\)"):
        STFLoss(rbatch=6, bank=ReferenceBank(torch.zeros(10, 2, 4, 2, dtype=F64)))(net, images)
    with pytest.raises(TypeError, match="images must have a floating dtype, got torch.int64"):
        EDMLoss()(net, torch.zeros(4, 2, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="images must be a torch.Tensor of shape \\(B, \\*S\\), got list"):
        CDMLoss()(net, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"at least 2 dimensions, got \(4,\)"):
        EDMLoss()(net, torch.zeros(4, dtype=F64))
    assert net.calls == []
