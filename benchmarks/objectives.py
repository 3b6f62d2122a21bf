"""The four training objectives (EDM, STF, CDM, STF+CDM) on the digits, measured against the exact
denoiser: error per sigma, martingale violation, sample quality and memorisation (docs/objectives.md).

    python -m benchmarks.objectives --quick --threads 1 --out benchmarks/results   # under 10 minutes on 2 cores
    python -m benchmarks.objectives --threads 1                                     # the full run, under an hour
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a script: make `benchmarks` and `cdm_kernels` importable
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import stf_common as sc  # noqa: E402
from cdm_kernels import (  # noqa: E402
    CDMLoss, EmpiricalDenoiser, consistency_rollout, edm_sampler, load_dataset, martingale_loss,
)
from cdm_kernels.train import TrainConfig, train  # noqa: E402

LOSSES = ("edm", "stf", "cdm", "stf+cdm")
EXACT = "exact"  # the empirical denoiser of the training split, as a model row
CONFIDENT = 0.9  # a sample is confident when the classifier gives its class at least this probability
COPY_RMS = 0.05  # a sample this close (RMS per pixel, images in [-1, 1]) to a training image is a copy


@dataclass(frozen=True)
class Config:
    """One comparison: the same network, learning rate and image budget for every objective."""

    losses: tuple[str, ...] = LOSSES
    seeds: tuple[int, ...] = (0, 1, 2)
    images: int = 38_400              # training images per run (the same for every objective)
    batch: int = 64
    lr: float = 2e-3
    model_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2)
    num_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (4,)
    rbatch: int = 1024                # STF reference batch (the loop's default)
    held_out: float = 0.2             # share of the digits held out (stratified by class)
    split_seed: int = 0
    num_sigmas: int = 13              # log-spaced over [0.002, 80]
    eval_images: int = 360            # noisy images per sigma, from each split, for the error to the truth
    mart_images: int = 256            # images per sigma for the martingale violation
    samples: int = 1000               # samples per model (Heun, 18 steps) for the classifier and the distances
    sample_steps: int = 18
    threads: int | None = None
    out: str = ""
    quick: bool = False


QUICK = dict(seeds=(0, 1), images=9_600, mart_images=64, samples=200)


def sigma_grid(n: int) -> list[float]:
    return [float(s) for s in np.geomspace(0.002, 80.0, n)]


# ----------------------------------------------------------------------------------------------
# Data: a stratified split of the digits, the training part written where the loop reads it
# ----------------------------------------------------------------------------------------------


def split_digits(held_out: float, seed: int):
    """(train images, train labels, held-out images, held-out labels): the digits (N, 1, 8, 8) in
    [-1, 1], a share `held_out` of each class held out, chosen by `seed`."""
    ds = load_dataset("digits")
    rng = np.random.default_rng(seed)
    labels = ds.labels.numpy()
    test = np.zeros(len(labels), dtype=bool)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        test[rng.choice(idx, size=int(round(held_out * len(idx))), replace=False)] = True
    tr, te = torch.from_numpy(~test), torch.from_numpy(test)
    return ds.images[tr].contiguous(), ds.labels[tr], ds.images[te].contiguous(), ds.labels[te]


# ----------------------------------------------------------------------------------------------
# Training: the loop's own API, one run per objective and seed
# ----------------------------------------------------------------------------------------------


def train_config(cfg: Config, loss: str, seed: int, data: str, outdir: str) -> TrainConfig:
    return TrainConfig(
        data=data, outdir=outdir, loss=loss, batch=cfg.batch, rbatch=cfg.rbatch, lr=cfg.lr, images=cfg.images,
        seed=seed, snap=10**9, grid=0, progress=False, threads=cfg.threads, device="cpu",
        model_channels=cfg.model_channels, channel_mult=cfg.channel_mult, num_blocks=cfg.num_blocks,
        attn_resolutions=cfg.attn_resolutions,
    )


def train_all(cfg: Config, data: str, workdir: str, log=print):
    """Trains every (seed, objective) in turn, the objectives interleaved within each seed so that a
    change of the machine's load hits all of them. Returns (rows, {(loss, seed): EMA network})."""
    rows, nets = [], {}
    for loss in cfg.losses:  # one untimed step each first: no timed run pays the process's first-use costs
        train(replace(train_config(cfg, loss, 0, data, os.path.join(workdir, "warm-up", loss.replace("+", "_"))),
                      images=None, steps=1))
    for seed in cfg.seeds:
        for loss in cfg.losses:
            c = train_config(cfg, loss, seed, data, os.path.join(workdir, f"{loss.replace('+', '_')}-{seed}"))
            cpu0 = time.process_time()
            s = train(c)
            # With one thread the process's CPU time is the run's own cost, which other jobs on a
            # shared machine inflate far less than its wall time (set-up and the final checkpoint included).
            cpu = time.process_time() - cpu0
            rows.append({"loss": loss, "seed": seed, "images": s["images"], "steps": s["steps"],
                         "seconds": round(s["seconds"], 2), "cpu_seconds": round(cpu, 2),
                         "images_per_second": round(s["images_per_second"], 1),
                         "final_loss": s["loss"], "load_average": sc.load_average()})
            nets[(loss, seed)] = s["ema"].eval().requires_grad_(False)
            log(f"trained {loss} seed {seed}: {s['images']} images in {s['seconds']:.1f} s")
    return rows, nets


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def error_to_truth(net, truth, images: torch.Tensor, sigmas: list[float], seed: int) -> list[float]:
    """Per sigma: the mean squared error per element between net(x; sigma) and truth(x; sigma), with
    x = y + sigma z over `images` y (one noise draw each, the same for every net)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in sigmas:
        x = images + s * torch.randn(images.shape, generator=g)
        out.append(float((net(x, s).float() - truth(x, s).float()).pow(2).mean()))
    return out


@torch.no_grad()
def martingale_violation(net, images: torch.Tensor, sigmas: list[float], seed: int, c: TrainConfig) -> list[float]:
    """Per sigma: CDMLoss's martingale term without its weight, (D1a - D0)(D1b - D0) per element
    averaged (`cdm_kernels.martingale_loss`), an unbiased estimate of (E[D1 | x_t] - D0)^2; D0 = D(x_t;
    sigma), D1a, D1b = D at the end of two reverse-SDE trajectories from x_t to the loss's own
    sigma_min (`consistency_rollout` with the training run's schedule points and eps range)."""
    g = torch.Generator().manual_seed(seed)
    cdm = CDMLoss(num_steps=c.cdm_steps, eps_min=c.eps_min, eps_max=c.eps_max)
    B, out = images.shape[0], []
    for s in sigmas:
        sigma = torch.full((B,), s)
        x_t = images + s * torch.randn(images.shape, generator=g)
        D0 = net(x_t, sigma).float()
        sigma_min = cdm.sample_sigma_min(sigma, g)
        seed_k = int(torch.randint(0, 1 << 62, (1,), generator=g))
        x_final, s_final = consistency_rollout(net, x_t, sigma, sigma_min, c.cdm_steps, num_trajectories=2, seed=seed_k)
        D1 = net(x_final.reshape(2 * B, *images.shape[1:]), s_final.repeat(2)).float()
        term = martingale_loss(D0, D1[:B].contiguous(), D1[B:].contiguous(), D0, 0.0, lambda_m=1.0)
        out.append(float(term.mean()))
    return out


@torch.no_grad()
def draw_samples(net, num: int, steps: int, seed: int) -> torch.Tensor:
    """`num` samples (num, 1, 8, 8) in [-1, 1] from EDM's deterministic Heun sampler, the same latents
    for every net."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(num, 1, 8, 8, generator=g)
    return edm_sampler(net, latents, num_steps=steps).float().clamp(-1, 1)


def fit_classifier(images: torch.Tensor, labels: torch.Tensor):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=5000).fit(images.reshape(len(images), -1).numpy(), labels.numpy())


def nn_rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each image of a: the RMS per pixel distance to its nearest image of b."""
    d2 = torch.cdist(a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()).pow(2)
    return (d2.min(dim=1).values / a[0].numel()).sqrt()


def sample_quality(samples: torch.Tensor, clf, train_images: torch.Tensor) -> dict:
    """Classifier and memorisation figures of a set of samples."""
    p = clf.predict_proba(samples.reshape(len(samples), -1).numpy())
    top = p.max(axis=1)
    counts = np.bincount(clf.classes_[p.argmax(axis=1)], minlength=10)
    share = counts / counts.sum()
    nz = share[share > 0]
    d = nn_rms(samples, train_images)
    return {
        "confident": float((top >= CONFIDENT).mean()),
        "class_entropy": float(-(nz * np.log(nz)).sum() / math.log(10)),  # 1: every class equally often
        "min_class_share": float(share.min()),
        "max_class_share": float(share.max()),
        "nn_median": float(d.median()),
        "copies": float((d < COPY_RMS).double().mean()),
    }


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation over the seeds (0 for one seed)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3g} ± {std:.2g}"


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def models(cfg: Config) -> list[str]:
    return list(cfg.losses) + [EXACT]


def summarise(cfg: Config, sigma_rows: list[dict], sample_rows: list[dict]) -> dict:
    """{model: {quantity: [(mean, std) per sigma]} and {quantity: (mean, std)}} over the seeds."""
    out = {}
    for m in models(cfg):
        rs = [r for r in sigma_rows if r["model"] == m]
        per_sigma = {}
        for q in ("mse_train", "mse_heldout", "martingale"):
            per_sigma[q] = [_stats([r[q] for r in rs if r["sigma_index"] == i]) for i in range(cfg.num_sigmas)]
        ss = [r for r in sample_rows if r["model"] == m]
        samples = {q: _stats([r[q] for r in ss]) for q in ss[0] if q not in ("model", "seed")}
        out[m] = {"per_sigma": per_sigma, "samples": samples}
    return out


def write_markdown(path: str, cfg: Config, env: dict, runs: list[dict], summary: dict, sigmas: list[float],
                   clf_accuracy: float, heldout_nn: float, total_s: float, command: str) -> None:
    L = [f"# The four objectives on the digits, against the exact denoiser ({'--quick' if cfg.quick else 'full'} run)", ""]
    L += [f"Command: `{command}`; {total_s / 60:.1f} min in all on {env['device_name']}, torch {env['torch']}, "
          f"cdm_kernels {env['cdm_kernels']}. Means ± standard deviations over {len(cfg.seeds)} seeds "
          f"{list(cfg.seeds)}; the row `exact` is the empirical denoiser of the training split itself.", ""]
    L += ["Chosen before any result: " + ", ".join(f"{k} {v}" for k, v in asdict(cfg).items()
                                                   if k not in ("out", "quick", "threads")) +
          "; every other option the loop's default (EMA half-life, warm-up, CDM's 6 schedule points, "
          "lambda_m 2, eps in [0, 0.05]).", ""]
    L += ["## Training: the same images, not the same time", "",
          "| objective | images | steps | wall seconds | x EDM's | CPU seconds | x EDM's |", "|---|---|---|---|---|---|---|"]

    def edm_mean(q):
        return _stats([r[q] for r in runs if r["loss"] == "edm"])[0] if any(r["loss"] == "edm" for r in runs) else float("nan")

    for loss in cfg.losses:
        rs = [r for r in runs if r["loss"] == loss]
        sec, cpu = _stats([r["seconds"] for r in rs]), _stats([r["cpu_seconds"] for r in rs])
        L.append(f"| {loss} | {rs[0]['images']} | {rs[0]['steps']} | {_fmt(*sec)} | {sec[0] / edm_mean('seconds'):.2f} | "
                 f"{_fmt(*cpu)} | {cpu[0] / edm_mean('cpu_seconds'):.2f} |")
    L += ["", "Load average (1, 5, 15 min) at the end of each run: "
          + "; ".join(f"{r['loss']} seed {r['seed']} {r['load_average']}" for r in runs) + "."]
    for title, q in (("Mean squared error to the exact denoiser of the training split (noisy training images)", "mse_train"),
                     ("Mean squared error to the exact denoiser of the held-out split (noisy held-out images)", "mse_heldout"),
                     ("Martingale violation: CDMLoss's term (D1a - D0)(D1b - D0), mean per element", "martingale")):
        L += ["", f"## {title}", "", "| sigma | " + " | ".join(models(cfg)) + " |", "|---" * (len(models(cfg)) + 1) + "|"]
        for i, s in enumerate(sigmas):
            L.append(f"| {s:.3g} | " + " | ".join(_fmt(*summary[m]["per_sigma"][q][i]) for m in models(cfg)) + " |")
    L += ["", "## Samples: classifier and nearest training image", "",
          f"A logistic regression trained on the training split ({clf_accuracy:.3f} accuracy on the held-out split) "
          f"classifies {cfg.samples} samples of each model (EDM's Heun sampler, {cfg.sample_steps} steps, the same "
          f"latents for every model). confident: share with class probability >= {CONFIDENT}; class entropy: of the "
          "predicted classes, over log 10 (1 = every class equally often); nn median: median RMS per pixel distance "
          f"to the nearest training image (held-out digits: {heldout_nn:.3f}); copies: share closer than {COPY_RMS}.", "",
          "| model | confident | class entropy | min class share | max class share | nn median | copies |",
          "|---|---|---|---|---|---|---|"]
    for m in models(cfg):
        s = summary[m]["samples"]
        L.append(f"| {m} | " + " | ".join(_fmt(*s[q]) for q in ("confident", "class_entropy", "min_class_share",
                                                                  "max_class_share", "nn_median", "copies")) + " |")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def plot(path: str, cfg: Config, summary: dict, sigmas: list[float], heldout_nn: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), dpi=100)
    colors = dict(zip(models(cfg), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    panels = (("mse_train", "MSE to the exact denoiser (training split)"),
              ("mse_heldout", "MSE to the exact denoiser (held-out split)"),
              ("martingale", "martingale violation (D1a-D0)(D1b-D0)"))
    for ax, (q, title) in zip(axes, panels):
        for m in models(cfg):
            if m == EXACT and q == "mse_train":
                continue  # zero by definition
            mean, std = (np.array(v) for v in zip(*summary[m]["per_sigma"][q]))
            ax.errorbar(sigmas, mean, yerr=std, label=m, color=colors[m], marker="o", ms=3, capsize=2,
                        ls="--" if m == EXACT else "-")
        ax.set_xscale("log")
        if q == "martingale":
            ax.set_yscale("symlog", linthresh=1e-6)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("sigma")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)  # the panel with every model (the exact row is 0 in the first)
    ax = axes[3]
    ms = models(cfg)
    x = np.arange(len(ms))
    for j, (q, label) in enumerate((("confident", f"confident (p >= {CONFIDENT})"), ("class_entropy", "class entropy / log 10"),
                                    ("nn_median", "nn distance (RMS)"))):
        mean, std = zip(*(summary[m]["samples"][q] for m in ms))
        ax.bar(x + (j - 1) * 0.27, mean, 0.27, yerr=std, capsize=2, label=label)
    ax.axhline(heldout_nn, color="k", lw=0.8, ls=":", label="nn distance of held-out digits")
    ax.set_xticks(x, ms)
    ax.set_ylim(0, 1.45)
    ax.set_title("samples", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"EDM, STF, CDM, STF+CDM on the digits: {cfg.images} images, {len(cfg.seeds)} seeds "
                 f"(error bars: std over seeds){', --quick' if cfg.quick else ''}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------


def run(cfg: Config, command: str = "", log=print) -> dict:
    t0 = time.time()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    sigmas = sigma_grid(cfg.num_sigmas)
    tr_x, tr_y, te_x, te_y = split_digits(cfg.held_out, cfg.split_seed)
    truth_train, truth_heldout = EmpiricalDenoiser(tr_x), EmpiricalDenoiser(te_x)
    env = sc.environment("cpu")
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "digits_train.npz")
        np.savez(data, images=tr_x.numpy(), labels=tr_y.numpy())
        runs, nets = train_all(cfg, data, work, log)
    c = train_config(cfg, "cdm", 0, "", "")
    clf = fit_classifier(tr_x, tr_y)
    clf_accuracy = float(clf.score(te_x.reshape(len(te_x), -1).numpy(), te_y.numpy()))
    heldout_nn = float(nn_rms(te_x, tr_x).median())
    # The same evaluation images and noise for every model: the comparisons are paired.
    g = torch.Generator().manual_seed(12345)
    ev_tr = tr_x[torch.randperm(len(tr_x), generator=g)[: cfg.eval_images]]
    ev_te = te_x[torch.randperm(len(te_x), generator=g)[: cfg.eval_images]]
    ev_mart = tr_x[torch.randperm(len(tr_x), generator=g)[: cfg.mart_images]]
    sigma_rows, sample_rows = [], []
    evaluated = [((loss, seed), net) for (loss, seed), net in nets.items()]
    evaluated += [((EXACT, seed), truth_train) for seed in cfg.seeds]  # seeds of its rollouts and latents
    for (m, seed), net in evaluated:
        mse_tr = error_to_truth(net, truth_train, ev_tr, sigmas, seed=1)
        mse_te = error_to_truth(net, truth_heldout, ev_te, sigmas, seed=2)
        mart = martingale_violation(net, ev_mart, sigmas, 100 + seed, c)
        for i, s in enumerate(sigmas):
            sigma_rows.append({"model": m, "seed": seed, "sigma_index": i, "sigma": s, "mse_train": mse_tr[i],
                               "mse_heldout": mse_te[i], "martingale": mart[i]})
        q = sample_quality(draw_samples(net, cfg.samples, cfg.sample_steps, 1000 + seed), clf, tr_x)
        sample_rows.append({"model": m, "seed": seed, **q})
        log(f"evaluated {m} seed {seed}: confident {q['confident']:.2f}, nn median {q['nn_median']:.3f}")
    summary = summarise(cfg, sigma_rows, sample_rows)
    total = time.time() - t0
    stamp = {"device_name": env["device_name"], "torch": env["torch"], "cdm_kernels": env["cdm_kernels"]}
    _write_csv(os.path.join(cfg.out, "objectives_runs.csv"), [{**r, **stamp} for r in runs])
    _write_csv(os.path.join(cfg.out, "objectives_sigma.csv"), [{**r, **stamp} for r in sigma_rows])
    _write_csv(os.path.join(cfg.out, "objectives_samples.csv"), [{**r, **stamp} for r in sample_rows])
    write_markdown(os.path.join(cfg.out, "objectives.md"), cfg, env, runs, summary, sigmas, clf_accuracy,
                   heldout_nn, total, command)
    plot(os.path.join(cfg.out, "objectives.png"), cfg, summary, sigmas, heldout_nn)
    with open(os.path.join(cfg.out, "objectives_command.txt"), "w") as f:
        f.write(command + "\n" + json.dumps(asdict(cfg)) + "\n")
    log(f"{len(runs)} runs and {len(evaluated)} evaluations in {total / 60:.1f} min; results in {cfg.out}")
    return {"runs": runs, "sigma_rows": sigma_rows, "sample_rows": sample_rows, "summary": summary,
            "classifier_accuracy": clf_accuracy, "seconds": total}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.objectives", description=__doc__.split("\n\n")[0])
    sc.add_quick_and_out(ap, "objectives", f"2 seeds, {QUICK['images']} images a run, fewer evaluation draws: "
                         "under 10 minutes on 2 cores")
    ap.add_argument("--threads", type=sc.positive_int("--threads"), default=None, help="torch's CPU threads")
    ap.add_argument("--losses", default=",".join(LOSSES), help="subset of edm,stf,cdm,stf+cdm (default: all)")
    ap.add_argument("--seeds", type=sc.positive_int("--seeds"), default=None, help="number of seeds (3; --quick 2)")
    ap.add_argument("--images", type=sc.positive_int("--images"), default=None, help="training images a run (38400; --quick 9600)")
    ap.add_argument("--batch", type=sc.positive_int("--batch"), default=None, help="batch (64)")
    ap.add_argument("--rbatch", type=sc.positive_int("--rbatch"), default=None, help="STF reference batch (1024)")
    ap.add_argument("--channels", type=sc.positive_int("--channels"), default=None, help="U-Net channels (16)")
    ap.add_argument("--sigmas", type=sc.positive_int("--sigmas"), default=None, help="noise levels over [0.002, 80] (13)")
    ap.add_argument("--eval-images", type=sc.positive_int("--eval-images"), default=None, help="images per sigma (360)")
    ap.add_argument("--mart-images", type=sc.positive_int("--mart-images"), default=None,
                    help="images per sigma of the martingale violation (256; --quick 64)")
    ap.add_argument("--samples", type=sc.positive_int("--samples"), default=None, help="samples per model (1000; --quick 200)")
    ap.add_argument("--sample-steps", type=sc.positive_int("--sample-steps"), default=None, help="Heun steps (18)")
    return ap


def parse_args(argv=None) -> Config:
    ap = build_parser()
    a = ap.parse_args(argv)
    losses = tuple(s for s in a.losses.split(",") if s)
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown or not losses:
        ap.error(f"--losses: expected a non-empty subset of {','.join(LOSSES)}, got {a.losses!r}")
    cfg = Config(quick=a.quick, out=a.out, threads=a.threads, losses=tuple(x for x in LOSSES if x in losses))
    if a.quick:
        cfg = replace(cfg, **QUICK)
    over = dict(images=a.images, batch=a.batch, rbatch=a.rbatch, model_channels=a.channels, num_sigmas=a.sigmas,
                eval_images=a.eval_images, mart_images=a.mart_images, samples=a.samples, sample_steps=a.sample_steps)
    cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if a.seeds is not None:
        cfg = replace(cfg, seeds=tuple(range(a.seeds)))
    if cfg.images < cfg.batch:
        ap.error(f"--images ({cfg.images}) must be at least --batch ({cfg.batch})")
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    command = "python -m benchmarks.objectives " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    run(cfg, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
