"""The fused rollout steps against their speed targets (and against their peers), on the CPU.

    python -m benchmarks.bench_rollout [--batch 256] [--threads 1,0] [--out DIR] [--strict]
    python -m benchmarks.bench_rollout --quick      # ~10 s, no speed claims (or: python benchmarks/bench_rollout.py)

float32 states of shape (B, 3, 32, 32) and (B, 3, 64, 64), B = --batch (256 by default). One row
per fused method and shape, each with its own criterion, measured against peers timed in the same
run and in alternation (a b c a b c ...), so that a change of load on the shared machine hits
every side alike:

  sde     the fused reverse-SDE step (docs/math.md section 3 step 4) with its noise drawn in the kernel,
          against the authors' sequence of float64 tensor operations with torch.randn_like (their
          rollout keeps x in float64 and casts D(x) to it): peer time / ours >= 10.
  noise   cdm_kernels.randn (the same Philox noise, written to memory) against torch.randn of the
          same size: torch.randn time / ours >= 1.
  euler   EDM's Euler step, and
  heun    its Heun correction: GB/s as a fraction of a plain tensor copy of the same bytes >= 0.6.

Bytes moved, float32, n = x.numel(): sde and euler read x and D and write x' (3 n 4 bytes), heun
reads x, D, x_euler, D_euler and writes x' (5 n 4), noise writes its output (n 4). Every row gives
these bytes, its GB/s (bytes / median time) and the fraction of the copy's GB/s: the copy is
`src.clone()` of a float32 tensor of bytes / 8 elements (read + write = the same bytes), timed in
the same alternation. A clone, not a copy into a preallocated tensor, because every step allocates
its output as well (a fresh multi-MB tensor pays its page faults on first touch).

Every row is measured at 1 thread and at torch's default thread count (--threads), ours, the peer
and the copy at the same count: on a loaded 2-core machine torch's multi-threaded ops can lose a
scheduler slice at a barrier (milliseconds for a copy of a few MB), which 1 thread shows apart.

Timing: inputs are made before timing, never in it. Each call is warmed up, then run `inner`
times per timed sample (so a sample lasts about --sample-ms; the per-call time is sample / inner),
and the median and quartiles of --repeats samples are reported (stf_common.time_interleaved).

Correctness first: before anything is timed, every fused method (and the authors' formula) runs
on a small case and is compared with the float64 reference (rollout_reference, fed the numbers of
the Philox spec `philox_randn_reference` for the noise). A method that disagrees is reported
`wrong: ...` with verdict `FAIL (wrong)` and is not timed.

Outputs in --out (default out/benchmarks/bench_rollout in the checkout, which git ignores; the
committed results in benchmarks/results/ change only when --out names that folder):
rollout_bench.csv (one row per method and shape; device, versions, shapes, times, GB/s, fractions,
target and verdict in every row) and rollout_bench.md. Exit status 0 unless --strict and a
criterion failed (never with --quick, whose sizes are not the targets').
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

if __package__ in (None, ""):  # run as `python benchmarks/bench_rollout.py`: the checkout's packages, as -m
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import cdm_kernels  # noqa: E402
from benchmarks import stf_common as sc  # noqa: E402
from cdm_kernels import rollout_reference as ref  # noqa: E402
from cdm_kernels.progress import progress as progress_display  # noqa: E402
from cdm_kernels.random import philox_randn_reference  # noqa: E402

FLOAT32 = 4
SEED, OFFSET = 1234, 5  # Philox key and first counter of every in-kernel draw


@dataclass(frozen=True)
class Config:
    batch: int = 256
    images: tuple[tuple[int, int, int], ...] = ((3, 32, 32), (3, 64, 64))
    repeats: int = 31  # timed samples per call (median, quartiles)
    sample_ms: float = 20.0  # target length of one timed sample (inner repetitions of the call)
    backend: str = "auto"
    threads: tuple[int, ...] = (1, 0)  # torch.set_num_threads for each pass; 0 = torch's default count
    methods: tuple[str, ...] = ("sde", "noise", "euler", "heun")
    quick: bool = False
    out: str | None = None

    def shapes(self) -> list[tuple[int, ...]]:
        return [(self.batch, *s) for s in self.images]


QUICK = dict(batch=16, repeats=5, sample_ms=2.0, threads=(0,), quick=True)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """One problem: the float32 state and predictions, per-sample levels, and the authors' float64
    copies (their rollout keeps x in float64; the levels are (B, 1, 1, 1) float64)."""

    x: Tensor
    D: Tensor
    t_cur: Tensor  # (B,) float32
    t_next: Tensor
    x_euler: Tensor
    D_euler: Tensor
    x64: Tensor
    t64: Tensor  # (B, 1, ..., 1) float64
    tn64: Tensor
    copy_src: dict[int, Tensor] = field(default_factory=dict)  # arrays moved -> clone source


def make_inputs(shape: tuple[int, ...], seed: int = 0, copies: tuple[int, ...] = ()) -> Inputs:
    """Images-like states; t_cur over EDM's range, t_next = 0.7 t_cur (a valid step for every kind)."""
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    x = torch.randn(shape, generator=g) * 2
    D = torch.rand(shape, generator=g) * 2 - 1
    t_cur = torch.exp(torch.linspace(math.log(0.01), math.log(80.0), B, dtype=torch.float64)).float()
    t_next = (t_cur.double() * 0.7).float()
    x_euler = torch.randn(shape, generator=g) * 2
    D_euler = torch.rand(shape, generator=g) * 2 - 1
    bshape = (B,) + (1,) * (len(shape) - 1)
    n = x.numel()
    return Inputs(x, D, t_cur, t_next, x_euler, D_euler, x.double(), t_cur.double().reshape(bshape),
                  t_next.double().reshape(bshape),
                  {a: torch.rand((a * n + 1) // 2, generator=g) for a in copies})


# ----------------------------------------------------------------------------------------------
# The methods, their peers and their float64 references
# ----------------------------------------------------------------------------------------------


def authors_sde_step(x64: Tensor, D: Tensor, t: Tensor, tn: Tensor, z: Tensor | None = None) -> Tensor:
    """The consistency authors' step: float64 throughout (D(x) cast to it), noise from
    torch.randn_like, separate tensor operations (docs/math.md section 3)."""
    D64 = D.to(torch.float64)
    if z is None:
        z = torch.randn_like(x64)
    return x64 + 2 * (tn - t) * (x64 - D64) / t + torch.sqrt(2 * (t - tn).abs() * t) * z


def _terms(x, D, t, tn, scale=2.0):
    # Sum of |terms| of x + g (x - D): the float32 rounding bound of a step scales with it.
    sh = (-1,) + (1,) * (x.dim() - 1)
    g = (scale * (tn - t) / t).reshape(sh)
    return x.abs() + g.abs() * (x.abs() + D.abs())


@dataclass
class Method:
    """A fused method and how it is judged.

    fn(inp, backend) -> the call to time (a closure over fixed inputs);
    check(backend, fn) -> (worst error / tolerance, detail) on a small case against float64;
    peer(inp) -> the peer's call, or None when the criterion is against the copy alone;
    arrays: float32 arrays of x's size the method moves (its bytes = arrays n 4);
    metric "speedup" (peer time / ours) or "copy fraction" (ours GB/s / the copy's)."""

    name: str
    description: str
    fn: Callable[[Inputs, str], Callable[[], Any]]
    check: Callable[[str, Callable], tuple[float, str]]
    arrays: int
    metric: str
    target: float
    peer_name: str = ""
    peer: Callable[[Inputs], Callable[[], Any]] | None = None
    peer_check: Callable[[], tuple[float, str]] | None = None


CHECK_SHAPE = (3, 3, 5, 7)  # M = 105, not a multiple of any block


def _check_inputs():
    inp = make_inputs(CHECK_SHAPE, seed=99)
    # Levels over EDM's whole range with large and small steps.
    inp.t_cur = torch.tensor([0.005, 1.3, 80.0])
    inp.t_next = torch.tensor([0.002, 1.2, 20.0])
    bshape = (3, 1, 1, 1)
    inp.t64, inp.tn64 = inp.t_cur.double().reshape(bshape), inp.t_next.double().reshape(bshape)
    return inp


def _philox_spec(shape, seed, offset) -> Tensor:
    n = math.prod(shape)
    return torch.from_numpy(philox_randn_reference(n, seed, offset)).reshape(shape).double()


def _judge(got: Tensor, want: Tensor, tol: Tensor) -> tuple[float, str]:
    if got.shape != want.shape:
        return math.inf, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if not torch.isfinite(got).all():
        return math.inf, "non-finite values"
    err = (got.double() - want).abs()
    worst = (err / tol).max().item()
    return worst, f"max |err| {err.max().item():.2e}, {worst:.2f}x the float32 bound"


EPS32 = torch.finfo(torch.float32).eps


def _check_sde(backend, fn):
    inp = _check_inputs()
    z = _philox_spec(CHECK_SHAPE, SEED, OFFSET)
    t, tn = inp.t_cur.double(), inp.t_next.double()
    want = ref.sde_step(inp.x.double(), inp.D.double(), t, tn, z)
    scale = torch.sqrt(2 * (t - tn).abs() * t).reshape(-1, 1, 1, 1)
    # float32 arithmetic on the terms, plus the float32 log/cos of the noise (<= 2e-6 per unit).
    tol = 8 * EPS32 * (_terms(inp.x, inp.D, t, tn) + scale * z.abs()) + 4e-6 * scale
    return _judge(fn(inp, backend)(), want, tol)


def _check_noise(backend, fn):
    shape = (3, 1000)
    want = _philox_spec(shape, SEED, OFFSET)
    return _judge(fn(_ShapeOnly(shape), backend)(), want, 4e-6 * (1 + want.abs()))


class _ShapeOnly:
    """Inputs for the noise method, which needs only x's shape."""

    def __init__(self, shape):
        self.x = torch.empty(shape)


def _check_euler(backend, fn):
    inp = _check_inputs()
    t, tn = inp.t_cur.double(), inp.t_next.double()
    want = ref.euler_step(inp.x.double(), inp.D.double(), t, tn)
    return _judge(fn(inp, backend)(), want, 8 * EPS32 * _terms(inp.x, inp.D, t, tn, 1.0))


def _check_heun(backend, fn):
    inp = _check_inputs()
    t, tn = inp.t_cur.double(), inp.t_next.double()
    want = ref.heun_step(inp.x.double(), inp.D.double(), inp.x_euler.double(), inp.D_euler.double(), t, tn)
    h = (tn - t).reshape(-1, 1, 1, 1)
    terms = inp.x.abs() + (h / t.reshape(-1, 1, 1, 1)).abs() * (inp.x.abs() + inp.D.abs()) \
        + (h / tn.reshape(-1, 1, 1, 1)).abs() * (inp.x_euler.abs() + inp.D_euler.abs())
    return _judge(fn(inp, backend)(), want, 8 * EPS32 * terms)


def _check_authors():
    inp = _check_inputs()
    z = _philox_spec(CHECK_SHAPE, SEED, OFFSET)
    t, tn = inp.t_cur.double(), inp.t_next.double()
    want = ref.sde_step(inp.x.double(), inp.D.double(), t, tn, z)
    got = authors_sde_step(inp.x64, inp.D, inp.t64, inp.tn64, z)
    scale = torch.sqrt(2 * (t - tn).abs() * t).reshape(-1, 1, 1, 1)
    return _judge(got, want, 8 * torch.finfo(torch.float64).eps * (_terms(inp.x64, inp.D, t, tn) + scale * z.abs()))


def _sde(inp, backend):
    return lambda: cdm_kernels.rollout_step(inp.x, inp.D, inp.t_cur, inp.t_next, kind="sde", seed=SEED,
                                            offset=OFFSET, backend=backend)


def _noise(inp, backend):
    shape = tuple(inp.x.shape)
    name = backend if backend in cdm_kernels.available_backends("randn", "cpu") else "auto"
    return lambda: cdm_kernels.randn(shape, SEED, OFFSET, backend=name)


def _euler(inp, backend):
    return lambda: cdm_kernels.rollout_step(inp.x, inp.D, inp.t_cur, inp.t_next, kind="euler", backend=backend)


def _heun(inp, backend):
    return lambda: cdm_kernels.rollout_step(inp.x, inp.D, inp.t_cur, inp.t_next, kind="heun", x_euler=inp.x_euler,
                                            denoised_euler=inp.D_euler, backend=backend)


def all_methods() -> list[Method]:
    return [
        Method("sde", "fused reverse-SDE step, Philox noise in the kernel (float32)", _sde, _check_sde, 3,
               "speedup", 10.0, "authors' float64 ops + torch.randn_like",
               lambda inp: (lambda: authors_sde_step(inp.x64, inp.D, inp.t64, inp.tn64)), _check_authors),
        Method("noise", "cdm_kernels.randn (the same Philox noise, written out)", _noise, _check_noise, 1,
               "speedup", 1.0, "torch.randn of the same size",
               lambda inp: (lambda: torch.randn(inp.x.shape))),
        Method("euler", "fused Euler step x + h (x - D) / t", _euler, _check_euler, 3, "copy fraction", 0.6),
        Method("heun", "fused Heun correction x + h/2 ((x - D)/t + (x_e - D_e)/t')", _heun, _check_heun, 5,
               "copy fraction", 0.6),
    ]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def _inner_count(call: Callable[[], Any], sample_s: float) -> int:
    """Warms the call up, then how many calls make one timed sample of about sample_s seconds."""
    call()  # first-call costs: thread pool, extension, page faults of a new size
    # The fastest of a few calls: one call preempted by another process must not set the count.
    dt, spent = math.inf, 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        out = call()
        t1 = time.perf_counter() - t0
        del out
        dt, spent = min(dt, t1), spent + t1
        if spent > 4 * sample_s:
            break
    return max(1, min(10_000, round(sample_s / max(dt, 1e-7))))


def _repeated(call: Callable[[], Any], inner: int) -> Callable[[], Any]:
    if inner == 1:
        return call

    def many():
        for _ in range(inner - 1):
            call()
        return call()

    return many


def time_group(calls: list[Callable[[], Any]], repeats: int, sample_s: float) -> list[tuple[sc.Timing, int]]:
    """Per-call timings (stf_common.Timing, seconds per call) of calls timed in alternation."""
    inners = [_inner_count(c, sample_s) for c in calls]
    timings = sc.time_interleaved([_repeated(c, k) for c, k in zip(calls, inners)], repeats=repeats)
    out = []
    for t, k in zip(timings, inners):
        out.append((sc.Timing(t.median / k, t.q25 / k, t.q75 / k, t.min / k, t.max / k, t.repeats, t.first / k), k))
    return out


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

CSV_FIELDS = [
    "device", "device_name", "torch", "triton", "cdm_kernels", "extension", "python", "threads", "backend",
    "quick", "shape", "B", "dtype", "method", "description", "check", "check_detail", "bytes",
    "median_s", "q25_s", "q75_s", "iqr_s", "repeats", "inner", "gbps",
    "copy_median_s", "copy_iqr_s", "copy_gbps", "frac_of_copy",
    "peer", "peer_median_s", "peer_iqr_s", "metric", "measured", "target", "verdict",
    "load_start", "load_end",
]


def verdict(measured: float | None, target: float, check_ok: bool, quick: bool) -> str:
    if not check_ok:
        return "FAIL (wrong)"
    v = "PASS" if measured is not None and measured >= target else "FAIL"
    return v + (" (quick: not the target sizes)" if quick else "")


def run(cfg: Config, methods: list[Method] | None = None, progress: bool = True) -> dict:
    """Checks every method, then times the ones that passed; returns rows and the environment."""
    default_threads = torch.get_num_threads()
    thread_counts = list(dict.fromkeys(t or default_threads for t in cfg.threads))
    backend = cdm_kernels.resolve_backend("rollout_step", "cpu", cfg.backend)
    methods = [m for m in all_methods() if m.name in cfg.methods] if methods is None else methods
    env = sc.environment("cpu")
    load_start = sc.load_average()
    bar = progress_display(len(methods) * (1 + len(cfg.shapes()) * len(thread_counts)), desc="rollout bench",
                           unit="steps", disable=not progress)

    checks: dict[str, tuple[bool, str]] = {}
    for m in methods:
        bar.set_postfix_str(f"check {m.name}")
        try:
            worst, detail = m.check(backend, m.fn)
            ok = worst <= 1.0
            if ok and m.peer_check is not None:
                pworst, pdetail = m.peer_check()
                if pworst > 1.0:
                    ok, detail = False, f"peer {m.peer_name} wrong: {pdetail}"
        except Exception as exc:  # a method that cannot run is reported, the run goes on
            ok, detail = False, f"raised {type(exc).__name__}: {exc}"[:300]
        checks[m.name] = (ok, detail)
        bar.update(1)

    rows = []
    for shape, threads in ((s, t) for s in cfg.shapes() for t in thread_counts):
        # Each row at 1 thread and at torch's default: on a loaded 2-core machine, torch's
        # multi-threaded ops (the copy, the authors' ops) can wait a scheduler slice at a barrier.
        torch.set_num_threads(threads)
        inp = make_inputs(shape, copies=tuple(sorted({m.arrays for m in methods})))
        n = inp.x.numel()
        for m in methods:
            bar.set_postfix_str(f"{m.name} {'x'.join(map(str, shape))} {threads}t")
            ok, detail = checks[m.name]
            nbytes = m.arrays * n * FLOAT32
            row = {**env, "threads": threads, "backend": backend, "quick": cfg.quick,
                   "shape": "x".join(map(str, shape)), "B": shape[0],
                   "dtype": "float32", "method": m.name, "description": m.description,
                   "check": "ok" if ok else "wrong", "check_detail": detail, "bytes": nbytes,
                   "peer": m.peer_name or "copy of the same bytes", "metric": m.metric, "target": m.target}
            if ok:
                src = inp.copy_src[m.arrays]
                calls = [m.fn(inp, backend), lambda src=src: src.clone()]
                if m.peer is not None:
                    calls.append(m.peer(inp))
                res = time_group(calls, cfg.repeats, cfg.sample_ms / 1e3)
                (t, inner), (tc, _) = res[0], res[1]
                gbps, copy_gbps = nbytes / t.median / 1e9, nbytes / tc.median / 1e9
                row.update(median_s=t.median, q25_s=t.q25, q75_s=t.q75, iqr_s=t.q75 - t.q25, repeats=t.repeats,
                           inner=inner, gbps=gbps, copy_median_s=tc.median, copy_iqr_s=tc.q75 - tc.q25,
                           copy_gbps=copy_gbps, frac_of_copy=gbps / copy_gbps)
                if m.peer is not None:
                    tp = res[2][0]
                    row.update(peer_median_s=tp.median, peer_iqr_s=tp.q75 - tp.q25)
                measured = t_peer_over_ours(row) if m.metric == "speedup" else row["frac_of_copy"]
                row["measured"] = measured
                row["verdict"] = verdict(measured, m.target, True, cfg.quick)
            else:
                row["verdict"] = verdict(None, m.target, False, cfg.quick)
            rows.append(row)
            bar.update(1)
    bar.close()
    torch.set_num_threads(default_threads)
    load_end = sc.load_average()
    for r in rows:
        r["load_start"], r["load_end"] = load_start, load_end
    return {"rows": rows, "env": env, "backend": backend, "checks": checks, "load": (load_start, load_end),
            "config": cfg, "threads": thread_counts}


def t_peer_over_ours(row: dict) -> float:
    return row["peer_median_s"] / row["median_s"]


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _ms(s) -> str:
    return "-" if s in (None, "") else f"{s * 1e3:.3f}"


def format_markdown(res: dict, command: str) -> str:
    env, cfg = res["env"], res["config"]
    lines = [
        "# Fused rollout steps: speed targets"
        + (" (--quick: small sizes, not a measurement)" if cfg.quick else ""),
        "",
        f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, cdm_kernels {env['cdm_kernels']} "
        f"(extension {env['extension']}), Python {env['python']}, torch's default {env['threads']} threads; "
        f"rollout backend `{res['backend']}`. Load average at start {res['load'][0]}, at end {res['load'][1]}.",
        "",
        f"Command: `{command}`",
        "",
        f"float32; times are the median per call [quartiles] of {cfg.repeats} samples, each sample about "
        f"{cfg.sample_ms:g} ms of repeated calls, every method timed in alternation with its peer and with a "
        "`clone()` of the same bytes (the copy ceiling). GB/s = bytes moved / median time.",
        "",
    ]
    for shape, threads in ((s, t) for s in cfg.shapes() for t in res["threads"]):
        s = "x".join(map(str, shape))
        lines += [f"## {s}, {threads} thread{'s' if threads > 1 else ''}", "",
                  "| method | bytes | ours ms [IQR] | GB/s | copy GB/s | fraction of copy | peer | peer ms (IQR) "
                  "| measured | target | verdict |",
                  "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
        for r in res["rows"]:
            if r["shape"] != s or r["threads"] != threads:
                continue
            mb = f"{r['bytes'] / 2**20:.1f} MiB"
            if r["check"] != "ok":
                lines.append(f"| {r['method']} | {mb} | not timed | | | | {r['peer']} | | | "
                             f">= {r['target']:g} | **{r['verdict']}** |")
                continue
            ours = f"{_ms(r['median_s'])} [{_ms(r['q25_s'])}-{_ms(r['q75_s'])}]"
            peer = (f"{_ms(r['peer_median_s'])} (IQR {_ms(r['peer_iqr_s'])})" if r.get("peer_median_s") is not None
                    else f"{_ms(r['copy_median_s'])} (IQR {_ms(r['copy_iqr_s'])})")
            what = "x faster" if r["metric"] == "speedup" else " of copy"
            lines.append(f"| {r['method']} | {mb} | {ours} | {r['gbps']:.2f} | {r['copy_gbps']:.2f} | "
                         f"{r['frac_of_copy']:.2f} | {r['peer']} | {peer} | {r['measured']:.2f}{what} | "
                         f">= {r['target']:g} | {r['verdict']} |")
        lines.append("")
    lines += ["## Correctness checks (before timing; small case (3, 3, 5, 7) against the float64 reference)", ""]
    for name, (ok, detail) in res["checks"].items():
        lines.append(f"- {name}: {'ok' if ok else '**WRONG** (not timed)'}: {detail}")
    lines += ["", "Criteria: sde = authors' time / ours >= 10; noise = torch.randn time / ours >= 1; euler, heun = "
              "GB/s >= 0.6 x the copy's GB/s for the same bytes (x, D read and x' written; heun also x_euler, "
              "D_euler)."]
    return "\n".join(lines) + "\n"


def write_outputs(res: dict, out: str, command: str) -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    csv_path, md_path = os.path.join(out, "rollout_bench.csv"), os.path.join(out, "rollout_bench.md")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in res["rows"]:
            w.writerow({k: _csv_value(r.get(k)) for k in CSV_FIELDS})
    with open(md_path, "w") as f:
        f.write(format_markdown(res, command))
    return csv_path, md_path


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.9g}"
    return v


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="B of the (B, 3, 32, 32) and (B, 3, 64, 64) states (256)")
    ap.add_argument("--repeats", type=int, default=None, help="timed samples per call (31; --quick 5)")
    ap.add_argument("--sample-ms", type=float, default=None, help="length of one timed sample in ms (20; --quick 2)")
    ap.add_argument("--backend", default="auto", help="rollout backend (auto: the C++ kernels when built)")
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts, each a pass of every row; 0 = torch's default (1,0; --quick 0)")
    ap.add_argument("--methods", default="sde,noise,euler,heun", help="comma-separated subset")
    sc.add_quick_and_out(ap, "bench_rollout", "B=16, few repeats: checks the script, no speed claims")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a criterion fails (ignored with --quick)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def parse_args(argv=None) -> tuple[Config, bool, bool]:
    ap = build_parser()
    a = ap.parse_args(argv)
    cfg = Config(**QUICK) if a.quick else Config()
    over = {k: v for k, v in (("batch", a.batch), ("repeats", a.repeats), ("sample_ms", a.sample_ms)) if v is not None}
    methods = tuple(s for s in a.methods.split(",") if s)
    unknown = sorted(set(methods) - {m.name for m in all_methods()})
    if unknown:
        ap.error(f"--methods: unknown {unknown}")
    if over.get("batch", 1) < 1 or over.get("repeats", 1) < 1 or over.get("sample_ms", 1.0) <= 0:
        ap.error("--batch and --repeats must be >= 1 and --sample-ms > 0")
    if a.threads is not None:
        try:
            over["threads"] = tuple(int(v) for v in a.threads.split(",") if v)
        except ValueError:
            over["threads"] = ()
        if not over["threads"] or min(over["threads"]) < 0:
            ap.error(f"--threads: comma-separated counts >= 0 (0 = torch's default), got {a.threads!r}")
    cfg = replace(cfg, **over, backend=a.backend, methods=methods, out=a.out)
    return cfg, a.strict, not a.no_progress


def main(argv=None) -> int:
    cfg, strict, progress = parse_args(argv)
    command = "python -m benchmarks.bench_rollout " + " ".join(sys.argv[1:] if argv is None else argv)
    res = run(cfg, progress=progress)
    md = format_markdown(res, command.strip())
    print(md)
    paths = write_outputs(res, cfg.out, command.strip())
    print("wrote " + ", ".join(paths))
    print(f"results in {os.path.abspath(cfg.out)}")
    failed = [r for r in res["rows"] if not r["verdict"].startswith("PASS")]
    return 1 if (strict and not cfg.quick and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
