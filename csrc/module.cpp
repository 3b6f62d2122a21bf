// The Python module `cdm_kernels._C`. Importing it loads the library, whose static initialisers
// register every op under torch.ops.cdm_kernels_C: the schemas of csrc/ops.cpp and the
// implementations of csrc/cpu and csrc/cuda (TORCH_LIBRARY_IMPL per dispatch key in each op's file).
#include <torch/extension.h>

#include "cpu/rollout_cpu.h"
#ifdef CDM_WITH_CUDA
#include "cuda/level_status.h"
#endif

#ifndef CDM_CUDA_ARCHS
#define CDM_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cdm_kernels compiled kernels (ops live in torch.ops.cdm_kernels_C)";
  m.def("built_with_cuda", []() {
#ifdef CDM_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_archs", []() { return std::string(CDM_CUDA_ARCHS); });
  m.def("rollout_levels_valid", &cdm::rollout::levels_valid, "rollout_step's check of t_cur, t_next on the CPU",
        pybind11::arg("t_cur"), pybind11::arg("t_next"), pybind11::arg("next_positive"));
#ifdef CDM_WITH_CUDA
  m.def("rollout_set_level_status", &cdm::rollout::cuda::set_level_status,
        "where the CUDA rollout kernels of dev's device record invalid noise levels (cdm_kernels/level_status.py)",
        pybind11::arg("dev"), pybind11::arg("host"));
  m.def("check_levels", &cdm::rollout::cuda::check_levels,
        "LevelStatus.check on a CUDA device: one launch and the status copy (cdm_kernels/level_status.py)",
        pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("source"));
#endif
}
