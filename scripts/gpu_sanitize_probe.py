"""Every GPU kernel of cdm_kernels at a few small odd shapes, forward and backward, for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/gpu_sanitize_probe.py

scripts/gpu_check.sh runs it under memcheck, racecheck and synccheck. The shapes cross the kernels'
tile edges (B, n, D not multiples of anything), use several reference chunks and a last partial
one, and every precision mode of every GPU backend of the stable target (the CUDA backend also with
its chunk pipeline, CDM_STF_OVERLAP=1: a side stream), with the forward's distances kept for the
backward (the default at these shapes) and, at the middle shape, recomputed; the rollout steps run
every kind with passed and in-kernel noise, the martingale loss forward and backward, and the
Philox sampler. It checks the results against the float64 reference loosely (a wrong-but-in-bounds
kernel is the test suite's to find) and exits 1 on a NaN, so that a run under a sanitizer that
turns errors into garbage is not read as clean. Prints one line per call.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import cdm_kernels  # noqa: E402
from cdm_kernels import registry  # noqa: E402

STF_SHAPES = ((3, 37, 67), (5, 300, 129), (17, 1000, 3073))  # (B, n, D)
ROLLOUT_SHAPES = ((3, 3, 5, 7), (5, 1, 33, 31))
DEVICE = "cuda"
LOOSE = {"ieee": 1e-3, "tf32x3": 1e-3, "tf32": 5e-2, "bf16": 2e-1}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def probe_stf(backend: str, failures: list) -> None:
    g = torch.Generator().manual_seed(0)
    for i, (B, n, D) in enumerate(STF_SHAPES):
        keep = None if i != 1 else False
        x = torch.randn(B, D, generator=g)
        ref = torch.randn(n, D, generator=g)
        sigma = torch.logspace(-2.7, 1.9, B).float()  # 0.002 .. 80
        mu64 = cdm_kernels.stf_target(x.double(), sigma.double(), ref.double(), backend="reference")
        runs = [(p, overlap) for p in registry.precisions("stf_target", backend, DEVICE)
                for overlap in ((False, True) if backend == "cuda" else (False,))]
        for p, overlap in runs:
            xs = x.to(DEVICE).requires_grad_()
            ss = sigma.to(DEVICE).requires_grad_()
            rs = ref.to(DEVICE).requires_grad_()
            chunk = max(1, n // 3 + 1)  # three chunks, the last one partial
            os.environ["CDM_STF_OVERLAP"] = "1" if overlap else "0"
            mu = cdm_kernels.stf_target(xs, ss, rs, backend=backend, precision=p, chunk_size=chunk,
                                        keep_distances=keep)
            mu.backward(torch.ones_like(mu))
            sync()
            os.environ.pop("CDM_STF_OVERLAP")
            grads = (xs.grad, ss.grad, rs.grad)
            finite = bool(torch.isfinite(mu).all()) and all(bool(torch.isfinite(t).all()) for t in grads)
            err = rel(mu, mu64)
            ok = finite and err <= LOOSE[p]
            label = f"{backend} {p}{', chunk pipeline' if overlap else ''}{', recomputed' if keep is False else ''}"
            print(f"stf_target {label} (B, n, D) = ({B}, {n}, {D}) chunk {chunk}: error {err:.1e}"
                  f"{'' if ok else '  <-- BAD'}", flush=True)
            if not ok:
                failures.append(f"stf_target {label} {(B, n, D)}")


def probe_rollout(backend: str, failures: list) -> None:
    g = torch.Generator().manual_seed(1)
    for shape in ROLLOUT_SHAPES:
        B = shape[0]
        x, D, xe, De, z, y = (torch.randn(shape, generator=g).to(DEVICE) for _ in range(6))
        t = (torch.rand(B, generator=g) * 10 + 0.1).to(DEVICE)
        tn = t * 0.6
        outs = {
            "euler": cdm_kernels.rollout_step(x, D, t, tn, kind="euler", backend=backend),
            "heun": cdm_kernels.rollout_step(x, D, t, tn, kind="heun", x_euler=xe, denoised_euler=De,
                                             backend=backend),
            "sde": cdm_kernels.rollout_step(x, D, t, tn, kind="sde", seed=3, offset=5, backend=backend),
            "sde, passed noise": cdm_kernels.rollout_step(x, D, t, tn, kind="sde", noise=z, backend=backend),
            "churn": cdm_kernels.rollout_step(x, None, t, kind="churn", num_steps=4, S_churn=2.0, seed=4,
                                              backend=backend)[0],
            "randn": cdm_kernels.randn(shape, seed=9, offset=11, device=DEVICE),
        }
        leaves = [v.clone().requires_grad_() for v in (D, xe, De)]
        loss = cdm_kernels.martingale_loss(*leaves, y, torch.full((B, 1, 1, 1), 0.5, device=DEVICE), backend=backend)
        loss.backward(torch.ones_like(loss))
        outs["martingale loss"] = loss
        outs["martingale loss backward"] = leaves[0].grad
        sync()
        for name, out in outs.items():
            ok = bool(torch.isfinite(out).all())
            print(f"{name} {backend} {tuple(shape)}: {'finite' if ok else 'NOT FINITE  <-- BAD'}", flush=True)
            if not ok:
                failures.append(f"{name} {backend} {tuple(shape)}")


def main(argv=None) -> int:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cuda (default); cpu runs the same calls on the CPU backends, to check the probe itself")
    DEVICE = ap.parse_args(argv).device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to probe (--device cpu checks the probe itself)", file=sys.stderr)
        return 2
    failures: list = []
    for backend in cdm_kernels.available_backends("stf_target", DEVICE):
        if backend != "reference":
            probe_stf(backend, failures)
    for backend in cdm_kernels.available_backends("rollout_step", DEVICE):
        if backend != "reference":
            probe_rollout(backend, failures)
    if failures:
        print(f"{len(failures)} bad call(s): " + "; ".join(failures), file=sys.stderr)
        return 1
    print("every probed call gave finite results within its loose bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
