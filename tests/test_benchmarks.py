"""The benchmarks' machinery: every benchmark's --quick mode runs in a clone of the repository, as
`python -m benchmarks.X` and as `python benchmarks/X.py`, and leaves the clone's git status clean
(its outputs go to the ignored out/ folder, never over the committed benchmarks/results/); the
--quick sweep's outputs are complete and well formed, the float64 correctness gate rejects wrong
methods (and they are never timed), the memory refusal and the time budget work, the peak-memory
measurement sees what a call allocates. No speed is asserted."""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from benchmarks import bench_stf, stf_common as sc
from benchmarks.stf_cpu_targets import Runner, _verdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Every benchmark in a clone, as a user would start it (subprocesses through the command line)
# ----------------------------------------------------------------------------------------------


def _git(cwd, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh git repository holding this working tree as it is (tracked files and the untracked ones
    git does not ignore) plus the built extension, committed: what a user's clone looks like."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    dst = tmp_path_factory.mktemp("clone")
    names = _git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    extension = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "cdm_kernels", "_C*.so"))]
    for name in [n for n in names if n] + extension:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(dst / name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), dst / name)
    _git(dst, "init", "-q")
    _git(dst, "add", "-A")
    _git(dst, "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-q", "-m", "clone")
    assert _git(dst, "status", "--porcelain", "--untracked-files=all") == ""
    return dst


def _in_clone(clone, *args, timeout=600):
    """`python *args` in the clone, importing only the clone's packages; returns its stdout."""
    env = dict(os.environ, PYTHONPATH=str(clone))
    proc = subprocess.run([sys.executable, *args], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args}: " + proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "\r" not in proc.stderr  # progress in a log: lines, not a bar
    return proc.stdout


def _benchmark_scripts(root) -> list[str]:
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "benchmarks", "*.py"))
                  if 'if __name__ == "__main__":' in open(p).read())


@pytest.fixture(scope="module")
def quick_run(clone):
    # As the README says, without --out: the results go to the ignored out/benchmarks/bench_stf.
    stdout = _in_clone(clone, "-m", "benchmarks.bench_stf", "--quick")
    out = clone / "out" / "benchmarks" / "bench_stf"
    assert f"results in {out}" in stdout
    assert _git(clone, "status", "--porcelain", "--untracked-files=all") == ""
    with open(out / "stf_bench.csv") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    with open(out / "stf_gate.csv") as f:
        gates = list(csv.DictReader(f))
    # The methods as the benchmark's own process sees them (the test process may register more
    # backends, e.g. an emulation for the tests alone): (name, why unavailable or None).
    methods = json.loads(_in_clone(clone, "-c", "import json; from benchmarks import stf_common as sc; "
                                   "print(json.dumps([[m.name, m.unavailable] for m in sc.all_methods('cpu')]))"))
    return {"out": out, "header": header, "rows": rows, "gates": gates, "stdout": stdout, "methods": methods}


def test_every_benchmark_runs_both_ways_and_leaves_the_clone_clean(clone, quick_run):
    # bench_stf's and bench_rollout's quick runs have their own tests, and objectives' --quick trains
    # eight networks for minutes (tests/test_objectives.py runs it at tiny sizes); every other
    # script's --quick runs here as `python benchmarks/X.py`, and each one's --help the other way
    # (`-m` for those).
    scripts = _benchmark_scripts(clone)
    assert {"bench_stf", "bench_rollout", "stf_cpu_targets", "stf_precision_table"} <= set(scripts)
    for name in scripts:
        if name not in ("bench_stf", "bench_rollout", "objectives"):
            _in_clone(clone, os.path.join("benchmarks", name + ".py"), "--quick", timeout=300)
        form = [os.path.join("benchmarks", name + ".py")] if name == "bench_stf" else ["-m", "benchmarks." + name]
        assert "--quick" in _in_clone(clone, *form, "--help"), name
    assert _git(clone, "status", "--porcelain", "--untracked-files=all") == ""
    written = sorted(os.listdir(clone / "out" / "benchmarks"))
    assert "stf_cpu_targets" in written
    assert os.path.getsize(clone / "out" / "benchmarks" / "stf_cpu_targets" / "stf_cpu_targets.md") > 0
    # gpu_targets' diagnostic of the host's share: both ops, the public call above its launcher alone.
    md = (clone / "out" / "benchmarks" / "gpu_targets" / "gpu_targets.md").read_text()
    host = md.split("## Host time of a call")[1].split("## Verdicts")[0]
    for op in ("stf_target", "rollout_step (euler)"):
        public, launcher, own = (float(v) for v in host.split(f"| {op} | cpu | ")[1].split(" |\n")[0].split(" | "))
        assert 0 < launcher < public and own == pytest.approx(public - launcher, abs=0.11), (op, host)


def test_every_benchmark_takes_quick_and_out_with_the_same_default(tmp_path):
    # One command-line shape: every script's parser has --quick and --out, and without --out each
    # writes into out/benchmarks/<its name>, which git ignores (benchmarks/results/ only when asked).
    import importlib

    scripts = _benchmark_scripts(ROOT)
    assert len(scripts) >= 6, scripts
    for name in scripts:
        parser = importlib.import_module(f"benchmarks.{name}").build_parser()
        args = parser.parse_args(["--quick", "--out", str(tmp_path / name)])
        assert args.quick is True and args.out == str(tmp_path / name), name
        default = parser.parse_args([])
        assert default.quick is False and default.out == os.path.join(ROOT, "out", "benchmarks", name), name
    if shutil.which("git") is not None and os.path.exists(os.path.join(ROOT, ".git")):
        assert _git(ROOT, "check-ignore", "-q", os.path.join("out", "benchmarks", "x")) == ""  # ignored (else it raises)


def test_gpu_targets_cut_by_sigterm_writes_what_it_measured(tmp_path, monkeypatch):
    # scripts/gpu_check.sh bounds the run by `timeout`: a SIGTERM during the stable target's sizes
    # keeps the short stages measured before it (rollout steps, host time), says which stage was
    # cut, and exits 1.
    import signal

    from benchmarks import gpu_targets

    run = gpu_targets.run

    def cut(cfg, res, log=print):
        def log_then_term(msg):
            if msg.startswith("stable target 8, 256"):
                signal.raise_signal(signal.SIGTERM)

        return run(cfg, res, log_then_term)

    monkeypatch.setattr(gpu_targets, "run", cut)
    assert gpu_targets.main(["--quick", "--out", str(tmp_path)]) == 1
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    md = (tmp_path / "gpu_targets.md").read_text()
    assert "**Stopped early** (SIGTERM) during: stable target 8, 256, 64 forward." in md
    rollout = md.split("## Rollout steps: per-call time")[1].split("## Host time")[0]
    assert "| (16, 3, 16, 16) | euler |" in rollout and "| (16, 3, 16, 16) | martingale fwd+bwd |" in rollout
    assert "| stf_target | cpu |" in md.split("## Host time of a call")[1]
    assert "euler per call at (8, 3, 8, 8)" in md.split("## Verdicts")[1]
    with open(tmp_path / "gpu_targets.csv") as f:
        assert list(csv.DictReader(f)) == []  # no size of the stable target was finished
    assert (tmp_path / "gpu_targets.png").is_file()


def test_gpu_targets_pipeline_table_pairs_each_pipeline_row_with_its_default():
    from benchmarks import gpu_targets

    def row(method, ms, n=50000, passes="forward"):
        return {"method": method, "B": 512, "n": n, "D": 3072, "pass": passes, "ms": ms}

    rows = [row("cuda ieee", 8.0), row("cuda ieee pipeline", 6.4), row("cuda tf32 pipeline", 1.0),
            row("eager fp32", 6.7), row("cuda ieee", 9.0, passes="forward+backward"),
            {"method": "cuda ieee pipeline", "B": 512, "n": 50000, "D": 3072, "pass": "forward+backward",
             "status": "wrong"}]
    table = gpu_targets.pipeline_table(rows)
    assert table.splitlines()[2:] == ["| 512, 50000, 3072 | forward | ieee | 8.000 | 6.400 | 1.25x |"]
    assert gpu_targets.pipeline_table([row("cuda ieee", 8.0), row("eager fp32", 6.7)]) == ""


def test_quick_sweep_writes_every_output(quick_run):
    out = quick_run["out"]
    for name in ("stf_bench.csv", "stf_gate.csv", "stf_bench.md", "stf_throughput.png", "stf_memory.png",
                 "stf_command.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    from PIL import Image

    for name in ("stf_throughput.png", "stf_memory.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    md = (out / "stf_bench.md").read_text()
    assert "## Correctness gate" in md and "## forward, D = 1024, B = 16" in md
    assert "## forward+backward, D = 1024, B = 16" in md and "GFLOP/s" in md


def test_quick_sweep_csv_is_complete_and_consistent(quick_run):
    rows, cfg = quick_run["rows"], bench_stf.SweepConfig(**bench_stf.QUICK)
    assert quick_run["header"] == bench_stf.CSV_FIELDS
    methods = [name for name, _ in quick_run["methods"]]
    expected = {(p, m, n) for p in sc.PASSES for m in methods for n in cfg.ns()}
    got = [(r["pass"], r["method"], int(r["n"])) for r in rows]
    assert len(got) == len(set(got)) and set(got) == expected  # one row per case, none missing
    statuses = ("ok", "wrong", "OOM (needs ", "skipped: time budget", "not installed", "error: ")
    timed = 0
    for r in rows:
        assert r["device"] == "cpu" and r["device_name"] and r["torch"] == torch.__version__
        assert r["dtype"] == "float32" and int(r["D"]) == 1024 and int(r["B"]) == 16
        assert float(r["matmul_gflops"]) > 0 and float(r["copy_gbps"]) > 0
        assert r["status"].startswith(statuses), r["status"]
        if r["status"] != "ok":
            assert r["median_s"] == "", r  # nothing that is not ok carries a time
            continue
        timed += 1
        B, n, D = int(r["B"]), int(r["n"]), int(r["D"])
        med = float(r["median_s"])
        assert 0 < float(r["min_s"]) <= float(r["q25_s"]) <= med <= float(r["q75_s"]) <= float(r["max_s"])
        assert int(r["repeats"]) >= 3
        assert math.isclose(float(r["samples_per_s"]), B / med, rel_tol=1e-4)
        assert math.isclose(float(r["gflops"]), sc.effective_flops(B, n, D, r["pass"]) / med / 1e9, rel_tol=1e-3)
        assert r["ceiling"] in ("compute", "bandwidth") and float(r["frac_of_ceiling"]) > 0
        assert int(r["peak_extra_bytes"]) >= 4 * B * D  # at least the output mu (B, D) float32
    assert timed >= len(methods)  # the library's forward and the peers that pass were timed


def test_quick_sweep_refuses_the_broadcast_by_predicted_memory(quick_run):
    # 0.15 GiB limit: the (B, n, D) tensors of the authors' formula do not fit at n = 1024.
    rows = {(r["pass"], int(r["n"])): r for r in quick_run["rows"] if r["method"] == "authors-broadcast"}
    # Predicted: inputs + 3 B n D floats = 196.4 MiB, recorded even if the time budget stopped it first.
    assert rows[("forward", 1024)]["status"] == "OOM (needs 196.4 MiB)"
    assert rows[("forward+backward", 1024)]["status"] == "OOM (needs 260.4 MiB)"
    keops = [r for r in quick_run["rows"] if r["method"] == "pykeops"]
    try:
        import pykeops  # noqa: F401
    except ImportError:
        assert all(r["status"].startswith("not installed") for r in keops)


def test_quick_sweep_gate_covers_every_available_method(quick_run):
    gated = {(g["method"], g["pass"]) for g in quick_run["gates"]}
    for name, unavailable in quick_run["methods"]:
        if not unavailable:
            assert {(name, p) for p in sc.PASSES} <= gated
    eager = [g for g in quick_run["gates"] if g["method"] == "eager"]
    assert eager and all(g["verdict"] == "ok" for g in eager)


# ----------------------------------------------------------------------------------------------
# The correctness gate
# ----------------------------------------------------------------------------------------------


def _missing_norm(x, sigma, ref, ref_sqnorm, prep=None):
    # A plausible bug: the ||r||^2 / 2 term forgotten.
    return torch.softmax((x @ ref.T) / (sigma * sigma)[:, None], dim=1) @ ref


def _off_by_1e3(x, sigma, ref, ref_sqnorm, prep=None):
    return sc.eager_composition(x, sigma, ref, ref_sqnorm) * (1 + 1e-3)


def _sigma_detached(x, sigma, ref, ref_sqnorm, prep=None):
    # Right values, but no gradient flows to sigma (returns grad_sigma None).
    return sc.eager_composition(x, sigma.detach(), ref, ref_sqnorm)


def _method(name, fn, extra=lambda B, n, D, bw: 0.0):
    return sc.Method(name, name, fn, extra, lambda *a: 1.0)


@pytest.mark.parametrize("D", [64, 1000])
def test_gate_passes_correct_forms_and_rejects_wrong_ones(D):
    for fn in (sc.eager_composition, sc.chunked_loop, sc.authors_broadcast, sc.sdpa_augmented):
        m = sc.Method("m", "", fn, lambda *a: 0.0, lambda *a: 0.0,
                      prepare=sc._sdpa_prepare if fn is sc.sdpa_augmented else (lambda r, rn: None))
        for p in sc.PASSES:
            g = sc.run_gate(m, D, p)
            assert g.ok, (fn.__name__, p, g.detail)
    for fn in (_missing_norm, _off_by_1e3):
        g = sc.run_gate(_method("bad", fn), D, "forward")
        assert not g.ok and "mu" in g.detail, (fn.__name__, g.detail)
    assert sc.run_gate(_method("nosig", _sigma_detached), D, "forward").ok
    g = sc.run_gate(_method("nosig", _sigma_detached), D, "forward+backward")
    assert not g.ok and "grad_sigma" in g.detail


def test_gate_reports_a_method_that_raises():
    def boom(*a):
        raise RuntimeError("kernel refused the shape")

    g = sc.run_gate(_method("boom", boom), 64, "forward")
    assert not g.ok and "RuntimeError: kernel refused the shape" in g.detail


def test_judge_is_the_definition():
    # The judge against a literal double loop over the definition (docs/math.md section 1).
    inp = sc.make_inputs(3, 5, 4, seed=7)
    mu = sc.judge_float64(inp.x, inp.sigma, inp.ref)
    x, s, r = inp.x.double(), inp.sigma.double(), inp.ref.double()
    for i in range(3):
        logits = [-float(((x[i] - r[j]) ** 2).sum()) / (2 * float(s[i]) ** 2) for j in range(5)]
        m = max(logits)
        w = [math.exp(v - m) for v in logits]
        want = sum(wj * r[j] for j, wj in enumerate(w)) / sum(w)
        torch.testing.assert_close(mu[i], want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# The sweep's bookkeeping: wrong methods untimed, memory refusal, time budget
# ----------------------------------------------------------------------------------------------


def _tiny_sweep(tmp_path, methods, **kw):
    cfg = bench_stf.SweepConfig(dims=(64,), batches=(4,), n_min=256, n_max=512, passes=("forward",),
                                budget_s=60.0, target_s=0.01, mem_limit_gb=1.0, out=str(tmp_path), quick=True, **kw)
    return bench_stf.run_sweep(cfg, methods=methods, progress=False)


def test_sweep_never_times_a_wrong_method(tmp_path):
    calls = {"n": 0}

    def counting_wrong(x, sigma, ref, ref_sqnorm, prep=None):
        calls["n"] += 1
        return _missing_norm(x, sigma, ref, ref_sqnorm)

    eager = _method("eager", sc.eager_composition)
    res = _tiny_sweep(tmp_path, [eager, _method("bad", counting_wrong)])
    bad = [r for r in res["rows"] if r["method"] == "bad"]
    assert len(bad) == 2 and all(r["status"].startswith("wrong: mu") and r["median_s"] in ("", None) for r in bad)
    assert calls["n"] == 1  # the gate's call only
    assert all(r["status"] == "ok" for r in res["rows"] if r["method"] == "eager")
    assert "| bad | 64 | forward | **wrong** |" in open(res["md"]).read()


def test_sweep_refuses_by_predicted_memory_without_calling(tmp_path):
    calls = {"n": 0}

    def counting(x, sigma, ref, ref_sqnorm, prep=None):
        calls["n"] += 1
        return sc.eager_composition(x, sigma, ref, ref_sqnorm)

    # Right (passes the gate), but predicts 2 GiB per call at n = 256 (4 GiB at 512) against 1 GiB:
    # every row states what that n would need.
    res = _tiny_sweep(tmp_path, [_method("big", counting, extra=lambda B, n, D, bw: n / 128 * (1 << 30))])
    assert [r["status"] for r in res["rows"]] == ["OOM (needs 2.0 GiB)", "OOM (needs 4.0 GiB)"]
    assert calls["n"] == 1  # the gate's call only


def test_sweep_stops_growing_n_past_the_time_budget(tmp_path):
    res = _tiny_sweep(tmp_path, [_method("eager", sc.eager_composition)], time_wrong=False)
    assert all(r["status"] == "ok" for r in res["rows"])
    cfg = bench_stf.SweepConfig(dims=(64,), batches=(4,), n_min=256, n_max=1024, passes=("forward",),
                                budget_s=1e-9, target_s=0.0, mem_limit_gb=1.0, out=str(tmp_path), quick=True)
    rows = bench_stf.run_sweep(cfg, methods=[_method("eager", sc.eager_composition)], progress=False)["rows"]
    assert [r["status"][:20] for r in rows] == ["ok", "skipped: time budget", "skipped: time budget"]


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench_stf.parse_args(["--n-min", "0"])
    with pytest.raises(ValueError, match=r"--methods: unknown \['nope'\]"):
        bench_stf.select_methods(bench_stf.SweepConfig(methods=("nope",)))


# ----------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------


def test_peak_extra_memory_sees_allocations():
    nbytes = sc.peak_extra_bytes(lambda: torch.empty(1000, 1000))
    assert nbytes == 4_000_000
    # (a few bytes beyond: the scalar 2 is wrapped into a tensor)

    def two_temporaries():
        a = torch.ones(500, 1000)
        b = a * 2  # both alive: 4 MB
        del a, b
        return torch.empty(10)

    assert 4_000_000 <= sc.peak_extra_bytes(two_temporaries) <= 4_000_000 + 64


@pytest.mark.parametrize("backward", [False, True])
def test_broadcast_memory_model_bounds_the_measurement(backward):
    # The refusal relies on the authors' formula's memory model: it must not under-predict.
    B, n, D = 4, 256, 64
    inp = sc.make_inputs(B, n, D)
    m = next(m for m in sc.all_methods() if m.name == "authors-broadcast")
    call = sc.make_call(m, inp, None, "forward+backward" if backward else "forward")
    measured = sc.peak_extra_bytes(call)
    predicted = m.extra_bytes(B, n, D, backward)
    assert 0.6 * predicted <= measured <= 1.05 * predicted, (measured, predicted)


def test_timers_report_ordered_statistics():
    t = sc.time_call(lambda: torch.ones(100).sum(), target_s=0.01)
    assert t.repeats >= 3 and t.min <= t.q25 <= t.median <= t.q75 <= t.max and t.first > 0
    a, b = sc.time_interleaved([lambda: torch.ones(10), lambda: torch.ones(20)], repeats=4)
    assert a.repeats == b.repeats == 4


def test_roofline_picks_the_binding_ceiling():
    ceil = sc.Ceilings(matmul_gflops=100.0, copy_gbps=10.0)
    assert sc.roofline(1e9, 1e6, 0.02, ceil) == ("compute", 100.0, pytest.approx(0.5))
    assert sc.roofline(1e6, 1e9, 0.2, ceil) == ("bandwidth", 10.0, pytest.approx(0.5))


# ----------------------------------------------------------------------------------------------
# stf_cpu_targets' building blocks (the full run takes minutes at the targets' shapes)
# ----------------------------------------------------------------------------------------------


def test_targets_runner_compares_and_flags_wrong_methods():
    r = Runner(repeats=2, time_wrong=False)
    r.methods["bad"] = _method("bad", _missing_norm)
    a = torch.randn(64, 64)
    res, problems = r.compare(["cdm_kernels[reference]", "eager"], 8, 512, "forward", extra={"mm": lambda: a @ a})
    assert not problems and set(res) == {"cdm_kernels[reference]", "eager", "mm"}
    assert res["mm"][1] == 64 * 64 * 4  # its output
    for name in ("cdm_kernels[reference]", "eager"):
        t, peak = res[name]
        assert t.repeats == 2 and t.median > 0 and peak >= 4 * 8 * 3072  # at least mu (B, D)
    res, problems = r.compare(["eager", "bad"], 8, 512, "forward")
    assert res is None and problems and problems[0].startswith("bad WRONG vs float64")
    assert _verdict(1.2, 1.0, []) == "PASS" and _verdict(0.9, 1.0, []) == "FAIL"
    assert _verdict(2.0, 1.0, ["x"]) == "FAIL (wrong)"


# ----------------------------------------------------------------------------------------------
# bench_rollout (the rollout steps' speed targets): the --quick run as a user would start it
# ----------------------------------------------------------------------------------------------


def test_rollout_bench_quick_writes_checked_complete_rows(clone):
    from benchmarks import bench_rollout as br

    # As a script, without --out: the results go to the ignored out/benchmarks/bench_rollout.
    stdout = _in_clone(clone, os.path.join("benchmarks", "bench_rollout.py"), "--quick", "--no-progress")
    out = clone / "out" / "benchmarks" / "bench_rollout"
    assert f"results in {out}" in stdout
    assert _git(clone, "status", "--porcelain", "--untracked-files=all") == ""
    for name in ("rollout_bench.csv", "rollout_bench.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "rollout_bench.csv") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    assert header == br.CSV_FIELDS
    cfg = br.Config(**br.QUICK)
    targets = {m.name: m.target for m in br.all_methods()}
    shapes = ["x".join(map(str, s)) for s in cfg.shapes()]
    assert sorted((r["shape"], r["method"]) for r in rows) == sorted((s, m) for s in shapes for m in targets)
    for r in rows:
        # Every method passed its correctness check against float64 and was timed.
        assert r["check"] == "ok", (r["method"], r["check_detail"])
        assert r["device"] == "cpu" and r["device_name"] and r["torch"] == torch.__version__
        assert r["dtype"] == "float32" and r["quick"] == "True" and r["backend"]
        n = math.prod(int(v) for v in r["shape"].split("x"))
        arrays = {"sde": 3, "noise": 1, "euler": 3, "heun": 5}[r["method"]]
        assert int(r["bytes"]) == arrays * 4 * n
        med = float(r["median_s"])
        assert 0 < float(r["q25_s"]) <= med <= float(r["q75_s"]) and int(r["repeats"]) == cfg.repeats
        assert math.isclose(float(r["iqr_s"]), float(r["q75_s"]) - float(r["q25_s"]), abs_tol=1e-6 * med)
        assert math.isclose(float(r["gbps"]), int(r["bytes"]) / med / 1e9, rel_tol=1e-4)
        assert math.isclose(float(r["copy_gbps"]), int(r["bytes"]) / float(r["copy_median_s"]) / 1e9, rel_tol=1e-4)
        assert math.isclose(float(r["frac_of_copy"]), float(r["gbps"]) / float(r["copy_gbps"]), rel_tol=1e-4)
        assert float(r["target"]) == targets[r["method"]]
        if r["metric"] == "speedup":  # sde and noise: peer time / ours
            assert math.isclose(float(r["measured"]), float(r["peer_median_s"]) / med, rel_tol=1e-4)
        else:  # euler and heun: fraction of the copy's bandwidth
            assert r["metric"] == "copy fraction" and r["measured"] == r["frac_of_copy"]
        assert r["verdict"].startswith(("PASS", "FAIL")) and "quick" in r["verdict"]  # no speed is asserted
    md = (out / "rollout_bench.md").read_text()
    for s in shapes:
        assert f"## {s}" in md
    for m in targets:
        assert f"- {m}: ok:" in md


def test_rollout_bench_never_times_a_wrong_method():
    from benchmarks import bench_rollout as br

    euler = next(m for m in br.all_methods() if m.name == "euler")
    calls = {"n": 0}

    def wrong_fn(inp, backend):
        step = euler.fn(inp, backend)

        def call():
            calls["n"] += 1
            return step() * (1 + 1e-3)  # a plausible bug: right formula, wrong by 1e-3

        return call

    wrong = br.Method("wrong-euler", "euler off by 1e-3", wrong_fn, euler.check, 3, "copy fraction", 0.6)
    cfg = br.Config(batch=2, images=((1, 4, 4),), repeats=2, sample_ms=0.1, threads=(1,))
    res = br.run(cfg, methods=[euler, wrong], progress=False)
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["euler"]["check"] == "ok" and rows["euler"]["median_s"] > 0
    bad = rows["wrong-euler"]
    assert bad["check"] == "wrong" and bad["verdict"] == "FAIL (wrong)" and "median_s" not in bad
    assert "x the float32 bound" in bad["check_detail"]
    assert calls["n"] == 1  # the check's call only
    assert "**WRONG** (not timed)" in br.format_markdown(res, "test")
