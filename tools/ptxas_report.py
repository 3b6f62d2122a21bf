"""Compiles every csrc/cuda/*.cu with nvcc for each target architecture and reports, per kernel,
what ptxas says it uses: registers, stack, spill stores/loads, static shared memory, barriers.

There is no GPU on the machines that build this project, so these figures are how a register
spill or a shared-memory overflow is seen. tests/test_cuda_build.py runs the same functions and
asserts on them; run this script to refresh the committed report:

    python tools/ptxas_report.py                # writes benchmarks/results/ptxas_report.md
    python tools/ptxas_report.py --arch 80 --out -   # one architecture, to stdout
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARCHS = ("80", "90")
# The flags setup.py gives nvcc that change code generation (its -gencode list is one arch here).
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "-DCDM_WITH_CUDA", "-Xptxas", "-v")
# Per-block static shared memory limit (48 KiB on sm_80 and sm_90; more needs a dynamic opt-in).
STATIC_SMEM_LIMIT = 48 * 1024
MAX_REGISTERS = 255

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclasses.dataclass
class KernelUsage:
    source: str  # path relative to the repository
    arch: str  # "sm_80"
    mangled: str
    name: str = ""  # demangled and shortened
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    barriers: int = 0


def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME/bin, else None."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = os.path.join(home, "bin", "nvcc") if home else None
    return candidate if candidate and os.access(candidate, os.X_OK) else None


def cuda_sources() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def parse_ptxas(text: str, source: str) -> list[KernelUsage]:
    """The per-kernel figures of `nvcc -Xptxas -v` output (one record per entry function and arch)."""
    records: dict[tuple[str, str], KernelUsage] = {}
    current: KernelUsage | None = None
    arch = ""
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            arch = m.group(2)
            current = records.setdefault((m.group(1), arch), KernelUsage(source, arch, m.group(1)))
            continue
        m = _PROPS.search(line)
        if m:
            key = (m.group(1), arch)
            current = records.get(key)
            continue
        if current is None:
            continue
        m = _STACK.search(line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m:
            current.registers = int(m.group(1))
            b = _BARRIERS.search(line)
            s = _SMEM.search(line)
            current.barriers = int(b.group(1)) if b else 0
            current.smem = int(s.group(1)) if s else 0
    return list(records.values())


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    pretty = out.splitlines()
    if len(pretty) != len(names):
        return {n: n for n in names}
    return {n: _shorten(p) for n, p in zip(names, pretty)}


def _shorten(name: str) -> str:
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = name.replace("cdm::stf::cuda::", "")
    return re.sub(r"\(.*\)$", "", name)  # argument list


def compile_and_parse(source: str, arch: str, nvcc: str, workdir: str) -> list[KernelUsage]:
    """Runs nvcc -cubin for one architecture ("80") on one .cu file; raises with nvcc's output on failure."""
    rel = os.path.relpath(source, ROOT)
    out = os.path.join(workdir, f"{os.path.basename(source)}.sm_{arch}.cubin")
    cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", *NVCC_FLAGS, "-I", os.path.join(ROOT, "csrc"), source, "-o", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {rel} for sm_{arch}:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    records = parse_ptxas(proc.stdout + proc.stderr, rel)
    names = _demangle([r.mangled for r in records])
    for r in records:
        r.name = names[r.mangled]
    return sorted(records, key=lambda r: r.name)


def collect(archs=DEFAULT_ARCHS, nvcc: str | None = None, workdir: str | None = None) -> list[KernelUsage]:
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (PATH, $CUDA_HOME/bin)")
    with tempfile.TemporaryDirectory() as tmp:
        work = workdir or tmp
        return [r for src in cuda_sources() for arch in archs for r in compile_and_parse(src, arch, nvcc, work)]


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else "unknown"


def problems(records: list[KernelUsage]) -> list[str]:
    """What the project does not accept: any spill, static shared memory above the sm_80 limit."""
    bad = []
    for r in records:
        if r.spill_stores or r.spill_loads:
            bad.append(f"{r.arch} {r.name}: spills {r.spill_stores} bytes stored / {r.spill_loads} loaded")
        if r.smem > STATIC_SMEM_LIMIT:
            bad.append(f"{r.arch} {r.name}: {r.smem} bytes of shared memory > {STATIC_SMEM_LIMIT}")
        if r.registers > MAX_REGISTERS:
            bad.append(f"{r.arch} {r.name}: {r.registers} registers > {MAX_REGISTERS}")
    return bad


def markdown(records: list[KernelUsage], nvcc: str) -> str:
    lines = [
        "# ptxas resource usage of the CUDA kernels",
        "",
        f"Generated by `python tools/ptxas_report.py` with {nvcc_version(nvcc)}; flags "
        f"`-cubin -arch=sm_XX {' '.join(NVCC_FLAGS)}` (the code-generation flags of setup.py).",
        "Checked by tests/test_cuda_build.py: no spill stores or loads, static shared memory within "
        f"{STATIC_SMEM_LIMIT // 1024} KiB per block (the sm_80 limit without opt-in), at most "
        f"{MAX_REGISTERS} registers.",
        "",
        "| source | arch | kernel | registers | stack (B) | spill stores (B) | spill loads (B) | smem (B) | barriers |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r.source} | {r.arch} | `{r.name}` | {r.registers} | {r.stack} | {r.spill_stores} | "
            f"{r.spill_loads} | {r.smem} | {r.barriers} |"
        )
    bad = problems(records)
    lines += ["", "Problems: " + ("none" if not bad else "; ".join(bad)), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help="SM architectures (default 80 90)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "ptxas_report.md"),
                        help="markdown file to write, or - for stdout")
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (PATH, $CUDA_HOME/bin): nothing to report", file=sys.stderr)
        return 2
    records = collect(args.arch, nvcc)
    text = markdown(records, nvcc)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {os.path.relpath(args.out, ROOT)}: {len(records)} kernels")
    bad = problems(records)
    for b in bad:
        print("PROBLEM:", b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
