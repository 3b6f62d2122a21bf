"""cdm_kernels: fused kernels for the stable target (STF) and consistency (CDM) diffusion objectives.

The public API is `__all__` below; docs/usage.md describes every op, loss and argument.
"""

from . import backends as _backends  # noqa: F401  (every backend registration, in one place)
from . import selfcheck as _selfcheck  # noqa: F401  (the GPU backends' first-use check, installed in the registry)
from ._ext import extension_status, has_cpu_kernels, has_cuda_kernels
from .registry import available_backends, resolve_backend
from .stf import STFStats, ref_sqnorm, stf_score, stf_target

__version__ = "0.1.0"

__all__ = [
    "STFStats",
    "available_backends",
    "extension_status",
    "has_cpu_kernels",
    "has_cuda_kernels",
    "ref_sqnorm",
    "resolve_backend",
    "stf_score",
    "stf_target",
]

# Consistency rollouts, EDM sampler steps, Philox noise and the martingale loss (docs/math.md sections 2 and 3).
from .random import randn
from .rollout import (
    available_rollout_backends,
    consistency_rollout,
    martingale_loss,
    resolve_rollout_backend,
    rollout_step,
)
from .schedule import edm_schedule

__all__ += [
    "available_rollout_backends",
    "consistency_rollout",
    "edm_schedule",
    "martingale_loss",
    "randn",
    "resolve_rollout_backend",
    "rollout_step",
]

# Training losses (EDM, STF, CDM, STF+CDM) and the stable target over sharded references.
from .distributed import stf_target_sharded
from .losses import CDMLoss, EDMLoss, ReferenceBank, STFCDMLoss, STFLoss

__all__ += ["CDMLoss", "EDMLoss", "ReferenceBank", "STFCDMLoss", "STFLoss", "stf_target_sharded"]

# EDM model, sampler and data sets. The training loop is the package cdm_kernels.train, imported on
# demand (`python -m cdm_kernels.train`, `from cdm_kernels.train import ...`).
from .data import ImageDataset, load_dataset
from .edm import EDMPrecond, UNet, edm_sampler

__all__ += ["EDMPrecond", "ImageDataset", "UNet", "edm_sampler", "load_dataset"]

# The exact denoiser of a data set (the posterior mean over its images), called like EDMPrecond.
from .empirical import EmpiricalDenoiser

__all__ += ["EmpiricalDenoiser"]
