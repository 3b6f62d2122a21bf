"""Shared machinery of the stable-target benchmarks: the methods compared, the float64 judge that
gates them, timers, peak-memory measurement and the machine's own ceilings.

Every method computes mu_i = sum_j softmax_j(-||x_i - r_j||^2 / (2 sigma_i^2)) r_j (docs/math.md
section 1) from x (B, D), sigma (B,), ref (n, D) and the bank's norms ||r_j||^2 (n,), float32.
Per-bank preparation (the norms, sdpa's augmented keys) is done once, untimed, for every method
alike, because a training loop keeps a fixed reference bank.

Counting conventions (stated in the results' README):
  effective FLOPs  forward 4 B n D (the two matrix products); forward+backward 8 B n D (those two
                   plus the two products a gradient with respect to x needs), whatever a method
                   actually executes.
  ceilings         compute: a float32 2048^3 matmul; bandwidth: a 256 MiB tensor copy (read + write).
  roofline         each method has a model of its unavoidable memory traffic; its row is compared
                   with whichever ceiling binds under that model (the broadcast formula is
                   bandwidth-bound, everything else compute-bound).
  peak extra       CPU: the maximum of the running sum of allocation/free events of PyTorch's CPU
                   allocator recorded by torch.profiler(profile_memory=True) during one call,
                   outputs included (BLAS workspaces and non-tensor heap allocations, e.g. inside
                   KeOps or std::vector in C++, are not seen). GPU: torch.cuda.max_memory_allocated
                   minus the allocation before the call.
"""

from __future__ import annotations

import contextlib
import math
import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

import cdm_kernels
from cdm_kernels.stf import default_chunk_size, keeps_distances

FLOAT32 = 4  # bytes per element: every benchmark here runs in float32

# The checkout this module belongs to.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_out(name: str) -> str:
    """Where benchmark `name` (its module: bench_stf, ...) writes when --out is not given:
    out/benchmarks/<name> in the checkout, which git ignores. benchmarks/results/ holds the committed
    results: it is written only when --out names it."""
    return os.path.join(REPO, "out", "benchmarks", name)


def positive_int(flag: str):
    """An argparse type for option `flag`: a positive int, else a usage error naming the flag."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = 0
        if v < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive int, got {text!r}")
        return v

    return parse


def add_quick_and_out(ap, name: str, quick_help: str) -> None:
    """The two options every benchmark has, in the same shape: --quick (`quick_help`: what it runs)
    and --out (default `default_out(name)`)."""
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", default=default_out(name), help="folder of the outputs (default: %(default)s, ignored "
                    "by git; the committed results: --out benchmarks/results)")

# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """One benchmark problem. x (B, D), sigma (B,), ref (n, D), ref_sqnorm (n,), grad (B, D): the
    incoming gradient of mu for forward+backward."""

    x: Tensor
    sigma: Tensor
    ref: Tensor
    ref_sqnorm: Tensor
    grad: Tensor


def make_inputs(B: int, n: int, D: int, device: str = "cpu", seed: int = 0, sigma: Tensor | None = None) -> Inputs:
    """Images-like data in [-1, 1]; the minibatch's own clean samples are the first references (as in
    STF training) and x_i = r_(i mod n) + sigma_i z_i with EDM's ln sigma ~ N(-1.2, 1.2^2)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ref = torch.empty(n, D).uniform_(-1.0, 1.0, generator=g)
    if sigma is None:
        sigma = torch.exp(torch.randn(B, generator=g) * 1.2 - 1.2)
    idx = torch.arange(B) % n
    x = ref[idx] + sigma[:, None] * torch.randn(B, D, generator=g)
    grad = torch.randn(B, D, generator=g)
    ref = ref.to(device)
    # Norms a slice at a time: ref * ref in one go would double the memory of a 12 GiB bank.
    sqnorm = torch.cat([(r * r).sum(1) for r in ref.split(1 << 16)])
    return Inputs(x.to(device), sigma.to(device), ref, sqnorm, grad.to(device))


def input_bytes(B: int, n: int, D: int) -> int:
    return FLOAT32 * (n * D + n + 3 * B * D + B)


# ----------------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------------


@dataclass
class Method:
    """A way to compute the stable target. `fn(x, sigma, ref, ref_sqnorm, prep) -> mu (B, D)` must be
    differentiable in x and sigma; `prepare(ref, ref_sqnorm) -> prep` is the untimed per-bank work;
    `extra_bytes(B, n, D, backward)` predicts the peak extra memory of a call (used to refuse calls
    that would not fit); `traffic_bytes(B, n, D, backward)` is its unavoidable memory traffic."""

    name: str
    description: str
    fn: Callable[..., Tensor] | None
    extra_bytes: Callable[[int, int, int, bool], float]
    traffic_bytes: Callable[[int, int, int, bool], float]
    prepare: Callable[[Tensor, Tensor], Any] = lambda ref, ref_sqnorm: None
    unavailable: str | None = None  # why it cannot run here ("not installed: ...")
    version: str = ""


def _matmul_traffic(B: int, n: int, D: int, backward: bool) -> float:
    # References read once per product (twice forward, four times forward+backward), x and mu once.
    return FLOAT32 * ((4 if backward else 2) * n * D + 4 * B * D)


def library_method(backend: str, keep_distances: bool | None = None) -> Method:
    """This library's stable target on `backend`; with keep_distances=False (a method of its own,
    named so) its backward recomputes the distances even where the default keeps them."""

    # The library takes no norms: its kernels compute the centred references' norms in the pass.
    def fn(x, sigma, ref, ref_sqnorm, prep):
        return cdm_kernels.stf_target(x, sigma, ref, backend=backend, keep_distances=keep_distances)

    def extra(B, n, D, backward):
        # The (B, chunk) logit tiles, the (B, D) accumulators and the outputs (the reference backend
        # keeps a few more chunk-sized temporaries than the fused kernel), and with a gradient the
        # B x n distances where they are kept.
        c = default_chunk_size(B, n, D)
        kept = backward and keeps_distances(B, n, D, c, keep_distances)
        return FLOAT32 * ((4 if backward else 3) * B * c + (6 if backward else 4) * B * D + (B * n if kept else 0))

    suffix = "" if keep_distances is None else f", keep_distances={keep_distances}"
    return Method(
        f"cdm_kernels[{backend}{suffix}]",
        f"this library, backend {backend!r}{suffix}: streaming over reference chunks with the log-sum-exp merge",
        fn,
        extra,
        _matmul_traffic,
        version=cdm_kernels.__version__,
    )


def eager_composition(x: Tensor, sigma: Tensor, ref: Tensor, ref_sqnorm: Tensor, prep=None) -> Tensor:
    """The best eager PyTorch composition: softmax((x r^T - ||r||^2 / 2) / sigma^2) r, norms
    precomputed, the bias fused into the first product (addmm). Memory O(B n)."""
    inv_s2 = 1.0 / (sigma * sigma)
    z = torch.addmm(ref_sqnorm * -0.5, x, ref.T) * inv_s2[:, None]
    return torch.softmax(z, dim=1) @ ref


def authors_broadcast(x: Tensor, sigma: Tensor, ref: Tensor, ref_sqnorm: Tensor = None, prep=None) -> Tensor:
    """The stable-target authors' formula (peers.md 1): the (B, n, D) difference tensor, squared and
    summed, a max-subtracted softmax over n, then the references repeated B times and the weighted
    copies summed. Exact (no cancellation) but O(B n D) memory."""
    B = x.shape[0]
    diff = x[:, None, :] - ref[None, :, :]  # (B, n, D), kept alive like a named variable in their code
    dist = (diff**2).sum(-1)  # (B, n)
    logit = -dist / (2 * sigma[:, None] ** 2)
    logit = logit - logit.max(dim=1, keepdim=True).values
    w = torch.exp(logit)
    w = w / w.sum(dim=1, keepdim=True)
    refs = ref[None].repeat(B, 1, 1)  # (B, n, D)
    return (w[:, :, None] * refs).sum(1)


def chunked_loop(x: Tensor, sigma: Tensor, ref: Tensor, ref_sqnorm: Tensor, prep=None,
                 chunk_size: int | None = None) -> Tensor:
    """A plain chunked PyTorch loop with the log-sum-exp merge (docs/math.md): the fused kernel's
    algorithm without the fusion, the baseline it must beat. Same chunk size as the library's
    default. Memory O((B + chunk) D)."""
    B, D = x.shape
    n = ref.shape[0]
    c = chunk_size or default_chunk_size(B, n, D)
    inv_s2 = 1.0 / (sigma * sigma)
    m = x.new_full((B,), -math.inf)
    l = x.new_zeros(B)
    a = x.new_zeros(B, D)
    for start in range(0, n, c):
        r = ref[start : start + c]
        z = torch.addmm(ref_sqnorm[start : start + c] * -0.5, x, r.T) * inv_s2[:, None]
        m_new = torch.maximum(m, z.amax(dim=1))
        alpha = torch.exp(m - m_new)  # exp(-inf) = 0 for the empty first state
        e = torch.exp(z - m_new[:, None])
        l = l * alpha + e.sum(dim=1)
        a = torch.addmm(a * alpha[:, None], e, r)
        m = m_new
    return a / l[:, None]


def chunked_loop_method() -> Method:
    return Method(
        "chunked-loop",
        "plain PyTorch loop over reference chunks with the log-sum-exp merge (unfused)",
        chunked_loop,
        lambda B, n, D, bw: FLOAT32 * (3 * B * default_chunk_size(B, n, D) + 4 * B * D),
        _matmul_traffic,
    )


def _sdpa_prepare(ref: Tensor, ref_sqnorm: Tensor) -> Tensor:
    # Augmented keys [r_j, ||r_j||^2] (n, D + 1): a per-bank cost, like the norms.
    return torch.cat([ref, ref_sqnorm[:, None]], dim=1)


def sdpa_augmented(x: Tensor, sigma: Tensor, ref: Tensor, ref_sqnorm: Tensor, key_aug: Tensor) -> Tensor:
    """scaled_dot_product_attention with query [x / sigma^2, -1 / (2 sigma^2)], key [r, ||r||^2],
    value r and scale 1 (peers.md 3): q . k = (x . r - ||r||^2 / 2) / sigma^2."""
    inv_s2 = 1.0 / (sigma * sigma)
    q = torch.cat([x * inv_s2[:, None], (-0.5 * inv_s2)[:, None]], dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[None, None], key_aug[None, None], ref[None, None], scale=1.0
    )
    return out[0, 0]


def _keops_method() -> Method:
    try:
        import pykeops
        from pykeops.torch import LazyTensor
    except ImportError as exc:
        return Method("pykeops", "KeOps LazyTensor sumsoftmaxweight", None, lambda *a: 0.0, lambda *a: 0.0,
                      unavailable=f"not installed ({exc})")

    def fn(x, sigma, ref, ref_sqnorm, prep):
        # peers.md 4: ((Xi | Rj) + Ai * Nj).sumsoftmaxweight(Rj) with Xi = x / sigma^2, Ai = -1/(2 sigma^2).
        inv_s2 = 1.0 / (sigma * sigma)
        Xi = LazyTensor((x * inv_s2[:, None])[:, None, :])
        Rj = LazyTensor(ref[None, :, :])
        Ai = LazyTensor((-0.5 * inv_s2)[:, None, None])
        Nj = LazyTensor(ref_sqnorm[None, :, None])
        return ((Xi | Rj) + Ai * Nj).sumsoftmaxweight(Rj, axis=1)

    return Method(
        "pykeops",
        "KeOps LazyTensor sumsoftmaxweight (symbolic reduction, compiled C++; O((B + n) D) memory)",
        fn,
        lambda B, n, D, bw: FLOAT32 * (6 if bw else 3) * B * (D + 2),
        _matmul_traffic,
        version=pykeops.__version__,
    )


_COMPILED: dict[str, Callable] = {}


def _compiled_eager(x, sigma, ref, ref_sqnorm, prep):
    # One dynamic-shape compilation serves every n; it happens in the gate (warm-up), never timed.
    if "eager" not in _COMPILED:
        _COMPILED["eager"] = torch.compile(eager_composition, dynamic=True)
    return _COMPILED["eager"](x, sigma, ref, ref_sqnorm)


def all_methods(device: str = "cpu") -> list[Method]:
    """Every method of the sweep against the peers that this machine can be asked about (unavailable ones included, with
    the reason), the library's backends first, in `available_backends` order."""
    # On the CPU, "triton" is only there under TRITON_INTERPRET=1 (the tests set it): the
    # interpreter checks kernels, it is not a way to run them, so it is not a method to time.
    interpreted = torch.device(device).type == "cpu"
    methods = [
        library_method(b)
        for b in cdm_kernels.available_backends("stf_target", device)
        if not (interpreted and b == "triton")
    ]
    methods += [
        Method(
            "eager",
            "eager PyTorch: addmm (norms precomputed), softmax, matmul; O(B n) memory",
            eager_composition,
            lambda B, n, D, bw: FLOAT32 * ((7 if bw else 3) * B * n + (4 if bw else 1) * B * D),
            lambda B, n, D, bw: _matmul_traffic(B, n, D, bw) + FLOAT32 * (8 if bw else 4) * B * n,
        ),
        Method(
            "torch.compile",
            "torch.compile(dynamic=True) of the eager composition (compiled in the warm-up, untimed)",
            _compiled_eager,
            lambda B, n, D, bw: FLOAT32 * ((6 if bw else 2) * B * n + (4 if bw else 1) * B * D),
            lambda B, n, D, bw: _matmul_traffic(B, n, D, bw) + FLOAT32 * (6 if bw else 2) * B * n,
        ),
        Method(
            "sdpa",
            "scaled_dot_product_attention, augmented dimensions (head dim D + 1, keys prepared per bank)",
            sdpa_augmented,
            # The CPU kernel copies the keys once per call (measured: n (D + 1) floats), plus B x n tiles.
            lambda B, n, D, bw: FLOAT32 * (n * (D + 1) + (6 if bw else 2) * (B * n + B * (D + 1))),
            _matmul_traffic,
            prepare=_sdpa_prepare,
        ),
        _keops_method(),
        Method(
            "authors-broadcast",
            "the authors' formula: (B, n, D) difference tensor, softmax, repeated references",
            authors_broadcast,
            # Forward peak: diff + its square, then diff + repeated refs + their weighted copy; with
            # autograd, 4 such tensors live at once (measured with the profiler at B=16, n=1024).
            lambda B, n, D, bw: FLOAT32 * ((4 if bw else 3) * B * n * D + 4 * B * n),
            # Each (B, n, D) tensor is written once and read once: 4 of them forward, ~10 with grads.
            lambda B, n, D, bw: FLOAT32 * (20 if bw else 8) * B * n * D,
        ),
    ]
    return methods


# ----------------------------------------------------------------------------------------------
# Running a method: forward, forward+backward
# ----------------------------------------------------------------------------------------------

PASSES = ("forward", "forward+backward")


def effective_flops(B: int, n: int, D: int, pass_name: str) -> float:
    return (8.0 if pass_name == "forward+backward" else 4.0) * B * n * D


def make_call(method: Method, inp: Inputs, prep: Any, pass_name: str) -> Callable[[], Any]:
    """A closure running one call of the pass on fixed inputs (inputs are created before, never in it)."""
    if pass_name == "forward":

        def call():
            with torch.no_grad():
                return method.fn(inp.x, inp.sigma, inp.ref, inp.ref_sqnorm, prep)

        return call

    def call():
        x = inp.x.detach().requires_grad_(True)
        sigma = inp.sigma.detach().requires_grad_(True)
        mu = method.fn(x, sigma, inp.ref, inp.ref_sqnorm, prep)
        mu.backward(inp.grad)
        return x.grad, sigma.grad

    return call


# ----------------------------------------------------------------------------------------------
# The float64 judge and the correctness gate
# ----------------------------------------------------------------------------------------------


def judge_float64(x: Tensor, sigma: Tensor, ref: Tensor) -> Tensor:
    """mu in float64 straight from the definition (direct differences, no matmul cancellation),
    independent of every method benchmarked. Differentiable in x and sigma."""
    d = ((x.double()[:, None, :] - ref.double()[None, :, :]) ** 2).sum(-1)
    w = torch.softmax(-d / (2 * sigma.double()[:, None] ** 2), dim=1)
    return w @ ref.double()


GATE_B, GATE_N = 8, 300  # n not a multiple of any block or chunk size


def gate_inputs(D: int, device: str = "cpu", seed: int = 1234) -> Inputs:
    """The small judged case: sigma log-spaced over [0.5, 80] so the rows range from one-hot weights
    (nearest reference) through mixed ones to near-uniform (the references' mean)."""
    sigma = torch.logspace(math.log10(0.5), math.log10(80.0), GATE_B)
    return make_inputs(GATE_B, GATE_N, D, device, seed, sigma=sigma)


@dataclass
class GateResult:
    method: str
    D: int
    pass_name: str
    ok: bool
    detail: str  # per quantity: relative error vs tolerance, or the exception
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)


def _rel_err(got: Tensor, want: Tensor) -> float:
    # Normwise: the largest error relative to the largest magnitude of the float64 value.
    scale = want.abs().max().item()
    return (got.double() - want).abs().max().item() / (scale if scale > 0 else 1.0)


def _quantities(method_fn, inp: Inputs, prep, pass_name: str) -> dict[str, Tensor]:
    if pass_name == "forward":
        with torch.no_grad():
            return {"mu": method_fn(inp.x, inp.sigma, inp.ref, inp.ref_sqnorm, prep)}
    x = inp.x.detach().requires_grad_(True)
    sigma = inp.sigma.detach().requires_grad_(True)
    mu = method_fn(x, sigma, inp.ref, inp.ref_sqnorm, prep)
    mu.backward(inp.grad)
    return {"mu": mu.detach(), "grad_x": x.grad, "grad_sigma": sigma.grad}


_TOL_CACHE: dict[tuple, dict[str, float]] = {}
TOL_FACTOR, TOL_FLOOR = 4.0, 1e-5


def gate_tolerances(inp: Inputs, want: dict[str, Tensor], pass_name: str, key: tuple) -> dict[str, float]:
    """FlashAttention's rule: a method may err by a small multiple (TOL_FACTOR) of the error of the
    same math done by plain PyTorch in float32, with a floor for rounding-level luck. Plain PyTorch
    has two natural forms with different rounding: the matmul form (cancellation between ||r||^2
    and 2 x.r) and the direct differences (absorption of ||x||^2 ~ sigma^2 D at large sigma); the
    larger of their errors sets the scale, so either form's rounding passes and a formula error,
    orders of magnitude larger, does not."""
    if key not in _TOL_CACHE:
        errs = {k: 0.0 for k in want}
        for form in (eager_composition, authors_broadcast):
            got = _quantities(form, inp, None, pass_name)
            for k in want:
                errs[k] = max(errs[k], _rel_err(got[k], want[k]))
        _TOL_CACHE[key] = {k: max(TOL_FACTOR * e, TOL_FLOOR) for k, e in errs.items()}
    return _TOL_CACHE[key]


def run_gate(method: Method, D: int, pass_name: str, device: str = "cpu") -> GateResult:
    """Compares the method with the float64 judge on the small case; a method that disagrees (or
    raises) is reported as wrong and never timed."""
    inp = gate_inputs(D, device)
    if pass_name == "forward":
        want = {"mu": judge_float64(inp.x, inp.sigma, inp.ref)}
    else:
        x = inp.x.double().requires_grad_(True)
        sigma = inp.sigma.double().requires_grad_(True)
        mu = judge_float64(x, sigma, inp.ref)
        mu.backward(inp.grad.double())
        want = {"mu": mu.detach(), "grad_x": x.grad, "grad_sigma": sigma.grad}
    tol = gate_tolerances(inp, want, pass_name, (D, pass_name, device))
    try:
        prep = method.prepare(inp.ref, inp.ref_sqnorm)
        got = _quantities(method.fn, inp, prep, pass_name)
    except Exception as exc:  # a method that cannot run is reported, the sweep goes on
        return GateResult(method.name, D, pass_name, False, f"raised {type(exc).__name__}: {exc}"[:300])
    errors, ok, parts = {}, True, []
    for k in want:
        g = got[k]
        if g is None or tuple(g.shape) != tuple(want[k].shape):
            return GateResult(method.name, D, pass_name, False, f"{k}: shape {None if g is None else tuple(g.shape)}, "
                              f"expected {tuple(want[k].shape)}")
        e = _rel_err(g, want[k]) if torch.isfinite(g).all() else math.inf
        errors[k] = (e, tol[k])
        ok &= e <= tol[k]
        parts.append(f"{k} {e:.1e} (tol {tol[k]:.1e})")
    return GateResult(method.name, D, pass_name, ok, "; ".join(parts), errors)


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median: float
    q25: float
    q75: float
    min: float
    max: float
    repeats: int
    first: float  # the warm-up call


def _quantile(sorted_xs: list[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _time_once(call: Callable[[], Any], cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = call()
        end.record()
        torch.cuda.synchronize()
        del out
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    out = call()
    t1 = time.perf_counter()
    del out
    return t1 - t0


def _summarize(times: list[float], first: float) -> Timing:
    s = sorted(times)
    return Timing(statistics.median(s), _quantile(s, 0.25), _quantile(s, 0.75), s[0], s[-1], len(s), first)


def time_call(call: Callable[[], Any], device: str = "cpu", min_repeats: int = 3, max_repeats: int = 20,
              target_s: float = 1.0, warmup: bool = True) -> Timing:
    """Median of repeats after one warm-up call (skip it with warmup=False when the caller has just
    run the same call, e.g. to measure its memory): at least `min_repeats`, more while their total
    stays under `target_s`. CUDA events on a GPU (the GPU's own clock), perf_counter on the CPU."""
    cuda = torch.device(device).type == "cuda"
    first = _time_once(call, cuda) if warmup else math.nan
    times: list[float] = []
    while len(times) < min_repeats or (len(times) < max_repeats and sum(times) + times[-1] <= target_s):
        times.append(_time_once(call, cuda))
    return _summarize(times, first)


def time_interleaved(calls: list[Callable[[], Any]], device: str = "cpu", repeats: int = 5,
                     warmup: bool = True) -> list[Timing]:
    """Times several calls in alternation (a b a b ...), so that a change of load on a shared machine
    hits all of them alike and their ratio stays meaningful; median of `repeats` each."""
    cuda = torch.device(device).type == "cuda"
    firsts = [_time_once(c, cuda) if warmup else math.nan for c in calls]
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for c, ts in zip(calls, times):
            ts.append(_time_once(c, cuda))
    return [_summarize(ts, f) for ts, f in zip(times, firsts)]


@contextlib.contextmanager
def _quiet_fd2():
    # The profiler's backend prints start/stop lines on the C-level stderr; they would shred tqdm's bar.
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


MEM_METHOD_CPU = "torch.profiler allocator events (running-sum peak, outputs included)"
MEM_METHOD_CUDA = "torch.cuda.max_memory_allocated - allocated before"


def peak_extra_bytes(call: Callable[[], Any], device: str = "cpu") -> int:
    """Peak memory a call allocates above what was allocated before it (see the module docstring)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = call()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd2():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = call()
            del out
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


# ----------------------------------------------------------------------------------------------
# The machine: ceilings and identity
# ----------------------------------------------------------------------------------------------


@dataclass
class Ceilings:
    matmul_gflops: float  # float32 2048^3 matmul, median of repeats
    copy_gbps: float  # 256 MiB copy, (read + write) bytes / time


def matmul_rate(size: int = 2048, device: str = "cpu", target_s: float = 1.0) -> tuple[float, Timing]:
    """GFLOP/s of a plain float32 size^3 matmul (2 size^3 flops), inputs made before timing."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    t = time_call(lambda: torch.mm(a, b, out=out), device, min_repeats=5, target_s=target_s)
    return 2.0 * size**3 / t.median / 1e9, t


def measure_ceilings(device: str = "cpu", quick: bool = False) -> Ceilings:
    gflops, _ = matmul_rate(2048, device, target_s=0.5 if quick else 1.5)
    nbytes = (64 if quick else 256) << 20
    src = torch.empty(nbytes // FLOAT32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, min_repeats=5, target_s=0.5 if quick else 1.5)
    return Ceilings(gflops, 2.0 * nbytes / t.median / 1e9)


def device_name(device: str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def load_average(sep: str = " ") -> str:
    """The 1/5/15-minute load average: how much a shared machine could have disturbed the timings."""
    try:
        return sep.join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def environment(device: str = "cpu") -> dict[str, str]:
    """Versions and identity recorded in every row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        import pykeops

        keops_version = pykeops.__version__
    except ImportError:
        keops_version = "not installed"
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        # Results of a tree with uncommitted changes to tracked files say so: the commit alone would
        # claim code that was not what ran.
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += ".dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "device": torch.device(device).type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "pykeops": keops_version,
        "cdm_kernels": f"{cdm_kernels.__version__}+{commit}",
        "extension": "loaded" if cdm_kernels.has_cpu_kernels() else "not built",
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
    }


def roofline(flops: float, traffic: float, seconds: float, ceil: Ceilings) -> tuple[str, float, float]:
    """(binding ceiling, its value, fraction of the roofline time bound this call reached)."""
    t_compute = flops / (ceil.matmul_gflops * 1e9)
    t_memory = traffic / (ceil.copy_gbps * 1e9)
    if t_compute >= t_memory:
        return "compute", ceil.matmul_gflops, t_compute / seconds
    return "bandwidth", ceil.copy_gbps, t_memory / seconds


def fmt_bytes(nbytes: float) -> str:
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.1f} GiB"
    return f"{nbytes / (1 << 20):.1f} MiB"
