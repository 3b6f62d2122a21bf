"""The two papers' claims about their objectives, measured against the exact posterior mean
(`cdm_kernels.EmpiricalDenoiser`; docs/estimators.md says what each number is).

    python -m benchmarks.estimators --quick          # reduced sizes, about a minute on 2 cores
    python benchmarks/estimators.py --out benchmarks/results    # the committed results

STF (Xu et al. 2023): the mean squared error of the DSM target (the clean image y) and of the stable
target over a reference batch of n (the minibatch's B clean images, then n - B other images) against
E[x0 | x], split into squared bias and variance over R reference batches for the same x; on the
digits (exact posterior mean: the whole set) and on a Gaussian mixture in D = 3072 (closed form),
and the smallest n of the grid whose stable target is within 1% of the exact one.

CDM (Daras et al. 2023): the martingale term (D1a - D0)(D1b - D0) of `martingale_loss` after a
`consistency_rollout` from sigma to sigma / 2, with the exact denoiser of the digits, the exact one at
a mis-scaled noise level, and a small EDMPrecond trained by EDMLoss: its mean and Monte Carlo error.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a script: make `benchmarks` and `cdm_kernels` importable
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import cdm_kernels  # noqa: E402
from benchmarks import stf_common as sc  # noqa: E402
from cdm_kernels import (  # noqa: E402
    EDMLoss,
    EDMPrecond,
    EmpiricalDenoiser,
    consistency_rollout,
    load_dataset,
    martingale_loss,
    stf_target,
)

STF_FIELDS = ["dataset", "D", "sigma", "n", "B", "R", "mse_stf", "bias2", "var", "mse_dsm", "rel_stf", "rel_dsm"]
CDM_FIELDS = ["denoiser", "sigma", "sigma_min", "num_steps", "samples", "martingale", "se", "z", "mse_vs_exact"]
ENV_FIELDS = ["device_name", "torch", "cdm_kernels", "threads", "quick"]


@dataclass
class Config:
    sigmas: tuple = (0.002, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 80.0)
    batch: int = 64  # B, the minibatch (and the smallest reference batch)
    batches: int = 8  # R, reference batches per x
    digits_refs: tuple = (64, 128, 256, 512, 1024, 1536, 1797)  # n on the digits (1797: the whole set)
    gmm_dim: int = 3072
    gmm_components: int = 10
    gmm_refs: tuple = (32, 256, 1024, 4096, 16384)  # from B = gmm_batch
    gmm_batch: int = 32
    cdm_sigmas: tuple = (0.1, 0.3, 1.0, 3.0, 10.0)
    cdm_samples: int = 2000
    cdm_steps: tuple = (2, 6, 20)
    mis_scales: tuple = (0.5, 0.8)  # the exact denoiser evaluated at these multiples of sigma
    train_steps: int = 300
    seed: int = 0
    quick: bool = False
    out: str = sc.default_out("estimators")


QUICK = dict(sigmas=(0.002, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 80.0), batch=32, batches=4,
             digits_refs=(32, 128, 512, 1797), gmm_dim=3072, gmm_refs=(16, 256, 2048), gmm_batch=16,
             cdm_sigmas=(0.3, 1.0, 3.0), cdm_samples=300, cdm_steps=(2, 6, 20), train_steps=40)


# ----------------------------------------------------------------------------------------------
# STF: bias and variance of the stable target against the exact posterior mean
# ----------------------------------------------------------------------------------------------


def _errors(mus: torch.Tensor, exact: torch.Tensor) -> tuple[float, float, float]:
    """(mse, squared bias, variance) per element of R estimates mus (R, B, D) of exact (B, D): the
    variance unbiased over the R batches, the bias^2 = ||mean - exact||^2 - var / R, so mse = bias2 + var."""
    R, B, D = mus.shape
    mean = mus.mean(0)
    var = (mus - mean).pow(2).sum(-1).sum(0) / max(R - 1, 1)  # (B,)
    bias2 = (mean - exact).pow(2).sum(-1) - (var / R if R > 1 else 0)
    return float((bias2 + var).mean() / D), float(bias2.mean() / D), float(var.mean() / D)


def _row(dataset, D, sigma, n, B, R, mse, bias2, var, mse_dsm, norm2) -> dict:
    return dict(dataset=dataset, D=D, sigma=sigma, n=n, B=B, R=R, mse_stf=mse, bias2=bias2, var=var, mse_dsm=mse_dsm,
                rel_stf=math.sqrt(max(mse, 0) / norm2), rel_dsm=math.sqrt(mse_dsm / norm2))


def stf_digits(cfg: Config, gen: torch.Generator) -> list[dict]:
    data = load_dataset("digits", use_labels=False).images.double()
    N, D = data.shape[0], data[0].numel()
    flat = data.reshape(N, D)
    exact_net = EmpiricalDenoiser(data)
    B, R = cfg.batch, cfg.batches
    rows = []
    for sigma in cfg.sigmas:
        idx = torch.randperm(N, generator=gen)[:B]
        y = flat[idx]
        x = y + sigma * torch.randn(y.shape, generator=gen, dtype=y.dtype)
        exact = exact_net(x.reshape(B, *data.shape[1:]), sigma).reshape(B, D)
        mse_dsm = float((y - exact).pow(2).mean())
        norm2 = float(exact.pow(2).mean())
        rest = torch.ones(N, dtype=torch.bool)
        rest[idx] = False
        others = rest.nonzero().flatten()
        for n in cfg.digits_refs:
            n = min(n, N)
            mus = []
            # n = B (the minibatch alone) and n = N (the whole set, the exact target): one possible batch
            for _ in range(R if B < n < N else 1):
                pick = others[torch.randperm(others.numel(), generator=gen)[: n - B]]
                mus.append(stf_target(x, sigma, torch.cat([y, flat[pick]])))
            mse, bias2, var = _errors(torch.stack(mus), exact)
            rows.append(_row("digits", D, sigma, n, B, len(mus), mse, bias2, var, mse_dsm, norm2))
    return rows


def stf_gmm(cfg: Config, gen: torch.Generator) -> list[dict]:
    """x0 ~ (1/K) sum_k N(m_k, s^2 I) in D dimensions: E[x0 | x] = c x + (1 - c) sum_k g_k m_k with
    c = s^2 / (s^2 + sigma^2) and g = softmax_k(-||x - m_k||^2 / (2 (s^2 + sigma^2))), the stable
    target over the K means at noise level sqrt(s^2 + sigma^2) (docs/math.md section 4)."""
    D, K, B, R = cfg.gmm_dim, cfg.gmm_components, cfg.gmm_batch, cfg.batches
    s = 0.25
    means = 0.45 * torch.randn(K, D, generator=gen, dtype=torch.float64)

    def draw(m: int) -> torch.Tensor:
        k = torch.randint(0, K, (m,), generator=gen)
        return means[k] + s * torch.randn(m, D, generator=gen, dtype=torch.float64)

    y = draw(B)
    per_sigma = []
    for sigma in cfg.sigmas:
        x = y + sigma * torch.randn(B, D, generator=gen, dtype=torch.float64)
        c = s * s / (s * s + sigma * sigma)
        exact = c * x + (1 - c) * stf_target(x, math.sqrt(s * s + sigma * sigma), means)
        per_sigma.append((sigma, x, exact))
    n_max = max(cfg.gmm_refs)
    # mus[sigma][n]: the R estimates; each reference batch's fresh images serve every sigma and n
    # (nested prefixes), in float32 as a training loop would compute them.
    mus = {(si, n): [] for si in range(len(cfg.sigmas)) for n in cfg.gmm_refs}
    y32 = y.float()
    for _ in range(R):
        pool = draw(n_max - B).float()
        for si, (sigma, x, _) in enumerate(per_sigma):
            for n in cfg.gmm_refs:
                mus[(si, n)].append(stf_target(x.float(), sigma, torch.cat([y32, pool[: n - B]])).double())
    rows = []
    for si, (sigma, x, exact) in enumerate(per_sigma):
        mse_dsm = float((y - exact).pow(2).mean())
        norm2 = float(exact.pow(2).mean())
        for n in cfg.gmm_refs:
            mse, bias2, var = _errors(torch.stack(mus[(si, n)]), exact)
            rows.append(_row(f"gmm{K}", D, sigma, n, B, R, mse, bias2, var, mse_dsm, norm2))
    return rows


def refs_for_one_percent(rows: list[dict]) -> dict[tuple[str, float], int | None]:
    """(dataset, sigma) -> the smallest n of the grid with rel_stf <= 1% (None: none of the grid)."""
    best: dict[tuple[str, float], int | None] = {}
    for r in rows:
        key = (r["dataset"], r["sigma"])
        best.setdefault(key, None)
        if r["rel_stf"] <= 0.01 and (best[key] is None or r["n"] < best[key]):
            best[key] = r["n"]
    return best


# ----------------------------------------------------------------------------------------------
# CDM: the martingale term with the exact, a mis-scaled and a trained denoiser
# ----------------------------------------------------------------------------------------------


def train_small_net(data: torch.Tensor, steps: int, gen: torch.Generator) -> EDMPrecond:
    """A small EDMPrecond trained by EDMLoss on the digits (Adam, batch 64): the DSM-trained network."""
    torch.manual_seed(int(torch.randint(0, 1 << 31, (1,), generator=gen)))
    net = EDMPrecond(data.shape[-1], data.shape[1], model_channels=16, channel_mult=(1, 2), attn_resolutions=())
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    loss_fn = EDMLoss()
    for _ in range(steps):
        batch = data[torch.randint(0, data.shape[0], (64,), generator=gen)]
        loss = loss_fn(net, batch, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def martingale_term(net, data: torch.Tensor, sigma: float, sigma_min: float, num_steps: int, samples: int,
                    gen: torch.Generator, exact=None) -> dict:
    """The mean over samples and elements of (D1a - D0)(D1b - D0) (martingale_loss with weight 0)
    from x_t = y + sigma z, its standard error over the samples, and E||D0 - exact||^2 / D."""
    y = data[torch.randint(0, data.shape[0], (samples,), generator=gen)]
    x_t = y + sigma * torch.randn(y.shape, generator=gen, dtype=y.dtype)
    with torch.no_grad():
        D0 = net(x_t, sigma).double()
        seed = int(torch.randint(0, 1 << 62, (1,), generator=gen))
        x_final, s_final = consistency_rollout(net, x_t, sigma, sigma_min, num_steps, 2, seed=seed)
        D1 = net(x_final.reshape(2 * samples, *x_t.shape[1:]), s_final.repeat(2)).double()
        m = martingale_loss(D0, D1[:samples], D1[samples:], D0, 0.0, lambda_m=1.0).flatten(1).mean(1)
        err = float((D0 - exact(x_t, sigma)).pow(2).mean()) if exact is not None else 0.0
    mean, se = float(m.mean()), float(m.std()) / math.sqrt(samples)
    return dict(sigma=sigma, sigma_min=sigma_min, num_steps=num_steps, samples=samples, martingale=mean, se=se,
                z=mean / se if se > 0 else 0.0, mse_vs_exact=err)


def cdm_rows(cfg: Config, gen: torch.Generator) -> list[dict]:
    data = load_dataset("digits", use_labels=False).images.double()
    exact = EmpiricalDenoiser(data)

    def mis_scaled(scale):
        def net(x, sigma, class_labels=None, **kwargs):
            return exact(x, scale * torch.as_tensor(sigma, dtype=x.dtype))
        return net

    t = time.perf_counter()
    trained = train_small_net(data.float(), cfg.train_steps, gen)
    print(f"  trained the small EDMPrecond for {cfg.train_steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
    default_steps = 6 if 6 in cfg.cdm_steps else cfg.cdm_steps[-1]
    nets = [("exact", exact, cfg.cdm_steps)]
    nets += [(f"exact at {c:g} sigma", mis_scaled(c), (default_steps,)) for c in cfg.mis_scales]
    nets += [(f"EDMLoss net ({cfg.train_steps} steps)", trained, (default_steps,))]
    rows = []
    for name, net, steps_list in nets:
        for sigma in cfg.cdm_sigmas:
            for steps in steps_list:
                r = martingale_term(net, data, sigma, sigma / 2, steps, cfg.cdm_samples, gen, exact)
                rows.append(dict(denoiser=name, **r))
    return rows


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_csv(path: str, fields: list[str], rows: list[dict], env: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields + ENV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: _fmt(r[k]) if isinstance(r[k], float) else r[k] for k in fields}, **env})


def write_markdown(path: str, cfg: Config, stf: list[dict], cdm: list[dict], env: dict, cmd: str) -> None:
    best = refs_for_one_percent(stf)
    lines = ["# The stable target and the consistency term against the exact denoiser", "",
             f"`{cmd}` ({'quick' if cfg.quick else 'full'} mode) on {env['device_name']}, torch {env['torch']}, "
             f"cdm_kernels {env['cdm_kernels']}. Definitions: docs/estimators.md.", "",
             "## STF: error of the training targets against E[x0 | x] (per element)", ""]
    for ds in dict.fromkeys(r["dataset"] for r in stf):
        rs = [r for r in stf if r["dataset"] == ds]
        ns = list(dict.fromkeys(r["n"] for r in rs))
        B, R = rs[0]["B"], max(r["R"] for r in rs)
        lines += [f"### {ds} (D = {rs[0]['D']}, B = {B}, R = {R} reference batches per x)", "",
                  "relative RMS error sqrt(MSE / mean(mu*^2)) of the DSM target y and of the stable target with n "
                  "references; then n for 1% (the smallest n of the grid), and the squared bias's share of the "
                  f"stable target's MSE at n = {ns[1]} (at n = B the batch is the minibatch alone: no variance)", "",
                  "| sigma | DSM | " + " | ".join(f"n={n}" for n in ns) + " | n for 1% | bias^2 / MSE at n=" + str(ns[1]) + " |",
                  "|---" * (len(ns) + 4) + "|"]
        for sigma in dict.fromkeys(r["sigma"] for r in rs):
            by_n = {r["n"]: r for r in rs if r["sigma"] == sigma}
            first, second = by_n[ns[0]], by_n[ns[1]]
            share = second["bias2"] / second["mse_stf"] if second["mse_stf"] > 0 else float("nan")
            n1 = best[(ds, sigma)]
            lines.append(f"| {sigma:g} | {first['rel_dsm']:.2e} | " + " | ".join(f"{by_n[n]['rel_stf']:.2e}" for n in ns)
                         + f" | {n1 if n1 is not None else '> ' + str(ns[-1])} | {share:.2f} |")
        lines.append("")
    lines += ["## CDM: the martingale term (D1a - D0)(D1b - D0), rollout from sigma to sigma / 2", "",
              "mean over samples and elements, its standard error, z = mean / SE; E||D0 - mu*||^2 / D says how "
              "wrong the denoiser is", "",
              "| denoiser | sigma | steps | samples | martingale | SE | z | E(D0 - mu*)^2 |", "|---" * 8 + "|"]
    for r in cdm:
        lines.append(f"| {r['denoiser']} | {r['sigma']:g} | {r['num_steps']} | {r['samples']} | {r['martingale']:.2e} | "
                     f"{r['se']:.1e} | {r['z']:.1f} | {r['mse_vs_exact']:.1e} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(out: str, stf: list[dict], cdm: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def pos(v: float) -> float:  # log axes: zero or a negative estimate is left out of the line
        return v if v > 0 else float("nan")

    datasets = list(dict.fromkeys(r["dataset"] for r in stf))
    fig, axes = plt.subplots(2, len(datasets), figsize=(6 * len(datasets), 8), squeeze=False)
    for col, ds in enumerate(datasets):
        rs = [r for r in stf if r["dataset"] == ds]
        sig = sorted(dict.fromkeys(r["sigma"] for r in rs))
        ns = list(dict.fromkeys(r["n"] for r in rs))
        ax, ax2 = axes[0][col], axes[1][col]
        dsm = [next(r["mse_dsm"] for r in rs if r["sigma"] == s) for s in sig]
        ax.loglog(sig, [pos(v) for v in dsm], "k--", label="DSM target y")
        cmap = plt.get_cmap("viridis")
        for i, n in enumerate(ns):
            colour = cmap(i / max(len(ns) - 1, 1))
            m = [next(r for r in rs if r["sigma"] == s and r["n"] == n) for s in sig]
            ax.loglog(sig, [pos(r["mse_stf"]) for r in m], "-o", ms=3, color=colour, label=f"STF n={n}")
            ax2.loglog(sig, [pos(r["bias2"]) for r in m], "-o", ms=3, color=colour, label=f"bias^2 n={n}")
            ax2.loglog(sig, [pos(r["var"]) for r in m], ":", color=colour)
        ax.set_title(f"{ds} (D = {rs[0]['D']}): MSE against E[x0|x] per element")
        floor = 1e-9  # below: rounding (the whole set on the digits) or a posterior on one image
        ax2.set_title("squared bias (solid) and variance (dotted) of the stable target")
        for a in (ax, ax2):
            a.set_xlabel("sigma")
            a.set_ylim(bottom=floor)
            a.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "estimators_stf.png"), dpi=110)
    plt.close(fig)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["denoiser"] for r in cdm):
        rs = [r for r in cdm if r["denoiser"] == name]
        for steps in dict.fromkeys(r["num_steps"] for r in rs):
            m = [r for r in rs if r["num_steps"] == steps]
            label = f"{name}, {steps} steps"
            ax.plot([r["sigma"] for r in m], [r["z"] for r in m], "-o", ms=3, label=label)
            ax2.errorbar([r["sigma"] for r in m], [pos(r["martingale"]) for r in m], yerr=[r["se"] for r in m],
                         fmt="-o", ms=3, capsize=3, label=label)
    ax.axhspan(-2, 2, color="0.85", label="|z| < 2")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=4)
    ax.set_ylabel("z = mean / its Monte Carlo error")
    ax.set_title("CDM's martingale term on the digits: significance")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_ylabel("mean of (D1a - D0)(D1b - D0) per element, +- SE (positive means)")
    ax2.set_title("its size")
    ax2.set_ylim(bottom=1e-7)  # below: the posterior sits on one image
    for a in (ax, ax2):
        a.set_xlabel("sigma (rollout to sigma / 2)")
        a.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "estimators_cdm.png"), dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_quick_and_out(ap, "estimators", "reduced sizes (about a minute on 2 cores)")
    ap.add_argument("--train-steps", type=int, help="steps of the small EDMLoss network (default 300, quick 40)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def parse_args(argv=None) -> Config:
    a = build_parser().parse_args(argv)
    kw = dict(QUICK) if a.quick else {}
    if a.train_steps is not None:
        if a.train_steps < 0:
            raise SystemExit(f"--train-steps must be >= 0, got {a.train_steps}")
        kw["train_steps"] = a.train_steps
    return Config(**kw, seed=a.seed, quick=a.quick, out=a.out)


def run(cfg: Config) -> tuple[list[dict], list[dict]]:
    gen = torch.Generator().manual_seed(cfg.seed)
    t = time.perf_counter()
    stf = stf_digits(cfg, gen)
    print(f"  STF on the digits: {len(stf)} rows in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    gmm = stf_gmm(cfg, gen)
    print(f"  STF on the Gaussian mixture: {len(gmm)} rows in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    cdm = cdm_rows(cfg, gen)
    print(f"  CDM's martingale term: {len(cdm)} rows in {time.perf_counter() - t:.0f} s", flush=True)
    return stf + gmm, cdm


def main(argv=None) -> int:
    cfg = parse_args(argv)
    os.makedirs(cfg.out, exist_ok=True)
    cmd = "python -m benchmarks.estimators " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    env = {k: v for k, v in sc.environment("cpu").items() if k in ENV_FIELDS}
    env["quick"] = str(cfg.quick)
    stf, cdm = run(cfg)
    write_csv(os.path.join(cfg.out, "estimators_stf.csv"), STF_FIELDS, stf, env)
    write_csv(os.path.join(cfg.out, "estimators_cdm.csv"), CDM_FIELDS, cdm, env)
    write_markdown(os.path.join(cfg.out, "estimators.md"), cfg, stf, cdm, env, cmd)
    plot(cfg.out, stf, cdm)
    with open(os.path.join(cfg.out, "estimators_command.txt"), "w") as f:
        f.write(cmd + "\n" + repr(asdict(cfg)) + "\n")
    print(f"results in {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
