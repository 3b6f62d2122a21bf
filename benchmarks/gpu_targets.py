"""The GPU targets of cdm_kernels, measured in one run on one GPU against the peers timed beside them.

    python -m benchmarks.gpu_targets [--out DIR] [--repeats 10] [--strict]
    python -m benchmarks.gpu_targets --quick      # any machine: small shapes, checks the script, no verdicts

Stable target, float32 inputs, at (B, n, D) = (64, 4096, 3072), (512, 4096, 3072), (512, 50000, 3072),
(256, 262144, 3072), (64, 16384, 12288), forward and forward+backward (gradients of x and sigma):
every GPU backend of the library in every precision mode (the CUDA backend also as "cuda <mode>
pipeline": its chunk pipeline, CDM_STF_OVERLAP=1, an experiment), against eager PyTorch (the matmul form
with the norms precomputed, softmax, matmul) in float32 with TF32 off, with TF32 on and in bfloat16,
`scaled_dot_product_attention` with augmented dimensions, and the authors' broadcast formula where it
fits in memory. The targets:

  ieee      >= 1.0x eager float32 (TF32 off), at every size and pass
  tf32x3    >= 1.8x eager float32, with an error against float64 within 2x eager float32's
  tf32      >= 1.0x eager with TF32 on;   bf16  >= 1.0x eager in bfloat16
  small     at (64, 4096, 3072): >= 1.5x the same-precision eager
  memory    extra memory at most a tenth of eager float32's, from n = 50000

and every time also as a fraction of the same-run matmul ceiling of its precision (a product of
8192^3 through torch: float32 without TF32, TF32, bf16) and of the copy ceiling.

Rollout steps (docs/math.md section 3), float32: the Euler step's per-call time at (256, 3, 32, 32)
<= 25 us; Euler and Heun at (4096, 3, 64, 64) >= 0.85 of a copy's bandwidth (bytes moved over time);
the SDE step with in-kernel noise >= 10x the authors' float64 step at both shapes; the martingale
loss forward+backward >= 0.8 of the copy's bandwidth.

Accuracy first: every method's mu (and gradients) is compared with the float64 judge on a problem
with spread weights at every sigma (benchmarks.stf_common's judge), and the errors are reported with
the times; a library method with a NaN or an error over 10x its peer's (and over 1e-3) is "wrong" and not timed.

Also, without a target, the host time of a call of `stf_target` and `rollout_step` on tiny problems,
through the public function and through the backend's launcher alone (docs/gpu_design.md, "The
host's share of a call"): what decides the small sizes.

Outputs in --out (default out/benchmarks/gpu_targets in the checkout, ignored by git): gpu_targets.csv
(one row per method, size and pass, with the device and versions in every row), gpu_targets.md and
gpu_targets.png (time against the size, per method). The verdict table is printed last. The short
stages run first (ceilings, rollout steps, host time), then the stable target's; on SIGTERM (a
`timeout` around the run) the outputs hold what was measured before it, say which stage was cut,
and the exit status is 1.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as `python benchmarks/gpu_targets.py`: the checkout's packages, as -m
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import cdm_kernels  # noqa: E402
from benchmarks import stf_common as sc  # noqa: E402
from cdm_kernels import registry, stf_reference  # noqa: E402
from cdm_kernels.matmul_mode import products  # noqa: E402
from cdm_kernels.stf import default_chunk_size  # noqa: E402

SIZES = ((64, 4096, 3072), (512, 4096, 3072), (512, 50000, 3072), (256, 262144, 3072), (64, 16384, 12288))
QUICK_SIZES = ((8, 256, 64), (16, 512, 64))
SMALL = (64, 4096, 3072)
ROLLOUT_SHAPES = ((256, 3, 32, 32), (4096, 3, 64, 64))
QUICK_ROLLOUT_SHAPES = ((8, 3, 8, 8), (16, 3, 16, 16))
PEER_OF = {"ieee": "eager fp32", "tf32x3": "eager fp32", "tf32": "eager tf32", "bf16": "eager bf16"}
TARGET = {"ieee": 1.0, "tf32x3": 1.8, "tf32": 1.0, "bf16": 1.0}


@dataclass
class Config:
    sizes: tuple = SIZES
    rollout_shapes: tuple = ROLLOUT_SHAPES
    repeats: int = 10
    quick: bool = False
    device: str = "cuda"


def tf32(enabled: bool):
    """torch's float32 products with TF32 on or off for the eager peers (cdm_kernels.matmul_mode)."""
    return products(enabled, torch.device("cuda"))


# ----------------------------------------------------------------------------------------------
# The stable target's methods: (name, precision label, fn(x, sigma, ref, norms) -> mu, extra bytes)
# ----------------------------------------------------------------------------------------------


def library(backend: str, precision: str, pipeline: bool = False):
    """The library's stable target; with `pipeline`, the CUDA backend's chunk pipeline (the next
    chunk's shift on a side stream, CDM_STF_OVERLAP=1). Every library method sets the variable when
    it is called, so that the backward pass right after its forward (in the same timed call) runs
    under the same setting while methods alternate."""

    def fn(x, sigma, ref, norms):
        os.environ["CDM_STF_OVERLAP"] = "1" if pipeline else "0"
        return cdm_kernels.stf_target(x, sigma, ref, backend=backend, precision=precision)

    return fn


def eager(dtype: torch.dtype, allow_tf32: bool):
    def fn(x, sigma, ref, norms):
        with tf32(allow_tf32):
            xd, rd, nd = x.to(dtype), ref.to(dtype), norms.to(dtype)
            z = torch.addmm(nd * -0.5, xd, rd.T) / (sigma.to(dtype) ** 2)[:, None]
            return (torch.softmax(z, dim=1) @ rd).to(x.dtype)

    return fn


def sdpa(x, sigma, ref, norms):
    with tf32(False):
        return sc.sdpa_augmented(x, sigma, ref, norms, sc._sdpa_prepare(ref, norms))


def authors(x, sigma, ref, norms):
    return sc.authors_broadcast(x, sigma, ref, norms)


def methods(device: str):
    """[(name, precision, fn, peer_name)], the library's backends for `device` in every mode first."""
    out = []
    for backend in cdm_kernels.available_backends("stf_target", device):
        if backend == "reference" or (device == "cpu" and backend in ("triton", "cuda")):
            continue  # the reference is the spec, the CPU's triton/cuda are test vehicles
        for p in cdm_kernels.registry.precisions("stf_target", backend, device):
            out.append((f"{backend} {p}", p, library(backend, p), PEER_OF[p]))
            if backend == "cuda":  # the same with the chunk pipeline, an experiment (docs/gpu_design.md)
                out.append((f"cuda {p} pipeline", p, library(backend, p, True), PEER_OF[p]))
    out += [("eager fp32", "ieee", eager(torch.float32, False), None),
            ("eager tf32", "tf32", eager(torch.float32, True), None),
            ("eager bf16", "bf16", eager(torch.bfloat16, False), None),
            ("sdpa", "ieee", sdpa, None),
            ("authors", "ieee", authors, None)]
    return out


def authors_fits(B, n, D, passes: str, device: str) -> bool:
    need = sc.FLOAT32 * ((4 if passes == "forward+backward" else 3) * B * n * D + 4 * B * n)
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return need < 0.8 * free
    return need < 2 << 30


def check_accuracy(device: str, D: int, ms) -> dict:
    """Relative error of mu, dL/dx and dL/dsigma against float64 for each method, on a problem whose
    weights spread at every sigma in [0.002, 80] (B = 16, n = 512)."""
    g = torch.Generator().manual_seed(7)
    inp = sc.gate_inputs(D, device)
    x, sigma, ref = inp.x, inp.sigma, inp.ref
    grad = torch.randn(x.shape, generator=g).to(device)
    x64 = x.double().cpu().requires_grad_()
    s64 = sigma.double().cpu().requires_grad_()
    mu64 = sc.judge_float64(x64, s64, ref.double().cpu())
    gx64, gs64 = torch.autograd.grad((mu64 * grad.double().cpu()).sum(), (x64, s64))
    errs = {}
    for name, _, fn, _ in ms:
        xs, ss = x.clone().requires_grad_(), sigma.clone().requires_grad_()
        try:
            mu = fn(xs, ss, ref, inp.ref_sqnorm)
            gx, gs = torch.autograd.grad((mu * grad).sum(), (xs, ss))
        except (RuntimeError, ValueError, torch.OutOfMemoryError) as exc:
            errs[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
            continue
        errs[name] = {k: sc._rel_err(v.double().cpu(), w) for k, v, w in
                      (("mu", mu, mu64), ("gx", gx, gx64), ("gs", gs, gs64))}
    return errs


def _ok(err: dict, peer_err: dict | None) -> bool:
    """A library method is fit to time when its errors are finite and at most 10x its peer's (1e-3 for
    the float32-grade modes at least); a peer only needs finite errors (its error is the yardstick)."""
    if "error" in err or not all(math.isfinite(v) for v in err.values()):
        return False
    if peer_err is None:
        return True
    return all(v <= max(1e-3, 10 * peer_err.get(k, 0.0)) for k, v in err.items())


def time_size(cfg: Config, B, n, D, passes, ms, errs) -> list[dict]:
    """One size and pass: every method timed in alternation, with its memory high-water excess."""
    inp = sc.make_inputs(B, n, D, cfg.device, seed=n)
    calls, rows = [], []
    for name, p, fn, peer in ms:
        row = {"method": name, "precision": p, "B": B, "n": n, "D": D, "pass": passes, "peer": peer or ""}
        if name == "authors" and not authors_fits(B, n, D, passes, cfg.device):
            row["status"] = "OOM (skipped: its (B, n, D) tensors do not fit)"
        elif name == "sdpa" and D > 4096 and cfg.device == "cuda":
            row["status"] = "skipped (no SDPA kernel for head dim > 4096 runs in useful time)"
        elif not _ok(errs.get(name, {"error": "not checked"}), errs.get(peer) if peer else None):
            row["status"] = f"wrong: {errs.get(name)}"
        else:
            method = sc.Method(name, name, lambda x, s, r, rn, prep, fn=fn: fn(x, s, r, rn), lambda *a: 0, lambda *a: 0)
            call = sc.make_call(method, inp, None, passes)
            try:
                row["peak_extra"] = sc.peak_extra_bytes(call, cfg.device)
                calls.append(call)
                row["status"] = "ok"
            except torch.OutOfMemoryError:
                row["status"] = "OOM (at run)"
                torch.cuda.empty_cache()
        rows.append(row)
    timed = [r for r in rows if r["status"] == "ok"]
    for r, t in zip(timed, sc.time_interleaved(calls, cfg.device, repeats=cfg.repeats)):
        r["ms"] = t.median * 1e3
        r["ms_q25"], r["ms_q75"] = t.q25 * 1e3, t.q75 * 1e3
    return rows


def stf_criteria(rows: list[dict], errs: dict, ceilings: dict, quick: bool) -> list[dict]:
    by = {(r["method"], r["B"], r["n"], r["D"], r["pass"]): r for r in rows}
    crit = []
    for r in rows:
        if not r["peer"]:
            continue
        key = (r["B"], r["n"], r["D"], r["pass"])
        peer = by.get((r["peer"], *key))
        p = r["precision"]
        target = 1.5 if (r["B"], r["n"], r["D"]) == SMALL else TARGET[p]
        ratio = peer["ms"] / r["ms"] if "ms" in r and peer and "ms" in peer else None
        flops = sc.effective_flops(r["B"], r["n"], r["D"], r["pass"]) * (3 if p == "tf32x3" else 1)
        ceil = ceilings.get({"ieee": "fp32", "tf32x3": "tf32", "tf32": "tf32", "bf16": "bf16"}[p])
        r["ceiling_fraction"] = flops / (r["ms"] / 1e3) / ceil if "ms" in r and ceil else None
        ok = ratio is not None and ratio >= target
        text = f"{r['method']} vs {r['peer']} at {key[:3]} {r['pass']}: >= {target}x"
        crit.append({"criterion": text, "measured": ratio, "target": target, "verdict": _verdict(ok, r, quick)})
        if p == "tf32x3" and key == (*SMALL, "forward"):
            e, e32 = errs[r["method"]].get("mu"), errs["eager fp32"].get("mu")
            crit.append({"criterion": f"{r['method']} error of mu within 2x eager fp32's", "measured": e,
                         "target": 2 * e32, "verdict": _verdict(e is not None and e <= 2 * e32, r, quick)})
        if r["n"] >= 50000 and r["precision"] == "ieee":
            eager_peak = by.get(("eager fp32", *key), {}).get("peak_extra")
            mine = r.get("peak_extra")
            frac = mine / eager_peak if mine is not None and eager_peak else None
            crit.append({"criterion": f"{r['method']} extra memory <= 0.1 x eager fp32's at {key[:3]} {r['pass']}",
                         "measured": frac, "target": 0.1,
                         "verdict": _verdict(frac is not None and frac <= 0.1, r, quick)})
    return crit


def _verdict(ok: bool, row: dict, quick: bool) -> str:
    if quick:
        return "n/a (quick)"
    if row.get("status", "ok") != "ok":
        return f"FAIL ({row['status'][:40]})"
    return "PASS" if ok else "FAIL"


# ----------------------------------------------------------------------------------------------
# Rollout steps
# ----------------------------------------------------------------------------------------------


def rollout_rows(cfg: Config, copy_rate: float) -> list[dict]:
    """Per shape: per-call times of the library's steps, the authors' float64 SDE step and a copy."""
    rows = []
    backend = cdm_kernels.resolve_backend("rollout_step", cfg.device)
    for shape in cfg.rollout_shapes:
        g = torch.Generator().manual_seed(0)
        x, D, xe, De, y = (torch.randn(shape, generator=g).to(cfg.device) for _ in range(5))
        B = shape[0]
        t = torch.rand(B, generator=g).to(cfg.device) * 10 + 0.1
        tn = t * 0.7
        n = x.numel()

        def authors_sde():
            x64 = x.double()
            h = (tn - t).double().reshape(-1, 1, 1, 1)
            return x64 + 2 * h * (x64 - D.double()) / t.double().reshape(-1, 1, 1, 1) + torch.sqrt(
                2 * h.abs() * t.double().reshape(-1, 1, 1, 1)) * torch.randn_like(x64)

        w = torch.full((B, 1, 1, 1), 2.0, device=cfg.device)

        def loss_fwd_bwd():
            leaves = [v.detach().requires_grad_() for v in (D, xe, De)]
            cdm_kernels.martingale_loss(*leaves, y, w, backend=backend).backward(x)
            return leaves[0].grad

        calls = {
            "euler": (lambda: cdm_kernels.rollout_step(x, D, t, tn, kind="euler", backend=backend), 3 * 4 * n),
            "heun": (lambda: cdm_kernels.rollout_step(x, D, t, tn, kind="heun", x_euler=xe, denoised_euler=De,
                                                      backend=backend), 5 * 4 * n),
            "sde": (lambda: cdm_kernels.rollout_step(x, D, t, tn, kind="sde", seed=1, backend=backend), 3 * 4 * n),
            "authors sde (float64)": (authors_sde, 0),
            "martingale fwd+bwd": (loss_fwd_bwd, (5 + 3) * 4 * n + (5 + 3) * 4 * n),
        }
        with torch.no_grad():
            timings = sc.time_interleaved([c for c, _ in list(calls.values())[:4]], cfg.device, repeats=cfg.repeats)
        timings.append(sc.time_interleaved([calls["martingale fwd+bwd"][0]], cfg.device, repeats=cfg.repeats)[0])
        for (name, (_, nbytes)), tm in zip(calls.items(), timings):
            rate = nbytes / tm.median if nbytes else None
            rows.append({"shape": shape, "method": name, "backend": backend if "authors" not in name else "torch",
                         "us": tm.median * 1e6, "bytes": nbytes, "copy_fraction": rate / copy_rate if rate else None})
    return rows


def rollout_criteria(rows: list[dict], quick: bool) -> list[dict]:
    by = {(r["shape"], r["method"]): r for r in rows}
    small, large = (QUICK_ROLLOUT_SHAPES if quick else ROLLOUT_SHAPES)
    crit = []

    def add(text, measured, target, ok):
        crit.append({"criterion": text, "measured": measured, "target": target,
                     "verdict": "n/a (quick)" if quick else ("PASS" if ok else "FAIL")})

    e = by[(small, "euler")]["us"]
    add(f"euler per call at {small} <= 25 us", e, 25.0, e <= 25.0)
    for kind in ("euler", "heun"):
        f = by[(large, kind)]["copy_fraction"]
        add(f"{kind} at {large} >= 0.85 of the copy's bandwidth", f, 0.85, f >= 0.85)
    for shape in (small, large):
        ratio = by[(shape, "authors sde (float64)")]["us"] / by[(shape, "sde")]["us"]
        add(f"sde (in-kernel noise) vs authors' float64 step at {shape} >= 10x", ratio, 10.0, ratio >= 10)
    f = by[(large, "martingale fwd+bwd")]["copy_fraction"]
    add(f"martingale loss forward+backward at {large} >= 0.8 of the copy's bandwidth", f, 0.8, f >= 0.8)
    return crit


# ----------------------------------------------------------------------------------------------
# Host time of a call
# ----------------------------------------------------------------------------------------------


def _host_us(call, device: str, repeats: int = 25) -> float:
    """Host time of one call in us: calls back to back, timed without waiting for the device (on a
    GPU 32 of them, which its launch queue holds), then one synchronisation outside the timing;
    median of `repeats`. On the CPU, where the work runs in the call, the work is included."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    calls = 32 if cuda else 200
    for _ in range(calls):
        call()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - t0) / calls)
        sync()
    return statistics.median(times) * 1e6


def host_rows(device: str) -> list[dict]:
    """The host's share of a call (docs/gpu_design.md): tiny problems through the public function and
    through the backend's launcher alone, with the arguments the public function would pass made
    beforehand. Their difference is the public function's own host time (checks, shapes, the
    centre, the level check); the launcher's is its launches. A diagnostic, no target."""
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(8, 64, generator=g).to(device), torch.randn(64, 64, generator=g).to(device)
    sigma = (torch.rand(8, generator=g) + 0.5).to(device)
    xs, D = (torch.randn(8, 3, 8, 8, generator=g).to(device) for _ in range(2))
    t = (torch.rand(8, generator=g) + 1.0).to(device)
    tn = t * 0.5
    dt = torch.device(device).type
    stf_backend = cdm_kernels.resolve_backend("stf_target", device)
    roll_backend = cdm_kernels.resolve_backend("rollout_step", device)
    stf_forward = registry.launchers("stf_target", stf_backend, dt).stf_forward
    step = registry.launchers("rollout_step", roll_backend, dt).rollout_step
    centre, chunk = stf_reference.centre_of(ref), default_chunk_size(8, 64, 64)
    flat = xs.reshape(8, -1), D.reshape(8, -1)
    calls = [
        ("stf_target", stf_backend, lambda: cdm_kernels.stf_target(x, sigma, ref),
         lambda: stf_forward(x, sigma, ref, centre, chunk, "ieee", False)),
        ("rollout_step (euler)", roll_backend, lambda: cdm_kernels.rollout_step(xs, D, t, tn, kind="euler"),
         lambda: step(*flat, t, tn, None, None, None, 0, 0, "euler", 1.0)),
    ]
    rows = []
    with torch.no_grad():
        for op, backend, public, launcher in calls:
            pub, lau = _host_us(public, device), _host_us(launcher, device)
            rows.append({"op": op, "backend": backend, "public_us": pub, "launcher_us": lau,
                         "python_us": pub - lau})
    return rows


# ----------------------------------------------------------------------------------------------
# Ceilings, outputs, main
# ----------------------------------------------------------------------------------------------


def ceilings(cfg: Config) -> dict:
    """Same-run ceilings: matmul FLOP/s in float32 (TF32 off), TF32 and bf16, and the copy's bytes/s."""
    size = 8192 if cfg.device == "cuda" and not cfg.quick else 512
    out = {}
    for key, dtype, allow in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False)):
        a = torch.randn(size, size, device=cfg.device).to(dtype)
        b = torch.randn(size, size, device=cfg.device).to(dtype)
        with tf32(allow):
            t = sc.time_interleaved([lambda: a @ b], cfg.device, repeats=5)[0]
        out[key] = 2 * size**3 / t.median
    src = torch.randn((1 << 28) if cfg.device == "cuda" and not cfg.quick else (1 << 20), device=cfg.device)
    t = sc.time_interleaved([lambda: src.clone()], cfg.device, repeats=5)[0]
    out["copy"] = 2 * src.numel() * 4 / t.median
    return out


def write_outputs(out: str, res: Results, crit: list[dict]) -> tuple[str, str]:
    env, ceil, stf_rows, errs, roll_rows, host = res.env, res.ceil, res.rows, res.errs, res.roll, res.host
    os.makedirs(out, exist_ok=True)
    csv_path, md_path = os.path.join(out, "gpu_targets.csv"), os.path.join(out, "gpu_targets.md")
    keys = ["device_name", "torch", "triton", "cdm_kernels", "method", "precision", "B", "n", "D", "pass", "status",
            "ms", "ms_q25", "ms_q75", "peak_extra", "peer", "ceiling_fraction"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in stf_rows:
            w.writerow({**{k: env.get(k, "") for k in keys[:4]}, **r})
    lines = [f"# GPU targets: {env['device_name']}, torch {env['torch']}, triton {env['triton']}", ""]
    if res.stopped:
        lines += [f"**Stopped early** (SIGTERM) during: {res.stopped}. What follows is what was measured "
                  "before it; the stages after it did not run.", ""]
    lines += ["Ceilings measured in the same run: " + ", ".join(
                  f"{k} {v / 1e12:.1f} TFLOP/s" if k != "copy" else f"copy {v / 1e12:.2f} TB/s" for k, v in ceil.items()),
              "", "## Errors against float64 (relative, normwise)", "", "| method | mu | dL/dx | dL/dsigma |",
              "|---|---:|---:|---:|"]
    for D, per in errs.items():
        for name, e in per.items():
            cells = " | ".join(f"{e[k]:.1e}" for k in ("mu", "gx", "gs")) if "error" not in e else e["error"]
            lines.append(f"| {name} (D = {D}) | {cells} |")
    lines += ["", "## Stable target: median ms [quartiles], fraction of the precision's matmul ceiling", "",
              "| B, n, D | pass | method | ms | peak extra | ceiling fraction | status |", "|---|---|---|---:|---:|---:|---|"]
    for r in stf_rows:
        ms = f"{r['ms']:.3f} [{r['ms_q25']:.3f}-{r['ms_q75']:.3f}]" if "ms" in r else ""
        frac = f"{r['ceiling_fraction']:.2f}" if r.get("ceiling_fraction") else ""
        pk = sc.fmt_bytes(r["peak_extra"]) if "peak_extra" in r else ""
        lines.append(f"| {r['B']}, {r['n']}, {r['D']} | {r['pass']} | {r['method']} | {ms} | {pk} | {frac} | "
                     f"{r['status']} |")
    lines += ["", "## Rollout steps: per-call time", "", "| shape | method | us | fraction of copy |", "|---|---|---:|---:|"]
    for r in roll_rows:
        cf = f"{r['copy_fraction']:.2f}" if r["copy_fraction"] else ""
        lines.append(f"| {r['shape']} | {r['method']} | {r['us']:.1f} | {cf} |")
    if host:
        lines += ["", "## Host time of a call (tiny problems: the host's share, no target)", "",
                  "| op | backend | public function us | launcher alone us | the public function's own us |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {r['op']} | {r['backend']} | {r['public_us']:.1f} | {r['launcher_us']:.1f} | "
                  f"{r['python_us']:.1f} |" for r in host]
    pipeline = pipeline_table(stf_rows)
    if pipeline:
        lines += ["", "## The chunk pipeline against the default (cuda backend, same run)", "", pipeline]
    lines += ["", "## Verdicts", "", verdict_table(crit)]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(stf_rows, os.path.join(out, "gpu_targets.png"), env)
    return csv_path, md_path


def _plot(rows, path, env) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, passes in zip(axes, sc.PASSES):
        sizes = sorted({(r["B"], r["n"], r["D"]) for r in rows})
        for name in dict.fromkeys(r["method"] for r in rows):
            pts = [(sizes.index((r["B"], r["n"], r["D"])), r["ms"]) for r in rows
                   if r["method"] == name and r["pass"] == passes and "ms" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xticks(range(len(sizes)), [f"{b}\n{n}\n{d}" for b, n, d in sizes], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{passes} (B, n, D)")
    if axes[1].lines:  # none when the run was cut before the stable target
        axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"stable target on {env['device_name']}, torch {env['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pipeline_table(rows: list[dict]) -> str:
    """The CUDA backend's time with its chunk pipeline (CDM_STF_OVERLAP=1) against without, per size,
    pass and mode where both were timed: the default changes only if the pipeline wins here."""
    ms = {(r["method"], r["B"], r["n"], r["D"], r["pass"]): r["ms"] for r in rows if "ms" in r}
    lines = ["| B, n, D | pass | mode | default ms | pipeline ms | speed-up |", "|---|---|---|---:|---:|---:|"]
    for (name, B, n, D, passes), t in ms.items():
        if not (name.startswith("cuda ") and name.endswith(" pipeline")):
            continue
        mode = name[len("cuda "):-len(" pipeline")]
        base = ms.get((f"cuda {mode}", B, n, D, passes))
        if base is not None:
            lines.append(f"| {B}, {n}, {D} | {passes} | {mode} | {base:.3f} | {t:.3f} | {base / t:.2f}x |")
    return "\n".join(lines) if len(lines) > 2 else ""


def verdict_table(crit: list[dict]) -> str:
    lines = ["| criterion | measured | target | verdict |", "|---|---:|---:|---|"]
    for c in crit:
        m = "" if c["measured"] is None else f"{c['measured']:.3g}"
        lines.append(f"| {c['criterion']} | {m} | {c['target']:.3g} | {c['verdict']} |")
    return "\n".join(lines)


class Stopped(BaseException):
    """SIGTERM (a `timeout` around the run, as scripts/gpu_check.sh's time budget sends): the results
    measured so far are written, with the stage that was cut. A BaseException, as KeyboardInterrupt,
    so that no `except Exception` on the way catches it as a method's failure."""


@dataclass
class Results:
    """What a run has measured so far; filled stage by stage, so that a run cut short still writes it."""

    env: dict
    ceil: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    errs: dict = field(default_factory=dict)
    roll: list = field(default_factory=list)
    host: list = field(default_factory=list)
    stopped: str = ""  # the stage a SIGTERM cut, if any

    def criteria(self, cfg: Config) -> list[dict]:
        crit = []
        if self.rows:
            crit += stf_criteria(self.rows, self.errs[cfg.sizes[0][2]], self.ceil, cfg.quick)
        if self.roll:
            crit += rollout_criteria(self.roll, cfg.quick)
        return crit


def run(cfg: Config, res: Results, log=print) -> Results:
    """Fills `res`: the ceilings, the rollout steps and the host times (short), then the stable
    target's errors and its sizes (long), so that a cut run keeps the short ones."""
    stage = "ceilings"
    try:
        res.ceil = ceilings(cfg)
        log("ceilings: " + ", ".join(f"{k} {v:.3g}" for k, v in res.ceil.items()))
        stage = "rollout steps"
        res.roll = rollout_rows(cfg, res.ceil["copy"])
        stage = "host time"
        res.host = host_rows(cfg.device)
        for r in res.host:
            log(f"host time of {r['op']} ({r['backend']}): {r['public_us']:.1f} us a call, "
                f"{r['launcher_us']:.1f} us of it the launcher's")
        ms = methods(cfg.device)
        for D in sorted({D for _, _, D in cfg.sizes}):
            stage = f"stable target accuracy, D = {D}"
            res.errs[D] = check_accuracy(cfg.device, D, ms)
        for B, n, D in cfg.sizes:
            for passes in sc.PASSES:
                stage = f"stable target {B}, {n}, {D} {passes}"
                log(stage)
                res.rows += time_size(cfg, B, n, D, passes, ms, res.errs[D])
    except Stopped:
        res.stopped = stage
        log(f"stopped by SIGTERM during: {stage}; writing what was measured before it")
    return res


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sc.add_quick_and_out(ap, "gpu_targets", "small shapes on any device: checks the script, no verdicts")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per method (median) (default 10)")
    ap.add_argument("--strict", action="store_true", help="exit status 1 when a verdict is FAIL")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.quick:
        ap.error("no CUDA GPU here: the targets are measured on a GPU (--quick checks the script on the CPU)")
    cfg = Config(repeats=3 if args.quick else args.repeats, quick=args.quick, device="cuda" if has_gpu else "cpu",
                 sizes=QUICK_SIZES if args.quick else SIZES,
                 rollout_shapes=QUICK_ROLLOUT_SHAPES if args.quick else ROLLOUT_SHAPES)
    res = Results(sc.environment(cfg.device))

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
        raise Stopped

    signal.signal(signal.SIGTERM, stop)
    run(cfg, res)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    crit = res.criteria(cfg)
    csv_path, md_path = write_outputs(args.out, res, crit)
    print(f"results in {csv_path}, {md_path}")
    pipeline = pipeline_table(res.rows)
    if pipeline:
        print(pipeline)
    print(verdict_table(crit))
    if res.stopped:
        print(f"stopped early, during: {res.stopped} (the stages after it did not run)")
        return 1
    failed = any(c["verdict"].startswith("FAIL") for c in crit)
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
