"""Training losses in the style of EDM's training/loss.py: EDM's denoising loss, the stable target
(STF), the consistency loss (CDM) and both together (docs/math.md sections 2 and 3); each returns the
per-element loss unreduced and draws its randomness from `generator` in an order its class states.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .random import seed_from_generator
from .rollout import consistency_rollout, martingale_loss
from .stf import stf_target

__all__ = ["CDMLoss", "EDMLoss", "ReferenceBank", "STFCDMLoss", "STFLoss"]

# EDM's smallest noise level; CDM's rollouts stop no lower than this (docs/math.md section 3 step 2).
SIGMA_MIN_FLOOR = 0.002


def _check_images(images) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, *S), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must have a floating dtype, got {images.dtype}")
    if images.dim() < 2:
        raise ValueError(f"images must have shape (B, *S) with at least 2 dimensions, got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0)")


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _rollout_seed(generator: torch.Generator | None) -> int:
    # consistency_rollout draws its Philox seed from a CPU generator. A CUDA generator's state is
    # kept on the host (its seed and Philox offset), so the seed is derived from them and the offset
    # advanced: reproducible from the generator's state, and no read of the device.
    if generator is None or generator.device.type == "cpu":
        return seed_from_generator(generator)
    try:
        offset = generator.get_offset()
        generator.set_offset(offset + 4)  # CUDA Philox offsets move in steps of 4
    except (AttributeError, RuntimeError):  # a generator without a host-side offset: read one draw back
        return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device).item())
    return _splitmix64(_splitmix64(generator.initial_seed()) ^ offset) >> 2


def _splitmix64(v: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers that mixes every bit into every other."""
    v = (v + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return v ^ (v >> 31)


class EDMLoss:
    """EDM's denoising score matching loss (Karras et al. 2022, docs/math.md section 2), per element.

        ln sigma ~ N(P_mean, P_std^2),  n ~ N(0, sigma^2 I),  (y, augment_labels) = augment_pipe(images)
        lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
        loss = lambda(sigma) (D(y + n; sigma) - y)^2

    Draws, in this order: ln sigma (B, 1, ..., 1), then n (the shape of y), both in y's dtype.

    Args of the call:
        net: the denoiser D(x, sigma, labels, augment_labels=...).
        images: clean images (B, *S), a floating dtype.
        labels: class labels passed to the net as they are (or None).
        augment_pipe: optional callable images -> (y, augment_labels).
        generator: optional torch.Generator on images' device for the draws.
    Returns the loss (B, *S) in the promoted dtype of the net's output and the images (torch's type
    promotion: a float32 net gives float32 for float16 or float32 images, float64 for float64).
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean = _finite(P_mean, "P_mean")
        self.P_std = _finite(P_std, "P_std")
        self.sigma_data = _finite(sigma_data, "sigma_data")
        if self.P_std < 0:
            raise ValueError(f"P_std must be >= 0 (the std of ln sigma), got {P_std}")
        if self.sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")

    def weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, elementwise."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_sigma(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """sigma = exp(P_mean + P_std N(0, 1)), shape (B, 1, ..., 1) broadcasting against images."""
        shape = (images.shape[0],) + (1,) * (images.dim() - 1)
        rnd_normal = torch.randn(shape, generator=generator, dtype=images.dtype, device=images.device)
        return (rnd_normal * self.P_std + self.P_mean).exp()

    def _noisy(self, images, augment_pipe, generator):
        # The draws shared by every loss here: sigma, the augmentation, the one noise draw n.
        _check_images(images)
        sigma = self.sample_sigma(images, generator)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device) * sigma
        return sigma, y, augment_labels, y + n

    def __call__(self, net: Callable, images: Tensor, labels=None, augment_pipe=None, *, generator=None) -> Tensor:
        sigma, y, augment_labels, x = self._noisy(images, augment_pipe, generator)
        D_yn = net(x, sigma, labels, augment_labels=augment_labels)
        return self.weight(sigma) * (D_yn - y) ** 2


class ReferenceBank:
    """A pool of clean references for the stable target.

    `refresh(images)` replaces the pool (images (N, *S), kept detached, not copied); `sample(k)`
    draws k distinct references uniformly. The training loop refreshes it, e.g. every step with a
    fresh batch of the data set. (It cached ||r_j||^2 in 0.1; the stable target's kernels now compute
    the norms of the centred references in their pass, which the exact distances need.)
    """

    def __init__(self, images: Tensor | None = None):
        self.refs: Tensor | None = None
        if images is not None:
            self.refresh(images)

    def refresh(self, images: Tensor) -> None:
        """Replaces the pool by `images` (N, *S), N >= 1, floating dtype."""
        _check_images(images)
        self.refs = images.detach()

    def __len__(self) -> int:
        return 0 if self.refs is None else self.refs.shape[0]

    def sample(self, k: int, generator: torch.Generator | None = None, *, out: Tensor | None = None) -> Tensor:
        """k distinct references (k, *S), uniformly without replacement; gathered into `out` when given
        (a contiguous (k, *S) tensor of the pool's dtype and device, e.g. rows of a larger batch).

        One draw: torch.randperm(N) on the generator's device (or the pool's)."""
        if self.refs is None:
            raise RuntimeError("ReferenceBank is empty: call refresh(images) before sample(k)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        N = self.refs.shape[0]
        if k > N:
            raise ValueError(f"cannot sample k = {k} distinct references from a bank of {N}; refresh it with more")
        if out is not None:
            want = (k, *self.refs.shape[1:])
            if not isinstance(out, Tensor) or tuple(out.shape) != want or out.dtype != self.refs.dtype \
                    or out.device != self.refs.device or not out.is_contiguous():
                got = (f"{tuple(out.shape)} {out.dtype} on {out.device}"
                       f"{'' if out.is_contiguous() else ', not contiguous'}") if isinstance(out, Tensor) \
                    else type(out).__name__
                raise ValueError(f"out must be a contiguous {want} {self.refs.dtype} tensor on {self.refs.device} "
                                 f"(the pool's dtype and device), got {got}")
        device = generator.device if generator is not None else self.refs.device
        idx = torch.randperm(N, generator=generator, device=device)[:k].to(self.refs.device)
        return self.refs[idx] if out is None else torch.index_select(self.refs, 0, idx, out=out)


class _StableTargetMixin:
    """The reference batch and the stable target shared by STFLoss and STFCDMLoss."""

    def _init_stf(self, rbatch, bank, chunk_size, backend, sharded, group):
        if rbatch is not None and (isinstance(rbatch, bool) or not isinstance(rbatch, int) or rbatch < 1):
            raise ValueError(f"rbatch must be a positive int (the total size of the reference batch), got {rbatch!r}")
        if bank is not None and not isinstance(bank, ReferenceBank):
            raise TypeError(f"bank must be a ReferenceBank or None, got {type(bank).__name__}")
        if bank is not None and rbatch is None:
            raise ValueError("rbatch is required with a bank: it sets how many references a step draws")
        self.rbatch, self.bank = rbatch, bank
        self.chunk_size, self.backend = chunk_size, backend
        self.sharded, self.group = bool(sharded), group

    def _reference_batch(self, y: Tensor, ref: Tensor | None, generator) -> Tensor:
        # The minibatch's own clean (augmented) images come first, as in the authors' code
        # (ref_images[:len(y)] = y); the rest of the reference batch are other samples.
        B = y.shape[0]
        y = y.detach()
        if ref is not None:
            if not isinstance(ref, Tensor) or not ref.is_floating_point():
                got = ref.dtype if isinstance(ref, Tensor) else type(ref).__name__
                raise TypeError(f"ref must be a floating torch.Tensor of shape (rbatch, *S), got {got}")
            if tuple(ref.shape[1:]) != tuple(y.shape[1:]):
                raise ValueError(
                    f"ref must have shape (rbatch, *S) with S = {tuple(y.shape[1:])} (the images' shape); "
                    f"got {tuple(ref.shape)}"
                )
            if ref.shape[0] < B:
                raise ValueError(
                    f"the reference batch ref has {ref.shape[0]} rows but the minibatch has B = {B}: it must "
                    f"hold the minibatch's own images first, so rbatch >= B"
                )
            if self.rbatch is not None and ref.shape[0] != self.rbatch:
                raise ValueError(f"ref has {ref.shape[0]} rows but this loss was built with rbatch = {self.rbatch}")
            return torch.cat([y, ref[B:].detach().to(device=y.device, dtype=y.dtype)])
        if self.bank is None:
            raise ValueError("no reference batch: pass ref= to the call, or build the loss with bank=ReferenceBank(...)")
        if self.rbatch < B:
            raise ValueError(
                f"rbatch = {self.rbatch} is smaller than the minibatch B = {B}: the reference batch must hold "
                f"the minibatch's own images first"
            )
        pool = self.bank.refs
        if pool is not None and tuple(pool.shape[1:]) != tuple(y.shape[1:]):
            raise ValueError(
                f"the bank holds references of shape {tuple(pool.shape[1:])} but the images have shape "
                f"{tuple(y.shape[1:])}"
            )
        # One buffer, the bank's rows gathered straight into it: a gather and then a concatenation
        # moved the whole reference batch twice (0.73 s against 0.40 s at 50000 CIFAR-sized images on
        # one CPU core: as long as the stable target itself).
        refs = torch.empty((self.rbatch, *y.shape[1:]), device=y.device, dtype=y.dtype)
        refs[:B] = y
        if pool is not None and pool.device == y.device and pool.dtype == y.dtype:
            self.bank.sample(self.rbatch - B, generator, out=refs[B:])
        else:
            refs[B:] = self.bank.sample(self.rbatch - B, generator)
        return refs

    def stable_target(self, x: Tensor, sigma: Tensor, refs: Tensor) -> Tensor:
        """mu(x; sigma) over `refs` (or over the union of every process's refs when sharded)."""
        with torch.no_grad():
            if self.sharded:
                from .distributed import stf_target_sharded

                return stf_target_sharded(
                    x, sigma, refs, group=self.group, chunk_size=self.chunk_size, backend=self.backend
                )
            return stf_target(x, sigma, refs, chunk_size=self.chunk_size, backend=self.backend)


class STFLoss(EDMLoss, _StableTargetMixin):
    """EDM's loss with the stable target (Xu et al., ICLR 2023) in place of the clean image.

        loss = lambda(sigma) (D(y + n; sigma) - mu(y + n; sigma))^2,
        mu_i = sum_j softmax_j(-||x_i - r_j||^2 / (2 sigma_i^2)) r_j   (docs/math.md section 1)

    over a reference batch r of `rbatch` rows whose first B rows are the minibatch's own clean
    (augmented) images y. The rest comes from `ref=` (a (rbatch, *S) tensor whose first B rows are
    replaced by y, as in the authors' code) or, without it, from `bank.sample(rbatch - B)`.
    The target is computed under no_grad with `cdm_kernels.stf_target` (`backend`, `chunk_size` are
    its arguments); with `sharded=True` it is the target over the union of every process's
    reference batch in `group` (`cdm_kernels.distributed.stf_target_sharded`).

    Draws, in this order: ln sigma, n (as EDMLoss), then the bank's sample (one randperm).
    """

    def __init__(
        self,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_data: float = 0.5,
        rbatch: int | None = None,
        bank: ReferenceBank | None = None,
        *,
        chunk_size: int | None = None,
        backend: str = "auto",
        sharded: bool = False,
        group=None,
    ):
        super().__init__(P_mean, P_std, sigma_data)
        self._init_stf(rbatch, bank, chunk_size, backend, sharded, group)

    def __call__(self, net, images, labels=None, augment_pipe=None, *, ref=None, generator=None) -> Tensor:
        sigma, y, augment_labels, x = self._noisy(images, augment_pipe, generator)
        refs = self._reference_batch(y, ref, generator)
        target = self.stable_target(x.detach(), sigma, refs)
        D_yn = net(x, sigma, labels, augment_labels=augment_labels)
        return self.weight(sigma) * (D_yn - target) ** 2


class CDMLoss(EDMLoss):
    """EDM's loss plus the consistency (martingale) loss of Daras et al. 2023 (docs/math.md section 3).

    Per sample: ln sigma ~ N(P_mean, P_std^2); x_t = y + sigma z (one noise draw);
    D0 = D(x_t; sigma) with gradient; eps ~ U[eps_min, eps_max]; sigma_min = max(sigma - eps, 0.002);
    K = 2 independent reverse-SDE trajectories from x_t over the sample's own EDM schedule of
    `num_steps` points from sigma to sigma_min (rho = 7), under no_grad
    (`cdm_kernels.consistency_rollout`); D1a, D1b = D(x_final; sigma_min) with gradient, as one
    batch of 2B; then, per element (`cdm_kernels.martingale_loss`):

        loss = lambda(sigma) (D0 - target)^2 + lambda_m (D1a - D0)(D1b - D0)

    with target = y here (the stable target in STFCDMLoss). The second term is an unbiased
    estimate of (E[D1 | x_t] - D0)^2. One departure from docs/math.md: sigma_min is also capped at sigma,
    so the rare sample drawn with sigma < 0.002 (probability about 1.5e-5 with the default P_mean,
    P_std) gets a zero-length rollout (D1 = D0, no consistency term) instead of a schedule running
    upward, which the EDM schedule does not define.

    Draws, in this order, from `generator` (or the global generator): ln sigma, n, eps (the shape of
    sigma), then one int64 in [0, 2^62), the Philox seed of the trajectories' noise (step k of the
    rollout uses the counters k K x_t.numel() + i, see `consistency_rollout`).

    The loss is computed and returned in the promoted dtype of the net's output and the images, as
    EDMLoss's (float64 images with a float32 net, e.g. EDM's preconditioned one, give float64).
    """

    def __init__(
        self,
        num_steps: int = 6,
        lambda_m: float = 2.0,
        eps_min: float = 0.0,
        eps_max: float = 0.05,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_data: float = 0.5,
    ):
        super().__init__(P_mean, P_std, sigma_data)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(
                f"num_steps must be an int >= 2 (the schedule's points from sigma to sigma_min, both "
                f"included), got {num_steps!r}"
            )
        self.num_steps = num_steps
        self.lambda_m = _finite(lambda_m, "lambda_m")
        if self.lambda_m < 0:
            raise ValueError(f"lambda_m must be >= 0, got {lambda_m}")
        self.eps_min = _finite(eps_min, "eps_min")
        self.eps_max = _finite(eps_max, "eps_max")
        if not 0 <= self.eps_min <= self.eps_max:
            raise ValueError(f"the eps range must satisfy 0 <= eps_min <= eps_max, got eps_min = {eps_min}, eps_max = {eps_max}")

    def sample_sigma_min(self, sigma: Tensor, generator=None) -> Tensor:
        """sigma_min = min(max(sigma - eps, 0.002), sigma), eps ~ U[eps_min, eps_max], sigma's shape."""
        u = torch.rand(sigma.shape, generator=generator, dtype=sigma.dtype, device=sigma.device)
        eps = self.eps_min + (self.eps_max - self.eps_min) * u
        return torch.minimum((sigma - eps).clamp_min(SIGMA_MIN_FLOOR), sigma)

    def _martingale(self, net, x_t, sigma, target, labels, augment_labels, generator) -> Tensor:
        B = x_t.shape[0]
        D0 = net(x_t, sigma, labels, augment_labels=augment_labels)
        sigma_min = self.sample_sigma_min(sigma, generator)
        K = 2

        def repeat(t):  # (B, ...) -> (K B, ...), trajectory-major, as the rollout batches them
            return None if t is None else t.repeat(K, *([1] * (t.dim() - 1)))

        aug_K = repeat(augment_labels)

        def net_rollout(x, s, class_labels=None, augment_labels=None):
            # The rollout's net calls see the augmentation labels of D0, repeated per trajectory.
            if augment_labels is None and aug_K is not None:
                rows = x.shape[0]
                if rows % B:
                    raise RuntimeError(f"consistency_rollout called the net on {rows} rows, not a multiple of B = {B}")
                augment_labels = aug_K[:B].repeat(rows // B, *([1] * (aug_K.dim() - 1)))
            return net(x, s, class_labels, augment_labels=augment_labels)

        with torch.no_grad():
            x_final, _ = consistency_rollout(
                net_rollout, x_t.detach(), sigma.detach(), sigma_min, self.num_steps, num_trajectories=K,
                labels=labels, seed=_rollout_seed(generator),
            )
        x_final = x_final.reshape(K * B, *x_t.shape[1:]).to(x_t.dtype)
        D1 = net(x_final, repeat(sigma_min), repeat(labels), augment_labels=aug_K)
        # The fused loss wants one dtype; the net's output need not have the images' (EDM's
        # preconditioned net returns float32 whatever x is). Promote as EDMLoss's
        # weight * (D - y)^2 does: float16 images with a float32 net give float32, float64 images
        # float64 (the casts are differentiable, so D0 and D1 still get their gradients).
        dtype = torch.promote_types(torch.promote_types(D0.dtype, D1.dtype), target.dtype)
        D0, D1, target = D0.to(dtype), D1.to(dtype), target.to(dtype)
        D1a, D1b = D1[:B], D1[B:]
        return martingale_loss(D0, D1a, D1b, target, self.weight(sigma), lambda_m=self.lambda_m)

    def __call__(self, net, images, labels=None, augment_pipe=None, *, generator=None) -> Tensor:
        sigma, y, augment_labels, x_t = self._noisy(images, augment_pipe, generator)
        return self._martingale(net, x_t, sigma, y, labels, augment_labels, generator)


class STFCDMLoss(CDMLoss, _StableTargetMixin):
    """CDMLoss with the stable target mu(x_t; sigma) in place of y in its first term:

        loss = lambda(sigma) (D0 - mu(x_t; sigma))^2 + lambda_m (D1a - D0)(D1b - D0)

    The reference batch is built as in STFLoss (`ref=` of the call, or `bank` with `rbatch`).
    Draws, in this order: ln sigma, n, the bank's sample, eps, the rollout's seed.
    """

    def __init__(
        self,
        num_steps: int = 6,
        lambda_m: float = 2.0,
        eps_min: float = 0.0,
        eps_max: float = 0.05,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_data: float = 0.5,
        rbatch: int | None = None,
        bank: ReferenceBank | None = None,
        *,
        chunk_size: int | None = None,
        backend: str = "auto",
        sharded: bool = False,
        group=None,
    ):
        super().__init__(num_steps, lambda_m, eps_min, eps_max, P_mean, P_std, sigma_data)
        self._init_stf(rbatch, bank, chunk_size, backend, sharded, group)

    def __call__(self, net, images, labels=None, augment_pipe=None, *, ref=None, generator=None) -> Tensor:
        sigma, y, augment_labels, x_t = self._noisy(images, augment_pipe, generator)
        refs = self._reference_batch(y, ref, generator)
        mu = self.stable_target(x_t.detach(), sigma, refs)
        return self._martingale(net, x_t, sigma, mu, labels, augment_labels, generator)
