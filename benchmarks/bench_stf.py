"""The stable-target sweep against the peers a user would pick instead: throughput and peak extra
memory against the reference-batch size n, for this library's backends and its peers, forward and
forward+backward.

    python -m benchmarks.bench_stf --quick            # reduced sweep, well under a minute (or: python benchmarks/bench_stf.py)
    python -m benchmarks.bench_stf --budget 1 --out benchmarks/results   # the full sweep, into the committed results

For each D in --dims and B in --batches, n doubles from --n-min to --n-max. Before any timing every
method is compared with a float64 judge on a small case (stf_common.run_gate); a method that
disagrees is reported as "wrong" and never timed. A call whose predicted memory (inputs + the
method's model of its peak extra memory) exceeds --mem-limit-gb is refused as "OOM (needs X)"; a
method whose median call exceeds --budget seconds stops growing n ("skipped: time budget"); this
library's own methods (cdm_kernels[...]) have their own, larger --library-budget, so that their rows
reach n = 1M where memory allows (they are what a user compares the peers with).

Outputs in --out (default out/benchmarks/bench_stf in the checkout, which git ignores; the committed
results in benchmarks/results/ change only when --out names that folder): stf_bench.csv (one row per
(pass, D, B, n, method), device and versions in every row), stf_gate.csv, stf_bench.md (tables),
stf_throughput.png and stf_memory.png (log-log, one line per method), stf_command.txt. pykeops is
used when importable; otherwise its rows say "not installed".
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field

if __package__ in (None, ""):  # run as `python benchmarks/bench_stf.py`: the checkout's packages, as -m
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import stf_common as sc  # noqa: E402
from cdm_kernels.progress import progress as progress_display  # noqa: E402

CSV_FIELDS = [
    "timestamp", "device", "device_name", "torch", "triton", "pykeops", "cdm_kernels", "extension", "python",
    "threads", "dtype", "pass", "method", "B", "n", "D", "status", "median_s", "q25_s", "q75_s", "min_s",
    "max_s", "repeats", "samples_per_s", "gflops", "ceiling", "ceiling_value", "frac_of_ceiling",
    "frac_of_matmul", "matmul_gflops", "copy_gbps", "peak_extra_bytes", "predicted_extra_bytes", "mem_method",
]
GATE_FIELDS = ["device", "method", "D", "pass", "verdict", "detail"]


@dataclass
class SweepConfig:
    """The sweep, declared as data."""

    dims: tuple[int, ...] = (3072, 12288)
    batches: tuple[int, ...] = (64, 256)
    n_min: int = 256
    n_max: int = 1 << 20
    passes: tuple[str, ...] = sc.PASSES
    budget_s: float = 1.0  # per-call time budget (median); a method stops growing n past it
    library_budget_s: float = 6.0  # the same for this library's methods (cdm_kernels[...])
    target_s: float = 1.0  # repeats continue while their total stays under this
    mem_limit_gb: float = 16.0  # GiB: inputs + predicted extra memory of one call
    methods: tuple[str, ...] | None = None  # None: all
    device: str = "cpu"
    out: str = field(default_factory=lambda: sc.default_out("bench_stf"))
    time_wrong: bool = False  # time methods that failed the gate anyway (still marked wrong)
    quick: bool = False

    def ns(self) -> list[int]:
        out, n = [], self.n_min
        while n <= self.n_max:
            out.append(n)
            n *= 2
        return out


QUICK = dict(dims=(1024,), batches=(16,), n_min=256, n_max=1024, budget_s=0.1, library_budget_s=0.1, target_s=0.1,
             mem_limit_gb=0.15)


def default_mem_limit_gb() -> float:
    # 70% of what the machine has free now, at most 16 GiB: enough for n = 1M references at D = 3072
    # (12 GiB) on a 24 GiB machine, with room for the process and whatever else runs.
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return min(16.0, 0.7 * avail_kb / (1 << 20))
    except (OSError, StopIteration, ValueError):
        return 8.0


def select_methods(cfg: SweepConfig, methods: list[sc.Method] | None = None) -> list[sc.Method]:
    methods = sc.all_methods(cfg.device) if methods is None else methods
    if cfg.methods:
        unknown = set(cfg.methods) - {m.name for m in methods}
        if unknown:
            raise ValueError(f"--methods: unknown {sorted(unknown)}; known: {[m.name for m in methods]}")
        methods = [m for m in methods if m.name in cfg.methods]
    return methods


def run_sweep(cfg: SweepConfig, methods: list[sc.Method] | None = None, progress: bool = True) -> dict:
    """Runs the sweep and writes every output into cfg.out; returns paths and rows."""
    os.makedirs(cfg.out, exist_ok=True)
    methods = select_methods(cfg, methods)
    env = sc.environment(cfg.device)
    ceil = sc.measure_ceilings(cfg.device, quick=cfg.quick)
    limit = cfg.mem_limit_gb * (1 << 30)
    mem_method = sc.MEM_METHOD_CUDA if torch.device(cfg.device).type == "cuda" else sc.MEM_METHOD_CPU
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_start = sc.load_average("/")
    base = {**env, "timestamp": stamp, "dtype": "float32", "matmul_gflops": f"{ceil.matmul_gflops:.1f}",
            "copy_gbps": f"{ceil.copy_gbps:.1f}", "mem_method": mem_method}

    csv_path = os.path.join(cfg.out, "stf_bench.csv")
    gate_path = os.path.join(cfg.out, "stf_gate.csv")
    rows: list[dict] = []
    gates: list[sc.GateResult] = []
    total = len(cfg.dims) * len(cfg.batches) * len(cfg.ns()) * len(methods) * len(cfg.passes)
    bar = progress_display(total, desc="stf sweep", unit="cases", disable=not progress)

    with open(csv_path, "w", newline="") as fcsv:
        writer = csv.DictWriter(fcsv, fieldnames=CSV_FIELDS)
        writer.writeheader()

        def emit(row: dict) -> None:
            row = {**dict.fromkeys(CSV_FIELDS, ""), **base, **row}
            writer.writerow(row)
            fcsv.flush()  # a sweep stopped half-way keeps what it measured
            rows.append(row)
            bar.update(1)

        for D in cfg.dims:
            # The gate: once per (method, D, pass), before anything is timed at this D.
            verdict: dict[tuple[str, str], str] = {}
            for m in methods:
                for p in cfg.passes:
                    bar.set_postfix_str(f"gate {m.name} D={D} {p}")
                    if m.unavailable:
                        verdict[(m.name, p)] = m.unavailable
                        continue
                    g = sc.run_gate(m, D, p, cfg.device)
                    gates.append(g)
                    verdict[(m.name, p)] = "ok" if g.ok else f"wrong: {g.detail}"
            for B in cfg.batches:
                done: dict[tuple[str, str], str] = {}  # (method, pass) -> status of every later n
                for key, v in verdict.items():
                    if v != "ok" and not (cfg.time_wrong and v.startswith("wrong")):
                        done[key] = v
                for n in cfg.ns():
                    need_inputs = sc.input_bytes(B, n, D)
                    if need_inputs > limit:
                        for key in [(m.name, p) for m in methods for p in cfg.passes]:
                            done.setdefault(key, f"skipped: inputs need {sc.fmt_bytes(need_inputs)}")
                    live = [(m, p) for m in methods for p in cfg.passes if (m.name, p) not in done]
                    inp = sc.make_inputs(B, n, D, cfg.device, seed=n) if live else None
                    for m in methods:
                        prep = m.prepare(inp.ref, inp.ref_sqnorm) if inp is not None and any(
                            mm is m for mm, _ in live) else None
                        for p in cfg.passes:
                            key = (m.name, p)
                            shape = {"pass": p, "method": m.name, "B": B, "n": n, "D": D}
                            if key in done:
                                # Where a method would run out of memory is recorded even past its
                                # time budget: that is the point of the broadcast's rows.
                                oom = oom_status(m, B, n, D, p, limit)
                                status = oom if oom and done[key].startswith(("skipped: time", "OOM")) else done[key]
                                emit({**shape, "status": status})
                                continue
                            bar.set_postfix_str(f"{m.name} {p} D={D} B={B} n={n}")
                            emit({**shape, **measure_one(m, inp, prep, p, cfg, ceil, limit,
                                                         wrong=verdict[key] != "ok")})
                            status = rows[-1]["status"]
                            if status.startswith("OOM"):
                                done[key] = status  # a larger n needs more still
                            elif status.startswith("error"):
                                done[key] = "skipped: error at a smaller n"
                            elif rows[-1]["median_s"] and float(rows[-1]["median_s"]) > budget_of(m, cfg):
                                done[key] = f"skipped: time budget ({budget_of(m, cfg):g} s/call exceeded at n={n})"
                        del prep
                    del inp  # once every method has stopped, later n are recorded without inputs
    bar.close()

    with open(gate_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=GATE_FIELDS)
        w.writeheader()
        for g in gates:
            w.writerow({"device": env["device_name"], "method": g.method, "D": g.D, "pass": g.pass_name,
                        "verdict": "ok" if g.ok else "wrong", "detail": g.detail})
    md_path = os.path.join(cfg.out, "stf_bench.md")
    load_end = sc.load_average("/")
    env = {**env, "started": stamp, "load": f"{load_start} at the start, {load_end} at the end"}
    write_markdown(md_path, rows, gates, methods, env, ceil, cfg)
    plots = write_plots(cfg.out, rows, methods, env)
    return {"csv": csv_path, "gate": gate_path, "md": md_path, "plots": plots, "rows": rows, "gates": gates,
            "ceilings": ceil}


def budget_of(m: sc.Method, cfg: SweepConfig) -> float:
    return cfg.library_budget_s if m.name.startswith("cdm_kernels[") else cfg.budget_s


def oom_status(m: sc.Method, B: int, n: int, D: int, p: str, limit: float) -> str | None:
    """'OOM (needs X)' when the inputs plus the method's predicted extra memory exceed the limit."""
    need = sc.input_bytes(B, n, D) + m.extra_bytes(B, n, D, p == "forward+backward")
    return f"OOM (needs {sc.fmt_bytes(need)})" if need > limit else None


def measure_one(m: sc.Method, inp: sc.Inputs, prep, p: str, cfg: SweepConfig, ceil: sc.Ceilings, limit: float,
                wrong: bool) -> dict:
    B, D = inp.x.shape
    n = inp.ref.shape[0]
    predicted = m.extra_bytes(B, n, D, p == "forward+backward")
    oom = oom_status(m, B, n, D, p, limit)
    if oom:
        return {"status": oom, "predicted_extra_bytes": int(predicted)}
    call = sc.make_call(m, inp, prep, p)
    try:
        # The memory call doubles as the warm-up; its profiler overhead is never timed.
        peak = sc.peak_extra_bytes(call, cfg.device)
        t = sc.time_call(call, cfg.device, target_s=cfg.target_s, warmup=False)
    except (RuntimeError, MemoryError) as exc:  # a real out-of-memory or a kernel refusing a shape
        return {"status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                "predicted_extra_bytes": int(predicted)}
    flops = sc.effective_flops(B, n, D, p)
    bound, cval, frac = sc.roofline(flops, m.traffic_bytes(B, n, D, p == "forward+backward"), t.median, ceil)
    gflops = flops / t.median / 1e9
    return {
        "status": "wrong (timed on request)" if wrong else "ok",
        "median_s": f"{t.median:.6g}", "q25_s": f"{t.q25:.6g}", "q75_s": f"{t.q75:.6g}",
        "min_s": f"{t.min:.6g}", "max_s": f"{t.max:.6g}", "repeats": t.repeats,
        "samples_per_s": f"{B / t.median:.6g}", "gflops": f"{gflops:.4g}", "ceiling": bound,
        "ceiling_value": f"{cval:.1f}", "frac_of_ceiling": f"{frac:.4f}",
        "frac_of_matmul": f"{gflops / ceil.matmul_gflops:.4f}",
        "peak_extra_bytes": int(peak), "predicted_extra_bytes": int(predicted),
    }


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def _cell(row: dict) -> str:
    if row["status"].startswith("ok") or row["status"].startswith("wrong (timed"):
        mark = "" if row["status"] == "ok" else " (WRONG)"
        mem = sc.fmt_bytes(float(row["peak_extra_bytes"]))
        return f"{float(row['gflops']):.3g} ({float(row['frac_of_ceiling']):.0%} {row['ceiling'][0]}), {mem}{mark}"
    s = row["status"]
    if s.startswith("skipped: time budget"):
        return "budget"
    if s.startswith("wrong"):
        return "wrong"
    return s.replace("|", "/")[:40]


def write_markdown(path: str, rows: list[dict], gates: list[sc.GateResult], methods: list[sc.Method], env: dict,
                   ceil: sc.Ceilings, cfg: SweepConfig) -> None:
    names = [m.name for m in methods]
    lines = [
        "# Stable target: throughput and peak extra memory against n",
        "",
        f"Device: **{env['device_name']}**; torch {env['torch']}, triton {env['triton']}, pykeops {env['pykeops']}, "
        f"cdm_kernels {env['cdm_kernels']} (extension {env['extension']}), python {env['python']}, "
        f"{env['threads']} threads. float32. Started {env['started']}; load average (1/5/15 min) "
        f"{env['load']}.",
        "",
        f"Ceilings measured in this run: float32 2048^3 matmul **{ceil.matmul_gflops:.1f} GFLOP/s**; "
        f"tensor copy **{ceil.copy_gbps:.1f} GB/s** (read + write).",
        "",
        f"Per-call time budget {cfg.budget_s:g} s (median; {cfg.library_budget_s:g} s for cdm_kernels[...]), "
        f"memory limit {cfg.mem_limit_gb:.1f} GiB "
        "(inputs + predicted extra). Cells: effective GFLOP/s (forward 4BnD, forward+backward 8BnD per "
        "call), its fraction of the binding ceiling (c = compute, b = bandwidth), peak extra memory. "
        "`budget` = stopped growing n after a call exceeded the time budget.",
        "",
        "## Correctness gate (float64 judge, B=8, n=300, sigma in [0.5, 80])",
        "",
        "| method | D | pass | verdict | relative error (tolerance) |",
        "|---|---|---|---|---|",
    ]
    for g in gates:
        lines.append(f"| {g.method} | {g.D} | {g.pass_name} | {'ok' if g.ok else '**wrong**'} | {g.detail} |")
    for m in methods:
        if m.unavailable:
            lines.append(f"| {m.name} | all | all | {m.unavailable} | |")
    by = {}
    for r in rows:
        by.setdefault((r["pass"], int(r["D"]), int(r["B"])), {}).setdefault(int(r["n"]), {})[r["method"]] = r
    for (p, D, B), table in by.items():
        lines += ["", f"## {p}, D = {D}, B = {B}", "", "| n | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for n in sorted(table):
            cells = [_cell(table[n][name]) if name in table[n] else "" for name in names]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Methods", ""] + [f"- **{m.name}**: {m.description}" for m in methods]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plots(out: str, rows: list[dict], methods: list[sc.Method], env: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["pass"], int(r["D"]), int(r["B"])) for r in rows}, key=lambda k: (sc.PASSES.index(k[0]),
                                                                                           k[1], k[2]))
    passes = [p for p in sc.PASSES if any(k[0] == p for k in panels)]
    shapes = sorted({(D, B) for _, D, B in panels})
    paths = []
    for what, column, ylabel in (("throughput", "samples_per_s", "samples / s"),
                                ("memory", "peak_extra_bytes", "peak extra memory (bytes)")):
        width = max(4.2 * len(shapes), 8.0)  # room for the legend even with one panel per row
        fig, axes = plt.subplots(len(passes), len(shapes), figsize=(width, 3.6 * len(passes)), squeeze=False)
        for i, p in enumerate(passes):
            for j, (D, B) in enumerate(shapes):
                ax = axes[i][j]
                for k, m in enumerate(methods):
                    pts = sorted((int(r["n"]), float(r[column])) for r in rows
                                 if r["method"] == m.name and r["pass"] == p and int(r["D"]) == D
                                 and int(r["B"]) == B and r.get(column) not in (None, "") and float(r[column]) > 0)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", ms=3, label=m.name, color=f"C{k}")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{p}, D={D}, B={B}", fontsize=9)
                ax.set_xlabel("references n")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
        handles = {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        if handles:
            fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), int(width // 2.2)),
                       fontsize=8)
        fig.suptitle(f"stable target, float32, {env['device_name']}", fontsize=10)
        fig.tight_layout(rect=(0, 0.08, 1, 0.96))
        path = os.path.join(out, f"stf_{what}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_quick_and_out(ap, "bench_stf", "reduced sweep (D=1024, B=16, n=256..1024), under a minute")
    ap.add_argument("--dims", type=int, nargs="+", help="D values (default 3072 12288)")
    ap.add_argument("--batches", type=int, nargs="+", help="B values (default 64 256)")
    ap.add_argument("--n-min", type=int)
    ap.add_argument("--n-max", type=int)
    ap.add_argument("--passes", nargs="+", choices=sc.PASSES)
    ap.add_argument("--budget", type=float, help="per-call time budget in seconds (default 1)")
    ap.add_argument("--library-budget", type=float, help="the same for cdm_kernels[...] methods (default 6)")
    ap.add_argument("--target", type=float, help="seconds of repeats per point (default 1)")
    ap.add_argument("--mem-limit-gb", type=float, help="GiB per call, inputs included (default: min(16, 70%% of free))")
    ap.add_argument("--methods", nargs="+", help="subset of method names")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--time-wrong", action="store_true", help="also time methods that fail the gate (marked)")
    return ap


def parse_args(argv=None) -> SweepConfig:
    a = build_parser().parse_args(argv)
    kw = dict(QUICK) if a.quick else {"mem_limit_gb": default_mem_limit_gb()}
    for name, value in (("dims", a.dims), ("batches", a.batches), ("n_min", a.n_min), ("n_max", a.n_max),
                        ("passes", a.passes), ("budget_s", a.budget), ("library_budget_s", a.library_budget),
                        ("target_s", a.target),
                        ("mem_limit_gb", a.mem_limit_gb), ("methods", a.methods)):
        if value is not None:
            kw[name] = tuple(value) if isinstance(value, list) else value
    for name in ("n_min", "n_max"):
        if name in kw and kw[name] < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {kw[name]}")
    return SweepConfig(**kw, device=a.device, out=a.out, time_wrong=a.time_wrong, quick=a.quick)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    cmd = "python -m benchmarks.bench_stf " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    res = run_sweep(cfg)
    with open(os.path.join(cfg.out, "stf_command.txt"), "w") as f:
        f.write(cmd + "\n" + repr(asdict(cfg)) + "\n")
    ok = sum(r["status"] == "ok" for r in res["rows"])
    print(f"{len(res['rows'])} rows ({ok} timed), gate: "
          f"{sum(g.ok for g in res['gates'])}/{len(res['gates'])} ok; ceilings "
          f"{res['ceilings'].matmul_gflops:.1f} GFLOP/s, {res['ceilings'].copy_gbps:.1f} GB/s")
    for path in (res["csv"], res["gate"], res["md"], *res["plots"]):
        print("wrote", path)
    print(f"results in {os.path.abspath(cfg.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
