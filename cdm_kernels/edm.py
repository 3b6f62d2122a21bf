"""EDM's preconditioning, a small U-Net in the layout of EDM's DDPM++ network and EDM's Heun sampler
(Karras et al. 2022; docs/math.md section 2), sized by options so that it trains on a CPU.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EDMPrecond", "UNet", "edm_sampler", "edm_sigma_steps", "save_image_grid"]


def _groups(channels: int) -> int:
    # GroupNorm needs a group count dividing the channels; 32 groups as in EDM once there are enough.
    # at least 2 channels a group where possible, so the statistics are not of a single channel.
    return next((g for g in (32, 16, 8, 4, 2) if channels % g == 0 and channels // g >= 2), 1)


def _scale_init_(module: nn.Module, scale: float) -> nn.Module:
    # EDM initialises the last layer of every residual branch near zero ("init_zero", 1e-5), so each
    # block starts as the identity and the network as D = c_skip x, which trains stably.
    with torch.no_grad():
        module.weight.mul_(scale)
        if module.bias is not None:
            module.bias.zero_()
    return module


class FourierEmbedding(nn.Module):
    """Random Fourier features of c_noise: (B,) -> (B, num_channels), [cos(2 pi f c), sin(2 pi f c)].

    The frequencies f ~ N(0, scale^2) are a buffer (saved in checkpoints, equal on every process)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c_noise: Tensor) -> Tensor:
        x = c_noise.to(self.freqs.dtype)[:, None] * (2 * math.pi * self.freqs)[None, :]
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(nn.Module):
    """Residual block: GroupNorm-SiLU-conv, noise embedding as (1 + scale) * h + shift, GroupNorm-SiLU-
    dropout-conv, a 1x1 skip when the channels change, optional up/down-sampling by 2 (nearest /
    average) and optional multi-head self-attention after it. Residual sums are scaled by sqrt(1/2)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        channels_per_head: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down = up, down
        self.norm0 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _scale_init_(nn.Conv2d(out_channels, out_channels, 3, padding=1), 1e-5)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.num_heads = max(1, out_channels // channels_per_head) if attention else 0
        if attention:
            self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
            self.qkv = nn.Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = _scale_init_(nn.Conv2d(out_channels, out_channels, 1), 1e-5)

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self._resample(F.silu(self.norm0(x)))
        h = self.conv0(h)
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        skip = self._resample(x)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (h + skip) * math.sqrt(0.5)
        if self.num_heads:
            B, C, H, W = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W).unbind(1)
            # (B, heads, tokens, channels per head) for the fused attention kernel.
            a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            a = a.transpose(-1, -2).reshape(B, C, H, W)
            x = (x + self.proj(a)) * math.sqrt(0.5)
        return x


class UNet(nn.Module):
    """The network F of EDM's preconditioning: a U-Net on (B, C, R, R) images.

    Args:
        img_resolution: R, divisible by 2^(len(channel_mult) - 1).
        in_channels, out_channels: image channels C.
        label_dim: number of classes (0: unconditional).
        model_channels: channels at the first level; level i has model_channels * channel_mult[i].
        channel_mult: one multiplier per resolution level (R, R/2, R/4, ...).
        num_blocks: residual blocks per level in the encoder (num_blocks + 1 in the decoder).
        attn_resolutions: resolutions at which blocks end with self-attention.
        dropout: dropout probability inside the residual blocks.

    forward(x (B, C, R, R) float, c_noise (B,), class_labels (B, label_dim) or None) -> (B, C, R, R).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        model_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_blocks: int = 1,
        attn_resolutions: Sequence[int] = (4,),
        dropout: float = 0.0,
    ):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or any(int(m) < 1 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {list(channel_mult)}")
        if img_resolution % (1 << (levels - 1)) != 0:
            raise ValueError(
                f"img_resolution {img_resolution} must be divisible by 2^(len(channel_mult) - 1) = "
                f"{1 << (levels - 1)} (channel_mult = {list(channel_mult)})"
            )
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.img_resolution, self.label_dim = img_resolution, label_dim
        emb_channels = model_channels * 4
        self.map_noise = FourierEmbedding(model_channels)
        self.map_label = nn.Linear(label_dim, model_channels, bias=False) if label_dim else None
        self.map_layer0 = nn.Linear(model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)
        block = dict(emb_channels=emb_channels, dropout=dropout)

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.enc = nn.ModuleList()
        skips = [model_channels]
        cout = model_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc.append(UNetBlock(cout, cout, down=True, **block))
                skips.append(cout)
            for _ in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc.append(UNetBlock(cin, cout, attention=res in attn_resolutions, **block))
                skips.append(cout)

        self.dec = nn.ModuleList()
        self.dec_takes_skip: list[bool] = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec.append(UNetBlock(cout, cout, attention=True, **block))
                self.dec.append(UNetBlock(cout, cout, **block))
            else:
                self.dec.append(UNetBlock(cout, cout, up=True, **block))
            self.dec_takes_skip += [False] * (2 if level == levels - 1 else 1)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec.append(UNetBlock(cin, cout, attention=attn, **block))
                self.dec_takes_skip.append(True)
        self.norm_out = nn.GroupNorm(_groups(cout), cout)
        self.conv_out = _scale_init_(nn.Conv2d(cout, out_channels, 3, padding=1), 1e-5)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.map_noise(c_noise)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels.to(emb.dtype))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        h = self.conv_in(x)
        skips = [h]
        for blk in self.enc:
            h = blk(h, emb)
            skips.append(h)
        for blk, takes_skip in zip(self.dec, self.dec_takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = blk(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class EDMPrecond(nn.Module):
    """EDM's preconditioned denoiser D(x; sigma) around a `UNet` (docs/math.md section 2).

        c_skip = sd^2 / (sigma^2 + sd^2)        c_out = sigma sd / sqrt(sigma^2 + sd^2)
        c_in   = 1 / sqrt(sigma^2 + sd^2)       c_noise = ln(sigma) / 4
        D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, class_labels)

    Args:
        img_resolution, img_channels: image shape (C, R, R).
        label_dim: number of classes, 0 for an unconditional model.
        sigma_data: sd, the data's standard deviation (0.5 for images in [-1, 1]).
        **unet_kwargs: sizes of the `UNet` (model_channels, channel_mult, num_blocks, ...).

    forward(x, sigma, class_labels=None, augment_labels=None):
        x (B, C, R, R) float; sigma a float, (B,) or (B, 1, 1, 1), > 0; class_labels (B,) int64 class
        indices or (B, label_dim) one-hot / weights, or None (a zero label); returns D with x's shape,
        in float32. `augment_labels` exists for EDM's loss signature and must be None (this model has
        no augmentation conditioning).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, sigma_data: float = 0.5, **unet_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.sigma_data = label_dim, float(sigma_data)
        self.model = UNet(img_resolution, img_channels, img_channels, label_dim=label_dim, **unet_kwargs)

    def _labels(self, class_labels, B: int, device) -> Tensor | None:
        if not self.label_dim:
            if class_labels is not None:
                raise ValueError("class_labels were given but the model is unconditional (label_dim = 0)")
            return None
        if class_labels is None:
            return torch.zeros(B, self.label_dim, device=device)
        if class_labels.dim() == 1 and not class_labels.is_floating_point():
            if class_labels.shape[0] != B:
                raise ValueError(f"class_labels must have shape ({B},) or ({B}, {self.label_dim}), got {tuple(class_labels.shape)}")
            return F.one_hot(class_labels.long(), self.label_dim).float()
        if tuple(class_labels.shape) != (B, self.label_dim):
            raise ValueError(
                f"class_labels must have shape ({B},) (int) or ({B}, {self.label_dim}) (one-hot), "
                f"got {tuple(class_labels.shape)}"
            )
        return class_labels.float()

    def forward(self, x: Tensor, sigma, class_labels: Tensor | None = None, augment_labels: Tensor | None = None) -> Tensor:
        expect = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expect:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expect))}), got {tuple(x.shape)}")
        if augment_labels is not None:
            raise ValueError("augment_labels must be None: this EDMPrecond has no augmentation conditioning")
        B = x.shape[0]
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.numel() not in (1, B):
            raise ValueError(f"sigma must be a float or hold B = {B} values, got shape {tuple(sigma.shape)}")
        sigma = sigma.reshape(-1, 1, 1, 1).expand(B, 1, 1, 1)
        labels = self._labels(class_labels, B, x.device)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log().flatten() / 4
        F_x = self.model(c_in * x, c_noise, labels)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, *,
                    dtype=torch.float64, device=None) -> Tensor:
    """EDM's sampling noise levels t_0 > ... > t_{N-1} (the rho schedule, docs/math.md section 2,
    `cdm_kernels.edm_schedule`) and t_N = 0. Returns shape (num_steps + 1,)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if num_steps == 1:
        t = torch.tensor([sigma_max], dtype=dtype, device=device)
    else:
        from .schedule import edm_schedule

        t = edm_schedule(float(sigma_max), float(sigma_min), num_steps, rho).to(device=device, dtype=dtype)
    return torch.cat([t, t.new_zeros(1)])


Denoiser = Callable[..., Tensor]


@torch.no_grad()
def edm_sampler(
    net: Denoiser,
    latents: Tensor,
    class_labels: Tensor | None = None,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Tensor:
    """EDM's Heun sampler (Karras et al. 2022, Algorithm 2), deterministic when S_churn = 0.

    Starting from x_0 = t_0 * latents, for each step (t, t') of `edm_sigma_steps`:
      churn:  t_hat = t (1 + gamma), x_hat = x + sqrt(t_hat^2 - t^2) S_noise z,
              gamma = min(S_churn / N, sqrt 2 - 1) if S_min <= t <= S_max else 0;
      Euler:  d = (x_hat - D(x_hat; t_hat)) / t_hat, x' = x_hat + (t' - t_hat) d;
      Heun:   unless t' = 0, x' = x_hat + (t' - t_hat) (d + d') / 2, d' = (x' - D(x'; t')) / t'.

    Args:
        net: the denoiser, called as net(x (B, *S) float64, sigma (B,) float64, class_labels) -> (B, *S).
        latents: (B, *S) standard normal noise (scaled by t_0 = sigma_max here).
        class_labels: passed through to `net`.
        generator: a CPU torch.Generator from which the churn steps draw their Philox seeds (no global
            random state is used, so sampling during training does not change the training run).
        backend: the `rollout_step` backend ("auto", "reference", "cpu", "triton", "cuda").
    The steps are `cdm_kernels.rollout_step` (kinds "churn", "euler", "heun"), in float64.
    Returns x at t_N = 0, shape (B, *S), float64.
    """
    from .rollout import rollout_step

    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    B = latents.shape[0]

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        # float64 in (EDMPrecond casts to its own precision), float64 out, as in EDM's sampler.
        return net(x, t.expand(B), class_labels).to(torch.float64)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i in range(num_steps):
        t_cur, t_next = t_steps[i].expand(B), t_steps[i + 1].expand(B)
        x_cur = x_next
        if S_churn > 0:
            # Churn's noise comes from the kernel's Philox stream, keyed by a seed drawn from `generator`.
            x_hat, t_hat = rollout_step(
                x_cur, None, t_cur, kind="churn", num_steps=num_steps, S_churn=S_churn, S_min=S_min,
                S_max=S_max, S_noise=S_noise, generator=generator, backend=backend,
            )
        else:
            x_hat, t_hat = x_cur, t_cur
        denoised = denoise(x_hat, t_hat)
        # seed=0: the deterministic kinds use no noise, and an explicit seed keeps rollout_step from
        # drawing one from the global generator (which would perturb a training run that samples).
        x_next = rollout_step(x_hat, denoised, t_hat, t_next, kind="euler", seed=0, backend=backend)
        if i < num_steps - 1:
            denoised_next = denoise(x_next, t_next)
            x_next = rollout_step(x_hat, denoised, t_hat, t_next, kind="heun", x_euler=x_next, denoised_euler=denoised_next,
                                  seed=0, backend=backend)
    return x_next


def save_image_grid(images: Tensor, path: str, ncols: int | None = None, pad: int = 1, min_width: int = 512) -> None:
    """Writes (B, C, H, W) images in [-1, 1] as one PNG grid (C = 1 or 3), rows of `ncols` images.

    Images are separated by `pad` pixels of mid-gray; small images are enlarged (nearest neighbour,
    an integer factor) until the grid is at least `min_width` pixels wide, so 8x8 digits are legible."""
    from PIL import Image

    B, C, H, W = images.shape
    if C not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(images.shape)}")
    ncols = ncols or max(1, int(math.ceil(math.sqrt(B))))
    nrows = -(-B // ncols)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.full((C, nrows * (H + pad) + pad, ncols * (W + pad) + pad), 128, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, ncols)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, top:top + H, left:left + W] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if C == 1 else arr, "L" if C == 1 else "RGB")
    zoom = max(1, -(-min_width // img.width))
    if zoom > 1:
        img = img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)
    img.save(path)
