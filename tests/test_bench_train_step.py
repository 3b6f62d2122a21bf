"""The training-step benchmark's machinery: the --quick run writes every row and output, the authors'
formulas agree with the library's before anything is timed (and a wrong one is reported, not timed),
the memory estimate refuses what would not fit and a real out-of-memory error is caught, the
DDPM++-like network has EDM's size. No speed is asserted."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from benchmarks import bench_train_step as bts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_CFG = replace(bts.Config(), **bts.QUICK)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_step_quick")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_train_step", "--quick", "--device", "cpu", "--no-progress",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "train_step.csv") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    return {"out": out, "header": header, "rows": rows, "stdout": proc.stdout}


def _key(r):
    return r["loss"], r["method"], r["rbatch"]


def test_quick_run_has_every_row(quick_run):
    rows = quick_run["rows"]
    assert quick_run["header"] == bts.CSV_FIELDS
    small, large = QUICK_CFG.rbatches
    expected = {("edm", "-", "")} | {
        (loss, m, str(r)) for loss, rb in (("stf", (small, large)), ("cdm", ("",)), ("stf+cdm", (small,)))
        for r in rb for m in ("library", "authors")
    }
    steps = [r for r in rows if not r["loss"].startswith(("target", "edm (end)"))]
    assert sorted(map(_key, steps)) == sorted(expected)
    end = [r for r in rows if r["loss"] == "edm (end)"]  # EDM again after every row: the run's drift
    assert len(end) == 1 and end[0]["status"] == "ok" and float(end[0]["ratio_vs_edm"]) > 0
    for r in steps:
        assert r["status"] == "ok", r
        assert r["device"] == "cpu" and r["device_name"] and r["torch"] == torch.__version__ and r["triton"]
        assert r["threads"] == "1" and r["batch"] == "4" and r["image"] == "3x32x32"
        ms = float(r["ms_per_step"])
        assert 0 < float(r["q25_ms"]) <= ms <= float(r["q75_ms"]) and int(r["steps"]) == 2
        assert float(r["peak_bytes"]) >= float(r["peak_extra_bytes"]) > 0
        assert 0 <= float(r["lib_share"]) <= 1.5  # profiler timing of nested CPU work can exceed the wall a little
    # Ratios against the EDM steps timed in alternation with each row's (EDM's own row: 1).
    # On the CPU the same from the process's CPU time, which other processes do not inflate.
    for r in steps:
        edm = (r["ms_per_step"], r["cpu_ms_per_step"]) if r["loss"] == "edm" else (r["edm_paired_ms"], r["edm_paired_cpu_ms"])
        assert math.isclose(float(r["ratio_vs_edm"]), float(r["ms_per_step"]) / float(edm[0]), rel_tol=1e-3)
        assert math.isclose(float(r["cpu_ratio_vs_edm"]), float(r["cpu_ms_per_step"]) / float(edm[1]), rel_tol=1e-3)
        assert float(r["cpu_ms_per_step"]) > 0
    # What each method runs: the library's ops, or (authors' STF) none of them.
    ops = {_key(r): r["lib_ops"] for r in steps}
    assert "cdm_kernels::stf_forward" in ops[("stf", "library", str(small))]
    assert ops[("stf", "authors", str(small))] == "" and ops[("edm", "-", "")] == ""
    assert "cdm_kernels::rollout_step" in ops[("cdm", "library", "")]
    assert "rollout_step" not in ops[("cdm", "authors", "")] and "martingale_loss" in ops[("cdm", "authors", "")]
    target = [r for r in rows if r["loss"].startswith("target")]
    assert len(target) == 1 and target[0]["status"].startswith("no verdict (CPU")
    assert math.isclose(float(target[0]["ratio_vs_edm"]),
                        float(next(r for r in steps if _key(r) == ("stf", "library", str(large)))["ratio_vs_edm"]),
                        rel_tol=1e-6)


def test_quick_run_writes_markdown_and_plot(quick_run):
    out = quick_run["out"]
    md = (out / "train_step.md").read_text()
    assert "## Correctness checks" in md and "**WRONG**" not in md and "| stf+cdm | authors |" in md
    assert "59,803,395" in md and "55,733,891" in md
    from PIL import Image

    with Image.open(out / "train_step.png") as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_each_row_times_the_loops_own_step(monkeypatch):
    # The rows step the run that cdm_kernels.train.set_up built, through the loop's train_step, each
    # with its own loss and reference draw swapped in; the loop's EMA update is part of the step.
    seen = []
    real = bts.train_step

    def spy(run):
        record = real(run)
        seen.append((run.c.loss, run.refs.k if run.refs is not None else 0, record))
        return record

    monkeypatch.setattr(bts, "train_step", spy)
    bench = bts.Bench(QUICK_CFG)
    net = QUICK_CFG.net
    assert (bench.run.c.model_channels, bench.run.c.channel_mult, bench.run.c.num_blocks) == (
        net.model_channels, net.channel_mult, net.num_blocks)
    assert bench.run.bank_images.shape == (QUICK_CFG.data, *QUICK_CFG.image)
    ema_before = [p.clone() for p in bench.run.ema.parameters()]
    small = QUICK_CFG.rbatches[0]
    for case in (bts.Case("edm", "-", None), bts.Case("stf", "library", small), bts.Case("stf", "authors", small)):
        bench.step_fn(case, bts.make_loss(QUICK_CFG, case))()
    assert [(loss, k) for loss, k, _ in seen] == [("edm", 0), ("stf", small - QUICK_CFG.batch),
                                                  ("stf", small - QUICK_CFG.batch)]
    assert all(math.isfinite(record["loss"]) and record["step"] == 1 for _, _, record in seen)
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, bench.run.ema.parameters()))


def test_formulas_agree_before_timing():
    D = math.prod(QUICK_CFG.image)
    lib, authors = bts.check_stable_target(D, "cpu")
    assert lib.ok and authors.ok, (lib.detail, authors.detail)
    roll = bts.check_rollout((3, 8, 8), 6, "cpu")
    assert roll.ok, roll.detail


def _run(cfg, **kw):
    return bts.run(replace(QUICK_CFG, losses=("edm", "stf"), min_steps=1, max_steps=1, **kw), progress=False)


def test_wrong_formula_is_reported_not_timed(monkeypatch):
    real = bts.authors_stable_target
    monkeypatch.setattr(bts, "authors_stable_target", lambda x, s, r: real(x, s, r) * 1.001 + 1e-3)
    res = _run(QUICK_CFG)
    assert not res["checks"]["stf authors"].ok and res["checks"]["stf library"].ok
    for r in res["rows"][:-2]:  # the last two: EDM re-timed, the target
        if r["method"] == "authors":
            assert r["status"].startswith("wrong: stable target (authors)") and "ms_per_step" not in r
        else:
            assert r["status"] == "ok" and r["ms_per_step"] > 0


def test_memory_estimate_refuses_oversized_cases():
    B, D, per = 64, 3 * 32 * 32, 2.0 * bts.GiB
    authors = bts.estimate_bytes(bts.Case("stf", "authors", 50_000), B, D, per, 1.0 * bts.GiB)
    library = bts.estimate_bytes(bts.Case("stf", "library", 50_000), B, D, per, 1.0 * bts.GiB)
    # The broadcast formula's three (B, n, D) float32 tensors: 110 GiB at CIFAR-10 sizes.
    assert authors > 3 * B * 50_000 * D * 4 > 100 * bts.GiB
    assert library < 5 * bts.GiB  # the same reference batch, a streaming target
    assert bts.refusal(authors, 16 * bts.GiB).startswith("OOM (needs 11")
    assert bts.refusal(library, 16 * bts.GiB) is None
    # The rollout's rows keep three graphs (D0 and the two trajectories' D1).
    cdm = bts.estimate_bytes(bts.Case("cdm", "library", None), B, D, per, 1.0 * bts.GiB)
    assert cdm >= per + 3 * bts.GiB
    # In a run: every row but EDM (always run: the others refer to it) is refused under a tiny limit.
    res = _run(QUICK_CFG, mem_limit_gb=1e-4)
    statuses = [r["status"] for r in res["rows"][:-2]]
    assert statuses[0] == "ok" and all(s.startswith("OOM (needs ") for s in statuses[1:]), statuses


def test_out_of_memory_at_run_is_caught(monkeypatch):
    real = bts.make_loss

    def make_loss(cfg, case):
        if case.method != "authors":
            return real(cfg, case)

        def loss(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 110.00 GiB (raised by the test)")

        return loss

    monkeypatch.setattr(bts, "make_loss", make_loss)
    res = _run(QUICK_CFG)
    for r in res["rows"][:-2]:
        assert r["status"] == ("OOM (at run: CUDA out of memory. Tried to allocate 110.00 GiB (raised by the test))"
                               if r["method"] == "authors" else "ok"), r["status"]


def test_ddpmpp_network_has_edms_size():
    ours = bts.param_count(bts.DDPMPP)
    edm = bts.edm_ddpmpp_param_count(bts.DDPMPP)
    assert abs(ours - 56e6) <= 0.1 * 56e6, ours
    assert abs(edm - bts.EDM_DDPMPP_PARAMS_PAPER) <= 0.01e6, edm  # the paper's 55.73M


def test_cli_checks_arguments_and_default_output():
    cfg, out, _ = bts.parse_args(["--quick", "--device", "cpu"])
    assert cfg.quick and cfg.batch == 4 and out == os.path.join(ROOT, "out", "benchmarks", "bench_train_step")
    for bad in (["--rbatch", "5"], ["--rbatch", "64,999999"], ["--losses", "edm,foo"], ["--batch", "0"],
                ["--steps", "1", "--min-steps", "3"]):
        with pytest.raises(SystemExit):
            bts.parse_args(["--device", "cpu", *bad])
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "bench_train_step.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--quick" in proc.stdout
