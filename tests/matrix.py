"""The op x backend matrix: the cases of an op family, a way to run the stable target on a case, and
the float32 error budget every backend is held to.

A case is one registered (backend, device type) of cdm_kernels.registry; `cases(op)` gives them as
pytest parameters (the CUDA ones marked `gpu`). Test vehicles that run GPU kernels on CPU tensors
(the Triton interpreter, the CUDA emulation: tests/conftest.py) are cases like any other; they are
slow, so `case.heavy_ok` says whether a case should take the large problems.

Tolerance (FlashAttention's rule, made robust): a quantity's normwise error against the float64
judge is at most FACTOR times the largest error of REALISATIONS float32 computations of the same math
(`stf_reference` in the same precision mode: the test's chunking, and one chunk with the features
in permuted orders, equally valid summation orders), plus FLOOR for what float32 gets exactly. One
realisation of rounding noise is not a budget: at sigma ~ 0.005 on data with near-duplicate
references the weights resolve distance differences of ~ sigma^2, below float32's resolution of the
distances, and the errors of equally valid summation orders vary 30-fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cdm_kernels import registry, stf_reference, stf_target
from cdm_kernels.contract import AUX_DBAR, AUX_NEFF, AUX_WMAX

FACTOR = 2
FLOOR = 16 * torch.finfo(torch.float32).eps
REALISATIONS = 6


@dataclass(frozen=True)
class Case:
    op: str
    backend: str
    device: str

    def __str__(self) -> str:
        return f"{self.backend}-{self.device}"

    @property
    def emulated(self) -> bool:
        """GPU kernels run on the host (the Triton interpreter or the CUDA emulation): slow."""
        return self.device == "cpu" and self.backend in ("triton", "cuda")

    @property
    def heavy_ok(self) -> bool:
        return not self.emulated

    def precisions(self) -> tuple[str, ...]:
        return registry.precisions(self.op, self.backend, self.device) or ("ieee",)

    def to(self, *tensors):
        return tuple(t.to(self.device) if isinstance(t, torch.Tensor) else t for t in tensors)


def cases(op: str, precision: str | None = None) -> list:
    """Every registered case of `op` (supporting `precision`, if given), as pytest parameters."""
    out = []
    for _, backend, device in registry.registrations(op):
        case = Case(op, backend, device)
        if precision is not None and precision not in case.precisions():
            continue
        marks = [pytest.mark.gpu] if device == "cuda" else []
        out.append(pytest.param(case, marks=marks, id=str(case)))
    return out


def mode_cases(op: str = "stf_target") -> list:
    """(case, precision) for every precision mode of every case."""
    out = []
    for param in cases(op):
        case = param.values[0]
        for p in case.precisions():
            out.append(pytest.param(case, p, marks=param.marks, id=f"{case}-{p}"))
    return out


def rel(a, b) -> float:
    """Normwise relative error of a against b (float64, on the CPU)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def run_stf(case: Case, x, sigma, ref, *, precision="ieee", chunk=None, grad_mu=None, grad_lse=None,
            keep_distances=None) -> dict:
    """The public op on the case: mu, lse, n_eff, w_max, d_bar and, with grad_mu, the gradients gx, gs,
    gr of sum(mu grad_mu) + sum(lse grad_lse); every tensor back on the CPU."""
    with_grad = grad_mu is not None
    xs, ss, rs = (t.detach().to(case.device).requires_grad_(with_grad) for t in (x, sigma, ref))
    mu, lse, st = stf_target(xs, ss, rs, return_lse=True, return_stats=True, chunk_size=chunk,
                             backend=case.backend, precision=precision, keep_distances=keep_distances)
    out = {"mu": mu, "lse": lse, "n_eff": st.n_eff, "w_max": st.w_max, "d_bar": st.d_bar}
    if with_grad:
        gm, gl = (t.to(case.device, mu.dtype) for t in (grad_mu, grad_lse))
        out.update(zip(("gx", "gs", "gr"), torch.autograd.grad((mu * gm).sum() + (lse * gl).sum(), (xs, ss, rs))))
    return {k: v.detach().cpu() for k, v in out.items()}


def reference_float32(x, sigma, ref, *, precision="ieee", chunk, grad_mu=None, grad_lse=None, perm=None) -> dict:
    """The same math by `stf_reference` in float32 (optionally with the features permuted)."""
    x, sigma, ref = (t.detach().cpu().float() for t in (x, sigma, ref))
    if perm is not None:
        x, ref = x[:, perm], ref[:, perm]
        grad_mu = grad_mu[:, perm] if grad_mu is not None else None
    centre = stf_reference.centre_of(ref)
    mu, lse, aux, _ = stf_reference.stf_forward(x, sigma, ref, centre, chunk, precision)
    out = {"mu": mu, "lse": lse, "n_eff": aux[:, AUX_NEFF], "w_max": aux[:, AUX_WMAX], "d_bar": aux[:, AUX_DBAR]}
    if grad_mu is not None:
        g = stf_reference.stf_backward(grad_mu.cpu().float(), grad_lse.cpu().float(), x, sigma, ref, centre, mu, aux,
                                       x.new_zeros(0), chunk, precision, True)
        out.update(zip(("gx", "gs", "gr"), g))
    if perm is not None:
        inv = torch.argsort(perm)
        out.update({k: out[k][:, inv] for k in ("mu", "gx", "gr") if k in out})
    return out


def float32_budget(exact: dict, x, sigma, ref, *, precision="ieee", chunk, grad_mu=None, grad_lse=None) -> dict:
    """Per quantity, the largest error against `exact` of REALISATIONS float32 computations of the math."""
    g = torch.Generator().manual_seed(123)
    outs = [reference_float32(x, sigma, ref, precision=precision, chunk=chunk, grad_mu=grad_mu, grad_lse=grad_lse)]
    for _ in range(REALISATIONS - 1):
        perm = torch.randperm(x.shape[1], generator=g)
        outs.append(reference_float32(x, sigma, ref, precision=precision, chunk=ref.shape[0], grad_mu=grad_mu,
                                      grad_lse=grad_lse, perm=perm))
    return {k: max(rel(o[k], exact[k]) for o in outs) for k in outs[0]}


def assert_within_budget(got: dict, exact: dict, budget: dict, what: str, factor: float = FACTOR) -> None:
    for name, value in got.items():
        err = rel(value, exact[name])
        tol = factor * budget[name] + FLOOR
        worst = (value.double() - exact[name].double().cpu()).abs().argmax().item()
        assert err <= tol, (
            f"{name} ({what}): relative error {err:.3e} against float64 exceeds {factor} x {budget[name]:.3e} "
            f"(the same math in float32, worst of {REALISATIONS} computations) + {FLOOR:.1e}; worst element at {worst}"
        )


class RecordOps(TorchDispatchMode):
    """A dispatch mode that runs every op a call dispatches and records its name in `ops` (whether a
    public function went through its torch.library op)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
