"""Benchmark of the fused rollout step, its Philox noise and the deterministic steps (CPU here).

Ratios are measured in one run against peers timed in the same run (timings on this shared
machine are noisy; ratios much less so):
  1. SDE step with in-kernel noise (float32) vs the authors' sequence of float64 tensor operations
     with torch.randn_like (their rollout keeps x in float64 and casts D(x) to float64).
  2. Noise alone: cdm_kernels.randn vs torch.randn of the same size.
  3. Euler step and Heun correction vs a plain tensor copy (clone, which allocates its output as
     the step does) moving the same bytes (Euler: x and D read, x' written = 3 arrays; Heun: x, D,
     x_euler, D_euler read, x' written = 5 arrays). "peer time / ours" is then our bandwidth as a
     fraction of the copy's.
Every peer is first checked to compute the same thing on the benchmark's inputs. Each row is
measured at 1 thread and at torch's default thread count, ours and the peer at the same count (on a
loaded 2-core machine, torch's multi-threaded copies can lose a scheduler slice at a barrier).

    PYTHONPATH=. python benchmarks/bench_rollout.py [--min-run-time 1.0] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
from dataclasses import dataclass

import torch
from torch.utils import benchmark

import cdm_kernels
from cdm_kernels import rollout_reference as ref


@dataclass(frozen=True)
class Config:
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


ROUNDS = 5
CONFIGS = [Config((256, 3, 32, 32)), Config((128, 3, 64, 64))]


def median_seconds(fn, min_run_time: float, threads: int) -> float:
    torch.set_num_threads(threads)
    fn()  # warm-up (allocator, thread pool, Triton/extension first call)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def authors_sde_step(x64, D, t, tn):
    """The consistency authors' step: float64 throughout, noise from torch.randn_like."""
    D64 = D.to(torch.float64)
    return x64 + 2 * (tn - t) * (x64 - D64) / t + torch.sqrt(2 * (t - tn).abs() * t) * torch.randn_like(x64)


def run(cfg: Config, backend: str, min_run_time: float, threads: int):
    B = cfg.shape[0]
    x = torch.randn(cfg.shape, dtype=cfg.dtype)
    D = torch.randn(cfg.shape, dtype=cfg.dtype)
    t_cur = torch.rand(B) * 10 + 1
    t_next = t_cur * 0.8
    x64 = x.double()
    t64, tn64 = t_cur.double().view(B, 1, 1, 1), t_next.double().view(B, 1, 1, 1)
    xe = torch.randn_like(x)
    De = torch.randn_like(x)
    n = x.numel()

    # Same-thing checks: the authors' formula with our noise equals our fused step.
    z = cdm_kernels.randn(cfg.shape, 123, 0, backend=backend)
    fused = cdm_kernels.rollout_step(x, D, t_cur, t_next, kind="sde", seed=123, backend=backend)
    authors_same_noise = x64 + 2 * (tn64 - t64) * (x64 - D.double()) / t64 + torch.sqrt(2 * (t64 - tn64).abs() * t64) * z.double()
    err_sde = (fused.double() - authors_same_noise).abs().max().item()
    euler_ref = ref.euler_step(x64, D.double(), t_cur.double(), t_next.double())
    err_euler = (cdm_kernels.rollout_step(x, D, t_cur, t_next, kind="euler", backend=backend).double() - euler_ref).abs().max().item()
    assert err_sde < 1e-4 and err_euler < 1e-4, (err_sde, err_euler)

    rows = []

    def add(name, ours_fn, peer_name, peer_fn, bytes_moved=None):
        # Interleaved rounds, so a burst of load from other users hits both sides alike.
        ours_t, peer_t = [], []
        for _ in range(ROUNDS):
            ours_t.append(median_seconds(ours_fn, min_run_time / ROUNDS, threads))
            peer_t.append(median_seconds(peer_fn, min_run_time / ROUNDS, threads))
        t_ours, t_peer = statistics.median(ours_t), statistics.median(peer_t)
        gbs = bytes_moved / t_ours / 1e9 if bytes_moved else float("nan")
        rows.append(dict(shape="x".join(map(str, cfg.shape)), threads=threads, op=name, ours_ms=t_ours * 1e3, peer=peer_name,
                         peer_ms=t_peer * 1e3, ratio=t_peer / t_ours, ours_GBps=gbs))

    add("sde step, in-kernel noise (fp32)",
        lambda: cdm_kernels.rollout_step(x, D, t_cur, t_next, kind="sde", seed=1, backend=backend),
        "authors' fp64 ops + randn_like", lambda: authors_sde_step(x64, D, t64, tn64))
    add("noise: cdm_kernels.randn", lambda: cdm_kernels.randn(cfg.shape, 1, 0, backend=backend),
        "torch.randn", lambda: torch.randn(cfg.shape))
    elt = x.element_size()
    # The copy allocates its output as the step does (a fresh 3 MB tensor costs page faults on
    # first touch, which a copy into a preallocated tensor would not pay).
    src3 = torch.randn(3 * n // 2, dtype=cfg.dtype)
    add("euler step", lambda: cdm_kernels.rollout_step(x, D, t_cur, t_next, kind="euler", backend=backend),
        "clone of the same bytes", lambda: src3.clone(), bytes_moved=3 * n * elt)
    src5 = torch.randn(5 * n // 2, dtype=cfg.dtype)
    add("heun correction",
        lambda: cdm_kernels.rollout_step(x, D, t_cur, t_next, kind="heun", x_euler=xe, denoised_euler=De, backend=backend),
        "clone of the same bytes", lambda: src5.clone(), bytes_moved=5 * n * elt)
    add("euler step", lambda: cdm_kernels.rollout_step(x, D, t_cur, t_next, kind="euler", backend=backend),
        "eager torch fp32 (x + h/t (x - D))", lambda: ref.euler_step(x, D, t_cur, t_next), bytes_moved=3 * n * elt)
    return rows, dict(err_sde=err_sde, err_euler=err_euler)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args()
    backend = cdm_kernels.resolve_rollout_backend("cpu", args.backend)
    default_threads = torch.get_num_threads()
    env = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, backend {backend}; "
           f"{cdm_kernels.extension_status()}")
    all_rows = []
    for threads in sorted({1, default_threads}):
        for cfg in CONFIGS:
            rows, errs = run(cfg, backend, args.min_run_time, threads)
            all_rows += rows
            print(f"checked {cfg.shape}: |fused sde - authors' formula, same noise| = {errs['err_sde']:.2e}, "
                  f"|fused euler - fp64 euler| = {errs['err_euler']:.2e}")
    torch.set_num_threads(default_threads)
    print(f"\n{env}\n")
    print("| shape | threads | op | ours (ms) | peer | peer (ms) | peer time / ours | ours GB/s |")
    print("|---|---:|---|---:|---|---:|---:|---:|")
    for r in all_rows:
        gbs = "" if r["ours_GBps"] != r["ours_GBps"] else f"{r['ours_GBps']:.1f}"
        print(f"| {r['shape']} | {r['threads']} | {r['op']} | {r['ours_ms']:.3f} | {r['peer']} | {r['peer_ms']:.3f} | {r['ratio']:.2f} | {gbs} |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*all_rows[0].keys(), "env"])
            w.writeheader()
            for r in all_rows:
                w.writerow({**r, "env": env})


if __name__ == "__main__":
    main()
