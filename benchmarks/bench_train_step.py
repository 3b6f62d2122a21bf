"""One training step of the EDM, STF, CDM and STF+CDM losses, this library's ops against the authors'
formulas, at CIFAR-10 shape.

    python -m benchmarks.bench_train_step --quick                 # tiny net: checks the script, well under a minute
    python -m benchmarks.bench_train_step --device cuda           # the target's configuration, on a GPU
    python benchmarks/bench_train_step.py --device cpu --batch 4 --threads 1   # works as a script too

The training loop's own step (`cdm_kernels.train.set_up` and `train_step`) on a run configured like
EDM's CIFAR-10 DDPM++ network (`DDPMPP`), each loss with this library's ops (`library`) and with the
authors' stable target and rollout swapped in (`authors`: `AuthorsLoss`). What each row runs, how it
is checked, timed and its memory estimated, and the outputs: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a script: make `benchmarks` and `cdm_kernels` importable
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cdm_kernels  # noqa: E402
from benchmarks import stf_common as sc  # noqa: E402
from cdm_kernels.train import (  # noqa: E402
    TrainConfig, build_loss, build_model, build_references, set_up, train_step,
)

GiB = float(1 << 30)
FLOAT32, FLOAT64 = 4, 8
K = 2  # CDM trajectories per sample (CDMLoss uses two)
EDM_DDPMPP_PARAMS_PAPER = 55.73e6  # EDM (Karras et al. 2022), Table 7: DDPM++ on CIFAR-10, "56M"
TARGET_RATIO = 1.10  # target: STF with 50,000 references adds at most 10% to an EDM step (on the H200)
LOSS_ORDER = ("edm", "stf", "cdm", "stf+cdm")
# How each column is measured (each row after its warm-up steps), as the markdown output says it.
MEASURED = """\
  ms/step     median over the timed steps (at least --min-steps, more while they total under
              --target-s, at most --steps); CUDA events on a GPU, time.perf_counter on the CPU.
  x EDM       ms/step over the median of EDM steps timed in alternation with the row's steps (one
              EDM step after each), so that a change of load or clocks hits both; "edm (end)" is
              EDM timed again after every row, its ratio to the first EDM row the run's drift.
  CPU time    on the CPU also the process's CPU time of each step (time.process_time) and its ratio
              to the paired EDM steps': with one thread (--threads 1) the step's own cost, which
              other processes on a shared machine do not inflate as they do the wall time.
  peak memory one more step: GPU torch.cuda.max_memory_allocated (absolute) and its excess over what
              was allocated before the step; CPU the allocator events of torch.profiler
              (stf_common.peak_extra_bytes) for the excess, plus the persistent tensors (parameters,
              the EMA's, Adam's state, the data set) for the total.
  lib ops     --profile-steps steps under torch.profiler: the time of every registered op of this
              library (names starting "cdm_kernels::", and "cdm_kernels_C::" called directly) that
              is not inside another one, its children included: GPU time of the kernels it launched
              on a GPU, CPU time on the CPU; share = that time over the profiled steps' own wall
              time (CUDA events / perf_counter). The Python glue of the losses (norms,
              concatenations) counts as "the rest".
"""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetConfig:
    """The loop's UNet options (cdm_kernels.train.TrainConfig's model fields)."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float


# EDM's CIFAR-10 DDPM++ (training/networks.py SongUNet defaults with train.py's cifar10 settings).
DDPMPP = NetConfig(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.13)
TINY = NetConfig(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,), dropout=0.13)


@dataclass(frozen=True)
class Config:
    device: str = "cpu"
    batch: int = 64
    image: tuple[int, int, int] = (3, 32, 32)
    net: NetConfig = DDPMPP
    rbatches: tuple[int, int] = (4096, 50_000)  # STF's small and large reference batch; STF+CDM uses the small
    data: int = 50_000  # synthetic data set (CIFAR-10's training set size); the references come from it
    cdm_steps: int = 6  # rollout schedule points
    losses: tuple[str, ...] = LOSS_ORDER
    warmup: int = 3  # untimed steps at the start of every row
    min_steps: int = 5
    max_steps: int = 30
    target_s: float = 10.0  # timed steps continue while they total under this (and fewer than max_steps)
    profile_steps: int = 2
    mem_limit_gb: float | None = None  # None: 95% of the GPU's free memory, 70% of the CPU's available memory
    budget_s: float | None = None  # whole run: rows not started by then are "skipped: time budget"
    threads: int | None = None  # torch's CPU threads (None: torch's default)
    seed: int = 0
    quick: bool = False


# On the CPU a step of the 56M network at batch 64 takes a minute or more on 2 cores: no warm-up
# step of its own (the network and Adam's state are warmed once at the start; the first step of a row
# is its memory step, and the CPU has no caches or autotuning for a warm-up to fill), one profiled
# step and 1 to 3 timed ones.
CPU_STEPS = dict(warmup=0, min_steps=1, max_steps=3, target_s=120.0, profile_steps=1)
# One thread: on a shared 2-core machine a second OpenMP thread waits at every barrier for a core
# that another process holds, and a 0.1 s step takes seconds.
QUICK = dict(batch=4, net=TINY, rbatches=(64, 256), data=256, warmup=0, min_steps=2, max_steps=2, target_s=0.0,
             profile_steps=1, threads=1, quick=True)


@dataclass(frozen=True)
class Case:
    loss: str  # one of LOSS_ORDER
    method: str  # "library", "authors", or "-" for EDM (no formula to swap)
    rbatch: int | None

    @property
    def label(self) -> str:
        name = {"edm": "EDM", "stf": "STF", "cdm": "CDM", "stf+cdm": "STF+CDM", "edm (end)": "EDM (end)"}[self.loss]
        return name + (f" r={self.rbatch}" if self.rbatch else "")


def cases(cfg: Config) -> list[Case]:
    """The rows, EDM first (every ratio and memory estimate refers to it)."""
    small, large = cfg.rbatches
    out = [Case("edm", "-", None)]
    for loss, rbatches in (("stf", (small, large)), ("cdm", (None,)), ("stf+cdm", (small,))):
        if loss in cfg.losses:
            out += [Case(loss, m, r) for r in rbatches for m in ("library", "authors")]
    return out


# ----------------------------------------------------------------------------------------------
# The network and its parameter count
# ----------------------------------------------------------------------------------------------


def train_config(cfg: Config, loss: str = "edm", rbatch: int | None = None, **kw) -> TrainConfig:
    """The loop's options of a row: the loss, the sizes, the network; `kw` (data, outdir) as given."""
    n = cfg.net
    return TrainConfig(
        loss=loss, batch=cfg.batch, rbatch=rbatch or cfg.batch, cdm_steps=cfg.cdm_steps, device=cfg.device,
        seed=cfg.seed, model_channels=n.model_channels, channel_mult=n.channel_mult, num_blocks=n.num_blocks,
        attn_resolutions=n.attn_resolutions, dropout=n.dropout, grid=0, progress=False, **kw,
    )


def param_count(net_cfg: NetConfig = DDPMPP, image: tuple[int, int, int] = (3, 32, 32)) -> int:
    """Parameters of the loop's network with these options, built on the meta device (no memory)."""
    cfg = Config(net=net_cfg, image=image)
    with torch.device("meta"):
        net = build_model(train_config(cfg), image[1], image[0], 0)
    return sum(p.numel() for p in net.parameters())


def edm_ddpmpp_param_count(net_cfg: NetConfig = DDPMPP, image: tuple[int, int, int] = (3, 32, 32),
                           augment_dim: int = 9) -> int:
    """Parameters of EDM's own SongUNet with DDPM++ options (adaptive_scale=False: the noise embedding
    adds a shift; resample_proj=True: a 1x1 projection on the skip of every up/down block; EDM's
    CIFAR-10 augmentation labels, augment_dim 9), counted from its layout. 55,733,891 for DDPMPP."""
    C, R = image[0], image[1]
    mc, emb = net_cfg.model_channels, 4 * net_cfg.model_channels

    def conv(cin, cout, k):
        return cin * cout * k * k + cout

    def block(cin, cout, attn=False, resample=False):
        n = 2 * cin + conv(cin, cout, 3) + (emb * cout + cout) + 2 * cout + conv(cout, cout, 3)
        if cin != cout or resample:
            n += conv(cin, cout, 1)
        if attn:
            n += 2 * cout + conv(cout, 3 * cout, 1) + conv(cout, cout, 1)
        return n

    total = augment_dim * mc + (mc * emb + emb) + (emb * emb + emb)  # mapping (positional embedding: none)
    total += conv(C, mc, 3)
    skips, cout = [mc], mc
    for level, mult in enumerate(net_cfg.channel_mult):
        res = R >> level
        if level > 0:
            total += block(cout, cout, resample=True)
            skips.append(cout)
        for _ in range(net_cfg.num_blocks):
            total += block(cout, mc * mult, attn=res in net_cfg.attn_resolutions)
            cout = mc * mult
            skips.append(cout)
    levels = len(net_cfg.channel_mult)
    for level, mult in reversed(list(enumerate(net_cfg.channel_mult))):
        res = R >> level
        if level == levels - 1:
            total += block(cout, cout, attn=True) + block(cout, cout)
        else:
            total += block(cout, cout, resample=True)
        for idx in range(net_cfg.num_blocks + 1):
            total += block(cout + skips.pop(), mc * mult, attn=idx == net_cfg.num_blocks and res in net_cfg.attn_resolutions)
            cout = mc * mult
    return total + 2 * cout + conv(cout, C, 3)  # output GroupNorm and conv


NET_DIFFERENCES = (
    "The loop's UNet follows the layout of EDM's SongUNet (the same levels, blocks, skips, attention "
    "placement and channel counts) but cannot express three of DDPM++'s options: (1) its residual "
    "blocks always take a scale and a shift from the noise embedding (EDM's adaptive_scale=True), "
    "DDPM++ a shift only: +(4 model_channels + 1) C parameters per block; (2) its up/down-sampling "
    "blocks resample the skip without DDPM++'s 1x1 projection (resample_proj=True): -(C^2 + C) per such "
    "block; (3) it has no augmentation-label input (EDM's CIFAR-10 net: augment_dim 9). Parameter-free "
    "differences: a Fourier noise embedding (a buffer) for DDPM++'s positional one, 32 channels per "
    "attention head (8 heads at 256 channels) for DDPM++'s single head (the same FLOPs), GroupNorm eps "
    "1e-5 for 1e-6, and its own initialisation."
)


# ----------------------------------------------------------------------------------------------
# The authors' formulas, and their losses
# ----------------------------------------------------------------------------------------------


def authors_stable_target(x: torch.Tensor, sigma: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """The broadcast stable target of x (B, *S) over refs (n, *S), under no_grad as in the authors' code."""
    B = x.shape[0]
    with torch.no_grad():
        mu = sc.authors_broadcast(x.reshape(B, -1), sigma.reshape(B), refs.reshape(refs.shape[0], -1))
    return mu.reshape(x.shape)


def authors_rollout(net: Callable, x_t: torch.Tensor, sigma: torch.Tensor, sigma_min: torch.Tensor,
                    num_steps: int, labels=None, noise: Callable | None = None) -> torch.Tensor:
    """K reverse-SDE trajectories from x_t as one float64 batch of K B, over each sample's EDM schedule
    from sigma to sigma_min (the schedule of `consistency_rollout`), each step the authors' float64
    tensor operations x + 2 (t' - t) (x - D) / t + sqrt(2 |t - t'| t) z with z = torch.randn_like(x),
    or z = noise(k, x) when given (the correctness check feeds the library's Philox noise).
    Returns x_final (K, B, *S) in float64."""
    B = x_t.shape[0]
    t = cdm_kernels.edm_schedule(sigma.reshape(B).double(), sigma_min.reshape(B).double(), num_steps)  # (B, N)
    bshape = (K * B,) + (1,) * (x_t.dim() - 1)
    labels_k = None if labels is None else labels.repeat(K, *([1] * (labels.dim() - 1)))
    with torch.no_grad():
        x = x_t.detach().double().repeat(K, *([1] * (x_t.dim() - 1)))
        for k in range(num_steps - 1):
            t_cur, t_next = t[:, k].repeat(K).reshape(bshape), t[:, k + 1].repeat(K).reshape(bshape)
            D = net(x, t_cur, labels_k).to(torch.float64)  # their rollout keeps x in float64, casts D to it
            z = torch.randn_like(x) if noise is None else noise(k, x)
            x = x + 2 * (t_next - t_cur) * (x - D) / t_cur + torch.sqrt(2 * (t_cur - t_next).abs() * t_cur) * z
    return x.reshape(K, *x_t.shape)


class AuthorsLoss:
    """The library loss `lib` (an EDMLoss subclass from build_loss) with the authors' stable target and
    rollout steps. Its draws (sigma, the noise, sigma_min), weighting, reference batch and martingale
    loss are `lib`'s own public pieces, in the same order as the library loss's __call__."""

    def __init__(self, lib, stf: bool, cdm: bool):
        self.lib, self.stf, self.cdm = lib, stf, cdm

    def __call__(self, net, images, labels=None, *, ref=None):
        lib, B = self.lib, images.shape[0]
        sigma = lib.sample_sigma(images)
        x = images + torch.randn_like(images) * sigma
        target = images
        if self.stf:
            if ref is None:
                raise ValueError("ref is required for the STF losses: a (rbatch, *S) reference batch, the batch first")
            refs = torch.cat([images, ref[B:].to(images.dtype)])  # the minibatch's own images first, as the authors
            target = authors_stable_target(x.detach(), sigma, refs)
        if not self.cdm:
            return lib.weight(sigma) * (net(x, sigma, labels) - target) ** 2
        D0 = net(x, sigma, labels)
        sigma_min = lib.sample_sigma_min(sigma)
        x_final = authors_rollout(net, x.detach(), sigma, sigma_min, lib.num_steps, labels)
        D1 = net(x_final.reshape(K * B, *x.shape[1:]).to(x.dtype), sigma_min.repeat(K, *([1] * (x.dim() - 1))),
                 None if labels is None else labels.repeat(K, *([1] * (labels.dim() - 1))))
        w = lib.weight(sigma).to(D0.dtype)
        return cdm_kernels.martingale_loss(D0, D1[:B], D1[B:], target.to(D0.dtype), w, lambda_m=lib.lambda_m)


def make_loss(cfg: Config, case: Case):
    lib = build_loss(train_config(cfg, case.loss, case.rbatch), cfg.data, cfg.batch)
    if case.method == "authors":
        return AuthorsLoss(lib, stf="stf" in case.loss, cdm="cdm" in case.loss)
    return lib


# ----------------------------------------------------------------------------------------------
# Correctness checks (before any timing)
# ----------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def check_stable_target(D: int, device: str) -> tuple[Check, Check]:
    """The library's stable target and the authors' broadcast formula against the float64 judge on
    stf_common's small case; tolerance max(4 x plain float32's error, 1e-5) (stf_common.gate_tolerances)."""
    inp = sc.gate_inputs(D, device)
    want = sc.judge_float64(inp.x, inp.sigma, inp.ref)
    tol = sc.gate_tolerances(inp, {"mu": want}, "forward", (D, "forward", device))["mu"]
    got = {}
    with torch.no_grad():
        got["library"] = cdm_kernels.stf_target(inp.x, inp.sigma, inp.ref)
        got["authors"] = authors_stable_target(inp.x, inp.sigma, inp.ref)
    agree = _rel(got["library"], got["authors"])
    out = []
    for method in ("library", "authors"):
        err = _rel(got[method], want) if torch.isfinite(got[method]).all() else math.inf
        out.append(Check(f"stable target ({method})", err <= tol,
                         f"rel. error vs float64 {err:.2e} (tol {tol:.2e}); library vs authors {agree:.2e}; "
                         f"B={inp.x.shape[0]}, n={inp.ref.shape[0]}, D={D}, sigma 0.5..80"))
    return out[0], out[1]


ROLLOUT_TOL = 1e-5
ROLLOUT_SEED = 1234


def _toy_denoiser(x, sigma, labels=None):
    # The exact denoiser of N(0, 0.25 I) data: smooth and deterministic (the real net has dropout).
    s2 = sigma.to(x.dtype) ** 2
    return x * (0.25 / (s2 + 0.25))


def check_rollout(image: tuple[int, ...], num_steps: int, device: str) -> Check:
    """The library's rollout (float32, fused steps, Philox noise) against the authors' float64 rollout
    fed the same noise (step k: counters k K numel(x_t) + i), normwise relative error <= 1e-5."""
    g = torch.Generator().manual_seed(7)
    sigma = torch.tensor([0.02, 1.0, 60.0]).reshape(3, 1, 1, 1)
    sigma_min = (sigma - 0.05).clamp_min(0.002)
    x_t = (torch.rand(3, *image, generator=g) * 2 - 1) + sigma * torch.randn(3, *image, generator=g)
    x_t, sigma, sigma_min = x_t.to(device), sigma.to(device), sigma_min.to(device)
    lib, _ = cdm_kernels.consistency_rollout(_toy_denoiser, x_t, sigma, sigma_min, num_steps, num_trajectories=K,
                                             seed=ROLLOUT_SEED)

    def philox(k, x):
        return cdm_kernels.randn(x.shape, ROLLOUT_SEED, k * x.numel(), device=x.device, dtype=torch.float64)

    ours = authors_rollout(_toy_denoiser, x_t, sigma, sigma_min, num_steps, noise=philox)
    err = _rel(lib, ours) if torch.isfinite(lib).all() else math.inf
    return Check("rollout (library vs authors, same noise)", err <= ROLLOUT_TOL,
                 f"rel. error {err:.2e} (tol {ROLLOUT_TOL:.0e}); x_t {tuple(x_t.shape)}, {num_steps} points, "
                 f"sigma 0.02..60")


def run_checks(cfg: Config) -> dict[str, Check]:
    D = math.prod(cfg.image)
    stf_lib, stf_auth = check_stable_target(D, cfg.device)
    return {"stf library": stf_lib, "stf authors": stf_auth,
            "rollout": check_rollout(cfg.image, cfg.cdm_steps, cfg.device)}


def failed_check(case: Case, checks: dict[str, Check]) -> Check | None:
    """The check that rules this case out, if any: its stable target's, or the rollout's (both methods)."""
    if "stf" in case.loss and not checks[f"stf {case.method}"].ok:
        return checks[f"stf {case.method}"]
    if "cdm" in case.loss and not checks["rollout"].ok:
        return checks["rollout"]
    return None


# ----------------------------------------------------------------------------------------------
# Memory: estimate before running, and the limit
# ----------------------------------------------------------------------------------------------


def graph_batches(case: Case) -> int:
    """Batches of B whose activations the backward keeps: D0 for every loss, plus D1 of K trajectories."""
    return 1 + (K if "cdm" in case.loss else 0)


def stable_target_bytes(case: Case, B: int, D: int, device: str = "cpu") -> float:
    """Peak extra bytes of the stable target itself (stf_common's model of the method; the broadcast
    formula's is 3 B n D + 4 B n floats), 0 without one."""
    if not case.rbatch:
        return 0.0
    methods = sc.all_methods(device)  # this library's backends first, the one "auto" picks first of all
    want = "authors-broadcast" if case.method == "authors" else "cdm_kernels["
    return next(m for m in methods if m.name.startswith(want)).extra_bytes(B, case.rbatch, D, False)


def estimate_bytes(case: Case, B: int, D: int, persistent: float, edm_extra: float, device: str = "cpu") -> float:
    """Predicted peak of a step of `case`:

        persistent tensors + the reference batch (the step's and the loss's concatenation, 2 rbatch D
        floats, alive through the forward pass) + the larger of the EDM step's measured excess for each
        batch that keeps a graph (D0, and D1 of the K trajectories) and the stable target's own
        tensors (under no_grad, freed before the network runs) + the rollout's states (float32 fused
        steps: x, D, x'; the authors' float64 steps: x, D, z and two temporaries)."""
    refs = FLOAT32 * 2 * case.rbatch * D if case.rbatch else 0.0
    rollout = K * B * D * (5 * FLOAT64 if case.method == "authors" else 3 * FLOAT32) if "cdm" in case.loss else 0.0
    return persistent + refs + max(graph_batches(case) * edm_extra, stable_target_bytes(case, B, D, device)) + rollout


def refusal(needs: float, limit: float) -> str | None:
    """The status of a row predicted not to fit, None if it fits."""
    if needs > limit:
        return f"OOM (needs {needs / GiB:.1f} GiB, limit {limit / GiB:.1f} GiB)"
    return None


def available_bytes(device: str) -> float:
    """Memory free for this run now: the GPU's free memory, or the CPU's MemAvailable."""
    if torch.device(device).type == "cuda":
        return float(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            return float(next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024)
    except (OSError, StopIteration, ValueError):
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_limit(device: str) -> float:
    return (0.95 if torch.device(device).type == "cuda" else 0.7) * available_bytes(device)


def is_oom(exc: BaseException) -> bool:
    msg = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in msg or "can't allocate memory" in msg


# ----------------------------------------------------------------------------------------------
# The step and its measurements
# ----------------------------------------------------------------------------------------------


class Bench:
    """The training loop's run (`cdm_kernels.train.set_up`), shared by every row: one model in memory."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed + 1)
        pixels = torch.randint(0, 256, (cfg.data, *cfg.image), generator=g, dtype=torch.uint8).numpy()
        with tempfile.TemporaryDirectory() as tmp:  # the loop loads the images into memory
            data = os.path.join(tmp, "synthetic.npy")
            np.save(data, pixels)
            self.run = set_up(train_config(cfg, data=data, outdir=tmp))
        self.device, self.net, self.opt = self.run.device, self.run.net, self.run.opt
        self.params = sum(p.numel() for p in self.net.parameters())

    def step_fn(self, case: Case, loss_fn) -> Callable[[], None]:
        """The loop's step of the shared run with the row's loss and its reference draw."""
        c = replace(self.run.c, loss=case.loss, rbatch=case.rbatch or self.cfg.batch)
        refs = build_references(c, self.run.bank_images.shape[0], self.run.local_batch)
        run = replace(self.run, c=c, loss_fn=loss_fn, refs=refs)
        return lambda: train_step(run)

    def persistent_bytes(self) -> float:
        """Parameters and buffers of the network and its EMA, Adam's state, the data set and the bank of
        references on the device: what lives between steps (grads do not: zero_grad(set_to_none=True)
        frees them, and the step allocates them again)."""
        r = self.run
        tensors = [*r.net.parameters(), *r.net.buffers(), *r.ema.parameters(), *r.ema.buffers(), r.ds.images,
                   r.bank_images]
        tensors += [v for s in r.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        unique = {(t.device, t.data_ptr()): t for t in tensors if t.device == self.device}  # the bank may be the data
        return float(sum(t.numel() * t.element_size() for t in unique.values()))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


LIB_PREFIXES = ("cdm_kernels::", "cdm_kernels_C::")


def library_op_time(step: Callable[[], None], device: str, steps: int) -> dict:
    """`steps` steps under torch.profiler: the seconds per step of this library's top-level registered
    ops (GPU kernel time on a GPU, CPU time on the CPU, children included), by op and in total, and the
    wall seconds per profiled step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # stf_common's guard: the profiler's backend prints start/stop lines on the C-level stderr.
    with sc._quiet_fd2(), profile(activities=acts) as prof:
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            wall = start.elapsed_time(end) / 1e3
        else:
            wall = time.perf_counter() - t0

    def is_lib(name: str) -> bool:
        return name.startswith(LIB_PREFIXES)

    by_op: dict[str, float] = {}
    for ev in prof.events():
        if not is_lib(ev.name):
            continue
        parent = ev.cpu_parent
        while parent is not None and not is_lib(parent.name):
            parent = parent.cpu_parent
        if parent is None:  # not inside another library op: counted once, with its children
            us = ev.device_time_total if cuda else ev.cpu_time_total
            by_op[ev.name] = by_op.get(ev.name, 0.0) + us * 1e-6 / steps
    lib = sum(by_op.values())
    return {"wall_s": wall / steps, "lib_s": lib, "share": lib / (wall / steps),
            "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}


def memory_of_step(bench: Bench, step: Callable[[], None]) -> tuple[float, float]:
    """(peak total, peak excess over what was allocated before) of one step, in bytes."""
    bench.opt.zero_grad(set_to_none=True)  # grads are allocated inside the measured step, as in the loop
    extra = float(sc.peak_extra_bytes(step, bench.cfg.device))
    if bench.device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(bench.device)), extra
    return bench.persistent_bytes() + extra, extra


@dataclass
class Timed:
    """Seconds of the timed steps (wall: CUDA events / perf_counter; cpu: this process's CPU time) and
    of the EDM steps timed in alternation with them."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peer_wall: list[float] = field(default_factory=list)
    peer_cpu: list[float] = field(default_factory=list)


def time_steps(step: Callable[[], None], cfg: Config, tick: Callable[[str], None],
               peer: Callable[[], None] | None = None) -> Timed:
    """Each timed step: at least min_steps, more while they total under target_s, at most max_steps
    (CUDA events on a GPU, perf_counter on the CPU: stf_common.time_call, one step a call; and the
    process's CPU time, which other processes on a shared CPU do not inflate). With a `peer` (EDM's
    step), one peer step after each step, timed too: a change of load or clocks hits both alike, and
    their ratio stays meaningful on a shared machine."""
    t = Timed()

    def one(fn, wall: list[float], cpu: list[float]) -> None:
        c0 = time.process_time()
        wall.append(sc.time_call(fn, cfg.device, min_repeats=1, max_repeats=1, warmup=False).median)
        cpu.append(time.process_time() - c0)

    while len(t.wall) < cfg.min_steps or (len(t.wall) < cfg.max_steps and sum(t.wall) + t.wall[-1] <= cfg.target_s):
        one(step, t.wall, t.cpu)
        if peer is not None:
            one(peer, t.peer_wall, t.peer_cpu)
        tick(f"timed {len(t.wall)}")
    return t


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------


class Progress:
    """tqdm over the rows on a terminal; otherwise a line at each row and every few steps (or 15 s)."""

    def __init__(self, rows: int, enabled: bool):
        self.enabled, self.rows, self.row_i = enabled, rows, 0
        self.t0 = self.t_line = time.monotonic()
        self.label, self.steps_since = "", 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=rows, unit="row", desc="train step bench", file=sys.stderr, dynamic_ncols=True)

    def row(self, label: str) -> None:
        self.row_i += 1
        self.label = label
        if self.bar is not None:
            self.bar.set_postfix_str(label)
        elif self.enabled:
            self._line(f"row {self.row_i}/{self.rows}: {label}")

    def row_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def tick(self, phase: str) -> None:
        self.steps_since += 1
        now = time.monotonic()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.label}: {phase}")
        elif self.enabled and (self.steps_since >= 10 or now - self.t_line >= 15):
            self._line(f"  {self.label}: {phase}")

    def _line(self, text: str) -> None:
        print(f"[bench_train_step {time.monotonic() - self.t0:7.1f} s] {text}", file=sys.stderr, flush=True)
        self.t_line, self.steps_since = time.monotonic(), 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def warm_up(step: Callable[[], None], n: int, tick: Callable[[str], None]) -> None:
    for i in range(n):
        step()
        tick(f"warm-up {i + 1}")


def base_row(bench: Bench, case: Case, env: dict, persistent: float) -> dict:
    """The columns every row of a case has: machine, versions, sizes, the case."""
    cfg = bench.cfg
    return {**env, "quick": cfg.quick, "batch": cfg.batch, "image": "x".join(map(str, cfg.image)),
            "net_params": bench.params, "loss": case.loss, "method": case.method, "rbatch": case.rbatch or "",
            "cdm_points": cfg.cdm_steps if "cdm" in case.loss else "", "persistent_bytes": persistent}


def timing_columns(t: Timed, device: str) -> dict:
    """Median and quartiles of the wall times, and the ratios to the EDM steps timed alongside; on the
    CPU the same from the process's CPU time (one thread: the step's own cost, whatever else runs)."""
    q = statistics.quantiles(t.wall, n=4, method="inclusive") if len(t.wall) > 1 else [t.wall[0]] * 3
    ms = statistics.median(t.wall) * 1e3
    cols = {"ms_per_step": ms, "q25_ms": q[0] * 1e3, "q75_ms": q[2] * 1e3, "steps": len(t.wall)}
    cpu = torch.device(device).type == "cpu"
    if cpu:
        cols["cpu_ms_per_step"] = statistics.median(t.cpu) * 1e3
    if t.peer_wall:
        cols["edm_paired_ms"] = statistics.median(t.peer_wall) * 1e3
        cols["ratio_vs_edm"] = ms / cols["edm_paired_ms"]
        if cpu:
            cols["edm_paired_cpu_ms"] = statistics.median(t.peer_cpu) * 1e3
            cols["cpu_ratio_vs_edm"] = cols["cpu_ms_per_step"] / cols["edm_paired_cpu_ms"]
    return cols


def run_case(bench: Bench, case: Case, progress: Progress, edm_step: Callable[[], None]) -> dict:
    """Warm-up, the memory step, the profiled steps and the timed steps of one row (in alternation
    with EDM's step, except for EDM's own row)."""
    cfg = bench.cfg
    step = bench.step_fn(case, make_loss(cfg, case))
    warm_up(step, cfg.warmup, progress.tick)
    bench.sync()
    peak, extra = memory_of_step(bench, step)
    progress.tick("memory")
    prof = library_op_time(step, cfg.device, cfg.profile_steps)
    progress.tick("profile")
    timed = time_steps(step, cfg, progress.tick, None if case.loss == "edm" else edm_step)
    return {"status": "ok", **timing_columns(timed, cfg.device), "peak_bytes": peak, "peak_extra_bytes": extra,
            "lib_ms_per_step": prof["lib_s"] * 1e3, "profiled_ms_per_step": prof["wall_s"] * 1e3,
            "lib_share": prof["share"],
            "lib_ops": "; ".join(f"{k}={v * 1e3:.3f}" for k, v in prof["by_op"].items())}


def _release(bench: Bench) -> None:
    bench.opt.zero_grad(set_to_none=True)
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()


def run(cfg: Config, progress: bool = True) -> dict:
    """Checks, then every row; returns the rows, the checks, the environment and the network."""
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config, progress: bool) -> dict:
    env = sc.environment(cfg.device)
    limit = cfg.mem_limit_gb * GiB if cfg.mem_limit_gb is not None else default_limit(cfg.device)
    load_start = sc.load_average()
    t_start = time.monotonic()
    checks = run_checks(cfg)
    bench = Bench(cfg)
    D = math.prod(cfg.image)
    todo = cases(cfg)
    prog = Progress(len(todo) + 1, progress)  # and EDM again at the end
    edm_step = bench.step_fn(todo[0], make_loss(cfg, todo[0]))
    edm_step()  # Adam's state exists from here on: persistent
    bench.sync()
    persistent = bench.persistent_bytes()
    rows: list[dict] = []
    edm: dict | None = None
    try:
        for case in todo:
            prog.row(f"{case.label} {case.method}")
            row = base_row(bench, case, env, persistent)
            bad = failed_check(case, checks)
            est = estimate_bytes(case, cfg.batch, D, persistent, edm["peak_extra_bytes"], cfg.device) if edm else None
            row["est_bytes"] = est if est is not None else ""
            if bad is not None:
                row["status"] = f"wrong: {bad.name}: {bad.detail}"
            elif edm is not None and cfg.budget_s is not None and time.monotonic() - t_start > cfg.budget_s:
                row["status"] = "skipped: time budget"
            elif est is not None and refusal(est, limit):
                row["status"] = refusal(est, limit)
            else:
                try:
                    row.update(run_case(bench, case, prog, edm_step))
                except torch.OutOfMemoryError as exc:
                    row["status"] = f"OOM (at run: {str(exc).splitlines()[0][:160]})"
                except RuntimeError as exc:  # the CPU allocator's failure is a plain RuntimeError
                    if not is_oom(exc):
                        raise
                    row["status"] = f"OOM (at run: {str(exc).splitlines()[0][:160]})"
                _release(bench)
            if case.loss == "edm":
                if row["status"] != "ok":
                    raise RuntimeError(f"the EDM row, which every other row refers to, did not run: {row['status']}")
                edm = row
            rows.append(row)
            prog.row_done()
        rows.append(retime_edm(bench, edm_step, prog, env, persistent, t_start))
    finally:
        prog.close()
    load_end = sc.load_average()
    for r in rows:
        if r["loss"] in ("edm", "edm (end)") and r.get("ms_per_step"):  # EDM's row: 1; at the end: the drift
            r["ratio_vs_edm"] = r["ms_per_step"] / edm["ms_per_step"]
            if "cpu_ms_per_step" in r:
                r["cpu_ratio_vs_edm"] = r["cpu_ms_per_step"] / edm["cpu_ms_per_step"]
        r["limit_bytes"] = limit
        r["load_start"], r["load_end"] = load_start, load_end
    rows.append(target_row(cfg, rows, env, limit))
    return {"rows": rows, "checks": checks, "env": env, "config": cfg, "limit": limit, "params": bench.params,
            "ddpmpp_params": param_count(DDPMPP, cfg.image), "edm_ddpmpp_params": edm_ddpmpp_param_count(DDPMPP, cfg.image),
            "seconds": time.monotonic() - t_start}


def retime_edm(bench: Bench, step: Callable[[], None], prog: Progress, env: dict, persistent: float,
               t_start: float) -> dict:
    """EDM's step timed again after every other row ("edm (end)"): its ratio to the first EDM row is
    the drift of the machine over the run (clocks, load), the scale of the other ratios' error."""
    cfg = bench.cfg
    row = base_row(bench, Case("edm (end)", "-", None), env, persistent)
    prog.row("EDM again, at the end")
    if cfg.budget_s is not None and time.monotonic() - t_start > cfg.budget_s:
        return {**row, "status": "skipped: time budget"}
    warm_up(step, cfg.warmup, prog.tick)
    row.update(status="ok", **timing_columns(time_steps(step, cfg, prog.tick), cfg.device))
    prog.row_done()
    return row


def target_row(cfg: Config, rows: list[dict], env: dict, limit: float) -> dict:
    """STF with the large reference batch (library) over EDM, with a verdict only where the target's
    target applies: on a GPU, at batch 64, 50,000 references, the DDPM++-like network."""
    large = cfg.rbatches[1]
    stf = next((r for r in rows if r["loss"] == "stf" and r["method"] == "library" and r["rbatch"] == large), None)
    ratio = stf.get("ratio_vs_edm") if stf is not None else None  # absent when the row did not run
    cpu_ratio = stf.get("cpu_ratio_vs_edm", "") if stf is not None else ""
    target_sizes = cfg.batch == 64 and large == 50_000 and cfg.net == DDPMPP and cfg.image == (3, 32, 32)
    if ratio is None:
        verdict = "no verdict: " + (stf["status"] if stf is not None else "the STF rows were not run")
    elif torch.device(cfg.device).type != "cuda":
        verdict = "no verdict (CPU: the target is for the GPU)"
    elif not target_sizes:
        verdict = "no verdict (not the target's sizes)"
    else:
        verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    return {**env, "quick": cfg.quick, "batch": cfg.batch, "image": "x".join(map(str, cfg.image)),
            "loss": f"target: STF(r={large})/EDM <= {TARGET_RATIO:.2f}", "method": "library", "rbatch": large,
            "ratio_vs_edm": ratio if ratio is not None else "", "cpu_ratio_vs_edm": cpu_ratio, "status": verdict,
            "limit_bytes": limit}


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------

CSV_FIELDS = [
    "device", "device_name", "torch", "triton", "cdm_kernels", "extension", "python", "threads", "quick",
    "batch", "image", "net_params", "loss", "method", "rbatch", "cdm_points", "status", "ms_per_step", "q25_ms",
    "q75_ms", "steps", "edm_paired_ms", "ratio_vs_edm", "cpu_ms_per_step", "edm_paired_cpu_ms", "cpu_ratio_vs_edm",
    "peak_bytes", "peak_extra_bytes", "persistent_bytes", "est_bytes",
    "limit_bytes", "lib_ms_per_step", "profiled_ms_per_step", "lib_share", "lib_ops", "load_start", "load_end",
]


def _gib(v) -> str:
    return "" if v in (None, "") else f"{float(v) / GiB:.2f}"


def _fmt(v, spec: str) -> str:
    return "" if v in (None, "") else format(float(v), spec)


def format_markdown(res: dict, command: str) -> str:
    cfg, env = res["config"], res["env"]
    net = cfg.net
    cpu = torch.device(cfg.device).type == "cpu"
    lines = [
        "# One training step: EDM, STF, CDM, STF+CDM, this library's ops against the authors' formulas"
        + (" (--quick: tiny network, not a measurement)" if cfg.quick else ""),
        "",
        f"{env['device_name']}; torch {env['torch']}, triton {env['triton']}, cdm_kernels {env['cdm_kernels']} "
        f"(extension {env['extension']}), Python {env['python']}, {env['threads']} CPU threads. "
        f"Load average {res['rows'][0]['load_start']} at the start, {res['rows'][0]['load_end']} at the end; "
        f"{res['seconds']:.0f} s in all.",
        "",
        f"Command: `{command}`",
        "",
        f"The loop's own step (cdm_kernels.train.train_step). Images {'x'.join(map(str, cfg.image))} from a "
        f"synthetic data set of {cfg.data} (uniform uint8 pixels, loaded by the loop's data loader); "
        f"batch {cfg.batch}; network: the loop's UNet with model_channels {net.model_channels}, channel_mult "
        f"{net.channel_mult}, {net.num_blocks} blocks a level, attention at {net.attn_resolutions}, dropout "
        f"{net.dropout}: {res['params']:,} parameters; Adam and the EMA; CDM with {cfg.cdm_steps} rollout points, 2 "
        f"trajectories. Per row: {cfg.warmup} warm-up step(s), 1 memory step, {cfg.profile_steps} profiled "
        f"step(s), then {cfg.min_steps} to {cfg.max_steps} timed steps (more while under {cfg.target_s:g} s). "
        f"Memory limit for the estimates: {res['limit'] / GiB:.1f} GiB.",
        "",
        "| loss | method | rbatch | ms/step [IQR] | steps | x EDM |" + (" CPU-time x EDM |" if cpu else "")
        + " peak GiB (excess) | est. GiB | library ops ms/step | share | status |",
        "|---|---|---:|---:|---:|---:|" + ("---:|" if cpu else "") + "---:|---:|---:|---:|---|",
    ]
    for r in res["rows"][:-1]:
        t = (f"{r['ms_per_step']:.1f} [{r['q25_ms']:.1f}-{r['q75_ms']:.1f}]" if r.get("ms_per_step") else "")
        mem = f"{_gib(r.get('peak_bytes'))} ({_gib(r.get('peak_extra_bytes'))})" if r.get("peak_bytes") else ""
        share = f"{100 * r['lib_share']:.1f}%" if r.get("lib_share") not in (None, "") else ""
        lines.append(f"| {r['loss']} | {r['method']} | {r['rbatch']} | {t} | {r.get('steps', '')} | "
                     f"{_fmt(r.get('ratio_vs_edm'), '.3f')} |"
                     + (f" {_fmt(r.get('cpu_ratio_vs_edm'), '.3f')} |" if cpu else "")
                     + f" {mem} | {_gib(r.get('est_bytes'))} | {_fmt(r.get('lib_ms_per_step'), '.2f')} | {share} | "
                     f"{r['status']} |")
    tr = res["rows"][-1]
    cpu_ratio = f" (CPU time: {_fmt(tr.get('cpu_ratio_vs_edm'), '.3f') or '-'})" if cpu else ""
    lines += ["", f"**{tr['loss']}**: ratio {_fmt(tr['ratio_vs_edm'], '.3f') or '-'}{cpu_ratio}: {tr['status']}", ""]
    ooms = [r for r in res["rows"][:-1] if r["status"].startswith("OOM")]
    lines.append("Out of memory: " + ("; ".join(f"{r['loss']} {r['method']} rbatch {r['rbatch']}: {r['status']}"
                                                 for r in ooms) if ooms else "no row.") + "")
    lines += ["", "## Correctness checks (before timing)", ""]
    lines += [f"- {c.name}: {'ok' if c.ok else '**WRONG** (its rows not timed)'}: {c.detail}" for c in res["checks"].values()]
    lines += [
        "", "## The network", "",
        f"EDM's CIFAR-10 DDPM++ configuration (model_channels 128, channel_mult (2, 2, 2), 4 blocks, attention "
        f"at 16, dropout 0.13) in the loop's UNet: {res['ddpmpp_params']:,} parameters; EDM's own SongUNet with "
        f"these options: {res['edm_ddpmpp_params']:,} (counted from its layout; the paper: 55.73M). "
        + NET_DIFFERENCES,
        "", "## Library ops per row (ms per step, profiled steps)", "",
    ]
    for r in res["rows"][:-1]:
        if r.get("lib_ops"):
            lines.append(f"- {r['loss']} {r['method']} {r['rbatch']}: {r['lib_ops']}")
    lines += ["", "## How each column is measured", "", "```", MEASURED.rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> None:
    """Bars of ms/step per loss (x) and method (colour); a row without a time is named by its status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    def label(r):
        return Case(r["loss"], r["method"], r["rbatch"] or None).label

    labels = list(dict.fromkeys(label(r) for r in rows))
    colours = {"-": "C7", "library": "C0", "authors": "C1"}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels)), 4.0), dpi=110)
    width = 0.38
    for r in rows:
        i = labels.index(label(r))
        x = i if r["method"] == "-" else i + (-0.5 if r["method"] == "library" else 0.5) * width
        if r.get("ms_per_step"):
            ax.bar(x, r["ms_per_step"], width, color=colours[r["method"]])
        else:
            ax.text(x, 0, r["status"].split(" (")[0].split(":")[0], rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("ms per training step (median)")
    ax.set_title(title, fontsize=9)
    ms = [r["ms_per_step"] for r in rows if r.get("ms_per_step")]
    if ms and max(ms) / min(ms) > 20:
        ax.set_yscale("log")
    ax.legend(handles=[Patch(color=c, label=m if m != "-" else "EDM (no formula swapped)") for m, c in colours.items()],
              fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def write_outputs(res: dict, out: str, command: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, name) for name in ("train_step.csv", "train_step.md", "train_step.png")]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in res["rows"]:
            w.writerow({k: _csv_value(r.get(k)) for k in CSV_FIELDS})
    with open(paths[1], "w") as f:
        f.write(format_markdown(res, command))
    env = res["env"]
    plot(res["rows"][:-1], paths[2], f"{env['device_name']}, batch {res['config'].batch}, "
         f"{res['params'] / 1e6:.1f}M-parameter net" + (" (--quick)" if res["config"].quick else ""))
    return paths


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_train_step", description=__doc__.split("\n\n")[0])
    sc.add_quick_and_out(ap, "bench_train_step", "tiny network, batch 4, rbatch 64/256: checks the script")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--batch", type=sc.positive_int("--batch"), default=None, help="batch size (64)")
    ap.add_argument("--rbatch", default=None, help="STF's two reference batches, small,large (4096,50000)")
    ap.add_argument("--losses", default=",".join(LOSS_ORDER), help="subset of edm,stf,cdm,stf+cdm (edm always runs)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per row (GPU 3, CPU 0)")
    ap.add_argument("--min-steps", type=sc.positive_int("--min-steps"), default=None, help="timed steps at least (GPU 5, CPU 1)")
    ap.add_argument("--steps", type=sc.positive_int("--steps"), default=None, help="timed steps at most (GPU 30, CPU 3)")
    ap.add_argument("--target-s", type=float, default=None, help="timed steps continue while under this (GPU 10, CPU 120)")
    ap.add_argument("--profile-steps", type=sc.positive_int("--profile-steps"), default=None, help="profiled steps (GPU 2, CPU 1)")
    ap.add_argument("--mem-limit-gb", type=float, default=None, help="GiB; default 95%% of the GPU's free / 70%% of available RAM")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run; later rows are skipped")
    ap.add_argument("--threads", type=sc.positive_int("--threads"), default=None,
                    help="torch's CPU threads (default: torch's; --quick 1)")
    ap.add_argument("--no-progress", action="store_true", help="no progress output")
    return ap


def parse_args(argv=None) -> tuple[Config, str, bool]:
    ap = build_parser()
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu")
    cfg = Config(device=device)
    if device == "cpu":
        cfg = replace(cfg, **CPU_STEPS)
    if a.quick:
        cfg = replace(cfg, **QUICK)
    over = {k: v for k, v in dict(batch=a.batch, warmup=a.warmup, min_steps=a.min_steps, max_steps=a.steps,
                                   target_s=a.target_s, profile_steps=a.profile_steps, mem_limit_gb=a.mem_limit_gb,
                                   budget_s=a.budget, threads=a.threads).items() if v is not None}
    if a.rbatch is not None:
        try:
            rb = tuple(int(v) for v in a.rbatch.split(","))
        except ValueError:
            rb = ()
        if len(rb) != 2 or min(rb) < 1:
            ap.error(f"--rbatch: two positive ints small,large (e.g. 4096,50000), got {a.rbatch!r}")
        over["rbatches"] = rb
    losses = tuple(s for s in a.losses.split(",") if s)
    unknown = sorted(set(losses) - set(LOSS_ORDER))
    if unknown:
        ap.error(f"--losses: unknown {unknown}; expected a subset of {','.join(LOSS_ORDER)}")
    over["losses"] = tuple(x for x in LOSS_ORDER if x in losses or x == "edm")
    if over.get("warmup", 0) < 0 or over.get("target_s", 0.0) < 0:
        ap.error("--warmup and --target-s must be >= 0")
    if over.get("mem_limit_gb", 1.0) <= 0 or over.get("budget_s", 1.0) <= 0:
        ap.error("--mem-limit-gb and --budget must be > 0")
    cfg = replace(cfg, **over)
    if cfg.max_steps < cfg.min_steps:
        ap.error(f"--steps ({cfg.max_steps}) must be >= --min-steps ({cfg.min_steps})")
    if max(cfg.rbatches) > cfg.data or min(cfg.rbatches) < cfg.batch:
        ap.error(f"--rbatch: each reference batch must be between the batch ({cfg.batch}) and the data set's "
                 f"size ({cfg.data}), got {cfg.rbatches}")
    return cfg, a.out, not a.no_progress


def main(argv=None) -> int:
    cfg, out, progress = parse_args(argv)
    args = sys.argv[1:] if argv is None else list(argv)
    command = "python -m benchmarks.bench_train_step " + " ".join(shlex.quote(x) for x in args)
    print(f"DDPM++-like network: {param_count(DDPMPP, cfg.image):,} parameters "
          f"(EDM's DDPM++: {edm_ddpmpp_param_count(DDPMPP, cfg.image):,}); this run: {asdict(cfg)}", flush=True)
    res = run(cfg, progress=progress)
    paths = write_outputs(res, out, command.strip())
    print(format_markdown(res, command.strip()))
    print("wrote " + ", ".join(paths))
    print(f"results in {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
