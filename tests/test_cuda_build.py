"""The CUDA sources compile with nvcc for sm_80 and sm_90, and ptxas reports no spills and no
shared-memory overflow for any kernel (there is no GPU here: this is how such a regression shows).

Runs nvcc itself through tools/ptxas_report.py, prints the per-kernel figures (see them with -s) and
writes the report into a temporary directory; the committed copy is
benchmarks/results/ptxas_report.md (refresh it with `python tools/ptxas_report.py`).
Skipped, visibly, only when nvcc is absent. When nvcc and a CUDA build of torch are both present,
an extension without its CUDA kernels is a failure, not a skip (`missing_cuda_build`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("ptxas_report", os.path.join(ROOT, "tools", "ptxas_report.py"))
ptxas_report = importlib.util.module_from_spec(_spec)
sys.modules["ptxas_report"] = ptxas_report  # dataclasses look their module up while it executes
_spec.loader.exec_module(ptxas_report)

NVCC = ptxas_report.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin): CUDA build not checked")

# Every kernel stf.cu instantiates: each per-thread functor of stf_kernels.h, float and double (the
# products are cuBLAS's).
FUNCTORS = ("ShiftRows", "DotRows", "QueryRows", "ChunkMin", "ChunkUpdate", "RowMerge", "ScaleRows", "NearestParts",
            "FinalizeRows", "FinalizeMu", "BackwardTerms", "ColumnSums", "RefGradFinish", "BackwardFinishX",
            "BackwardFinishSigma")
EXPECTED = {f"void thread_kernel<{f}<{t}> >" for f in FUNCTORS for t in ("float", "double")} | {
    f"void thread_kernel<{f}>" for f in ("RowSums", "RowsReset")
}


SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 8320 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_80'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 352 bytes cmem[0]
"""


def test_parser_reads_every_figure():
    # Independent of nvcc: the parser must see spills and shared memory, or the build test is vacuous.
    recs = {r.mangled: r for r in ptxas_report.parse_ptxas(SAMPLE, "x.cu")}
    foo, bar = recs["_Z3fooPf"], recs["_Z3barv"]
    assert (foo.registers, foo.stack, foo.spill_stores, foo.spill_loads, foo.smem, foo.barriers) == (
        40, 8, 12, 16, 8320, 1)
    assert (bar.registers, bar.spill_stores, bar.spill_loads, bar.smem, bar.barriers) == (8, 0, 0, 0, 0)
    foo.name, bar.name = "foo", "bar"
    assert ptxas_report.problems([foo, bar]) == ["sm_80 foo: spills 12 bytes stored / 16 loaded"]
    foo.spill_stores = foo.spill_loads = 0
    foo.smem = 49153
    assert ptxas_report.problems([foo]) == ["sm_80 foo: 49153 bytes of shared memory > 49152"]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin): CUDA build not checked")
    work = tmp_path_factory.mktemp("ptxas")
    recs = ptxas_report.collect(("80", "90"), NVCC, str(work))
    text = ptxas_report.markdown(recs, NVCC)
    (work / "ptxas_report.md").write_text(text)
    print("\n" + text)
    return recs


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_is_compiled_for_each_arch(records, arch):
    names = {r.name for r in records if r.arch == arch}
    assert EXPECTED <= names, f"missing kernels for {arch}: {sorted(EXPECTED - names)}"


@needs_nvcc
def test_no_spills_and_shared_memory_within_sm80_limit(records):
    assert ptxas_report.problems(records) == []
    assert all(r.smem <= ptxas_report.STATIC_SMEM_LIMIT for r in records)
    # The stable target's kernels are per-thread functors: no shared memory, no barrier.
    for r in records:
        if r.source.endswith("stf.cu"):
            assert r.smem == 0 and r.barriers == 0, r.name


@needs_nvcc
def test_nvcc_compiles_without_warnings(tmp_path):
    # A warning here has meant device code calling host-only functions (e.g. std::numeric_limits).
    import subprocess

    for src in ptxas_report.cuda_sources():
        cmd = [NVCC, "-cubin", "-arch=sm_80", *ptxas_report.NVCC_FLAGS, "-I", os.path.join(ROOT, "csrc"), src,
               "-o", str(tmp_path / "w.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "warning" in ln.lower()]
        assert warnings == [], warnings


@needs_nvcc
def test_committed_report_lists_the_current_kernels(records):
    path = os.path.join(ROOT, "benchmarks", "results", "ptxas_report.md")
    with open(path) as f:
        committed = set(re.findall(r"\| (sm_\d+) \| `([^`]+)` \|", f.read()))
    current = {(r.arch, r.name) for r in records}
    assert committed == current, "benchmarks/results/ptxas_report.md is stale: run python tools/ptxas_report.py"


def _header_functions(text: str) -> set[str]:
    return set(re.findall(r"CDM_HD\s+(?:[\w:<>]+\s+)+?(\w+)\s*\(", text))


def test_cuda_kernels_call_every_shared_function():
    # Why csrc/cuda/stf_math_check.cu could go: the kernels themselves instantiate every
    # __host__ __device__ function of stf_math.h (directly or through another one), so nvcc checks
    # all of them for the device.
    with open(os.path.join(ROOT, "csrc", "stf_math.h")) as f:
        math_h = f.read()
    with open(os.path.join(ROOT, "csrc", "cuda", "stf_kernels.h")) as f:
        kernels_h = f.read()
    functions = _header_functions(math_h)
    assert {"reduced_dist", "state_rebase", "state_finalize", "backward_weight", "grad_sigma"} <= functions
    bodies = {}
    for name in functions:
        m = re.search(r"CDM_HD\s+(?:[\w:<>]+\s+)+?" + name + r"\s*\([^)]*\)\s*\{(.*?)\n\}", math_h, re.S)
        bodies[name] = m.group(1) if m else ""
    # state_add and state_merge are the CPU's (its single-thread row loop) and the merge's across
    # shards; the kernels inline the same lines in ChunkUpdate / RowMerge.
    functions -= {"state_add", "state_merge"}
    used = {f for f in functions if re.search(r"\b" + f + r"\s*[<(]", kernels_h)}
    changed = True
    while changed:
        more = {f for f in functions - used for u in used if re.search(r"\b" + f + r"\s*[<(]", bodies[u])}
        changed = bool(more)
        used |= more
    assert functions - used == set()


def missing_cuda_build(has_cuda_kernels: bool, nvcc: str | None, torch_cuda: str | None, env) -> str | None:
    """Why the extension should have CUDA kernels and has not, or None. A CPU-only extension is
    legitimate only without nvcc, with a CPU build of torch, or when CDM_FORCE_CPU=1 / CDM_SKIP_BUILD=1
    asked for it; otherwise setup.py's CUDA build failed or was skipped, and the tests of the CUDA
    ops must fail rather than skip."""
    if has_cuda_kernels or nvcc is None or torch_cuda is None:
        return None
    if env.get("CDM_FORCE_CPU") == "1" or env.get("CDM_SKIP_BUILD") == "1":
        return None
    return (f"nvcc ({nvcc}) and a CUDA build of torch (CUDA {torch_cuda}) are present, but the extension has "
            f"no CUDA kernels; the CUDA build failed or was skipped (see build/build.log; CDM_FORCE_CPU=1 opts out)")


def test_missing_cuda_build_is_a_failure_not_a_skip():
    # The decision itself, on any machine: toolchain present and no CUDA kernels is an error.
    assert "the extension has no CUDA kernels" in missing_cuda_build(False, "/usr/bin/nvcc", "13.0", {})
    assert missing_cuda_build(True, "/usr/bin/nvcc", "13.0", {}) is None
    assert missing_cuda_build(False, None, "13.0", {}) is None
    assert missing_cuda_build(False, "/usr/bin/nvcc", None, {}) is None
    assert missing_cuda_build(False, "/usr/bin/nvcc", "13.0", {"CDM_FORCE_CPU": "1"}) is None
    assert missing_cuda_build(False, "/usr/bin/nvcc", "13.0", {"CDM_SKIP_BUILD": "1"}) is None


def test_cuda_ops_are_registered_for_the_cuda_key_only():
    # Without a GPU the built extension can still show that every op of cdm_kernels_C has a CUDA
    # implementation, serves the "cuda" backend, and is not dispatched to it for CPU tensors.
    import torch

    import cdm_kernels

    if not cdm_kernels.has_cuda_kernels():
        why = missing_cuda_build(False, NVCC, torch.version.cuda, os.environ)
        if why:
            pytest.fail(f"{why}: {cdm_kernels.extension_status()}")
        pytest.skip(f"no nvcc or no CUDA build of torch, or CDM_FORCE_CPU=1: {cdm_kernels.extension_status()}")
    for name in ("stf_forward", "stf_backward", "rollout_step", "martingale_loss_forward", "martingale_loss_backward",
                 "philox_randn"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cdm_kernels_C::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cdm_kernels_C::{name}", "CPU"), name
    for op in ("stf_target", "rollout_step", "martingale_loss", "randn"):
        assert cdm_kernels.available_backends(op, "cuda")[0] == "cuda"
        assert cdm_kernels.resolve_backend(op, "cpu") != "cuda"
    x, sigma, ref = torch.randn(2, 3), torch.ones(2), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"stf_forward \(cpu\): the CPU kernels compute in precision 'ieee' only"):
        torch.ops.cdm_kernels_C.stf_forward(x, sigma, ref, ref.mean(0), 2, "tf32", False)


def test_every_symbol_of_the_extension_resolves_at_load():
    # The products call cuBLAS directly (csrc/cuda/blas_cuda.cpp), found through torch's own CUDA
    # libraries: with lazy binding a missing one would show only at the first product, on a GPU.
    # LD_BIND_NOW=1 resolves every symbol when the extension loads.
    import subprocess

    code = "import cdm_kernels, sys; sys.exit(0 if cdm_kernels.has_cpu_kernels() else 3)"
    env = dict(os.environ, LD_BIND_NOW="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    import cdm_kernels

    assert cdm_kernels.has_cpu_kernels(), cdm_kernels.extension_status()


def test_no_code_reads_or_writes_torchs_global_tf32_switch():
    # Each product's math is chosen per call in C++ (a cuBLAS compute type) and through
    # cdm_kernels/matmul_mode.py in Python, the one place that touches torch's switch.
    pattern = re.compile(r"allowTF32CuBLAS|setAllowTF32CuBLAS|setFloat32Precision|allow_tf32|fp32_precision")
    found = []
    for folder in ("csrc", "cdm_kernels"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                path = os.path.join(base, name)
                if not name.endswith((".py", ".cpp", ".cu", ".h")) or path.endswith(os.path.join("cdm_kernels", "matmul_mode.py")):
                    continue
                with open(path, encoding="utf-8") as f:
                    found += [f"{os.path.relpath(path, ROOT)}:{i}" for i, line in enumerate(f, 1) if pattern.search(line)]
    assert not found, found
