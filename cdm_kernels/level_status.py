"""Checks of noise levels on the GPU paths, recorded on the device and raised at a later call without a
host synchronisation; the rules and where each op checks: docs/usage.md ("Noise levels on the GPU")
and docs/gpu_design.md.
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
        elif not _capturing(self.device):  # else: copied by the next call outside the capture
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
        from .triton.levels import check_levels

        out = check_levels(a, b, self.dev, source)
        self.publish()
        return out

    def raise_pending(self, wait: bool = False) -> None:
        """Raises the ValueError of the first bad sample recorded since the last report, if the
        record has reached the host (with `wait`, after synchronising the device); clears it."""
        if self._view[0] == 0 and not wait:
            return
        if self.device.type == "cuda" and _capturing(self.device):
            # A capture forbids the synchronisation and the copies: the record waits for the next
            # call outside it (an explicit check_pending cannot be honoured, so it says so).
            if wait:
                raise RuntimeError(f"check_pending({self.device}) cannot synchronise while a CUDA graph is being "
                                   "captured on it; call it after the capture")
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


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of `device` is capturing a CUDA graph."""
    if device.index is None or device.index == torch.cuda.current_device():  # the launchers' case: no guard
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


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
