"""The README's code runs as written: every Python block in a fresh interpreter on the CPU, the training
block's commands through the loop's own parser (and the first two for real, at two steps), and the
install block's switches and check command as the build and the package know them."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks(lang: str) -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def _commands(block: str) -> list[list[str]]:
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def _run(args: list[str], cwd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), CUDA_VISIBLE_DEVICES="")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_readme_has_its_examples():
    assert len(_blocks("python")) >= 3
    assert len(_blocks("bash")) >= 3


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_block_runs_as_written(index, tmp_path):
    block = _blocks("python")[index]
    r = _run([sys.executable, "-c", block], cwd=str(tmp_path))
    assert r.returncode == 0, f"README python block {index} failed:\n{block}\n{r.stderr[-3000:]}"


def _training_block() -> list[list[str]]:
    blocks = [b for b in _blocks("bash") if "cdm_kernels.train" in b and "scripts/" not in b]
    assert len(blocks) == 1, "one block of training commands"
    return _commands(blocks[0])


def _train_args(cmd: list[str]) -> list[str]:
    i = cmd.index("cdm_kernels.train")
    assert cmd[i - 1] == "-m" and cmd[0] in ("python", "torchrun"), cmd
    return cmd[i + 1 :]


def test_every_training_command_parses_with_the_loops_options():
    from cdm_kernels.train import parse_args

    commands = _training_block()
    assert commands
    for cmd in commands:
        parse_args(_train_args(cmd))  # argparse exits (SystemExit) on an unknown option or a bad value


def test_the_training_and_resume_commands_run(tmp_path):
    """The first command trains, the second continues it: as written but for the step counts (two,
    then three) and the folder (a temporary one)."""
    train, resume = _training_block()[:2]
    out = str(tmp_path / "run")

    def shortened(cmd: list[str], steps: int) -> list[str]:
        args = _train_args(cmd)
        for opt, value in (("--steps", str(steps)), ("--outdir", out), ("--resume", out)):
            if opt in args:
                args[args.index(opt) + 1] = value
        return [sys.executable, "-m", "cdm_kernels.train", *args, "--no-progress"]

    r = _run(shortened(train, 2), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(shortened(resume, 3), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(name.startswith("checkpoint-0000003") for name in os.listdir(out)), os.listdir(out)


def test_the_install_blocks_switches_and_check_are_the_builds():
    block = next(b for b in _blocks("bash") if "pip install" in b)
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup = f.read()
    switches = set(re.findall(r"\b(CDM_[A-Z_]+)=", block))
    assert switches == {"CDM_FORCE_CPU", "CDM_SKIP_BUILD"}
    for name in switches:
        assert f'"{name}"' in setup, name
    check = next(cmd for cmd in _commands(block) if cmd[:2] == ["python", "-c"])
    r = _run([sys.executable, "-c", check[2]], cwd=ROOT)
    assert r.returncode == 0 and "cdm_kernels" in r.stdout, r.stderr[-3000:]
    plan = next(cmd for cmd in _commands(block) if cmd[:2] == ["bash", "scripts/gpu_check.sh"])
    assert os.path.exists(os.path.join(ROOT, plan[1]))
