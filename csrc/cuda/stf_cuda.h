// The interface between the CUDA stable-target launches (stf.cu, built by nvcc without torch) and
// the torch glue (stf_cuda.cpp). Pointers are device pointers of contiguous tensors; the workspace
// holds ForwardWorkspace<T>::size(plan) / BackwardWorkspace<T>::size(plan, ref_grad) elements.
#pragma once

#include <cuda_runtime_api.h>

#include "stf_kernels.h"

namespace cdm {
namespace stf {
namespace cuda {

// The outcome of a launch sequence: the first failed launch, if any, and CUDA's message for it.
struct LaunchStatus {
  bool ok;
  const char* kernel;   // name of the kernel whose launch failed, or null
  const char* message;  // cudaGetErrorString of the failure, or ""
};

template <typename T>
LaunchStatus forward(const Plan& plan, const T* x, const T* sigma, const T* ref, const T* ref_sqnorm, T* mu,
                     T* lse, T* aux, T* workspace, cudaStream_t stream);

// grad_ref may be null (no gradient for the references).
template <typename T>
LaunchStatus backward(const Plan& plan, const T* grad_mu, const T* grad_lse, const T* x, const T* sigma,
                      const T* ref, const T* ref_sqnorm, const T* mu, const T* aux, T* grad_x, T* grad_sigma,
                      T* grad_ref, T* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace stf
}  // namespace cdm
