"""The count behind docs/gpu_design.md's forward+backward estimate for the H200 (a plan, not a
measurement): the stable target's forward+backward time, gradients of x and sigma, of the `cuda`
backend in each precision mode against its eager PyTorch peer, as this design does it by default
(two shift passes; five products, or four where the forward keeps its distances for the backward,
B n <= (B + chunk) D), with the chunk pipeline, with keep_distances=True at every size, and with both.

    python tools/gpu_estimate.py

Rates are those eager's forward measured once on the project's H200 (float32 products 48 TFLOP/s,
TF32 276) or the ceiling's 80% (bf16, 550 TFLOP/s); a product takes the longer of its arithmetic
and the read of its operands from memory. Memory passes run at 3.5 TB/s, the per-chunk kernels in
L2 at 7 TB/s, about 1 us between kernels.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cdm_kernels.stf import default_chunk_size, keeps_distances  # noqa: E402

SIZES = ((512, 4096, 3072), (512, 50000, 3072), (256, 262144, 3072), (64, 16384, 12288))
RATE = {"fp32": 48e12, "tf32": 276e12, "bf16": 550e12}  # flop/s
HBM, L2 = 3.5e12, 7e12  # bytes/s
L2_BYTES = 30e6  # a shifted chunk this large stays in L2 for its products
# mode: (eager peer, product rate, TF32 products per product, bytes of a shifted element)
MODES = {"ieee": ("fp32", "fp32", 1, 4), "tf32x3": ("fp32", "tf32", 3, 12),
         "tf32": ("tf32", "tf32", 1, 4), "bf16": ("bf16", "bf16", 1, 2)}
KERNELS_PER_CHUNK = 6
GAP = 1e-6  # s between kernels


def product(B: int, n: int, D: int, rate: float, element_bytes: float) -> float:
    """Seconds of one product of 2 B n D flops that reads its n x D operand from memory."""
    return max(2 * B * n * D / rate, n * D * element_bytes / HBM)


def eager(B: int, n: int, D: int, peer: str) -> float:
    """Eager autograd: four products and its B x n passes (about 44 B n bytes; half in bfloat16,
    which also converts the references once)."""
    if peer == "bf16":
        return 4 * product(B, n, D, RATE["bf16"], 2) + 22 * B * n / HBM + 6 * n * D / HBM
    return 4 * product(B, n, D, RATE[peer], 4) + 44 * B * n / HBM


def ours(B: int, n: int, D: int, mode: str, variant: str) -> float:
    """This design: `variant` is "default", or names "pipeline" (shifts hidden when there is more
    than one chunk) and/or "keep_distances=True" (the forward's distances kept at every size)."""
    _, rate, factor, width = MODES[mode]
    chunk = default_chunk_size(B, n, D)
    kept = keeps_distances(B, n, D, chunk, True if "keep_distances=True" in variant else None)
    chunks = -(-n // chunk)
    read = 0 if chunk * D * 4 <= L2_BYTES else n * D * width / HBM
    p = max(factor * 2 * B * n * D / RATE[rate], read)
    shifts = 0 if "pipeline" in variant and chunks > 1 else 2 * n * D * (4 + width) / HBM
    products = 4 if kept else 5
    return products * p + shifts + 2 * 12 * B * n / L2 + 2 * chunks * KERNELS_PER_CHUNK * GAP


def main() -> None:
    for variant in ("default", "pipeline", "keep_distances=True", "keep_distances=True + pipeline"):
        print(f"\n{variant}: forward+backward, eager peer's time / this design's time")
        print("| B, n, D | eager fp32 / TF32 / bf16 | " + " | ".join(MODES) + " |")
        print("|---|---|" + "---:|" * len(MODES))
        for B, n, D in SIZES:
            peers = " / ".join(f"{eager(B, n, D, p) * 1e3:.2f}" for p in ("fp32", "tf32", "bf16"))
            ratios = " | ".join(f"{eager(B, n, D, MODES[m][0]) / ours(B, n, D, m, variant):.2f}x" for m in MODES)
            print(f"| {B}, {n}, {D} | {peers} ms | {ratios} |")


if __name__ == "__main__":
    main()
