"""EDM preconditioning, the U-Net and EDM's Heun sampler (docs/math.md section 2).

The sampler is checked with the exact denoiser of a Gaussian data set N(m, s^2 I),
D(x; sigma) = m + s^2 / (s^2 + sigma^2) (x - m): its deterministic result is an affine map of the
latents whose factor follows from the step formulas in float64, and its samples (deterministic or
with churn, enough steps) have the Gaussian's mean and variance."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cdm_kernels import available_rollout_backends
from cdm_kernels.edm import EDMPrecond, UNet, edm_sampler, edm_sigma_steps, save_image_grid

M, S = 0.3, 0.7


def gaussian_denoiser(x, sigma, labels=None):
    sigma = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(torch.float64)
    return M + S**2 / (S**2 + sigma**2) * (x.to(torch.float64) - M)


def _tiny(**kw):
    args = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))
    args.update(kw)
    return args


def test_preconditioning_matches_the_formula_in_float64():
    torch.manual_seed(1)
    net = EDMPrecond(8, 1, label_dim=10, **_tiny()).double()
    # randomise the near-zero output layers so F contributes
    for p in net.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0], dtype=torch.float64)
    labels = torch.tensor([0, 3, 9, 1, 1])
    # float32 forward (what training runs) vs the float64 formula on the float64 F
    net32 = EDMPrecond(8, 1, label_dim=10, **_tiny())
    net32.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    D = net32(x.float(), sigma.float(), labels).double()
    sd = 0.5
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / torch.sqrt(s**2 + sd**2)
    c_in = 1 / torch.sqrt(s**2 + sd**2)
    c_noise = torch.log(sigma) / 4
    onehot = torch.nn.functional.one_hot(labels, 10).double()
    F_x = net.model(c_in * x, c_noise, onehot)
    expect = c_skip * x + c_out * F_x
    torch.testing.assert_close(D, expect, rtol=1e-4, atol=1e-4 * float(expect.detach().abs().max()))
    # the small-sigma limit: D(x; sigma) -> x
    torch.testing.assert_close(D[0], x[0], rtol=0, atol=1e-2)


def test_sigma_shapes_and_label_forms_agree():
    torch.manual_seed(2)
    net = EDMPrecond(8, 1, label_dim=4, **_tiny())
    x = torch.randn(3, 1, 8, 8)
    sig = torch.tensor([0.3, 1.0, 2.0])
    labels = torch.tensor([0, 2, 3])
    a = net(x, sig, labels)
    b = net(x, sig.reshape(3, 1, 1, 1), torch.nn.functional.one_hot(labels, 4).float())
    assert torch.equal(a, b)
    c = net(x, 0.5, labels)
    d = net(x, torch.full((3,), 0.5), labels)
    assert torch.equal(c, d)


def test_freshly_initialised_network_is_near_c_skip_x():
    # EDM's near-zero output layers: D = c_skip x + c_out F with F ~ 0 at initialisation.
    torch.manual_seed(3)
    net = EDMPrecond(16, 3, **_tiny(channel_mult=(1, 2, 2), attn_resolutions=(8, 4)))
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.5, 5.0])
    c_skip = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(net(x, sigma), c_skip.reshape(-1, 1, 1, 1) * x, rtol=0, atol=1e-3)


def test_unet_trains_every_parameter():
    torch.manual_seed(4)
    net = EDMPrecond(8, 3, label_dim=2, **_tiny())
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(4, 3, 8, 8)
    net(x, torch.rand(4) + 0.1, torch.tensor([0, 1, 1, 0])).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_bad_inputs_are_named():
    net = EDMPrecond(8, 1, label_dim=0, **_tiny())
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8), 1.0)
    with pytest.raises(ValueError, match=r"class_labels were given but the model is unconditional"):
        net(torch.randn(2, 1, 8, 8), 1.0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"sigma must be a float or hold B = 2 values, got shape \(3,\)"):
        net(torch.randn(2, 1, 8, 8), torch.ones(3))
    cond = EDMPrecond(8, 1, label_dim=3, **_tiny())
    with pytest.raises(ValueError, match=r"class_labels must have shape \(2,\) \(int\) or \(2, 3\)"):
        cond(torch.randn(2, 1, 8, 8), 1.0, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"img_resolution 12 must be divisible by 2\^\(len\(channel_mult\) - 1\) = 8"):
        UNet(12, 1, 1, channel_mult=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"num_steps must be >= 1, got 0"):
        edm_sigma_steps(0)


def test_sigma_steps_are_the_rho_schedule():
    t = edm_sigma_steps(18)
    assert t.shape == (19,) and t[-1] == 0
    k = torch.arange(18, dtype=torch.float64)
    rho = 7.0
    expect = (80 ** (1 / rho) + k / 17 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    torch.testing.assert_close(t[:-1], expect, rtol=1e-14, atol=0)


def _heun_factor(num_steps):
    """The deterministic sampler maps x_T - m to f (x_T - m) for the Gaussian denoiser:
    d(x; t) = (x - m) t / (s^2 + t^2), so each Euler/Heun step multiplies x - m by a number."""
    t = edm_sigma_steps(num_steps).tolist()
    f = 1.0
    for i in range(num_steps):
        tc, tn = t[i], t[i + 1]
        k = tc / (S**2 + tc**2)
        e = 1 + (tn - tc) * k
        if i < num_steps - 1:
            e = 1 + (tn - tc) * 0.5 * (k + e * tn / (S**2 + tn**2))
        f *= e
    return f


@pytest.mark.parametrize("backend", available_rollout_backends("cpu"))
def test_deterministic_heun_sampler_is_the_exact_discrete_map(backend):
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(64, 1, 4, 4, generator=g, dtype=torch.float64)
    for n in (1, 2, 18):  # n = 1: a single Euler step to 0, x = D(x; 80)
        x = edm_sampler(gaussian_denoiser, latents, num_steps=n, backend=backend)
        expect = M + _heun_factor(n) * (80.0 * latents - M)
        # float64 throughout: only rounding of a few dozen operations on |x| <= ~400
        torch.testing.assert_close(x, expect, rtol=0, atol=1e-10)


@pytest.mark.parametrize("churn", [False, True])
def test_heun_sampler_reproduces_the_gaussian(churn):
    g = torch.Generator().manual_seed(6)
    n, D = 4000, 16
    latents = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    kw = dict(S_churn=30.0, S_min=0.01, S_max=10.0, generator=g) if churn else {}
    x = edm_sampler(gaussian_denoiser, latents, num_steps=100, **kw).reshape(-1)
    N = n * D
    # sampling errors of the mean and variance of N samples of N(m, s^2): s/sqrt(N), s^2 sqrt(2/N);
    # 100 steps leave a discretisation bias of the variance of about 0.3% (see _heun_factor).
    assert abs(float(x.mean()) - M) < 5 * S / math.sqrt(N)
    assert abs(float(x.var()) - S**2) < 5 * S**2 * math.sqrt(2 / N) + 0.005
    if churn:
        # churn injects fresh noise: the result differs from the deterministic sampler's
        x_det = edm_sampler(gaussian_denoiser, latents, num_steps=100).reshape(-1)
        assert float((x - x_det).abs().mean()) > 0.05


def test_churn_sampler_reproduces_with_its_generator_and_leaves_global_rng_alone():
    latents = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    state = torch.get_rng_state()
    a = edm_sampler(gaussian_denoiser, latents, num_steps=6, S_churn=10, generator=torch.Generator().manual_seed(1))
    b = edm_sampler(gaussian_denoiser, latents, num_steps=6, S_churn=10, generator=torch.Generator().manual_seed(1))
    c = edm_sampler(gaussian_denoiser, latents, num_steps=6, S_churn=10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


def test_sampler_runs_the_network_with_labels():
    torch.manual_seed(7)
    net = EDMPrecond(8, 1, label_dim=10, **_tiny())
    out = edm_sampler(net, torch.randn(10, 1, 8, 8), torch.arange(10), num_steps=3)
    assert out.shape == (10, 1, 8, 8) and out.dtype == torch.float64 and torch.isfinite(out).all()


def test_save_image_grid(tmp_path):
    imgs = torch.linspace(-1, 1, 6 * 3 * 4 * 4).reshape(6, 3, 4, 4)
    save_image_grid(imgs, str(tmp_path / "g.png"), ncols=3, pad=1, min_width=100)
    im = Image.open(tmp_path / "g.png")
    w, h = 3 * 5 + 1, 2 * 5 + 1  # 4 pixels an image plus 1 of padding
    zoom = -(-100 // w)
    assert im.size == (w * zoom, h * zoom) and im.mode == "RGB"
    arr = np.asarray(im)
    # image 4 (row 1, column 1), its pixel (0, 0), channel 0, read back through padding and zoom
    expect = round((float(imgs[4, 0, 0, 0]) + 1) * 127.5)
    assert arr[6 * zoom, 6 * zoom, 0] == expect
    assert arr[5 * zoom, 5 * zoom, 0] == 128  # padding
    save_image_grid(torch.zeros(2, 1, 8, 8), str(tmp_path / "gray.png"))
    assert Image.open(tmp_path / "gray.png").mode == "L"
    with pytest.raises(ValueError, match=r"images must have 1 or 3 channels, got shape \(2, 2, 8, 8\)"):
        save_image_grid(torch.zeros(2, 2, 8, 8), str(tmp_path / "bad.png"))
