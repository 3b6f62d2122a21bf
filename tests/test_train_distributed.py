"""Data-parallel training: `torchrun --nproc_per_node 2 -m cdm_kernels.train` on the CPU (gloo).

The EDM and STF runs are checked against the same two steps computed in one process: each rank's
batch (every second image of the global batch), drawn with that rank's random state, gradients
averaged, one Adam step each; for STF the target of each rank's images is taken in one process over
the union of both ranks' reference batches (each rank's images, then its slice of the step's
reference draw), which the sharded stable target must equal. The STF + CDM run (sharded target and
several forward passes a step) is checked for equal replicas and a finite loss."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from cdm_kernels.data import BatchOrder, ReferenceDraw, get_batch, load_dataset
from cdm_kernels.losses import EDMLoss, STFLoss
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


def _replay(loss: str, own_refs_only: bool = False):
    """The run's two steps computed in one process: rank r's batch and random state, the mean of the
    gradients, Adam. Returns (the weights, the logged losses, the union of each step's reference
    batches as data-set indices). `own_refs_only`: STF over rank r's own reference batch only (what
    an unsharded target would give)."""
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
    local = c.batch // 2
    # STF in ONE process over both ranks' reference batches: no bank, the whole union passed as ref.
    loss_fn = EDMLoss() if loss == "edm" else STFLoss()
    draw = ReferenceDraw(len(ds), ARGS["rbatch"] - local, c.batch, c.seed, world_size=2)
    logged, unions = [], []
    for step in range(2):
        batches = [orders[r].next_batch(c.batch)[0] for r in range(2)]
        g_idx = orders[0].last_global[0]
        assert torch.equal(g_idx, orders[1].last_global[0])
        assert torch.equal(torch.cat(batches).sort()[0], g_idx.sort()[0])
        # rank r's reference batch: its images, then its slice of the step's draw
        ref_idx = [torch.cat([batches[r], draw.draw(step, g_idx, rank=r)]) for r in range(2)]
        unions.append(torch.cat(ref_idx))
        grads, losses = [], []
        for r in range(2):
            torch.set_rng_state(states[r])
            images, _ = get_batch(ds, batches[r], torch.zeros(local, dtype=torch.bool))
            net.zero_grad(set_to_none=True)
            if loss == "edm":
                loss_el = loss_fn(net, images)
            else:
                # own images first, as STFLoss wants
                union = ds.images[ref_idx[r] if own_refs_only else torch.cat([ref_idx[r], ref_idx[1 - r]])]
                loss_el = loss_fn(net, images, ref=union)
            (loss_el.sum() / local).backward()
            states[r] = torch.get_rng_state()
            grads.append([p.grad.clone() for p in net.parameters()])
            losses.append(float(loss_el.detach().mean()))
        for p, g0, g1 in zip(net.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        for g in opt.param_groups:
            g["lr"] = c.lr * min((step + 1) * c.batch / ARGS["lr_rampup"], 1.0)
        opt.step()
        logged.append(sum(losses) / 2)
    return net, logged, unions


def test_two_process_edm_run_equals_the_loop_computed_in_one_process(tmp_path):
    out = _torchrun(tmp_path, "edm")
    assert "2 process(es) on cpu" in out
    ckpt = torch.load(tmp_path / "checkpoint-0000002.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["param_checksums"][0] == ckpt["param_checksums"][1]  # the replicas agree bitwise

    net, logged, _ = _replay("edm")
    for name, value in net.state_dict().items():
        # gloo's all-reduce may sum in another order than (g0 + g1) / 2: rounding-level differences
        torch.testing.assert_close(ckpt["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the logged loss is the mean over the processes of their mean per-element loss
    assert [r["loss"] for r in _log(tmp_path)] == pytest.approx(logged, rel=1e-6)


def test_two_process_stf_run_equals_one_process_over_the_union_of_reference_batches(tmp_path):
    out = _torchrun(tmp_path, "stf")
    assert "note:" not in out  # 2 x 20 other references fit outside the batch: disjoint draws
    ckpt = torch.load(tmp_path / "checkpoint-0000002.pt", weights_only=True)
    assert ckpt["param_checksums"][0] == ckpt["param_checksums"][1]

    net, logged, unions = _replay("stf")
    for union in unions:  # 2 x 24 references, no image twice: each rank's batch and disjoint draws
        assert union.numel() == 2 * ARGS["rbatch"] and union.unique().numel() == union.numel()
    # The losses and weights of the sharded run equal those of the target over the union, computed
    # in one process (float32 targets merged in another order: rounding-level differences).
    run = [r["loss"] for r in _log(tmp_path)]
    assert run == pytest.approx(logged, rel=1e-5)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(ckpt["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # An unsharded target (each rank's own reference batch only) is far from the run already at
    # the first step: the comparison above tells the two apart.
    _, own_only, _ = _replay("stf", own_refs_only=True)
    assert abs(own_only[0] - run[0]) > 1e-3 * abs(run[0])


def test_two_process_sharded_stf_cdm_run(tmp_path):
    # sharded stable target, and DDP with two forward passes with gradient (D0, D1) and the
    # rollout's passes without, before one backward
    _torchrun(tmp_path, "stf+cdm")
    ckpt = torch.load(tmp_path / "checkpoint-0000002.pt", weights_only=True)
    assert ckpt["param_checksums"][0] == ckpt["param_checksums"][1]
    # each process drew its own noise: the random states differ between the ranks
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert all(abs(r["loss"]) < 1e3 for r in _log(tmp_path))
