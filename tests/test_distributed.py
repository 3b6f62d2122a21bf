"""The sharded stable target against the single-process one over the union of the shards.

Real processes (torch.multiprocessing, spawn) talk through gloo on the CPU, rendezvous through a
file in a temporary directory. Every process rebuilds the same global problem from a fixed seed,
works on its own slice, and saves its rows; the parent compares them in float64 with
`stf_target` over the concatenated shards and with the naive broadcast formula.
"""

from __future__ import annotations

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cdm_kernels import STFCDMLoss, STFLoss, available_backends, stf_target, stf_target_sharded


def _problem(batch_sizes, shard_sizes, shape=(3, 5), dtype=torch.float64):
    """Queries (sum B, *shape) near the references, sigma log-uniform over [0.002, 80], references."""
    g = torch.Generator().manual_seed(1234)
    n = sum(shard_sizes)
    ref = torch.rand((n, *shape), generator=g, dtype=dtype) * 2 - 1
    B = sum(batch_sizes)
    # Each query is a reference plus noise of its sigma, as in training, so the weights range from
    # one-hot (small sigma) to uniform (large sigma).
    sigma = torch.exp(torch.empty(B, dtype=dtype).uniform_(math.log(0.002), math.log(80.0), generator=g))
    pick = torch.randint(0, n, (B,), generator=g)
    x = ref[pick] + sigma.reshape(B, 1, 1) * torch.randn((B, *shape), generator=g, dtype=dtype)
    return x, sigma, ref


def _slices(sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + k) for s, k in zip(starts, sizes)]


def _worker(rank, world, init_file, out_dir, batch_sizes, shard_sizes, mode):
    # A forked child must not enter the OpenMP/MKL thread pool its parent already started (it
    # deadlocks); one thread is plenty for these sizes.
    torch.set_num_threads(1)
    nccl = mode == "nccl"
    if nccl:
        torch.cuda.set_device(rank)
    # A short timeout: a test that breaks a collective fails in seconds instead of hanging.
    dist.init_process_group(
        "nccl" if nccl else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        x, sigma, ref = _problem(batch_sizes, shard_sizes)
        xs, rs = _slices(batch_sizes)[rank], _slices(shard_sizes)[rank]
        with torch.no_grad():
            if nccl:  # every tensor on this process's GPU, as in multi-GPU training
                dev = torch.device("cuda", rank)
                mu, lse = stf_target_sharded(x[xs].to(dev), sigma[xs].to(dev), ref[rs].to(dev), return_lse=True)
                out = {"mu": mu.cpu(), "lse": lse.cpu()}
            elif mode in ("mismatch", "all empty"):
                # Collective errors: raised on every process, none left waiting.
                D = 3 + (rank if mode == "mismatch" else 0)
                try:
                    stf_target_sharded(torch.zeros(2, D, dtype=torch.float64), 1.0, torch.zeros(0 if mode == "all empty" else 2, D, dtype=torch.float64))
                    out = {"error": None}
                except ValueError as exc:
                    out = {"error": str(exc)}
            elif mode.startswith("target:"):
                mu, lse = stf_target_sharded(
                    x[xs], sigma[xs], ref[rs], return_lse=True, chunk_size=3, backend=mode.split(":")[1]
                )
                out = {"mu": mu, "lse": lse}
            elif mode == "float32":
                mu = stf_target_sharded(x[xs].float(), sigma[xs].float(), ref[rs].float())
                out = {"mu": mu}
            elif mode == "loss":
                # STFLoss with sharded=True: this process's images are the first rows of its reference
                # batch; the target is over every process's reference batch.
                images, rest = x[xs], ref[rs]
                loss_fn = STFLoss(P_mean=0.0, P_std=1.0, sharded=True)
                net = lambda x_, s_, labels=None, augment_labels=None: 0.5 * x_  # noqa: E731
                g = torch.Generator().manual_seed(100 + rank)
                loss = loss_fn(net, images, ref=torch.cat([images, rest]), generator=g)
                out = {"loss": loss}
            elif mode == "stfcdm":
                # The sharded STF+CDM loss equals the single-process one whose reference batch is
                # this process's images, then its shard, then every other process's reference batch
                # (the target does not depend on the order of the references), with the same draws.
                images = x[xs]
                others = [torch.cat([x[_slices(batch_sizes)[q]], ref[_slices(shard_sizes)[q]]]) for q in range(world) if q != rank]
                net = lambda x_, s_, labels=None, augment_labels=None: x_ / (1 + s_**2)  # noqa: E731
                args = dict(num_steps=3, eps_min=0.1, eps_max=0.3, P_mean=0.0, P_std=1.0)
                sharded = STFCDMLoss(**args, sharded=True)(
                    net, images, ref=torch.cat([images, ref[rs]]), generator=torch.Generator().manual_seed(7 + rank)
                )
                single = STFCDMLoss(**args)(
                    net, images, ref=torch.cat([images, ref[rs], *others]), generator=torch.Generator().manual_seed(7 + rank)
                )
                local = STFCDMLoss(**args)(
                    net, images, ref=torch.cat([images, ref[rs]]), generator=torch.Generator().manual_seed(7 + rank)
                )
                out = {"sharded": sharded, "single": single, "local": local}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, batch_sizes, shard_sizes, mode):
    world = len(batch_sizes)
    # fork, not spawn: the children inherit the imported torch instead of importing it again
    # (seconds each on a loaded machine); safe here because nothing has touched CUDA.
    mp.start_processes(
        _worker,
        args=(world, str(tmp_path / "rendezvous"), str(tmp_path), batch_sizes, shard_sizes, mode),
        nprocs=world,
        join=True,
        start_method="spawn" if mode == "nccl" or torch.cuda.is_initialized() else "fork",
    )
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _naive(x, sigma, ref):
    # Direct float64 transcription of docs/math.md section 1: the full (B, n) distance matrix.
    d = ((x.reshape(x.shape[0], 1, -1) - ref.reshape(1, ref.shape[0], -1)) ** 2).sum(-1)
    logit = -d / (2 * sigma[:, None] ** 2)
    w = torch.softmax(logit, dim=1)
    return (w @ ref.reshape(ref.shape[0], -1)).reshape(x.shape), torch.logsumexp(logit, dim=1)


@pytest.mark.parametrize("backend", available_backends("stf_target", "cpu"))
@pytest.mark.parametrize(
    "batch_sizes, shard_sizes",
    [((4, 7), (9, 5)), ((5, 2, 6), (3, 0, 11))],
    ids=["2 processes", "3 processes, one shard empty"],
)
def test_sharded_equals_single_process_over_the_union(tmp_path, batch_sizes, shard_sizes, backend):
    x, sigma, ref = _problem(batch_sizes, shard_sizes)
    want_mu, want_lse = stf_target(x, sigma, ref, return_lse=True)
    naive_mu, naive_lse = _naive(x, sigma, ref)
    torch.testing.assert_close(want_mu, naive_mu, rtol=1e-10, atol=1e-12)  # the judge itself
    outs = _run(tmp_path, batch_sizes, shard_sizes, mode=f"target:{backend}")
    got_mu = torch.cat([o["mu"] for o in outs])
    got_lse = torch.cat([o["lse"] for o in outs])
    assert got_mu.dtype == torch.float64 and got_mu.shape == x.shape
    torch.testing.assert_close(got_mu, want_mu, rtol=1e-12, atol=1e-13)
    # lse = zlse - ||x||^2 / (2 sigma^2) cancels terms up to about 1e6 at sigma = 0.002: its rounding
    # is relative to that term, not to lse.
    scale = 1 + (x.reshape(x.shape[0], -1) ** 2).sum(1) / (2 * sigma**2)
    assert ((got_lse - want_lse).abs() <= 1e-14 * scale).all()
    assert ((naive_lse - want_lse).abs() <= 1e-14 * scale).all()
    # The union matters: a process's own shard alone gives a different target.
    local_only = stf_target(x[: batch_sizes[0]], sigma[: batch_sizes[0]], ref[: shard_sizes[0]])
    assert (local_only - want_mu[: batch_sizes[0]]).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_sharded_over_nccl_on_two_gpus(tmp_path):
    batch_sizes, shard_sizes = (4, 7), (9, 5)
    x, sigma, ref = _problem(batch_sizes, shard_sizes)
    want_mu = _naive(x, sigma, ref)[0]
    outs = _run(tmp_path, batch_sizes, shard_sizes, mode="nccl")
    torch.testing.assert_close(torch.cat([o["mu"] for o in outs]), want_mu, rtol=1e-10, atol=1e-12)


def test_sharded_float32_within_float32_error(tmp_path):
    batch_sizes, shard_sizes = (3, 6), (8, 4)
    x, sigma, ref = _problem(batch_sizes, shard_sizes)
    want = _naive(x, sigma, ref)[0]
    got = torch.cat([o["mu"] for o in _run(tmp_path, batch_sizes, shard_sizes, mode="float32")])
    assert got.dtype == torch.float32
    # The tolerance is twice the error of the single-process float32 op on the same data.
    single = stf_target(x.float(), sigma.float(), ref.float()).double()
    bound = 2 * (single - want).abs().max().item() + 1e-6
    assert (got.double() - want).abs().max().item() <= bound


def test_stf_loss_sharded_uses_every_process_reference_batch(tmp_path):
    batch_sizes, shard_sizes = (3, 4), (5, 2)
    x, sigma, ref = _problem(batch_sizes, shard_sizes)
    outs = _run(tmp_path, batch_sizes, shard_sizes, mode="loss")
    # Replay each process's draws and take the target over the union of both reference batches
    # (each process's images first, then its shard), in float64.
    xs, rs = _slices(batch_sizes), _slices(shard_sizes)
    union = torch.cat([torch.cat([x[xs[r]], ref[rs[r]]]) for r in range(2)])
    for r in range(2):
        images = x[xs[r]]
        g = torch.Generator().manual_seed(100 + r)
        s = torch.exp(torch.randn((images.shape[0], 1, 1), generator=g, dtype=torch.float64))
        x_noisy = images + torch.randn(images.shape, generator=g, dtype=torch.float64) * s
        mu = _naive(x_noisy, s.reshape(-1), union)[0]
        weight = (s**2 + 0.25) / (s * 0.5) ** 2
        want = weight * (0.5 * x_noisy - mu) ** 2
        torch.testing.assert_close(outs[r]["loss"], want, rtol=1e-10, atol=1e-12)


def test_stfcdm_loss_sharded_equals_single_process_over_the_union(tmp_path):
    outs = _run(tmp_path, (3, 2, 4), (2, 5, 1), mode="stfcdm")
    for o in outs:
        torch.testing.assert_close(o["sharded"], o["single"], rtol=1e-11, atol=1e-13)
        assert (o["local"] - o["single"]).abs().max() > 1e-4  # the other processes' references count


def test_collective_errors_reach_every_process(tmp_path):
    outs = _run(tmp_path, (2, 2), (2, 2), mode="mismatch")
    for o in outs:
        assert o["error"] == (
            "every process must pass x and ref_shard with the same number of elements per sample; "
            "got D = [3, 4] (by rank in the group)"
        )
    (tmp_path / "b").mkdir()
    outs = _run(tmp_path / "b", (2, 2, 2), (1, 1, 1), mode="all empty")
    for o in outs:
        assert o["error"] == "every process's ref_shard is empty: the stable target needs at least one reference"


def test_requires_grad_is_refused_before_any_collective():
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"training target only .*torch.no_grad\(\)"):
        stf_target_sharded(x, 1.0, torch.randn(4, 3))


def test_bad_input_messages():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"ref_shard must have shape \(n_local, \*S\) .*\(3,\) of x; got .*\(4, 2\)"):
        stf_target_sharded(x, 1.0, torch.randn(4, 2))
    with pytest.raises(TypeError, match="ref_shard has dtype torch.float64 but x has dtype torch.float32"):
        stf_target_sharded(x, 1.0, torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"sigma\[1\] = -1.0"):
        stf_target_sharded(x, torch.tensor([1.0, -1.0]), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"ref_sqnorm must be a tensor of shape \(n,\) = \(4,\), got \(3,\)"):
        stf_target_sharded(x, 1.0, torch.randn(4, 3), ref_sqnorm=torch.ones(3))
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got 0"):
        stf_target_sharded(x, 1.0, torch.randn(4, 3), chunk_size=0)
    with pytest.raises(ValueError, match=r"precision must be one of \('ieee', 'tf32x3', 'tf32', 'bf16'\), got 'fp8'"):
        stf_target_sharded(x, 1.0, torch.randn(4, 3), precision="fp8")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        stf_target_sharded(x, 1.0, torch.randn(4, 3), backend="gpu")


@pytest.mark.skipif(dist.is_initialized(), reason="a process group is already initialized in this process")
def test_needs_an_initialized_process_group():
    with pytest.raises(RuntimeError, match="needs an initialized torch.distributed process group"):
        stf_target_sharded(torch.randn(2, 3), 1.0, torch.randn(4, 3))
