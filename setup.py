"""Builds cdm_kernels._C: the CPU kernels always, the CUDA kernels when a CUDA build of torch and
nvcc are both present.

Environment switches:
  CDM_SKIP_BUILD=1      no extension at all (the package runs on its reference/triton backends)
  CDM_FORCE_CPU=1       skip the CUDA sources even when nvcc and a CUDA torch are present
  CDM_CUDA_ARCHS="80;90"  SM architectures to build for (default 80;90, plus PTX of the newest)
  MAX_JOBS              parallel compile jobs (default: cores, bounded by free memory at ~3 GiB a job)
"""

import glob
import importlib.util
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(*patterns):
    return sorted(os.path.relpath(p, ROOT) for pat in patterns for p in glob.glob(os.path.join(ROOT, pat)))


# One list of sources, read by CMakeLists.txt too (it globs the same patterns).
CPU_SOURCES = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
CUDA_SOURCES = _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")


def _toolkit_include_dirs(cuda_home):
    # The toolkit's own headers must come before pip's: pip's cuda_runtime_api.h includes
    # crt/host_defines.h, which only the toolkit ships, and the host compiler (for the .cpp glue that
    # includes ATen/cuda headers) does not know nvcc's include directory.
    candidates = [os.path.join(cuda_home, "include"), os.path.join(cuda_home, "cuda", "include")]
    candidates += sorted(glob.glob(os.path.join(cuda_home, "cuda-*", "include")), reverse=True)
    return [d for d in candidates if os.path.exists(os.path.join(d, "crt", "host_defines.h"))][:1]


def _cuda_include_dirs():
    # pip's nvidia packages carry the CUDA library headers the system toolkit lacks (cusparse.h, ...).
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [
        inc
        for base in spec.submodule_search_locations
        for inc in (os.path.join(base, "cu13", "include"), os.path.join(base, "cuda_runtime", "include"))
        if os.path.isdir(inc)
    ]


def _cuda_library_dirs(cuda_home):
    # The toolkit's libcudart.so may sit in lib64, lib, or under cuda/ (nvcc on PATH from /usr/local/bin).
    candidates = [os.path.join(cuda_home, *parts) for parts in (("lib64",), ("lib",), ("cuda", "lib64"), ("cuda", "lib"))]
    candidates += glob.glob(os.path.join(cuda_home, "cuda-*", "lib*"))
    return [d for d in candidates if os.path.exists(os.path.join(d, "libcudart.so"))][:1]


def _max_jobs():
    if "MAX_JOBS" in os.environ:
        return
    jobs = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        jobs = max(1, min(jobs, avail_kb // (3 * 1024 * 1024)))
    except (OSError, StopIteration, ValueError):
        pass
    os.environ["MAX_JOBS"] = str(jobs)


def _extensions():
    if os.environ.get("CDM_SKIP_BUILD") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    _max_jobs()
    with_cuda = (
        os.environ.get("CDM_FORCE_CPU") != "1" and torch.version.cuda is not None and CUDA_HOME is not None
    )
    include_dirs = [os.path.join(ROOT, "csrc")]
    # -fopenmp: at::parallel_for is a header template whose threads come from `#pragma omp parallel`;
    # compiled without OpenMP it silently runs on one thread (the CPU kernels' element passes did).
    # The loader then resolves libgomp.so.1 to the copy torch has already loaded: one runtime.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    if not with_cuda:
        ext = CppExtension("cdm_kernels._C", CPU_SOURCES, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                           extra_link_args=link)
        return [ext], {"build_ext": BuildExtension}
    archs = [a.strip() for a in os.environ.get("CDM_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
    defines = ["-DCDM_WITH_CUDA", f'-DCDM_CUDA_ARCHS="{",".join(archs)}"']
    nvcc = ["-O3", "-Xptxas", "-v", "-lineinfo", *gencode, *defines]
    ext = CUDAExtension(
        "cdm_kernels._C",
        CPU_SOURCES + CUDA_SOURCES,
        include_dirs=include_dirs + _toolkit_include_dirs(CUDA_HOME) + _cuda_include_dirs(),
        library_dirs=_cuda_library_dirs(CUDA_HOME),
        extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc},
        extra_link_args=link,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="cdm_kernels",
    version="0.1.0",
    description="Fused Triton/CUDA/C++ kernels for stable-target and consistency diffusion objectives",
    packages=find_packages(include=["cdm_kernels", "cdm_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "train": ["scikit-learn", "matplotlib", "tqdm", "pillow"],
        "bench": ["matplotlib", "tqdm", "pykeops"],
        "test": ["pytest"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["cdm-train=cdm_kernels.train:main"]},
)
