"""The one seam every backend plugs into: op families, backends, "auto" order, capabilities, and the
launcher contract and device guard each launcher gets; the public functions resolve their backend
here (docs/contributing.md, "The registry")."""

from __future__ import annotations

import functools
import importlib
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from . import contract

__all__ = [
    "AUTO_ORDER",
    "BACKEND_NAMES",
    "OPS",
    "PRECISIONS",
    "available_backends",
    "backend_for",
    "launchers",
    "precisions",
    "register",
    "registrations",
    "resolve_backend",
]

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

# Precision modes of the stable target's matrix products (docs/math.md, "Precision modes"):
# "ieee" exact float32 (or float64); "tf32x3" three TF32 products of hi/lo splits (float32-grade);
# "tf32" one TF32 product; "bf16" bfloat16 operands. Accumulation is float32 in every mode.
PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")


@dataclass(frozen=True)
class OpSpec:
    launchers: tuple[str, ...]
    has_precision: bool = False


OPS: dict[str, OpSpec] = {
    "stf_target": OpSpec(("stf_forward", "stf_backward"), has_precision=True),
    "rollout_step": OpSpec(("rollout_step",)),
    "martingale_loss": OpSpec(("martingale_loss_forward", "martingale_loss_backward")),
    "randn": OpSpec(("philox_randn",)),
}


@dataclass
class _Entry:
    impl: object  # a module or a mapping of launchers, or the dotted name of a module (lazy)
    precisions: tuple[str, ...]
    checks_contract: bool = False
    wrapped: types.SimpleNamespace | None = None


_UNSET = object()
_REGISTRY: dict[tuple[str, str, str], _Entry] = {}  # (op, backend, device type) -> entry
_RESOLVED: dict[tuple, str] = {}
_CHOSEN: dict[tuple, str] = {}  # (op, device, backend, precision, dtype) -> the backend the public function uses
# The first-use check of the GPU backends (cdm_kernels/selfcheck.py installs itself here when the
# package loads, so that this module needs no import of it): forget(op, backend, device type) and
# choose(op, device, backend asked, backend resolved, precision, dtype) -> the backend, or None for
# "not now" (not cached).
_FIRST_USE = None


def set_first_use_check(check) -> None:
    """Installs the first-use check that `backend_for` consults (None: none)."""
    global _FIRST_USE
    _FIRST_USE = check
    _CHOSEN.clear()


def _check_op(op: str) -> OpSpec:
    try:
        return OPS[op]
    except (KeyError, TypeError):
        raise ValueError(f"op must be one of {tuple(OPS)}, got {op!r}") from None


def register(
    backend: str,
    device_types: tuple[str, ...],
    impls: Mapping[str, object],
    precisions: Mapping[str, tuple[str, ...]] | None = None,
    checks_contract: bool = False,
) -> None:
    """Registers `backend` for `device_types` with one implementation per op family.

    impls maps an op family to a module (or a mapping name -> function, or the dotted name of a
    module, imported when first used) that defines every launcher of the family. precisions maps a
    family with precision modes to the modes this backend supports (default: ("ieee",)).
    checks_contract: the launchers check the launcher contract (raising a ValueError) and make
    their tensors' device the current one themselves, so the registry does not wrap them.
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {backend!r}")
    precisions = dict(precisions or {})
    for op, impl in impls.items():
        spec = _check_op(op)
        modes = tuple(precisions.pop(op, ("ieee",))) if spec.has_precision else ()
        bad = [p for p in modes if p not in PRECISIONS]
        if bad:
            raise ValueError(f"precisions of {op!r} must be among {PRECISIONS}, got {bad}")
        for dt in device_types:
            _REGISTRY[(op, backend, dt)] = _Entry(impl, modes, checks_contract)
            if _FIRST_USE is not None:
                _FIRST_USE.forget(op, backend, dt)  # a new implementation is checked anew
    if precisions:
        raise ValueError(f"precisions given for op families without an implementation: {sorted(precisions)}")
    _RESOLVED.clear()
    _CHOSEN.clear()


def registrations(op: str | None = None) -> list[tuple[str, str, str]]:
    """Every registered (op family, backend, device type), in registration order."""
    return [key for key in _REGISTRY if op is None or key[0] == op]


def _device_type(device) -> str:
    if isinstance(device, torch.device):
        return device.type
    return torch.device(device).type


def _legacy(op, what: str) -> bool:
    """The 0.1 forms available_backends(device) / resolve_backend(device, backend, precision), which
    meant the stable target: still accepted, with a DeprecationWarning."""
    if isinstance(op, torch.device) or (isinstance(op, str) and op not in OPS and _is_device(op)):
        warnings.warn(
            f"{what}(device, ...) is deprecated: name the op family first, {what}('stf_target', device, ...)",
            DeprecationWarning,
            stacklevel=3,
        )
        return True
    return False


def _is_device(text: str) -> bool:
    try:
        torch.device(text)
    except (RuntimeError, TypeError):
        return False
    return True


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """The backends that implement op family `op` for tensors on `device`, in the order "auto"
    prefers them (backends registered beyond the preference order last)."""
    if _legacy(op, "available_backends"):
        op, device = "stf_target", op
    _check_op(op)
    dt = _device_type(device)
    order = AUTO_ORDER.get(dt, ("reference",))
    names = [b for (o, b, d) in _REGISTRY if o == op and d == dt]
    return [b for b in dict.fromkeys((*order, *names)) if b in names]


def precisions(op: str, backend: str, device: torch.device | str) -> tuple[str, ...]:
    """The precision modes `backend` supports for op family `op` on `device` (() for families
    without modes)."""
    return _entry(op, backend, _device_type(device)).precisions


def resolve_backend(op: str, device=_UNSET, backend=_UNSET, precision=_UNSET, *, dtype: torch.dtype | None = None) -> str:
    """The backend the public function of `op` uses for tensors on `device` (default "cpu") when
    asked for `backend` (default "auto") and, for the stable target, `precision` (default "ieee");
    "auto" takes the first backend of the device type's preference order that implements the family
    and supports the precision. With `dtype` (the compute dtype, float32 or float64), the answer
    after the first-use self-check of a GPU backend (`backend_for`, which may run it here); without,
    the registry's answer, before any self-check."""
    if dtype is not None:
        mode = ("ieee" if precision is _UNSET else precision) if _check_op(op).has_precision else None
        return backend_for(op, "cpu" if device is _UNSET else device, "auto" if backend is _UNSET else backend, mode,
                           dtype)
    if _legacy(op, "resolve_backend"):
        # The 0.1 form resolve_backend(device, backend, precision): every positional argument
        # moves one place to the right.
        op, device, backend, precision = (
            "stf_target", op, *((device, precision if backend is _UNSET else backend) if device is not _UNSET
                                else (backend, precision))
        )
    device = "cpu" if device is _UNSET else device
    backend = "auto" if backend is _UNSET else backend
    precision = "ieee" if precision is _UNSET else precision
    key = (op, device.type if isinstance(device, torch.device) else device, backend, precision)
    try:
        return _RESOLVED[key]
    except (KeyError, TypeError):
        pass
    name = _resolve(op, _device_type(device), backend, precision)
    if isinstance(backend, str) and isinstance(precision, str):
        _RESOLVED[key] = name
    return name


def backend_for(op: str, device, backend: str = "auto", precision: str | None = None,
                dtype: torch.dtype = torch.float32) -> str:
    """The backend that the public function of `op` runs for tensors of compute dtype `dtype` on
    `device`, asked for `backend` and `precision` (None for a family without modes): the
    registry's answer (`resolve_backend`) once a GPU backend has passed its first-use self-check
    (cdm_kernels/selfcheck.py, run here on the combination's first use); after a failed check
    "reference" for "auto", and a SelfCheckError for the backend asked for by name.

    After the first call a dict lookup: the public functions call it on every call."""
    try:
        return _CHOSEN[(op, device, backend, precision, dtype)]
    except (KeyError, TypeError):  # TypeError: an unhashable argument, which resolve_backend reports
        pass
    return _first_use(op, device, backend, precision, dtype)


def _first_use(op: str, device, backend: str, precision: str | None, dtype: torch.dtype) -> str:
    name = resolve_backend(op, device, backend, "ieee" if precision is None else precision)
    if _FIRST_USE is not None:
        chosen = _FIRST_USE.choose(op, device, backend, name, precision if _check_op(op).has_precision else None,
                                   dtype)
        if chosen is None:  # it cannot run now (compile tracing, graph capture, ...): a later call checks
            return name
        name = chosen
    _CHOSEN[(op, device, backend, precision, dtype)] = name
    return name


def _resolve(op: str, dt: str, backend: str, precision: str) -> str:
    spec = _check_op(op)
    if spec.has_precision and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend == "auto":
        order = AUTO_ORDER.get(dt, ("reference",))
        names = [b for b in order if (op, b, dt) in _REGISTRY]
        if not names:
            raise RuntimeError(f"no backend of {op!r} is registered for device type {dt!r}")
        fit = [b for b in names if not spec.has_precision or precision in _REGISTRY[(op, b, dt)].precisions]
        if not fit:
            have = ", ".join(f"{b}: {_REGISTRY[(op, b, dt)].precisions}" for b in names)
            raise ValueError(
                f"precision {precision!r} is not supported by any backend that 'auto' picks for {dt} tensors "
                f"({have}); the tensor-core modes are modes of the GPU backends"
            )
        return fit[0]
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    if (op, backend, dt) not in _REGISTRY:
        raise ValueError(
            f"backend {backend!r} is not available for {dt} tensors (available: {available_backends(op, dt)})"
        )
    modes = _REGISTRY[(op, backend, dt)].precisions
    if spec.has_precision and precision not in modes:
        raise ValueError(f"precision {precision!r} is not supported by the {backend!r} backend (supported: {modes})")
    return backend


def _entry(op: str, backend: str, dt: str) -> _Entry:
    _check_op(op)
    try:
        return _REGISTRY[(op, backend, dt)]
    except KeyError:
        raise ValueError(
            f"backend {backend!r} is not available for {dt} tensors (available: {available_backends(op, dt)})"
        ) from None


def launchers(op: str, backend: str, device_type: str) -> types.SimpleNamespace:
    """The launchers of `backend` for op family `op` on `device_type`, by launcher name, behind the
    contract check and device guard (unless the backend does both itself)."""
    entry = _entry(op, backend, device_type)
    if entry.wrapped is None:
        impl = entry.impl
        if isinstance(impl, str):
            impl = importlib.import_module(impl)
        get = impl.get if isinstance(impl, Mapping) else functools.partial(getattr, impl)
        fns = {}
        for name in OPS[op].launchers:
            fn = get(name, None)
            if fn is None:
                raise RuntimeError(f"backend {backend!r} registered {op!r} without the launcher {name!r}")
            fns[name] = fn if entry.checks_contract else _wrap(fn, getattr(contract, name))
        entry.wrapped = types.SimpleNamespace(**fns)
    return entry.wrapped


def _wrap(fn: Callable, check: Callable) -> Callable:
    """The launcher behind its contract check and, for GPU tensors, a guard that makes their device
    the current one."""

    @functools.wraps(fn)
    def launcher(*args):
        device = check(*args)
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return fn(*args)
        return fn(*args)

    launcher.unwrapped = fn
    return launcher


def plain_call(args) -> bool:
    """True when calling one of the package's ops (`register_device_kernels`) on `args` would do
    nothing but call the backend's launcher with them.

    That is plain eager mode: no torch.compile, functorch transform, tracer, profiler or torch
    function or dispatch mode is active, every tensor is a plain Tensor, and none needs a gradient
    (the op's autograd kernel would redispatch straight to the device kernel, which calls the
    launcher). The public functions then call the launcher themselves: an op's Python dispatch
    costs 7-12 us a call (2 cores), half a CIFAR-size rollout step, and rollouts, samplers and the
    training targets run under no_grad. In every other case they go through the op (so a profile
    names it, autograd records it, a compiler sees it).
    """
    if (
        torch.autograd.profiler._is_profiler_enabled
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._get_tracing_state() is not None
    ):
        return False
    grad = torch.is_grad_enabled()
    for a in args:  # a loop, not any(<generator>): this runs on every call
        if isinstance(a, torch.Tensor) and (type(a) is not torch.Tensor or (grad and a.requires_grad)):
            return False
    return True


def register_device_kernels(custom_op, op: str, launcher: str) -> None:
    """Attaches to a torch.library custom op, for every device type of AUTO_ORDER, the kernel that
    calls the wrapped `launcher` of the backend named by the op's last argument (every op of the
    package takes `backend` last; the launcher takes the other arguments, in order)."""
    for device_type in AUTO_ORDER:

        def kernel(*args, _device_type=device_type):
            *launcher_args, backend = args
            return getattr(launchers(op, backend, _device_type), launcher)(*launcher_args)

        custom_op.register_kernel(device_type)(kernel)
