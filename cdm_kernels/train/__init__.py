"""A thin EDM-style training loop for the losses of cdm_kernels (EDM, STF, CDM, STF + CDM), run as
`python -m cdm_kernels.train` (or `cdm-train`); docs/training.md says what a run does and writes.
The modules: options, devices, checkpoints, run (set-up), loop (the step and fit), snapshots, profiling, cli."""

from .checkpoints import (
    _CHECKPOINT_KEYS, _OUTPUTS, _TEMPORARY, CheckpointError, _atomic_save, _check_resume_config, _checkpoints,
    _clear_run, _config_dict, _fsync_dir, _read_checkpoint, _resume_or_start, _rng_state, _set_rng_state,
    _with_run_defaults, load_checkpoint,
)
from .cli import main
from .devices import _Dist, _resolve_device, _wrap_ddp, process_seed
from .loop import _announce, _nothing_to_do, _prepare_outdir, _update_ema, fit, train, train_step
from .options import (
    _FLAGS, DEFAULT_IMAGES, DEFAULT_OUTDIR, LOSSES, RESUME_MAY_CHANGE, TrainConfig, _check_config, _fail, _flag,
    _ints, _or_exit, _Parser, build_parser, parse_args,
)
from .profiling import _profile, _profile_config, profile_training
from .run import Run, _check_backend, _load_data, build_loss, build_model, build_references, set_up
from .snapshots import _plot_losses, _read_log, _sample, _truncate_log, sample_checkpoint, sample_grid, snapshot

__all__ = [
    "LOSSES", "RESUME_MAY_CHANGE", "Run", "TrainConfig", "build_loss", "build_model", "build_references", "fit",
    "main", "parse_args", "process_seed", "set_up", "snapshot", "train", "train_step",
]
