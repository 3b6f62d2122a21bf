"""EmpiricalDenoiser against the posterior mean written out by brute force (float64, odd sizes, the
whole noise range, with and without labels), its input errors, its float32 accuracy against direct
differences on the digits, sampling with it, and CDM's consistency property measured with it."""

from __future__ import annotations

import math

import pytest
import torch

import cdm_kernels
from cdm_kernels import EmpiricalDenoiser, consistency_rollout, edm_sampler, load_dataset, martingale_loss

SIGMAS = (0.002, 0.05, 0.3, 0.7, 2.0, 9.0, 80.0)


def brute_force(x, sigma, images, classes=None, image_classes=None):
    """E[x0 | x] by direct differences: softmax_j(-||x_i - r_j||^2 / (2 sigma_i^2)) over the images
    (of sample i's class when classes are given), one sample at a time, in float64."""
    X, R = x.double().flatten(1), images.double().flatten(1)
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(X.shape[0])
    out = torch.empty_like(X)
    for i in range(X.shape[0]):
        r = R if classes is None else R[image_classes == classes[i]]
        d = ((X[i] - r) ** 2).sum(1)
        out[i] = torch.softmax(-d / (2 * s[i] ** 2), 0) @ r
    return out.reshape(x.shape)


def _data(n, shape, dtype=torch.float64, classes=0):
    images = torch.rand(n, *shape, dtype=dtype) * 2 - 1
    labels = torch.arange(n) % classes if classes else None
    return images, labels


def _noisy(images, B, sigma, gen=None):
    idx = torch.randint(0, images.shape[0], (B,), generator=gen)
    s = torch.as_tensor(sigma, dtype=images.dtype).reshape(-1, *([1] * (images.dim() - 1)))
    return images[idx] + s * torch.randn((B, *images.shape[1:]), dtype=images.dtype, generator=gen), idx


# ----------------------------------------------------------------------------------------------
# Against the brute-force formula
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3, 5), (2, 3, 3), (3, 1, 1)])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_float64_matches_brute_force(shape, sigma):
    images, _ = _data(37, shape)
    net = EmpiricalDenoiser(images, chunk=8)
    x, _ = _noisy(images, 5, sigma)
    got = net(x, sigma)
    assert got.dtype == torch.float64 and got.shape == x.shape
    torch.testing.assert_close(got, brute_force(x, sigma, images), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("form", ["float", "vector", "column"])
def test_per_sample_sigma_in_every_form(form):
    images, _ = _data(37, (1, 3, 5))
    net = EmpiricalDenoiser(images)
    sig = torch.tensor(SIGMAS[:5], dtype=torch.float64)
    x, _ = _noisy(images, 5, sig)
    want = brute_force(x, sig, images)
    if form == "float":
        x, sig, want = x[:1], 0.3, brute_force(x[:1], 0.3, images)
    given = sig.reshape(-1, 1, 1, 1) if form == "column" else sig
    torch.testing.assert_close(net(x, given), want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_labels_give_the_posterior_over_the_sample_class(one_hot, sigma):
    images, labels = _data(37, (1, 3, 5), classes=4)
    given = torch.nn.functional.one_hot(labels, 4).float() if one_hot else labels
    net = EmpiricalDenoiser(images, given, chunk=3)
    assert net.label_dim == 4
    x, _ = _noisy(images, 5, sigma)
    classes = torch.tensor([3, 0, 0, 2, 1])
    cl = torch.nn.functional.one_hot(classes, 4).double() if one_hot else classes
    torch.testing.assert_close(net(x, sigma, cl), brute_force(x, sigma, images, classes, labels), rtol=1e-11, atol=1e-12)
    # Without class labels: the posterior over every image.
    torch.testing.assert_close(net(x, sigma), brute_force(x, sigma, images), rtol=1e-11, atol=1e-12)


def test_attributes_dtype_and_call_convention():
    images, labels = _data(11, (3, 4, 4), dtype=torch.float32, classes=3)
    net = EmpiricalDenoiser(images, labels, sigma_min=0.01, sigma_max=20.0)
    assert (net.img_resolution, net.img_channels, net.label_dim) == (4, 3, 3)
    assert (net.sigma_min, net.sigma_max) == (0.01, 20.0)
    assert EmpiricalDenoiser(images).label_dim == 0
    assert isinstance(net.round_sigma(0.5), torch.Tensor)
    assert "EmpiricalDenoiser" in cdm_kernels.__all__
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert net(x, 1.0).dtype == torch.float64
    assert net(x.float(), torch.tensor(1.0), force_fp32=True).dtype == torch.float32
    assert net(x.half(), 1.0).dtype == torch.float16
    assert net(x[:0], 1.0).shape == (0, 3, 4, 4)


def test_stays_exact_far_from_the_origin():
    # Translation invariance: the data shifted by 100 give the shifted posterior mean.
    images, _ = _data(37, (1, 3, 5))
    x, _ = _noisy(images, 5, 0.7)
    want = EmpiricalDenoiser(images)(x, 0.7) + 100
    torch.testing.assert_close(EmpiricalDenoiser(images + 100)(x + 100, 0.7), want, rtol=1e-12, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_bad_construction():
    images, labels = _data(10, (1, 3, 5), classes=3)
    _raises(ValueError, r"images must have shape \(n, C, H, W\)", EmpiricalDenoiser, images[:, 0])
    _raises(TypeError, "images must be a torch.Tensor", EmpiricalDenoiser, images.numpy())
    _raises(TypeError, "images must have a floating dtype", EmpiricalDenoiser, images.long())
    _raises(ValueError, "images is empty", EmpiricalDenoiser, images[:0])
    bad = images.clone()
    bad[7, 0, 1, 2] = float("nan")
    _raises(ValueError, r"images must be finite; images\[7\]", EmpiricalDenoiser, bad)
    _raises(ValueError, r"labels must have shape \(n,\) or \(n, label_dim\) with n = 10", EmpiricalDenoiser,
            images, labels[:9])
    _raises(TypeError, "labels of shape \\(n,\\) must be integer", EmpiricalDenoiser, images, labels.float())
    _raises(ValueError, "class ids >= 0", EmpiricalDenoiser, images, labels - 1)
    two_hot = torch.nn.functional.one_hot(labels, 3).float()
    two_hot[4, 0] = 1
    _raises(ValueError, "one-hot rows; row 4", EmpiricalDenoiser, images, two_hot)
    _raises(ValueError, "sigma_min must be a positive finite number", EmpiricalDenoiser, images, sigma_min=0.0)
    _raises(ValueError, "need sigma_min < sigma_max", EmpiricalDenoiser, images, sigma_min=5.0, sigma_max=1.0)
    _raises(ValueError, "chunk must be a positive int", EmpiricalDenoiser, images, chunk=0)


def test_bad_calls():
    images, labels = _data(10, (1, 3, 5), classes=3)
    net, plain = EmpiricalDenoiser(images, labels), EmpiricalDenoiser(images)
    x = torch.randn(4, 1, 3, 5, dtype=torch.float64)
    _raises(ValueError, r"x must have shape \(B, 1, 3, 5\)", net, x[0], 1.0)
    _raises(ValueError, r"x must have shape \(B, 1, 3, 5\)", net, x.reshape(4, 1, 5, 3), 1.0)
    _raises(TypeError, "x must have a floating dtype", net, x.long(), 1.0)
    _raises(ValueError, "sigma must be positive and finite", net, x, 0.0)
    _raises(ValueError, "sigma must be positive and finite", net, x, -1.0)
    _raises(ValueError, r"sigma\[2\] = nan", net, x, torch.tensor([1.0, 1.0, float("nan"), 1.0]))
    _raises(ValueError, r"sigma must have shape \(B,\)", net, x, torch.ones(3))
    _raises(ValueError, "class_labels were given but the denoiser was built without labels", plain, x, 1.0,
            torch.zeros(4, dtype=torch.long))
    _raises(ValueError, r"class_labels must have shape \(4,\)", net, x, 1.0, torch.zeros(5, dtype=torch.long))
    _raises(ValueError, r"class_labels must be classes in \[0, 3\), got 3", net, x, 1.0, torch.tensor([0, 1, 2, 3]))
    _raises(ValueError, "one-hot rows; row 0", net, x, 1.0, torch.full((4, 3), 1 / 3))
    _raises(ValueError, "augment_labels must be None", net, x, 1.0, None, torch.zeros(4, 9))
    empty_class = EmpiricalDenoiser(images, torch.nn.functional.one_hot(labels, 5).float())
    _raises(ValueError, "class 4, of which the denoiser holds no image", empty_class, x, 1.0, torch.tensor([0, 4, 1, 1]))


# ----------------------------------------------------------------------------------------------
# Float32 on the digits (D = 64): within 2x of the direct-differences formula's float32 error
# ----------------------------------------------------------------------------------------------


def _rel(got, want) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("trial", range(3))
def test_float32_on_the_digits_within_twice_direct_differences(trial):
    data = load_dataset("digits", use_labels=False).images
    net = EmpiricalDenoiser(data)
    gen = torch.Generator().manual_seed(trial)
    # Relative errors below a thousandth of float32's epsilon count as exact (the nearest-image
    # limit, where both give the image itself up to a subnormal weight).
    floor = 1e-3 * torch.finfo(torch.float32).eps
    for sigma in (0.002, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 2.0, 5.0, 20.0, 80.0):
        x, _ = _noisy(data, 64, sigma, gen)
        truth = brute_force(x.double(), sigma, data)
        X, R = x.flatten(1), data.flatten(1)
        w = torch.softmax(-((X[:, None] - R[None]) ** 2).sum(-1) / (2 * sigma**2), 1)  # float32, direct differences
        e_direct = _rel((w @ R).reshape(x.shape), truth)
        got = net(x, sigma)
        assert got.dtype == torch.float32
        e = _rel(got, truth)
        assert e <= 2 * e_direct + floor, f"sigma {sigma}: error {e:.3g} against direct differences' {e_direct:.3g}"


# ----------------------------------------------------------------------------------------------
# Sampling and CDM's consistency property
# ----------------------------------------------------------------------------------------------


def test_edm_sampler_reproduces_training_images():
    data = load_dataset("digits", use_labels=False).images[:60].double()
    net = EmpiricalDenoiser(data)
    gen = torch.Generator().manual_seed(1)
    samples = edm_sampler(net, torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=gen))
    X, R = samples.flatten(1), data.flatten(1)
    nearest = torch.cdist(X, R).min(1).values
    pairs = torch.pdist(R)
    typical = pairs.median()
    assert float(nearest.max()) < 1e-3 * float(typical), (nearest.max(), typical)
    # and not all the same image
    assert len({int(i) for i in torch.cdist(X, R).argmin(1)}) > 4


def _martingale_term(net, images, sigma, num_steps, B=4000, seed=0):
    """The martingale term (D1a - D0)(D1b - D0) of CDM with `net`, from x_t = y + sigma z over a
    rollout to sigma / 4: its mean over samples and elements, and the Monte Carlo standard error."""
    gen = torch.Generator().manual_seed(seed)
    x_t, _ = _noisy(images, B, sigma, gen)
    D0 = net(x_t, sigma)
    x_final, sigma_final = consistency_rollout(net, x_t, sigma, sigma / 4, num_steps, 2, seed=seed + 1)
    D1 = net(x_final.reshape(2 * B, *x_t.shape[1:]), sigma_final.repeat(2))
    # weight 0: only the martingale term of the loss
    m = martingale_loss(D0, D1[:B], D1[B:], D0, 0.0, lambda_m=1.0).flatten(1).mean(1)
    return float(m.mean()), float(m.std()) / math.sqrt(B)


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_martingale_term_vanishes_for_the_exact_denoiser_only(sigma):
    images, _ = _data(24, (1, 4, 4))
    net = EmpiricalDenoiser(images)
    mean, se = _martingale_term(net, images, sigma, num_steps=20)
    assert abs(mean) < 4 * se, (mean, se)

    def mis_scaled(x, s, class_labels=None, **kwargs):  # the exact denoiser at half the noise level
        return net(x, 0.5 * torch.as_tensor(s, dtype=x.dtype))

    mean_mis, se_mis = _martingale_term(mis_scaled, images, sigma, num_steps=20)
    assert mean_mis > 8 * se_mis and mean_mis > 5 * abs(mean), (mean_mis, se_mis, mean)


def test_martingale_remainder_of_a_one_step_rollout():
    # With one Euler-Maruyama step the discretisation leaves a clearly positive remainder, which
    # twenty steps remove (the exact denoiser's own test above).
    images, _ = _data(24, (1, 4, 4))
    net = EmpiricalDenoiser(images)
    mean, se = _martingale_term(net, images, 1.0, num_steps=2)
    assert mean > 6 * se, (mean, se)


# ----------------------------------------------------------------------------------------------
# The measurement script, at tiny sizes
# ----------------------------------------------------------------------------------------------


def test_estimators_script_at_tiny_sizes(tmp_path):
    from benchmarks import estimators as est

    cfg = est.Config(sigmas=(0.05, 1.0), batch=8, batches=3, digits_refs=(8, 64, 1797), gmm_dim=48,
                     gmm_refs=(8, 32), gmm_batch=8, cdm_sigmas=(1.0,), cdm_samples=40, cdm_steps=(2, 4),
                     train_steps=2, out=str(tmp_path))
    stf, cdm = est.run(cfg)
    assert len(stf) == 2 * 3 + 2 * 2 and len(cdm) == 2 + 2 + 1
    for r in stf:
        assert r["mse_stf"] == pytest.approx(r["bias2"] + r["var"], rel=1e-9, abs=1e-30)
        assert r["var"] >= 0 and r["mse_dsm"] >= 0
    whole = [r for r in stf if r["dataset"] == "digits" and r["n"] == 1797]
    assert all(r["R"] == 1 and r["mse_stf"] < 1e-24 for r in whole)  # the whole set: the exact target
    assert all(r["R"] == 1 and r["var"] == 0 for r in stf if r["n"] == cfg.batch and r["dataset"] == "digits")
    exact = [r for r in cdm if r["denoiser"] == "exact"]
    assert [r["num_steps"] for r in exact] == [2, 4] and all(r["mse_vs_exact"] == 0 for r in exact)
    assert all(r["mse_vs_exact"] > 0 for r in cdm if r["denoiser"] != "exact")
    env = {"device_name": "cpu", "torch": torch.__version__, "cdm_kernels": "test", "threads": "1", "quick": "True"}
    est.write_csv(str(tmp_path / "stf.csv"), est.STF_FIELDS, stf, env)
    est.write_markdown(str(tmp_path / "e.md"), cfg, stf, cdm, env, "test")
    est.plot(str(tmp_path), stf, cdm)
    md = (tmp_path / "e.md").read_text()
    assert md.count("| 0.05 | ") == 2 and "n for 1%" in md and "EDMLoss net (2 steps)" in md
    assert (tmp_path / "estimators_stf.png").stat().st_size > 0 and (tmp_path / "estimators_cdm.png").stat().st_size > 0
    assert est.refs_for_one_percent(stf)[("digits", 1.0)] in (8, 64, 1797)


def test_small_images_compute_in_float64_unless_a_tensor_core_mode_is_asked():
    from cdm_kernels.empirical import arithmetic_dtype

    assert arithmetic_dtype(torch.float32, 64) == torch.float64
    assert arithmetic_dtype(torch.float16, 1023) == torch.float64
    assert arithmetic_dtype(torch.float32, 1024) == torch.float32
    assert arithmetic_dtype(torch.float64, 3072) == torch.float64
    assert arithmetic_dtype(torch.float32, 64, "tf32") == torch.float32


@pytest.mark.parametrize("labelled", [False, True])
def test_the_losses_drive_it_as_a_network(labelled):
    images, labels = _data(37, (1, 3, 5), classes=4)
    net = EmpiricalDenoiser(images, labels if labelled else None)
    gen = torch.Generator().manual_seed(3)
    batch = images[:6]
    given = labels[:6] if labelled else None
    cdm = cdm_kernels.CDMLoss(num_steps=4)(net, batch, given, generator=gen)
    edm = cdm_kernels.EDMLoss()(net, batch, given, generator=torch.Generator().manual_seed(3))
    assert cdm.shape == edm.shape == batch.shape and bool(torch.isfinite(cdm).all())
    # The exact denoiser minimises EDM's loss: on the same draws of sigma and noise, a denoiser
    # evaluated at a wrong noise level does worse.
    many = images[torch.randint(0, 37, (2000,), generator=gen)]

    def wrong(x, sigma, class_labels=None, augment_labels=None):
        return net(x, 0.7 * sigma, class_labels)

    exact_loss = cdm_kernels.EDMLoss()(net, many, generator=torch.Generator().manual_seed(4)).mean()
    wrong_loss = cdm_kernels.EDMLoss()(wrong, many, generator=torch.Generator().manual_seed(4)).mean()
    assert float(exact_loss) < float(wrong_loss)
