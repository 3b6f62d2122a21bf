"""The fused CPU stable-target kernel against its speed targets, measured in one run.

    python -m benchmarks.stf_cpu_targets [--repeats 5] [--out DIR] [--time-wrong] [--strict]
    python benchmarks/stf_cpu_targets.py --quick     # small shapes, seconds: checks the script, measures nothing

float32, D = 3072. Every time is the median of --repeats calls after a warm-up, the kernel and its
peer timed in alternation (so a change of load on the shared machine hits both); every ratio is
of two timings of the same run. Peak extra memory is printed beside each time (torch.profiler
allocator events, see stf_common). Criteria:

  (a)  cpu backend at B=128, n=8192: effective rate 4BnD/time >= 80% of a float32 2048^3 matmul's
       rate, and faster than a plain chunked PyTorch loop with the log-sum-exp merge;
  (b)  at B=128, n=65536: forward no slower than the best eager composition, with at most a tenth
       of its peak extra memory;
  (c)  forward+backward (gradients of x and sigma) at B=128, n=8192 within 1.3x of eager autograd
       through that composition;
  (d)  >= 100x the authors' broadcast formula at B=64, n=1024, and >= 10x pykeops at B=64, n=4096.

Before timing, each method is compared with the float64 judge (stf_common.run_gate); a method that
fails it makes its criterion FAIL ("wrong") and is timed only with --time-wrong (for tuning).
Exit status 0 unless --strict and a criterion failed (never with --quick).

Writes stf_cpu_targets.md (the table) and stf_cpu_targets.csv into --out, by default
out/benchmarks/stf_cpu_targets in the checkout (ignored by git); the committed results in
benchmarks/results/ change only when --out names that folder.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass

if __package__ in (None, ""):  # run as `python benchmarks/stf_cpu_targets.py`: the checkout's packages, as -m
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import stf_common as sc  # noqa: E402

@dataclass(frozen=True)
class Sizes:
    """The shapes of the criteria (B, n) at dimension D, and the matmul that sets the compute ceiling."""

    D: int = 3072
    matmul: int = 2048
    a: tuple[int, int] = (128, 8192)
    b: tuple[int, int] = (128, 65536)
    c: tuple[int, int] = (128, 8192)
    d1: tuple[int, int] = (64, 1024)
    d2: tuple[int, int] = (64, 4096)


TARGET_SIZES = Sizes()
# --quick: the same criteria on small shapes, in seconds; it checks the script, it measures nothing.
QUICK_SIZES = Sizes(D=256, matmul=256, a=(16, 1024), b=(16, 4096), c=(16, 1024), d1=(8, 256), d2=(8, 512))
D = TARGET_SIZES.D


@dataclass
class Criterion:
    key: str
    text: str
    ratio: float | None  # measured, oriented so that larger is better
    target: float
    verdict: str  # PASS / FAIL / n/a ...
    detail: str  # times and memories


def _fmt_t(t: sc.Timing) -> str:
    return f"{t.median * 1e3:.1f} ms [{t.q25 * 1e3:.1f}-{t.q75 * 1e3:.1f}]"


class Runner:
    def __init__(self, repeats: int, time_wrong: bool, device: str = "cpu", D: int = D):
        self.repeats, self.time_wrong, self.device, self.D = repeats, time_wrong, device, D
        self.gates: dict[tuple[str, str], sc.GateResult] = {}
        self.methods = {m.name: m for m in sc.all_methods(device)}
        self.methods["chunked-loop"] = sc.chunked_loop_method()
        recomputed = sc.library_method("cpu", keep_distances=False)
        self.methods[recomputed.name] = recomputed
        self.recomputed = recomputed.name

    def gate(self, name: str, pass_name: str) -> sc.GateResult:
        if (name, pass_name) not in self.gates:
            self.gates[(name, pass_name)] = sc.run_gate(self.methods[name], self.D, pass_name, self.device)
        return self.gates[(name, pass_name)]

    def compare(self, names: list[str], B: int, n: int, pass_name: str, extra: dict | None = None):
        """Times the methods (and the `extra` named calls) in alternation on one input; returns
        ({name: (Timing, peak bytes)}, problems)."""
        problems = []
        for name in names:
            m = self.methods[name]
            if m.unavailable:
                return None, [f"{name} {m.unavailable}"]
            g = self.gate(name, pass_name)
            if not g.ok:
                problems.append(f"{name} WRONG vs float64 ({g.detail})")
        if problems and not self.time_wrong:
            return None, problems
        inp = sc.make_inputs(B, n, self.D, self.device, seed=n)
        calls, peaks = [], []
        for name in names:
            m = self.methods[name]
            call = sc.make_call(m, inp, m.prepare(inp.ref, inp.ref_sqnorm), pass_name)
            peaks.append(sc.peak_extra_bytes(call, self.device))  # doubles as a warm-up
            calls.append(call)
        names = list(names)
        for name, call in (extra or {}).items():
            names.append(name)
            peaks.append(sc.peak_extra_bytes(call, self.device))
            calls.append(call)
        timings = sc.time_interleaved(calls, self.device, repeats=self.repeats, warmup=True)
        return {nm: (t, pk) for nm, t, pk in zip(names, timings, peaks)}, problems


def _detail(res: dict, flops: float | None = None) -> str:
    parts = []
    for name, (t, pk) in res.items():
        rate = f", {flops / t.median / 1e9:.1f} GFLOP/s" if flops else ""
        parts.append(f"{name} {_fmt_t(t)}{rate}, peak {sc.fmt_bytes(pk)}")
    return "; ".join(parts)


def _verdict(ratio: float, target: float, problems: list[str], quick: bool = False) -> str:
    ok = ratio >= target and not problems
    return ("PASS" if ok else "FAIL") + (" (wrong)" if problems else "") + (" (quick: not the target sizes)" if quick else "")


def run(repeats: int = 5, time_wrong: bool = False, device: str = "cpu", log=print,
        sizes: Sizes = TARGET_SIZES) -> tuple[list[Criterion], dict]:
    quick = sizes != TARGET_SIZES
    D = sizes.D
    r = Runner(repeats, time_wrong, device, D)
    crit: list[Criterion] = []
    cpu = "cdm_kernels[cpu]"
    if cpu not in r.methods:
        raise SystemExit("the fused CPU kernel is not built: run `MAX_JOBS=1 CDM_FORCE_CPU=1 python setup.py "
                         "build_ext --inplace` first (" + sc.cdm_kernels.extension_status() + ")")
    info = {"load_start": sc.load_average(), "env": sc.environment(device), "D": D, "quick": quick}

    M = sizes.matmul
    mm = f"matmul {M}^3"
    mm_rate, mm_t = sc.matmul_rate(M, device, target_s=0.2 if quick else 2.0)
    info["matmul"] = f"{mm_rate:.1f} GFLOP/s ({_fmt_t(mm_t)})"
    log(f"float32 {M}^3 matmul: {info['matmul']}")

    # (a) rate vs the matmul, and vs the unfused chunked loop.
    B, n = sizes.a
    flops = sc.effective_flops(B, n, D, "forward")
    # The matmul is timed again in alternation with the kernel, so that both see the same load.
    a = torch.randn(M, M, device=device)
    b = torch.randn(M, M, device=device)
    c_out = torch.empty(M, M, device=device)
    res, probs = r.compare([cpu, "chunked-loop"], B, n, "forward", extra={mm: lambda: torch.mm(a, b, out=c_out)})
    if res:
        mm_rate = 2.0 * M**3 / res[mm][0].median / 1e9
        info["matmul"] += f"; alternating with (a): {mm_rate:.1f} GFLOP/s"
        rate = flops / res[cpu][0].median / 1e9
        crit.append(Criterion("a1", f"cpu fwd rate / matmul rate (B={B}, n={n})", rate / mm_rate, 0.8,
                              _verdict(rate / mm_rate, 0.8, probs, quick),
                              f"{cpu} {rate:.1f} GFLOP/s vs matmul {mm_rate:.1f} GFLOP/s (timed in "
                              f"alternation); " + _detail({k: v for k, v in res.items() if k != mm}, flops)))
        ratio = res["chunked-loop"][0].median / res[cpu][0].median
        crit.append(Criterion("a2", f"chunked-loop time / cpu time (B={B}, n={n})", ratio, 1.0,
                              _verdict(ratio, 1.0 + 1e-9, probs, quick),
                              _detail({k: v for k, v in res.items() if k != mm}, flops)))
    else:
        crit += [Criterion(k, t, None, tg, "FAIL (wrong)", "; ".join(probs))
                 for k, t, tg in (("a1", "cpu fwd rate / matmul rate", 0.8), ("a2", "chunked-loop / cpu", 1.0))]
    log(crit[-1].detail)

    # (b) forward vs eager at n = 65536: time and peak extra memory.
    B, n = sizes.b
    res, probs = r.compare([cpu, "eager"], B, n, "forward")
    if res:
        ratio = res["eager"][0].median / res[cpu][0].median
        crit.append(Criterion("b1", f"eager fwd time / cpu fwd time (B={B}, n={n})", ratio, 1.0,
                              _verdict(ratio, 1.0, probs, quick), _detail(res, sc.effective_flops(B, n, D, "forward"))))
        mem = res["eager"][1] / max(res[cpu][1], 1)
        crit.append(Criterion("b2", f"eager peak extra / cpu peak extra (B={B}, n={n})", mem, 10.0,
                              _verdict(mem, 10.0, probs, quick),
                              f"{cpu} {sc.fmt_bytes(res[cpu][1])}, eager {sc.fmt_bytes(res['eager'][1])}"))
    else:
        crit += [Criterion(k, t, None, tg, "FAIL (wrong)", "; ".join(probs))
                 for k, t, tg in (("b1", "eager / cpu fwd time", 1.0), ("b2", "eager / cpu peak extra", 10.0))]
    log(crit[-1].detail)

    # (c) forward+backward (x and sigma) vs eager autograd; target: cpu <= 1.3 x eager.
    B, n = sizes.c
    # The fused kernel keeps the distances for its backward at this size; timed beside it, the same
    # kernel recomputing them (for the record, not part of the criterion).
    res, probs = r.compare([cpu, r.recomputed, "eager"], B, n, "forward+backward")
    if res:
        ratio = 1.3 * res["eager"][0].median / res[cpu][0].median  # >= 1 means within 1.3x
        crit.append(Criterion("c", f"1.3 x eager fwd+bwd time / cpu fwd+bwd time (B={B}, n={n})", ratio, 1.0,
                              _verdict(ratio, 1.0, probs, quick),
                              _detail(res, sc.effective_flops(B, n, D, "forward+backward"))
                              + (("; " + "; ".join(probs)) if probs else "")))
    else:
        crit.append(Criterion("c", "1.3 x eager fwd+bwd / cpu fwd+bwd", None, 1.0, "FAIL (wrong)", "; ".join(probs)))
    log(crit[-1].detail)

    # (d) against the authors' broadcast formula and KeOps.
    for key, peer, (B, n), target in (("d1", "authors-broadcast", sizes.d1, 100.0), ("d2", "pykeops", sizes.d2, 10.0)):
        if r.methods[peer].unavailable:
            crit.append(Criterion(key, f"{peer} time / cpu time (B={B}, n={n})", None, target,
                                  f"n/a: pykeops {r.methods[peer].unavailable}", ""))
            continue
        res, probs = r.compare([cpu, peer], B, n, "forward")
        if res:
            ratio = res[peer][0].median / res[cpu][0].median
            crit.append(Criterion(key, f"{peer} time / cpu time (B={B}, n={n})", ratio, target,
                                  _verdict(ratio, target, probs, quick),
                                  _detail(res, sc.effective_flops(B, n, D, "forward"))))
        else:
            crit.append(Criterion(key, f"{peer} / cpu", None, target, "FAIL (wrong)", "; ".join(probs)))
        log(crit[-1].detail)
    info["load_end"] = sc.load_average()
    info["gates"] = r.gates
    return crit, info


def format_table(crit: list[Criterion], info: dict) -> str:
    env = info["env"]
    lines = [
        f"Speed targets of the fused CPU stable-target kernel{' (--quick)' if info.get('quick') else ''}, float32, "
        f"D={info.get('D', D)}: {env['device_name']}, torch {env['torch']}, "
        f"cdm_kernels {env['cdm_kernels']}, pykeops {env['pykeops']}",
        f"load average at start {info['load_start']}, at end {info['load_end']}; matmul {info['matmul']}",
        "",
        "| criterion | measured ratio | target | verdict | times (median [IQR]) and peak extra memory |",
        "|---|---|---|---|---|",
    ]
    for c in crit:
        ratio = "-" if c.ratio is None else f"{c.ratio:.3f}"
        lines.append(f"| ({c.key}) {c.text} | {ratio} | >= {c.target:g} | {c.verdict} | {c.detail} |")
    lines += ["", "Correctness gate (float64 judge, B=8, n=300, sigma in [0.5, 80]):"]
    for (name, p), g in info["gates"].items():
        lines.append(f"  {name:22s} {p:17s} {'ok   ' if g.ok else 'WRONG'} {g.detail}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sc.add_quick_and_out(ap, "stf_cpu_targets", "the criteria on small shapes: checks the script in seconds, "
                         "measures nothing")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per method (median), after a warm-up")
    ap.add_argument("--time-wrong", action="store_true", help="time methods that fail the float64 gate anyway")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a criterion fails (not with --quick)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {a.repeats}")
    crit, info = run(a.repeats, a.time_wrong, log=lambda s: print(s, flush=True),
                     sizes=QUICK_SIZES if a.quick else TARGET_SIZES)
    table = format_table(crit, info)
    print()
    print(table)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "stf_cpu_targets.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(a.out, "stf_cpu_targets.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["criterion", "text", "ratio", "target", "verdict", "detail", "device_name", "torch",
                    "load_start", "load_end"])
        for c in crit:
            w.writerow([c.key, c.text, "" if c.ratio is None else f"{c.ratio:.4f}", c.target, c.verdict,
                        c.detail, info["env"]["device_name"], info["env"]["torch"], info["load_start"],
                        info["load_end"]])
    print(f"results in {os.path.abspath(a.out)}")
    failed = [c for c in crit if not c.verdict.startswith(("PASS", "n/a"))]
    return 1 if (a.strict and not a.quick and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
