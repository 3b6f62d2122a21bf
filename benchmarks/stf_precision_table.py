"""Error of each precision mode of the stable target against float64, over sigma in [0.002, 80].

Each mode (`ieee`, `tf32x3`, `tf32`, `bf16`) as the GPU backends compute it: by default through its
exact CPU emulation, `stf_reference` in that mode (the operands shifted by the centre and rounded as
the kernels round them, products of the rounded values in float32; only the order of the float32
sums differs from a GPU's), or with `--backend triton` through the Triton kernels themselves under
the interpreter (slow). The peer is the eager PyTorch composition in float32 (the matmul form with
the norms precomputed, autograd for the gradients), what a user would write instead. Prints markdown
tables (one per quantity: rows are noise levels, columns the modes and the peer).

Data with spread weights at every sigma: C smooth "images" in [-1, 1]^D and, for each, copies
perturbed at log-spaced scales eps from 1e-5 to 3; x_i = centre + sigma_i z. A copy at scale eps
moves d_ij by about eps^2 D, so at every sigma some copies carry weight (the n_eff column shows it).
`--offset K` moves every image by K per coordinate (data away from the origin: the matmul form
loses its digits there, the shifted operands do not).

    python benchmarks/stf_precision_table.py [--dim 3072] [--copies 32] [--centres 8] [--offset 0]
    python benchmarks/stf_precision_table.py --quick     # D = 64, a few rows: checks the script in seconds

It prints the tables and writes them to stf_precision_table.md in --out (default
out/benchmarks/stf_precision_table, ignored by git).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors run for real
if __package__ in (None, ""):  # run as `python benchmarks/stf_precision_table.py`: the checkout's packages, as -m
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import stf_common as sc  # noqa: E402
from cdm_kernels import registry, stf_reference  # noqa: E402

SIGMAS = (0.002, 0.005, 0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 80.0)
MODES = registry.PRECISIONS


@dataclass
class Config:
    dim: int = 3072
    centres: int = 8
    copies: int = 32
    chunk_size: int = 128
    offset: float = 0.0
    seed: int = 0


def make_data(cfg: Config):
    g = torch.Generator().manual_seed(cfg.seed)
    D, C = cfg.dim, cfg.centres
    # Smooth images: low-frequency random fields squashed into [-1, 1] (like natural images, large ||x||).
    side = int(round(D ** 0.5))
    base = torch.randn(C, 1, 8, 8, generator=g, dtype=torch.float64)
    if side * side == D:
        centres = torch.nn.functional.interpolate(base, size=(side, side), mode="bilinear").reshape(C, D)
    else:
        centres = torch.nn.functional.interpolate(base.reshape(C, 1, 64), size=D, mode="linear").reshape(C, D)
    centres = torch.tanh(1.5 * centres)
    eps = torch.logspace(-5, 0.5, cfg.copies - 1, dtype=torch.float64)
    u = torch.randn(C, cfg.copies - 1, D, generator=g, dtype=torch.float64) / D ** 0.5
    copies = centres[:, None, :] + eps[None, :, None] * u * D ** 0.5 / 3
    ref = torch.cat([centres[:, None, :], copies], 1).reshape(-1, D)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64).repeat_interleave(C)
    x = centres.repeat(len(SIGMAS), 1) + sigma[:, None] * torch.randn(len(sigma), D, generator=g, dtype=torch.float64)
    grad_mu = torch.randn(x.shape, generator=g, dtype=torch.float64)
    grad_lse = torch.randn(len(sigma), generator=g, dtype=torch.float64)
    return x + cfg.offset, sigma, ref + cfg.offset, grad_mu, grad_lse


def judge(x, sigma, ref, grad_mu, grad_lse):
    """float64, direct distances ||x_i - r_j||^2 (no matmul form), gradients by autograd, row by row."""
    mus, lses, gxs, gss, neffs = [], [], [], [], []
    for i in range(x.shape[0]):
        xi = x[i].clone().requires_grad_(True)
        si = sigma[i].clone().requires_grad_(True)
        logit = -((xi[None, :] - ref) ** 2).sum(1) / (2 * si * si)
        w = torch.softmax(logit, 0)
        mu = w @ ref
        lse = torch.logsumexp(logit, 0)
        gx, gs = torch.autograd.grad((mu * grad_mu[i]).sum() + lse * grad_lse[i], (xi, si))
        mus.append(mu.detach()), lses.append(lse.detach()), gxs.append(gx), gss.append(gs)
        neffs.append(1.0 / (w.detach() ** 2).sum())
    return torch.stack(mus), torch.stack(lses), torch.stack(gxs), torch.stack(gss), torch.stack(neffs)


def run_mode(backend, mode, x, sigma, ref, grad_mu, grad_lse, chunk_size):
    """mu, lse, dL/dx, dL/dsigma of one precision mode: `stf_reference` (the modes' exact emulation) or
    the launchers of a registered backend for CPU tensors (the Triton interpreter)."""
    f = torch.float32
    x, sigma, ref, grad_mu, grad_lse = (t.to(f).contiguous() for t in (x, sigma, ref, grad_mu, grad_lse))
    fns = stf_reference if backend == "reference" else registry.launchers("stf_target", backend, "cpu")
    centre = stf_reference.centre_of(ref)
    mu, lse, aux, dist = fns.stf_forward(x, sigma, ref, centre, chunk_size, mode, False)
    gx, gs, _ = fns.stf_backward(grad_mu, grad_lse, x, sigma, ref, centre, mu, aux, dist, chunk_size, mode, False)
    return mu, lse, gx, gs


def run_eager_fp32(x, sigma, ref, grad_mu, grad_lse):
    """The eager composition in float32 (norms precomputed), gradients by autograd."""
    f = torch.float32
    x, sigma = (t.to(f).clone().requires_grad_() for t in (x, sigma))
    ref, grad_mu, grad_lse = (t.to(f) for t in (ref, grad_mu, grad_lse))
    logit = (x @ ref.T - 0.5 * (ref * ref).sum(1)) / sigma[:, None] ** 2 - 0.5 * (x * x).sum(1, keepdim=True) / (
        sigma[:, None] ** 2)
    mu = torch.softmax(logit, 1) @ ref
    lse = torch.logsumexp(logit, 1)
    gx, gs = torch.autograd.grad((mu * grad_mu).sum() + (lse * grad_lse).sum(), (x, sigma))
    return mu.detach(), lse.detach(), gx, gs


def group_errors(out, exact, C):
    """Per noise level (groups of C rows): mu max abs error; lse, grad_x, grad_sigma relative errors."""
    mu, lse, gx, gs = (t.double() for t in out)
    emu, else_, egx, egs = exact
    rows = []
    for k in range(len(SIGMAS)):
        s = slice(k * C, (k + 1) * C)
        rows.append(
            (
                (mu[s] - emu[s]).abs().max().item(),
                ((lse[s] - else_[s]).abs() / else_[s].abs().clamp_min(1e-300)).max().item(),
                ((gx[s] - egx[s]).norm() / egx[s].norm()).item(),
                ((gs[s] - egs[s]).norm() / egs[s].norm()).item(),
            )
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sc.add_quick_and_out(ap, "stf_precision_table", "D = 64, 2 centres of 4 copies: checks the script")
    ap.add_argument("--dim", type=int, default=Config.dim)
    ap.add_argument("--centres", type=int, default=Config.centres)
    ap.add_argument("--copies", type=int, default=Config.copies)
    ap.add_argument("--chunk-size", type=int, default=Config.chunk_size)
    ap.add_argument("--offset", type=float, default=Config.offset, help="added to every coordinate of the data")
    ap.add_argument("--backend", default="reference", choices=("reference", "triton"),
                    help="reference: each mode's exact emulation; triton: the Triton kernels under the interpreter")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = Config(dim=args.dim, centres=args.centres, copies=args.copies, chunk_size=args.chunk_size,
                 offset=args.offset)
    if args.quick:
        cfg = Config(dim=64, centres=2, copies=4, chunk_size=16, offset=args.offset)
    x, sigma, ref, grad_mu, grad_lse = make_data(cfg)
    *exact, neff = judge(x, sigma, ref, grad_mu, grad_lse)
    C = cfg.centres
    results = {"eager fp32": group_errors(run_eager_fp32(x, sigma, ref, grad_mu, grad_lse), exact, C)}
    for mode in MODES:
        out = run_mode(args.backend, mode, x, sigma, ref, grad_mu, grad_lse, cfg.chunk_size)
        results[mode] = group_errors(out, exact, C)
    names = list(results)
    how = "stf_reference's emulation of each mode" if args.backend == "reference" else "the Triton interpreter"
    lines = [
        f"Stable target vs float64: B = {x.shape[0]} ({C} per sigma), n = {ref.shape[0]}, D = {cfg.dim}, "
        f"data offset {cfg.offset:g}, chunk = {cfg.chunk_size}; modes by {how}; torch {torch.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}\n"
    ]
    titles = (
        "max |mu - mu64| (images in [-1, 1] before the offset)",
        "max |lse - lse64| / |lse64|",
        "||grad_x - grad_x64|| / ||grad_x64||",
        "||grad_sigma - grad_sigma64|| / ||grad_sigma64||",
    )
    for q, title in enumerate(titles):
        lines.append(f"**{title}**\n")
        lines.append("| sigma | median n_eff | " + " | ".join(names) + " |")
        lines.append("|---:|---:|" + "---:|" * len(names))
        for k, s in enumerate(SIGMAS):
            ne = neff[k * C : (k + 1) * C].median().item()
            cells = " | ".join(f"{results[name][k][q]:.1e}" for name in names)
            lines.append(f"| {s:g} | {ne:.1f} | {cells} |")
        worst = " | ".join(f"**{max(r[q] for r in results[name]):.1e}**" for name in names)
        lines.append(f"| worst | | {worst} |\n")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stf_precision_table.md"), "w") as f:
        f.write(text)
    print(f"results in {os.path.abspath(args.out)}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
