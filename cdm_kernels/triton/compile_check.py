"""Compiles every Triton kernel of the package for real GPUs without a GPU and reports ptxas's register,
spill and shared-memory use and any size argument multiplied in 32 bits (docs/contributing.md,
"Compiling the Triton kernels without a GPU"). Usage: python -m cdm_kernels.triton.compile_check [--arch 80 90] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass


SPILL_LIMIT = 32  # bytes of spill stores per thread


@dataclass
class Variant:
    kernel: str
    label: str
    signature: dict
    constexprs: dict
    module: str = "stf"  # cdm_kernels.triton.<module> defines the kernel


def _ptr(names, dtype="fp32"):
    return {n: f"*{dtype}" for n in names}


def _ints(names):
    return {n: "i32" for n in names}


def variants(quick: bool = False) -> list[Variant]:
    """The kernel instantiations the launchers produce on a GPU: for the stable target float32 in
    every mode and float64 in "ieee", first and later chunks, with and without the reference
    gradient; then `rollout_variants`."""
    import torch

    from . import stf

    bs = stf._blocks(torch.device("cuda"))
    modes = ["bf16"] if quick else list(stf.PRECISIONS)
    cases = [("fp32", m) for m in modes] + ([] if quick else [("fp64", "ieee")])
    out = []
    for ty, mode in cases:
        p = stf.PRECISIONS.index(mode)
        od = "bf16" if mode == "bf16" else ty  # the operands' storage
        label = mode if ty == "fp32" else f"{mode}, float64"
        for ref_layout in (False, True):
            out.append(Variant(
                "_shift_rows_kernel", f"{label}, {'references' if ref_layout else 'queries'}",
                {**_ptr(["src_ptr", "centre_ptr"], ty), "op_ptr": f"*{od}", "norm_ptr": f"*{ty}",
                 **_ints(["rows", "D", "W"])},
                {"PREC": p, "REF_LAYOUT": ref_layout, "HAS_CENTRE": True, "WITH_NORMS": True,
                 "BLOCK_R": bs["rows"], "BLOCK_D": bs["d"]},
            ))
        updates = [(False, True)] if quick else [(first, keep) for first in (True, False) for keep in (False, True)]
        for first, keep in updates:
            out.append(Variant(
                "_fwd_update_kernel", f"{label}{', first chunk' if first else ''}{', kept distances' if keep else ''}",
                {"S_ptr": f"*{ty}", "keep_ptr": f"*{ty}", "E_ptr": f"*{od}",
                 **_ptr(["S_lo_ptr", "xn_ptr", "rn_ptr", "k_ptr"], ty), "state_ptr": "*fp64",
                 "arg_ptr": "*i64", "acc_ptr": f"*{ty}", "alpha_ptr": f"*{ty}", **_ints(["B", "c", "D", "start"])},
                {"IS_FIRST": first, "RESCALE": mode != "bf16", "KEEP": keep, "PREC": p, "BLOCK_B": bs["rows"],
                 "BLOCK_C": bs["cols"], "BLOCK_D": bs["d"]},
            ))
        sweeps = [(True, False)] if quick else [(True, False), (True, True), (False, True)]
        terms = [(final, ref_grad, given) for final, ref_grad in sweeps for given in (False, True)]
        for final, ref_grad, given in terms:
            out.append(Variant(
                "_bwd_terms_kernel", f"{label}{', ref_grad' if ref_grad else ''}{'' if final else ', first sweep'}"
                f"{', kept distances' if given else ''}",
                {"S_ptr": f"*{ty}", "E_ptr": f"*{od}",
                 **_ptr(["C_ptr", "S_lo_ptr", "A_ptr", "xn_ptr", "rn_ptr", "k_ptr", "sigma_ptr", "aux_ptr"], ty),
                 "mg_ptr": "*fp64", "glse_ptr": f"*{ty}", "rows_ptr": "*fp64", **_ints(["B", "c"])},
                {"AUX": 6, "FINAL": final, "REF_GRAD": ref_grad, "GIVEN": given, "PREC": p, "BLOCK_B": bs["rows"],
                 "BLOCK_C": bs["cols"]},
            ))
        if quick or mode != "ieee":
            continue  # the finishing kernels do not depend on the mode
        out.append(Variant(
            "_fwd_finish_kernel", label,
            {"state_ptr": "*fp64", **_ptr(["k_ptr", "dmin_ptr", "centre_ptr", "mu_ptr", "lse_ptr", "aux_ptr"], ty),
             **_ints(["B", "D"])},
            {"AUX": 6, "BLOCK_B": bs["rows"], "BLOCK_D": bs["d"]},
        ))
        out.append(Variant(
            "_bwd_finish_kernel", label,
            {**_ptr(["px_ptr", "mu_ptr", "x_ptr", "centre_ptr", "sigma_ptr", "glse_ptr", "aux_ptr"], ty),
             "rows_ptr": "*fp64", **_ptr(["gx_ptr", "gs_ptr"], ty), **_ints(["B", "D"])},
            {"AUX": 6, "BLOCK_B": bs["rows"], "BLOCK_D": bs["d"]},
        ))
    return out + rollout_variants(quick)


def rollout_variants(quick: bool = False) -> list[Variant]:
    """The rollout launchers' instantiations: every step kind with in-kernel or passed noise, the
    martingale loss forward and backward with per-row or per-element weights, float32 and float64;
    the noise kernel. Seeds and offsets are 64-bit (they may exceed 2^31), M is 32-bit."""
    from . import rollout

    blk = {"BLOCK": rollout.BLOCK}
    out = [Variant("_philox_randn_kernel", "float32",
                   {"out_ptr": "*fp32", "n": "i64", "seed": "i64", "offset": "i64"}, blk, "rollout")]
    for ty, source, has_b in (("fp32", 3, False), ("fp64", 2, True)):  # stf_target's sigma, a schedule's ends
        out.append(Variant("_check_levels_kernel", f"{'two levels' if has_b else 'one level'}, {ty}",
                           {**_ptr(["a_ptr", "b_ptr", "out_ptr"], ty), "status_ptr": "*i64", "B": "i32"},
                           {"SOURCE": source, "HAS_B": has_b, **blk}, "levels"))
    for ty in ("fp32",) if quick else ("fp32", "fp64"):
        label = "float32" if ty == "fp32" else "float64"
        for kind, code in rollout._KINDS.items():
            for has_noise in ((False, True) if kind in ("sde", "churn") else (False,)):
                out.append(Variant(
                    "_rollout_step_kernel", f"{kind}{', noise passed' if has_noise else ''}, {label}",
                    {**_ptr(["x_ptr", "d_ptr", "xe_ptr", "de_ptr", "z_ptr", "tc_ptr", "tn_ptr", "out_ptr"], ty),
                     "status_ptr": "*i64", "M": "i32", "seed": "i64", "offset": "i64", "s_noise": "fp32"},
                    {"KIND": code, "HAS_NOISE": has_noise, **blk}, "rollout",
                ))
        for backward in (False, True):
            for per_row in (True, False):
                out.append(Variant(
                    "_martingale_kernel",
                    f"{'backward' if backward else 'forward'}, {'per-row' if per_row else 'per-element'} weight, {label}",
                    {**_ptr(["g_ptr", "d0_ptr", "da_ptr", "db_ptr", "y_ptr", "w_ptr", "out_ptr", "ga_ptr", "gb_ptr"],
                            ty), "M": "i32", "lambda_m": "fp32"},
                    {"PER_ROW": per_row, "BACKWARD": backward, **blk}, "rollout",
                ))
    return out


def _ptxas() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    found = bundled if os.path.exists(bundled) else shutil.which("ptxas")
    if not found:
        raise RuntimeError("ptxas not found (neither triton's bundled copy nor one on PATH)")
    return found


def size_products_in_32_bits(ptx: str, kernel: str, arg_names: list[str], signature: dict) -> list[str]:
    """The PTX lines that multiply one of the kernel's 32-bit size arguments (every "i32" argument:
    B, M, D, c, ...) in 32 bits (mul.lo / mad.lo .s32/.u32): an index product that wraps once
    B M or n D passes 2^31. A widening product (mul.wide.s32) of a size is what int64 indices give."""
    names = [k for k in arg_names if signature[k] != "constexpr"]  # the PTX parameters, in order
    sizes = {m.group(1) for m in re.finditer(rf"ld\.param\.[bsu]32\s+(%r\d+),\s*\[{kernel}_param_(\d+)\]", ptx)
             if signature[names[int(m.group(2))]] == "i32"}
    out = []
    for line in ptx.splitlines():
        if re.search(r"\b(mul|mad)\.lo\.[su]32\b", line):
            operands = re.findall(r"%r\d+", line)[1:]  # the first register is the result
            if sizes.intersection(operands):
                out.append(line.strip())
    return out


def compile_variant(v: Variant, arch: int) -> dict:
    """Compiles one variant for sm_<arch>; returns registers, spill bytes, shared bytes, mma kind."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import levels, rollout, stf

    mod = {"stf": stf, "rollout": rollout, "levels": levels}[v.module]
    fn = getattr(mod, v.kernel)
    sig = {**v.signature, **{k: "constexpr" for k in v.constexprs}}
    src = ASTSource(fn, sig, v.constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    ptx = k.asm["ptx"]
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        # The flags Triton's own make_cubin passes (its ptxas 13 register-allocation workaround).
        cmd = [_ptxas(), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", path, "-o", os.devnull]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    info = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    mma = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "fma")
    return {"regs": regs, "spill_stores": int(spill.group(1)) if spill else 0,
            "spill_loads": int(spill.group(2)) if spill else 0, "shared": k.metadata.shared, "mma": mma,
            "size_products_32": size_products_in_32_bits(ptx, v.kernel, fn.arg_names, sig)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Compiles every Triton kernel for sm_80 and sm_90 without a GPU; reports ptxas figures.")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--quick", action="store_true",
                    help="the stable target's bf16 per-chunk kernels and the float32 rollout kernels only")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter has nothing to compile)", file=sys.stderr)
        return 2
    bad = 0
    print("| kernel | variant | arch | registers | spill st/ld (bytes) | shared (bytes) | products | 32-bit size products |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for arch in args.arch:
        for v in variants(args.quick):
            r = compile_variant(v, arch)
            bad += r["spill_stores"] > SPILL_LIMIT or r["spill_loads"] > SPILL_LIMIT or bool(r["size_products_32"])
            print(f"| {v.kernel} | {v.label} | sm_{arch} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | "
                  f"{r['shared']} | {r['mma']} | {len(r['size_products_32'])} |", flush=True)
            for line in r["size_products_32"]:
                print(f"  {v.kernel}: a size multiplied in 32 bits: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
