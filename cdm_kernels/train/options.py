"""The options of a training run: TrainConfig, their checks, and the command line that maps onto them
(`cdm-train --help`); a bad value is one line naming its flag, and exit status 2."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

LOSSES = ("edm", "stf", "cdm", "stf+cdm")
DEFAULT_OUTDIR = "runs/train"
DEFAULT_IMAGES = 19_200


@dataclass
class TrainConfig:
    """Every option of a training run (the command line maps one-to-one onto these fields)."""

    data: str = "digits"              # "digits", a folder, a .zip or a .npy/.npz file
    outdir: str | None = None         # None: DEFAULT_OUTDIR, or with resume the checkpoint's folder
    loss: str = "stf+cdm"             # one of LOSSES
    batch: int = 64                   # global batch (split over the processes)
    rbatch: int = 1024                # STF reference batch per process (its own images first)
    cdm_steps: int = 6                # CDM: points of each rollout schedule
    lambda_m: float = 2.0             # CDM: weight of the martingale term
    eps_min: float = 0.0              # CDM: sigma_min = max(sigma - eps, 0.002), eps ~ U[eps_min, eps_max]
    eps_max: float = 0.05
    lr: float = 2e-3
    lr_rampup: int = 1_000            # images of linear learning-rate warm-up
    ema_halflife: int = 5_000         # images; EDM's half-life of the EMA weights
    ema_rampup: float = 0.05          # the half-life is at most this fraction of the images seen
    images: int | None = None         # duration in training images (steps = images / batch); None:
                                      # DEFAULT_IMAGES, or with resume (and no steps) the checkpoint's
    steps: int | None = None          # duration in steps (overrides images)
    seed: int = 0
    snap: int = 100                   # snapshot (grid, plot, checkpoint) every this many steps
    resume: str | None = None         # a checkpoint file, or an output folder (its latest checkpoint)
    device: str = "auto"              # "auto", "cpu" or "cuda"
    cond: bool = False                # class-conditional (needs labels; not with the STF losses)
    xflip: bool = False               # x-flip augmentation (off for digits: a flipped digit is not one)
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (4,)
    dropout: float = 0.0
    sample_steps: int = 18            # Heun steps of the snapshot sampler
    grid: int = 100                   # images in the snapshot grid
    backend: str = "auto"             # stable-target backend (cdm_kernels.stf_target)
    progress: bool = True             # progress on the first process (cdm_kernels.progress)
    threads: int | None = None        # torch intra-op CPU threads (None: torch's default)
    overwrite: bool = False           # a fresh run may delete the checkpoints, log and samples in outdir


# Options that may differ between a checkpoint and the run that resumes it: the duration, the
# snapshots, where and how fast it runs. Every other option must match (`_check_resume_config`).
RESUME_MAY_CHANGE = frozenset(
    {"images", "steps", "snap", "resume", "outdir", "overwrite", "device", "threads", "progress", "grid",
     "sample_steps", "backend"}
)
# Command-line names of the options whose field names differ from them.
_FLAGS = {"model_channels": "--channels", "num_blocks": "--blocks", "attn_resolutions": "--attn"}


def _flag(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _check_config(c: TrainConfig) -> None:
    """Raises ValueError naming the first option whose value cannot work (by its command-line flag)."""
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if c.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {c.loss!r}")
    for name in ("batch", "rbatch", "snap", "sample_steps", "model_channels", "num_blocks"):
        if not positive_int(getattr(c, name)):
            raise ValueError(f"{_flag(name)} must be a positive int, got {getattr(c, name)!r}")
    for name in ("images", "steps", "threads"):
        if getattr(c, name) is not None and not positive_int(getattr(c, name)):
            raise ValueError(f"{_flag(name)} must be a positive int, got {getattr(c, name)!r}")
    if "cdm" in c.loss and not (positive_int(c.cdm_steps) and c.cdm_steps >= 2):
        raise ValueError(f"--cdm-steps must be an int >= 2 (the points of each rollout schedule), got {c.cdm_steps!r}")
    if not (c.lr > 0 and math.isfinite(c.lr)):
        raise ValueError(f"--lr must be positive and finite, got {c.lr}")
    for name in ("lr_rampup", "ema_halflife", "ema_rampup", "eps_min", "lambda_m", "grid"):
        if not (getattr(c, name) >= 0 and math.isfinite(getattr(c, name))):
            raise ValueError(f"{_flag(name)} must be >= 0 and finite, got {getattr(c, name)}")
    if not c.eps_min <= c.eps_max < math.inf:
        raise ValueError(f"--eps-max must be finite and >= --eps-min ({c.eps_min}), got {c.eps_max}")
    if not 0 <= c.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {c.dropout}")
    for name in ("channel_mult", "attn_resolutions"):
        if not all(positive_int(v) for v in getattr(c, name)) or (name == "channel_mult" and not c.channel_mult):
            raise ValueError(f"{_flag(name)} must be a list of positive ints, got {getattr(c, name)!r}")
    if c.device not in ("auto", "cpu", "cuda") and not c.device.startswith("cuda:"):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda[:i]', got {c.device!r}")
    if c.cond and c.loss in ("stf", "stf+cdm"):
        # The stable target pools references of every class: at high noise it is the mean of all
        # images whatever the label, which would teach a conditional model to ignore its label.
        raise ValueError(
            f"--cond cannot be used with loss {c.loss!r}: the stable target averages references of every "
            "class, so it is the target of an unconditional model; train unconditionally, or use 'edm'/'cdm'"
        )


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the message and where to look), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of ints, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m cdm_kernels.train`; every option's help states its default once."""
    d = TrainConfig()
    p = _Parser(prog="cdm-train", description="Train an EDM denoiser with the EDM, stable-target (STF) or "
                "consistency (CDM) loss. Every option's help ends with its default.")
    D = "(default: %(default)s)"
    g = p.add_argument_group("data and output")
    g.add_argument("--data", default=d.data, help=f"'digits' (built in), a folder of images, a .zip, or a .npy/.npz {D}")
    g.add_argument("--outdir", default=None, help="output folder: log, plots, sample grids, checkpoints "
                   f"(default: {DEFAULT_OUTDIR}; with --resume, the folder of the checkpoint)")
    g.add_argument("--xflip", action="store_true", help="x-flip augmentation (default: off)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --outdir that holds checkpoints, "
                   "deleting its checkpoints, log and samples (default: off: such a folder is refused)")
    g.add_argument("--cond", action="store_true", help="class-conditional model, edm and cdm losses, needs labels "
                   "(default: off)")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default=d.loss, choices=LOSSES, help=f"training objective {D}")
    g.add_argument("--batch", type=int, default=d.batch, help=f"global batch size {D}")
    g.add_argument("--rbatch", type=int, default=d.rbatch, help=f"STF reference batch per process {D}")
    g.add_argument("--cdm-steps", type=int, default=d.cdm_steps, help=f"CDM rollout schedule points {D}")
    g.add_argument("--lambda-m", type=float, default=d.lambda_m, help=f"CDM martingale weight {D}")
    g.add_argument("--eps-min", type=float, default=d.eps_min, help=f"CDM: sigma_min = max(sigma - eps, 0.002), "
                   f"eps ~ U[eps-min, eps-max] {D}")
    g.add_argument("--eps-max", type=float, default=d.eps_max, help=f"see --eps-min {D}")
    g.add_argument("--backend", default=d.backend, help=f"stable-target backend (cdm_kernels.available_backends) {D}")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate {D}")
    g.add_argument("--lr-rampup", type=int, default=d.lr_rampup, help=f"images of learning-rate warm-up {D}")
    g.add_argument("--ema-halflife", type=int, default=d.ema_halflife, help=f"EMA half-life in images {D}")
    g.add_argument("--ema-rampup", type=float, default=d.ema_rampup,
                   help=f"the EMA half-life is at most this fraction of the images seen {D}")
    g.add_argument("--images", type=int, default=None, help="duration in training images "
                   f"(default: {DEFAULT_IMAGES}; with --resume, the checkpoint's duration)")
    g.add_argument("--steps", type=int, default=None,
                   help="duration in steps, counted from the start of the run; overrides --images (default: none)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed of the weights, the data order and the noise {D}")
    g = p.add_argument_group("model")
    g.add_argument("--channels", type=int, default=d.model_channels, help=f"U-Net channels at the first level {D}")
    g.add_argument("--channel-mult", type=_ints, default=d.channel_mult,
                   help=f"per-level channel multipliers (default: {','.join(map(str, d.channel_mult))})")
    g.add_argument("--blocks", type=int, default=d.num_blocks, help=f"residual blocks per level {D}")
    g.add_argument("--attn", type=_ints, default=d.attn_resolutions,
                   help=f"resolutions with attention (default: {','.join(map(str, d.attn_resolutions))})")
    g.add_argument("--dropout", type=float, default=d.dropout, help=f"dropout probability {D}")
    g = p.add_argument_group("run")
    g.add_argument("--snap", type=int, default=d.snap, help=f"snapshot (grid, plot, checkpoint) every this many steps {D}")
    g.add_argument("--resume", default=None, help="checkpoint file, or run folder (its newest readable checkpoint), "
                   "to continue (default: none: a fresh run)")
    g.add_argument("--device", default=d.device, help=f"'auto' (a CUDA GPU if there is one), 'cpu' or 'cuda[:i]' {D}")
    g.add_argument("--sample-steps", type=int, default=d.sample_steps, help=f"Heun steps of the snapshot grids {D}")
    g.add_argument("--grid", type=int, default=d.grid, help=f"images in each snapshot grid, 0 for none {D}")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress display (default: off: a bar on a "
                   "terminal, a line every few steps in a log file)")
    g.add_argument("--sample-only", metavar="PNG", default=None, help="instead of training, sample --grid images "
                   "from the EMA weights of --resume into PNG (default: none: train)")
    g.add_argument("--churn", type=float, default=0.0, help=f"S_churn of the --sample-only sampler, 0 is deterministic {D}")
    g.add_argument("--profile", type=int, default=0, metavar="N", help="instead of training, profile N steps and "
                   "print the share of time in cdm_kernels ops (default: 0: train)")
    return p


def parse_args(argv=None, with_profile: bool = False):
    """The TrainConfig of a command line (and the parsed namespace, for --profile and --sample-only,
    if `with_profile`)."""
    a = build_parser().parse_args(argv)
    c = TrainConfig(
        data=a.data, outdir=a.outdir, loss=a.loss, batch=a.batch, rbatch=a.rbatch, cdm_steps=a.cdm_steps,
        lambda_m=a.lambda_m, eps_min=a.eps_min, eps_max=a.eps_max, lr=a.lr, lr_rampup=a.lr_rampup,
        ema_halflife=a.ema_halflife, ema_rampup=a.ema_rampup, images=a.images, steps=a.steps, seed=a.seed,
        snap=a.snap, resume=a.resume, device=a.device, cond=a.cond, xflip=a.xflip,
        model_channels=a.channels, channel_mult=a.channel_mult, num_blocks=a.blocks, attn_resolutions=a.attn,
        dropout=a.dropout, sample_steps=a.sample_steps, grid=a.grid, backend=a.backend, progress=not a.no_progress,
        threads=a.threads, overwrite=a.overwrite,
    )
    return (c, a) if with_profile else c


def _fail(message: str):
    """Ends the program like a command-line error: the message on one line, status 2."""
    sys.stderr.write(f"cdm-train: error: {' '.join(message.split())}\n")
    raise SystemExit(2)


def _or_exit(fn, *args):
    """fn(*args); a ValueError or OSError it raises (a bad option, a missing or unreadable file, a
    folder that holds another run: all found before any training) is a command-line error."""
    try:
        return fn(*args)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
