"""scripts/gpu_check.sh's arguments, stage plan and time budget, checked without a GPU (--plan, and a
Python that sees none). Its stages themselves run on a GPU machine only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def _run(*args, **env):
    full = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=full, timeout=120)


@pytest.mark.parametrize("args, stages, budget", [
    ((), "build tests sanitizer targets", "none"),
    (("--skip-build", "--train-step"), "tests sanitizer targets train-step", "none"),
    (("--stages", "targets,tests", "--budget-s", "540"), "targets tests", "540 s in all"),
    (("--stages=build,sanitizer", "--skip-build", "--budget-s=60"), "sanitizer", "60 s in all"),
    (("--stages", "train-step", "--train-step"), "train-step", "none"),
])
def test_plan_lists_the_stages_in_order_and_the_budget(args, stages, budget):
    res = _run(*args, "--plan", "--out", "/nonexistent/never-made")
    assert res.returncode == 0, res.stderr
    assert f"stages, in order: {stages}\n" in res.stdout
    assert f"budget: {budget}" in res.stdout
    assert "outputs: /nonexistent/never-made" in res.stdout
    assert not os.path.exists("/nonexistent/never-made")


@pytest.mark.parametrize("args, message", [
    (("--stages", "build,tset"), "unknown stage 'tset' in --stages"),
    (("--stages", "build", "--skip-build"), "no stage left to run"),
    (("--budget-s", "0"), "--budget-s must be a whole number of seconds above 0, got '0'"),
    (("--budget-s", "8m"), "got '8m'"),
    (("--out",), "--out needs a folder"),  # --plan is not a folder
    (("--budget-s",), "--budget-s needs a number of seconds"),
    (("--fast",), "unknown argument --fast"),
])
def test_bad_arguments_exit_2_naming_the_argument(args, message):
    res = _run(*args, "--plan")
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert res.stdout == ""


def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    res = _run("--out", str(out), CUDA_VISIBLE_DEVICES="")
    assert res.returncode == 2
    assert "sees no CUDA GPU (torch.cuda.is_available() is False); nothing to check" in res.stderr
    assert not out.exists()
