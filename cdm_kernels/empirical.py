"""The exact denoiser of a finite data set, E[x0 | x] under the empirical distribution of its images
(per class with labels), streamed through `stf_target` and called like the library's `EDMPrecond`
(docs/estimators.md; the formula: docs/math.md section 4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import check_float, compute_dtype
from .stf import check_sigma, stf_target

__all__ = ["EmpiricalDenoiser"]


# Below this many features per image, float32 images are computed in float64: there the matmul form
# of stf_target loses up to 3x to direct differences in float32 (its rounding is relative to
# ||x'|| ||r'||, not to the nearest distances), and a float64 pass costs little (docs/estimators.md).
SMALL_DIM = 1024


def arithmetic_dtype(dtype: torch.dtype, dim: int, precision: str = "ieee") -> torch.dtype:
    """The dtype the denoiser computes in for images of `dtype` with `dim` features each (a
    tensor-core precision mode asks for float32 products: it keeps float32)."""
    return torch.float64 if dim < SMALL_DIM and precision == "ieee" else compute_dtype(dtype)


def _check_limit(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class EmpiricalDenoiser(torch.nn.Module):
    """The ideal denoiser of a data set: D(x; sigma) = E[x0 | x0 + sigma z = x] with x0 uniform over
    `images` (over the images of the sample's class when labels are given),

        D(x; sigma) = sum_j w_j r_j,   w = softmax_j(-||x - r_j||^2 / (2 sigma^2)),

    the minimiser of EDM's denoising loss on that data, computed exactly by `stf_target` over the
    whole set in O((B + chunk) D) memory (never B x n x D).

    Args:
        images: (n, C, H, W) floating tensor, n >= 1, finite (images in [-1, 1] by EDM's convention).
            The arithmetic is float64 for float64 images and for images of fewer than 1024 features
            (C H W < 1024, where float32's matmul form would lose digits and float64 costs little)
            unless `precision` is a tensor-core mode, else float32.
        labels: None, (n,) int64 class ids in [0, label_dim), or (n, label_dim) one-hot rows.
        sigma_min, sigma_max: the noise range a sampler should use (attributes, as EDM's networks').
        chunk: references per streaming chunk of `stf_target` (None picks one).
        backend, precision: passed to `stf_target`.

    Attributes: img_resolution (H), img_channels (C), label_dim (0 without labels), sigma_min,
    sigma_max, n (the number of images).

    forward(x, sigma, class_labels=None, augment_labels=None, **kwargs):
        x (B, C, H, W) floating; sigma a float, (B,) or (B, 1, 1, 1), positive and finite;
        class_labels (B,) ints or (B, label_dim) one-hot: each sample's posterior is over the images
        of its class; None: over all images. Returns D with x's shape, dtype and device. The call
        convention of `EDMPrecond`, so `edm_sampler`, `consistency_rollout` and the losses drive it
        as a network; augment_labels must be None, other keyword arguments (EDM's `force_fp32`, ...)
        are accepted and ignored.
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, *, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, chunk: int | None = None, backend: str = "auto", precision: str = "ieee"):
        super().__init__()
        check_float(images, "images")
        if images.dim() != 4:
            raise ValueError(f"images must have shape (n, C, H, W), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images is empty: the empirical denoiser needs at least one image (n >= 1)")
        if not bool(torch.isfinite(images).all()):
            i = int((~torch.isfinite(images)).flatten(1).any(1).nonzero()[0, 0])
            raise ValueError(f"images must be finite; images[{i}] holds a NaN or an infinity")
        self.sigma_min = _check_limit(sigma_min, "sigma_min")
        self.sigma_max = _check_limit(sigma_max, "sigma_max")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"need sigma_min < sigma_max, got sigma_min = {sigma_min}, sigma_max = {sigma_max}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
        self.chunk, self.backend, self.precision = chunk, backend, precision
        n, C, H, W = images.shape
        self.n, self.img_channels, self.img_resolution = n, C, H
        self.img_shape = (C, H, W)
        dtype = arithmetic_dtype(images.dtype, C * H * W, precision)
        imgs = images.detach().to(dtype)

        classes = self._check_labels(labels, n, images.device)
        if classes is None:
            self.label_dim = 0
            offsets = torch.tensor([0, n])
        else:
            # The images sorted by class, so that each class is one contiguous slice of references.
            order = torch.sort(classes, stable=True).indices
            imgs = imgs[order]
            counts = torch.bincount(classes.cpu(), minlength=self.label_dim)
            offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.register_buffer("refs", imgs.reshape(n, C * H * W).contiguous(), persistent=False)
        self._offsets = [int(v) for v in offsets]

    # ------------------------------------------------------------------------------------------

    def _check_labels(self, labels, n: int, device) -> Tensor | None:
        """The (n,) int64 class of every image, or None; sets label_dim."""
        if labels is None:
            return None
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor of shape (n,) or (n, label_dim), got {type(labels).__name__}")
        if labels.device != device:
            raise ValueError(f"labels are on {labels.device} but images are on {device}; put them on one device")
        if labels.dim() not in (1, 2) or labels.shape[0] != n:
            raise ValueError(
                f"labels must have shape (n,) or (n, label_dim) with n = {n} (images.shape[0]), "
                f"got {tuple(labels.shape)}"
            )
        if labels.dim() == 1:
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise TypeError(f"labels of shape (n,) must be integer class ids, got dtype {labels.dtype}")
            classes = labels.long()
            if bool((classes < 0).any()):
                raise ValueError(f"labels must be class ids >= 0, got a minimum of {int(classes.min())}")
            self.label_dim = int(classes.max()) + 1
            return classes
        self.label_dim = labels.shape[1]
        classes = self._one_hot_classes(labels, "labels")
        return classes

    def _one_hot_classes(self, labels: Tensor, name: str) -> Tensor:
        """The class of each one-hot row of `labels` (rows, label_dim); a ValueError if a row is not one-hot."""
        if labels.shape[1] == 0:
            raise ValueError(f"{name} of shape (rows, label_dim) need label_dim >= 1, got {tuple(labels.shape)}")
        ones = labels == 1
        bad = (ones.sum(1) != 1) | ((labels != 0) & ~ones).any(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} of shape (rows, label_dim) must be one-hot rows; row {i} is {labels[i].tolist()}")
        return ones.to(torch.uint8).argmax(1)

    def _sample_classes(self, class_labels, B: int) -> Tensor | None:
        if class_labels is None:
            return None
        if not self.label_dim:
            raise ValueError("class_labels were given but the denoiser was built without labels (label_dim = 0)")
        if not isinstance(class_labels, Tensor):
            raise TypeError(f"class_labels must be a torch.Tensor or None, got {type(class_labels).__name__}")
        if class_labels.dim() == 1 and not class_labels.is_floating_point():
            if class_labels.shape[0] != B:
                raise ValueError(f"class_labels must have shape ({B},) or ({B}, {self.label_dim}), got {tuple(class_labels.shape)}")
            classes = class_labels.long()
        elif tuple(class_labels.shape) == (B, self.label_dim):
            classes = self._one_hot_classes(class_labels, "class_labels")
        else:
            raise ValueError(
                f"class_labels must have shape ({B},) (int) or ({B}, {self.label_dim}) (one-hot), "
                f"got {tuple(class_labels.shape)}"
            )
        if B and bool(((classes < 0) | (classes >= self.label_dim)).any()):
            bad = classes[(classes < 0) | (classes >= self.label_dim)][0]
            raise ValueError(f"class_labels must be classes in [0, {self.label_dim}), got {int(bad)}")
        return classes

    # ------------------------------------------------------------------------------------------

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x: Tensor, sigma, class_labels: Tensor | None = None, augment_labels: Tensor | None = None,
                **kwargs) -> Tensor:
        check_float(x, "x")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.img_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.img_shape))}), got {tuple(x.shape)}")
        if x.device != self.refs.device:
            raise ValueError(f"x is on {x.device} but the denoiser's images are on {self.refs.device}; move one of them")
        if augment_labels is not None:
            raise ValueError("augment_labels must be None: the empirical denoiser knows no augmentation")
        B = x.shape[0]
        dtype = self.refs.dtype
        if isinstance(sigma, Tensor) and sigma.device != x.device and sigma.numel() == 1:
            sigma = sigma.to(x.device)
        sig = check_sigma(sigma, B, x, dtype)
        classes = self._sample_classes(class_labels, B)
        xc = x.reshape(B, self.refs.shape[1]).to(dtype)
        kw = dict(chunk_size=self.chunk, backend=self.backend, precision=self.precision)
        if classes is None:
            mu = stf_target(xc, sig, self.refs, **kw)
        else:
            mu = torch.empty_like(xc)
            for k in torch.unique(classes).tolist():
                lo, hi = self._offsets[k], self._offsets[k + 1]
                if lo == hi:
                    raise ValueError(f"class_labels ask for class {k}, of which the denoiser holds no image")
                rows = (classes == k).nonzero().flatten()
                mu[rows] = stf_target(xc[rows], sig[rows], self.refs[lo:hi], **kw)
        return mu.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        C, H, W = self.img_shape
        return f"n={self.n}, shape=({C}, {H}, {W}), label_dim={self.label_dim}, dtype={self.refs.dtype}"
