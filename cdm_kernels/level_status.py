"""Checks of noise levels on the GPU paths, reported without a host synchronisation.

A noise level that is not valid gives silently wrong results, so every op checks them; but checking
a tensor of levels on the host means reading it back, a synchronisation that costs more than a
CIFAR-size rollout step itself and that a CUDA graph capture forbids. So where the backend is a GPU
one ("cuda" or "triton") and the levels come as tensors, the check runs on the device:

  * `rollout_step`: inside the kernel (csrc/rollout_math.h, `levels_ok`: 0 < t_cur < inf and
    0 <= t_next <= t_cur, t_next > 0 for Heun, t_hat >= t_cur for churn). The sample's row of x'
    is NaN, never a plausible value.
  * `consistency_rollout`: sigma and sigma_min (finite, 0 < sigma_min <= sigma) by one check kernel
    where its schedule is made; the sample's trajectories are NaN.
  * `stf_target`: sigma (positive and finite) by one check kernel; the sample's target is NaN.
  The check kernel is the CUDA extension's where it is built (launched, with the word's copy, from
  C++), else a Triton one.

Each records the first bad sample since the last report in the device's status word [source,
sample, value, value] (int64; the values as float64 bits), which is copied asynchronously to pinned
host memory after the work that wrote it. The next call of one of these ops on that device, once the
copy has landed, which is at the latest after the caller's next synchronisation (`.item()`, a copy
to the CPU, ...), raises the ValueError the host check would have raised, naming the op, the sample
and its values, and clears the word. `check_pending(device)` raises it now (it synchronises).
Under CUDA graph capture the checks record as usual; the CUDA extension's copies are part of the
graph, the Triton check's copy waits for the next call outside a capture.

Levels given as Python numbers, and every level on the CPU backends and the reference, are checked
on the host before any launch, and the error is raised at once.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

from ._ext import module as _ext_module

__all__ = ["KERNEL_CHECKED", "LevelStatus", "check_pending", "status_of"]

# Backends whose calls check tensor levels on the device (the GPU kernels, wherever they run).
KERNEL_CHECKED = ("cuda", "triton")
WORDS = 4  # source, sample, two values
ROLLOUT_STEP, CONSISTENCY_ROLLOUT, STF_TARGET = 1, 2, 3  # sources; 1 is written by the rollout kernels

_RULES = {
    ROLLOUT_STEP: ("rollout_step", ("t_cur", "t_next"),
                   "0 < t_cur < inf and 0 <= t_next <= t_cur (t_next > 0 for 'heun'; for 'churn' t_next is "
                   "t_hat >= t_cur); that step's x' is NaN for the sample"),
    CONSISTENCY_ROLLOUT: ("consistency_rollout", ("sigma", "sigma_min"),
                          "finite 0 < sigma_min <= sigma; its trajectories are NaN for the sample"),
    STF_TARGET: ("stf_target", ("sigma", None), "sigma positive and finite; its target is NaN for the sample"),
}

_STATUS: dict[torch.device, "LevelStatus"] = {}


def _as_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


class LevelStatus:
    """The status word of one device: `dev` is what the checks write, `host` (pinned on a GPU)
    what it is copied to and what `raise_pending` reads."""

    def __init__(self, device: torch.device):
        self.device = device
        self.dev = torch.zeros(WORDS, dtype=torch.int64, device=device)
        self.host = torch.zeros(WORDS, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._view = self.host.numpy()  # reading it costs no torch dispatch
        ext = _ext_module()
        # With the CUDA extension, its rollout kernel and its check write these and queue their copy.
        self._compiled_check = None
        if device.type == "cuda" and ext is not None and hasattr(ext, "rollout_set_level_status"):
            ext.rollout_set_level_status(self.dev, self.host)
            self._compiled_check = ext.check_levels

    def publish(self) -> None:
        """Queues the copy of the device word to the host, behind the work queued so far."""
        if self.device.type != "cuda":
            self.host.copy_(self.dev)
        elif not torch.cuda.is_current_stream_capturing():  # else: copied by the next call outside it
            self.host.copy_(self.dev, non_blocking=True)

    def check(self, source: int, a: Tensor, b: Tensor | None = None) -> Tensor:
        """a (B,) with NaN where a sample's levels are not valid (a positive and finite; with b, both
        finite and 0 < b <= a), the first such sample recorded for `source`: one kernel, no sync
        (the CUDA extension's, launched with the word's copy from C++, else Triton's).
        What an earlier call recorded is raised first."""
        self.raise_pending()
        a, b = a.contiguous(), None if b is None else b.to(a.dtype).contiguous()
        if self._compiled_check is not None:
            return self._compiled_check(a, b, source)
        from .triton.rollout import check_levels

        out = check_levels(a, b, self.dev, source)
        self.publish()
        return out

    def raise_pending(self, wait: bool = False) -> None:
        """Raises the ValueError of the first bad sample recorded since the last report, if the
        record has reached the host (with `wait`, after synchronising the device); clears it."""
        if self._view[0] == 0 and not wait:
            return
        if self.device.type == "cuda":  # the error path may wait: read the word whole, after its copy
            torch.cuda.synchronize(self.device)
        self.host.copy_(self.dev)
        if self._view[0] == 0:
            return
        source, sample, a_bits, b_bits = (int(v) for v in self._view)
        self.dev.zero_()
        self.host.zero_()
        op, (a_name, b_name), rule = _RULES[source]
        values = f"{a_name} = {_as_float(a_bits)}" + (f", {b_name} = {_as_float(b_bits)}" if b_name else "")
        raise ValueError(
            f"an earlier {op} on {self.device} got noise levels that are not valid (checked on the device, "
            f"without a synchronisation): sample {sample} has {values}; it needs {rule}"
        )


def status_of(device: torch.device) -> LevelStatus:
    """The status word of `device`, made on first use."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    status = _STATUS.get(device)
    if status is None:
        status = _STATUS[device] = LevelStatus(device)
    return status


def check_pending(device: torch.device | str | Tensor = "cuda") -> None:
    """Raises now, after synchronising `device` (a device or a tensor on it), the ValueError of a
    noise level that an earlier call checked on the device, if any."""
    status_of(device.device if isinstance(device, Tensor) else torch.device(device)).raise_pending(wait=True)
