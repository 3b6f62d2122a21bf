"""The GPU backends check themselves: the first use in a process of a (device, backend, precision,
dtype) runs the backend once on a small odd problem against the `reference` backend on the same
device, and a backend outside its error budget is not used silently (docs/contributing.md, "The self-check").
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from . import random as philox
from . import registry, rollout_reference, stf_reference
from .contract import AUX_DBAR, AUX_NEFF, AUX_WMAX

__all__ = ["CHECKED", "Record", "SelfCheckError", "SelfCheckWarning", "enabled", "records", "status_lines"]

# The backends that check themselves: the GPU kernels, wherever they run (their test vehicles too).
CHECKED = ("cuda", "triton")

# Error budget of a quantity (normwise relative error against the float64 reference):
# FACTOR x the error of the same math in the same precision and dtype + FLOOR ulps of the dtype.
FACTOR = 8
FLOOR_ULPS = 16
_F32_TO_F64 = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps

# The stable target's problem, (B, n, D, chunk) by device type: more rows, features and chunk columns
# than one block of the kernels on that device type and a multiple of none of them, and a chunk that
# does not divide n. Blocks: the Triton kernels 4 rows x 128 columns x 256 features on a GPU, 4 x 16 x 32
# interpreted (cdm_kernels/triton/stf.py, `_blocks`); the CUDA kernels 32 threads per row (LANES, PARTS
# of csrc/cuda/stf_kernels.h).
STF_SHAPES = {"cuda": (7, 400, 293, 150), "cpu": (5, 150, 45, 40)}
# The standard deviation of one query's logits over the references, from which each sigma is chosen:
# spread weights (n_eff about n / 7 here, w_max about 0.1).
LOGIT_SPREAD = 1.5
# The elementwise families' problem (B, M): M above one block of the Triton kernels (1024) and of the
# CUDA kernels (256 threads) and a multiple of neither.
ELEMENTWISE_SHAPE = (3, 1100)
# Philox counters that cross a 32-bit word boundary inside the problem, and a key with both words set.
PHILOX_SEED, PHILOX_OFFSET = (1 << 32) + 12345, (1 << 32) - 1000
_SEED = 20240611  # of the check's own generator (never the global RNG)


class SelfCheckError(RuntimeError):
    """An explicitly requested backend failed its first-use self-check."""


class SelfCheckWarning(RuntimeWarning):
    """backend="auto" falls back to the reference backend after a failed self-check."""


@dataclass
class Record:
    """The outcome of one self-check, status "passed", "failed", "not run" (it could not run at that
    moment: tried again at the next call) or "unchecked" (the reference could not run: the backend is
    used unchecked), with the worst quantity or the reason in `detail`."""

    op: str
    device: torch.device
    backend: str
    precision: str | None
    dtype: torch.dtype
    status: str
    detail: str
    seconds: float = 0.0
    rows: tuple = ()  # (quantity, error, budget) of every quantity compared
    warned: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def combination(self) -> str:
        mode = f" precision {self.precision!r}," if self.precision is not None else ""
        return f"backend {self.backend!r} on {self.device}, {self.op}{mode} {str(self.dtype).replace('torch.', '')}"

    def message(self) -> str:
        """The failure's text: the warning of a fallback and the error of an explicit request."""
        return (f"cdm_kernels self-check: {self.combination()} is outside its error budget on its first use: "
                f"{self.detail}. backend='auto' uses 'reference' for this combination for the rest of the process; "
                f"backend={self.backend!r} raises (CDM_SELFCHECK=0 turns the check off)")


_LOCK = threading.Lock()
_RECORDS: dict[tuple, Record] = {}  # (op, device, backend, precision, dtype) -> its latest record
_TRACED: dict[tuple, None] = {}  # combinations first met inside torch.compile tracing, not checked there


def enabled() -> bool:
    """False when the environment sets CDM_SELFCHECK=0 (read at each first use)."""
    return os.environ.get("CDM_SELFCHECK", "1") != "0"


def records() -> list[Record]:
    """Every self-check of this process (one record per combination, the latest), in order."""
    with _LOCK:
        return list(_RECORDS.values())


def status_lines() -> list[str]:
    """What was checked, what fell back and what could not run: lines for `extension_status()`."""
    head = "self-check of the GPU backends on first use" + ("" if enabled() else ": off (CDM_SELFCHECK=0)")
    rows = []
    for r in records():
        if r.passed:
            rows.append(f"  {r.combination()}: passed in {1e3 * r.seconds:.0f} ms ({r.detail})")
        elif r.status == "failed":
            rows.append(f"  {r.combination()}: FAILED, backend='auto' uses 'reference' ({r.detail})")
        else:
            rows.append(f"  {r.combination()}: {r.status} ({r.detail})")
    checked = {(r.op, r.backend, r.precision, r.dtype) for r in records()}
    for op, device, backend, precision, dtype in list(_TRACED):
        if (op, backend, precision, dtype) not in checked:
            rec = Record(op, device, backend, precision, dtype, "not run", "")
            rows.append(f"  {rec.combination()}: not run (first used inside torch.compile tracing, where it cannot run; "
                        f"a graph traced then runs the backend unchecked until the first call outside it checks it)")
    return [head + ("" if rows or not enabled() else ": no GPU backend used yet"), *rows]


def _canonical(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def not_now(device: torch.device) -> str | None:
    """Why a check cannot run at this moment (None: it can), in the words of its record (torch.compile
    tracing is `verdict`'s own case: there nothing but a dict store may run)."""
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return "inside a torch dispatch or function mode (fake tensors, tracing); checked at the first call outside it"
    if torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None:
        return "inside a functorch transform or torch.jit trace; checked at the first call outside it"
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return ("inside CUDA graph capture, which allows no synchronisation; checked at the first call outside it "
                "(a graph captured before then runs the backend unchecked)")
    return None


def verdict(op: str, device, backend: str, precision: str | None, dtype: torch.dtype) -> Record | None:
    """The self-check's record of a combination, running the check on its first use; None where it
    cannot run now (compile tracing, `not_now`, out of memory: noted, and tried again at the next call)."""
    if torch.compiler.is_compiling():  # traced by dynamo: nothing but a plain dict store (no lock, no check)
        _TRACED[(op, device, backend, precision, dtype)] = None
        return None
    device = _canonical(device)
    key = (op, device, backend, precision, dtype)
    why = not_now(device)
    if why is not None:
        _note(key, why)
        return None
    with _LOCK:
        rec = _RECORDS.get(key)
        if rec is None or rec.status == "not run":
            rec = _check(op, device, backend, precision, dtype)
            _RECORDS[key] = rec
    return None if rec.status == "not run" else rec


def choose(op: str, device, asked: str, name: str, precision: str | None, dtype: torch.dtype) -> str | None:
    """The backend that `registry.backend_for` uses where `asked` resolved to `name`: `name` once it
    passed (or is not checked), "reference" after a failed check for "auto" (one warning), a
    SelfCheckError for a backend asked for by name; None when the check cannot run now."""
    if name not in CHECKED or not enabled():
        return name
    rec = verdict(op, device, name, precision, dtype)
    if rec is None:
        return None
    if rec.status == "failed":
        if asked != "auto":
            raise SelfCheckError(rec.message())
        fallback_warning(rec)
        return "reference"
    return name


def forget(op: str, backend: str, device_type: str) -> None:
    """Drops the records of a backend's family on a device type (it was registered again)."""
    with _LOCK:
        for key in [k for k in _RECORDS if k[0] == op and k[2] == backend and k[1].type == device_type]:
            del _RECORDS[key]


def fallback_warning(rec: Record) -> None:
    """The one warning of a combination whose failed check makes backend="auto" take the reference."""
    with _LOCK:
        if rec.warned:
            return
        rec.warned = True
    warnings.warn(rec.message(), SelfCheckWarning, stacklevel=6)  # the caller of the public function (via choose, _first_use, backend_for)


def _note(key: tuple, why: str) -> None:
    op, device, backend, precision, dtype = key
    with _LOCK:
        rec = _RECORDS.get(key)
        if rec is None or rec.status == "not run":
            _RECORDS[key] = Record(op, device, backend, precision, dtype, "not run", why)


class _BackendRaised(Exception):
    pass


def _check(op, device, backend, precision, dtype) -> Record:
    start = time.perf_counter()
    try:
        with torch.no_grad():
            rows = _CHECKS[op](device, backend, precision, dtype)
    except torch.OutOfMemoryError as exc:
        return Record(op, device, backend, precision, dtype, "not run", f"out of memory ({exc}); tried again at the "
                      f"next call")
    except _BackendRaised as exc:
        err = exc.__cause__
        return Record(op, device, backend, precision, dtype, "failed", f"it raised {type(err).__name__}: {err}",
                      time.perf_counter() - start)
    except Exception as exc:  # the reference or the problem could not be set up: the backend is not judged
        return Record(op, device, backend, precision, dtype, "unchecked",
                      f"the reference could not run ({type(exc).__name__}: {exc}); the backend is used unchecked")
    seconds = time.perf_counter() - start
    worst = max(rows, key=lambda r: r[1] / r[2] if r[1] == r[1] else math.inf)
    name, err, tol = worst
    judge = "the reference" if op == "randn" else "the float64 reference"
    text = f"{name} relative error {err:.2e} against {judge}, budget {tol:.2e}"
    ok = all(e <= t for _, e, t in rows)  # NaN fails
    if ok:
        return Record(op, device, backend, precision, dtype, "passed", "worst: " + text, seconds, tuple(rows))
    bad = [n for n, e, t in rows if not e <= t]
    return Record(op, device, backend, precision, dtype, "failed",
                  f"{text} ({len(bad)} of {len(rows)} quantities outside their budgets: {', '.join(bad)})", seconds,
                  tuple(rows))


# ----------------------------------------------------------------------------------------------
# The checks, one per op family: rows (quantity, error, budget)
# ----------------------------------------------------------------------------------------------


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _floor(dtype: torch.dtype) -> float:
    return FLOOR_ULPS * torch.finfo(dtype).eps


def _on_backend(fn, *args):
    """Calls one of the judged backend's launchers; what it raises is the backend's failure."""
    try:
        return fn(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        raise _BackendRaised() from exc


def _errors(got: dict, judge: dict) -> dict:
    return {k: _rel(v, judge[k]) for k, v in got.items()}


def _budget_rows(got: dict, judge: dict, same: dict, floor: dict) -> list:
    """(quantity, error of `got` against `judge`, its budget FACTOR x same[quantity] + floor[quantity]),
    `same` the errors of the same math in the same precision and dtype."""
    return [(k, err, FACTOR * same[k] + floor[k]) for k, err in _errors(got, judge).items()]


def _stf_problem(device_type: str, dtype: torch.dtype):
    """(x, sigma, ref, centre, grad_mu, grad_lse) in `dtype` on the CPU and the chunk size: data
    around 2 (a centre away from the origin), sigma_i from row i's distances (logits spread LOGIT_SPREAD)."""
    B, n, D, chunk = STF_SHAPES["cuda" if device_type == "cuda" else "cpu"]
    g = torch.Generator().manual_seed(_SEED)
    x = (2 + torch.randn(B, D, generator=g, dtype=torch.float64)).to(dtype)
    ref = (2 + torch.randn(n, D, generator=g, dtype=torch.float64)).to(dtype)
    d = torch.cdist(x.double(), ref.double()).square()
    sigma = (d.std(1) / (2 * LOGIT_SPREAD)).sqrt().to(dtype)  # std_j(d_ij) / (2 sigma_i^2) = LOGIT_SPREAD
    grad_mu = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    grad_lse = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    return (x, sigma, ref, stf_reference.centre_of(ref), grad_mu, grad_lse), chunk


def _stf_outputs(ns, inputs, chunk: int, precision: str, call=lambda fn, *a: fn(*a)) -> dict:
    """mu, lse, the stats and the gradients (with the kept distances and ref's gradient; recomputed
    distances without it) by the launchers `ns`."""
    x, sigma, ref, centre, gm, gl = inputs
    mu, lse, aux, dist = call(ns.stf_forward, x, sigma, ref, centre, chunk, precision, True)
    gx, gs, gr = call(ns.stf_backward, gm, gl, x, sigma, ref, centre, mu, aux, dist, chunk, precision, True)
    gx2, gs2, _ = call(ns.stf_backward, gm, gl, x, sigma, ref, centre, mu, aux, dist[:0], chunk, precision, False)
    return {"mu": mu, "lse": lse, "n_eff": aux[:, AUX_NEFF], "w_max": aux[:, AUX_WMAX], "d_bar": aux[:, AUX_DBAR],
            "grad x": gx, "grad sigma": gs, "grad ref": gr, "grad x (recomputed distances)": gx2,
            "grad sigma (recomputed distances)": gs2}


def _check_stf(device, backend, precision, dtype) -> list:
    inputs, chunk = _stf_problem(device.type, dtype)
    judge = _stf_outputs(registry.launchers("stf_target", "reference", device.type),
                         [t.to(device, torch.float64) for t in inputs], chunk, "ieee")
    # The same math by the reference on the CPU (so that no setting of the device's math applies).
    if dtype == torch.float32:
        same = _errors(_stf_outputs(stf_reference, inputs, chunk, precision), judge)
    else:  # float64: float32's error of the same math, scaled by the ratio of the unit roundoffs
        inputs32 = [t.float() for t in inputs]
        same32 = _errors(_stf_outputs(stf_reference, inputs32, chunk, "ieee"),
                         _stf_outputs(stf_reference, [t.double() for t in inputs32], chunk, "ieee"))
        same = {k: e * _F32_TO_F64 for k, e in same32.items()}
    got = _stf_outputs(registry.launchers("stf_target", backend, device.type), [t.to(device) for t in inputs], chunk,
                       precision, _on_backend)
    return _budget_rows(got, judge, same, dict.fromkeys(got, _floor(dtype)))


def _elementwise_problem(dtype: torch.dtype) -> dict:
    B, M = ELEMENTWISE_SHAPE
    g = torch.Generator().manual_seed(_SEED + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    t_cur = torch.tensor([0.05, 1.3, 40.0], dtype=torch.float64)
    t_next = t_cur * torch.tensor([0.6, 0.3, 0.9], dtype=torch.float64)
    x = randn(B, M) * (t_cur[:, None] ** 2 + 0.25).sqrt()
    p = {"x": x, "denoised": 0.7 * x.clamp(-1, 1) + 0.3 * randn(B, M), "x_euler": x + 0.1 * randn(B, M),
         "denoised_euler": randn(B, M).clamp(-1, 1), "noise": randn(B, M), "t_cur": t_cur, "t_next": t_next,
         "t_hat": rollout_reference.churn_t_hat(t_cur, 10, 5.0, 0.1, 50.0), "y": randn(B, M).clamp(-1, 1),
         "D1a": randn(B, M), "D1b": randn(B, M), "w_row": 1 + torch.rand(B, generator=g, dtype=torch.float64),
         "w_elem": 1 + torch.rand(B, M, generator=g, dtype=torch.float64), "grad": randn(B, M)}
    return {k: v.to(dtype) for k, v in p.items()}


# Every kind of step: its name, (kind, the levels' second argument, noise given or drawn in the kernel).
_STEPS = (("sde", "sde", "t_next", True), ("sde (Philox noise)", "sde", "t_next", False),
          ("euler", "euler", "t_next", None), ("heun", "heun", "t_next", None),
          ("churn", "churn", "t_hat", True), ("churn (Philox noise)", "churn", "t_hat", False))


def _rollout_outputs(ns, p: dict, call=lambda fn, *a: fn(*a)) -> dict:
    out = {}
    for name, kind, level, given in _STEPS:
        heun = kind == "heun"
        denoised = p["x"] if kind == "churn" else p["denoised"]
        out[name] = call(ns.rollout_step, p["x"], denoised, p["t_cur"], p[level], p["x_euler"] if heun else None,
                         p["denoised_euler"] if heun else None, p["noise"] if given else None,
                         PHILOX_SEED if given is False else 0, PHILOX_OFFSET if given is False else 0, kind, 1.007)
    return out


def _elementwise_check(outputs, device, backend, op, dtype, floors) -> list:
    p = _elementwise_problem(dtype)
    judge = outputs(registry.launchers(op, "reference", device.type),
                    {k: v.to(device, torch.float64) for k, v in p.items()})
    same = _errors(outputs(registry.launchers(op, "reference", "cpu"), p), judge)
    got = outputs(registry.launchers(op, backend, device.type), {k: v.to(device) for k, v in p.items()}, _on_backend)
    return _budget_rows(got, judge, same, {k: floors.get(k, _floor(dtype)) for k in got})


def _check_rollout(device, backend, precision, dtype) -> list:
    # The Philox noise is float32 whatever the dtype, and agrees between platforms to a few float32 ulps.
    philox_floor = {name: _floor(torch.float32) for name, *_, given in _STEPS if given is False}
    return _elementwise_check(_rollout_outputs, device, backend, "rollout_step", dtype, philox_floor)


def _loss_outputs(ns, p: dict, call=lambda fn, *a: fn(*a)) -> dict:
    out = {}
    for w in ("w_row", "w_elem"):
        args = (p["denoised"], p["D1a"], p["D1b"], p["y"], p[w], 1.7)
        out[f"loss ({w})"] = call(ns.martingale_loss_forward, *args)
        grads = call(ns.martingale_loss_backward, p["grad"], *args)
        out.update({f"grad {v} ({w})": gv for v, gv in zip(("D0", "D1a", "D1b"), grads)})
    return out


def _check_martingale(device, backend, precision, dtype) -> list:
    return _elementwise_check(_loss_outputs, device, backend, "martingale_loss", dtype, {})


def _check_randn(device, backend, precision, dtype) -> list:
    shape = list(ELEMENTWISE_SHAPE)
    want = torch.from_numpy(philox.philox_randn_reference(math.prod(shape), PHILOX_SEED, PHILOX_OFFSET)).reshape(shape)
    fn = registry.launchers("randn", backend, device.type).philox_randn
    got = _on_backend(fn, torch.empty(0, device=device), shape, PHILOX_SEED, PHILOX_OFFSET)
    return [("noise", _rel(got, want), _floor(torch.float32))]


_CHECKS = {"stf_target": _check_stf, "rollout_step": _check_rollout, "martingale_loss": _check_martingale,
           "randn": _check_randn}

registry.set_first_use_check(sys.modules[__name__])
