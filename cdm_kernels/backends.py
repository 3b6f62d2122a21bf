"""Every backend registration of the package, in one place: which backend implements which op family
on which device types (docs/contributing.md, "The registry")."""

from __future__ import annotations

import importlib.util
import os

import torch

from . import random, rollout_reference, stf_reference
from ._ext import has_cpu_kernels, has_cuda_kernels
from .registry import PRECISIONS, register

__all__ = ["triton_interpreted"]


def triton_interpreted() -> bool:
    """True when Triton kernels run under the interpreter (on CPU tensors) in this process."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class _Compiled:
    """The launchers of the compiled backends: the ops of torch.ops.cdm_kernels_C, looked up on use
    (the namespace exists once the extension is imported)."""

    def __getattr__(self, name):
        return getattr(torch.ops.cdm_kernels_C, name)


_COMPILED = _Compiled()
_FAMILIES = ("stf_target", "rollout_step", "martingale_loss", "randn")

register(
    "reference",
    ("cpu", "cuda"),
    {"stf_target": stf_reference, "rollout_step": rollout_reference, "martingale_loss": rollout_reference,
     "randn": random},
)
if has_cpu_kernels():
    register("cpu", ("cpu",), dict.fromkeys(_FAMILIES, _COMPILED), checks_contract=True)
if has_cuda_kernels():
    register("cuda", ("cuda",), dict.fromkeys(_FAMILIES, _COMPILED), precisions={"stf_target": PRECISIONS},
             checks_contract=True)
if importlib.util.find_spec("triton") is not None:
    register(
        "triton",
        ("cuda", "cpu") if triton_interpreted() else ("cuda",),
        {"stf_target": "cdm_kernels.triton.stf", "rollout_step": "cdm_kernels.triton.rollout",
         "martingale_loss": "cdm_kernels.triton.rollout", "randn": "cdm_kernels.triton.rollout"},
        precisions={"stf_target": PRECISIONS},
    )
