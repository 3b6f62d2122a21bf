// Every op of cdm_kernels_C, defined once: one schema per op, in this one file. The implementations
// attach by dispatch key in each op's own files (TORCH_LIBRARY_IMPL(cdm_kernels_C, CPU / CUDA)):
//   stf_forward, stf_backward           csrc/cpu/stf.cpp, csrc/cuda/stf_cuda.cpp
//   rollout_step, martingale_loss_*,    csrc/cpu/rollout.cpp, csrc/cuda/rollout_cuda.cpp
//   philox_randn
// Each op has the name and the arguments of a launcher of cdm_kernels/registry.py (the Python op
// cdm_kernels::<op> less its trailing `backend`), so the "cpu" and "cuda" backends are these ops.
#include <torch/library.h>

TORCH_LIBRARY(cdm_kernels_C, m) {
  m.def("stf_forward(Tensor x, Tensor sigma, Tensor ref, Tensor centre, int chunk_size, str precision, "
        "bool keep) -> (Tensor mu, Tensor lse, Tensor aux, Tensor dist)");
  m.def("stf_backward(Tensor grad_mu, Tensor grad_lse, Tensor x, Tensor sigma, Tensor ref, Tensor centre, "
        "Tensor mu, Tensor aux, Tensor dist, int chunk_size, str precision, bool ref_grad) "
        "-> (Tensor grad_x, Tensor grad_sigma, Tensor grad_ref)");
  m.def("rollout_step(Tensor x, Tensor denoised, Tensor t_cur, Tensor t_next, Tensor? x_euler, "
        "Tensor? denoised_euler, Tensor? noise, int seed, int offset, str kind, float s_noise) -> Tensor");
  m.def("martingale_loss_forward(Tensor D0, Tensor D1a, Tensor D1b, Tensor y, Tensor weight, float lambda_m) "
        "-> Tensor");
  m.def("martingale_loss_backward(Tensor grad, Tensor D0, Tensor D1a, Tensor D1b, Tensor y, Tensor weight, "
        "float lambda_m) -> (Tensor, Tensor, Tensor)");
  m.def("philox_randn(Tensor anchor, int[] shape, int seed, int offset) -> Tensor");
}
