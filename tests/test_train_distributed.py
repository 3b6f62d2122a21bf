"""Data-parallel training: `torchrun --nproc_per_node 2 -m cdm_kernels.train` on the CPU (gloo).

The EDM run is checked against the same two steps computed in one process: each rank's batch (every
second image of the global batch), drawn with that rank's random state, gradients averaged, one Adam
step each. The STF + CDM run (reference batch sharded over the processes, several forward passes a step) is
checked for equal replicas and a finite loss."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from cdm_kernels.data import BatchOrder, get_batch, load_dataset
from cdm_kernels.losses import EDMLoss
from cdm_kernels.train import TrainConfig, build_model, process_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARGS = dict(batch=8, rbatch=24, steps=2, lr=1e-3, lr_rampup=16, channels=8, seed=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(outdir, loss):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "cdm_kernels.train", "--loss", loss, "--outdir", str(outdir),
        "--batch", str(ARGS["batch"]), "--rbatch", str(ARGS["rbatch"]), "--steps", str(ARGS["steps"]),
        "--lr", str(ARGS["lr"]), "--lr-rampup", str(ARGS["lr_rampup"]), "--channels", str(ARGS["channels"]),
        "--seed", str(ARGS["seed"]), "--snap", "2", "--grid", "0", "--threads", "1", "--no-progress",
        "--cdm-steps", "3",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _log(outdir):
    with open(os.path.join(outdir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_process_edm_run_equals_the_loop_computed_in_one_process(tmp_path):
    out = _torchrun(tmp_path, "edm")
    assert "2 process(es) on cpu" in out
    ckpt = torch.load(tmp_path / "checkpoint-0000002.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["param_checksums"][0] == ckpt["param_checksums"][1]  # the replicas agree bitwise

    # The same two steps in one process: rank r's batch and random state, mean of the gradients.
    c = TrainConfig(batch=ARGS["batch"], model_channels=ARGS["channels"], seed=ARGS["seed"], lr=ARGS["lr"])
    torch.set_num_threads(1)
    ds = load_dataset("digits")
    torch.manual_seed(c.seed)
    net = build_model(c, 8, 1, 0)  # unconditional, the default
    opt = torch.optim.Adam(net.parameters(), lr=c.lr, betas=(0.9, 0.999), eps=1e-8)
    orders = [BatchOrder(len(ds), c.seed, rank=r, world_size=2) for r in range(2)]
    states = []
    for r in range(2):
        torch.manual_seed(process_seed(c.seed, r))
        states.append(torch.get_rng_state())
    loss_fn, local = EDMLoss(), c.batch // 2
    logged = []
    for step in range(2):
        grads, losses = [], []
        for r in range(2):
            torch.set_rng_state(states[r])
            images, _ = get_batch(ds, *orders[r].next_batch(c.batch))
            net.zero_grad(set_to_none=True)
            loss = loss_fn(net, images)
            (loss.sum() / local).backward()
            states[r] = torch.get_rng_state()
            grads.append([p.grad.clone() for p in net.parameters()])
            losses.append(float(loss.detach().mean()))
        for p, g0, g1 in zip(net.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        for g in opt.param_groups:
            g["lr"] = c.lr * min((step + 1) * c.batch / ARGS["lr_rampup"], 1.0)
        opt.step()
        logged.append(sum(losses) / 2)

    for name, value in net.state_dict().items():
        # gloo's all-reduce may sum in another order than (g0 + g1) / 2: rounding-level differences
        torch.testing.assert_close(ckpt["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the logged loss is the mean over the processes of their mean per-element loss
    assert [r["loss"] for r in _log(tmp_path)] == pytest.approx(logged, rel=1e-6)


def test_two_process_sharded_stf_cdm_run(tmp_path):
    # sharded stable target, and DDP with two forward passes with gradient (D0, D1) and the
    # rollout's passes without, before one backward
    _torchrun(tmp_path, "stf+cdm")
    ckpt = torch.load(tmp_path / "checkpoint-0000002.pt", weights_only=True)
    assert ckpt["param_checksums"][0] == ckpt["param_checksums"][1]
    # each process drew its own noise: the random states differ between the ranks
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert all(abs(r["loss"]) < 1e3 for r in _log(tmp_path))
