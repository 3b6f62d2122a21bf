// Stable target on CUDA GPUs (math.md section 1): the kernels and their launches.
//
// The thread code is csrc/cuda/stf_kernels.h (executed on the host by tests/cuda_emulator.cpp) and
// the arithmetic is csrc/stf_math.h (executed by the CPU backend); this file only turns them into
// __global__ functions and launches them on the caller's stream, checking every launch. It includes
// nothing from torch: csrc/cuda/stf_cuda.cpp is the torch glue (device guard, stream, allocation).
#include <cuda_runtime.h>

#include "stf_cuda.h"
#include "stf_kernels.h"

namespace cdm {
namespace stf {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Any per-thread functor of stf_kernels.h, one CUDA thread per flat index.
template <class F>
__global__ void __launch_bounds__(kThreads) thread_kernel(const F f) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < f.threads) f(t);
}

// The tiled product: the three phases of stf_kernels.h with the barriers between them.
template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS) gemm_kernel(const GemmArgs<T> g) {
  __shared__ GemmSmem<T> smem;
  GemmAcc<T> acc;
  gemm_zero(acc);
  int64_t m0, n0, k_begin, k_end, split;
  gemm_block_range(g, static_cast<int64_t>(blockIdx.x), &m0, &n0, &k_begin, &k_end, &split);
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += GEMM_BK) {
    gemm_load(g, smem, tid, m0, n0, k0, k_end);
    __syncthreads();
    gemm_multiply(smem, tid, acc);
    __syncthreads();
  }
  gemm_store(g, tid, m0, n0, split, acc);
}

// Launches on one stream; stops at the first failed launch and remembers which kernel it was.
struct DeviceExec {
  cudaStream_t stream;
  cudaError_t error;
  const char* failed;

  bool check(const char* name) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
      error = e;
      failed = name;
      return false;
    }
    return true;
  }

  bool grid_ok(int64_t blocks, const char* name) {
    if (blocks <= 0x7fffffff) return true;
    error = cudaErrorInvalidConfiguration;  // beyond gridDim.x: refuse instead of wrapping
    failed = name;
    return false;
  }

  template <class F>
  bool run(const F& f, const char* name) {
    if (f.threads == 0) return true;
    const int64_t blocks = (f.threads + kThreads - 1) / kThreads;
    if (!grid_ok(blocks, name)) return false;
    thread_kernel<F><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(f);
    return check(name);
  }

  template <typename T>
  bool gemm(const GemmArgs<T>& g, const char* name) {
    const int64_t blocks = gemm_blocks(g);
    if (blocks == 0) return true;
    if (!grid_ok(blocks, name)) return false;
    gemm_kernel<T><<<static_cast<unsigned>(blocks), GEMM_THREADS, 0, stream>>>(g);
    return check(name);
  }
};

LaunchStatus status_of(const DeviceExec& ex) {
  LaunchStatus s;
  s.ok = ex.error == cudaSuccess;
  s.kernel = ex.failed;
  s.message = s.ok ? "" : cudaGetErrorString(ex.error);
  return s;
}

}  // namespace

template <typename T>
LaunchStatus forward(const Plan& plan, const T* x, const T* sigma, const T* ref, const T* ref_sqnorm, T* mu,
                     T* lse, T* aux, T* workspace, cudaStream_t stream) {
  DeviceExec ex{stream, cudaSuccess, nullptr};
  forward_run<T>(ex, plan, x, sigma, ref, ref_sqnorm, mu, lse, aux, workspace);
  return status_of(ex);
}

template <typename T>
LaunchStatus backward(const Plan& plan, const T* grad_mu, const T* grad_lse, const T* x, const T* sigma,
                      const T* ref, const T* ref_sqnorm, const T* mu, const T* aux, T* grad_x, T* grad_sigma,
                      T* grad_ref, T* workspace, cudaStream_t stream) {
  DeviceExec ex{stream, cudaSuccess, nullptr};
  backward_run<T>(ex, plan, grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, grad_x, grad_sigma, grad_ref,
                  workspace);
  return status_of(ex);
}

#define CDM_STF_INSTANTIATE(T)                                                                                  \
  template LaunchStatus forward<T>(const Plan&, const T*, const T*, const T*, const T*, T*, T*, T*, T*,        \
                                   cudaStream_t);                                                               \
  template LaunchStatus backward<T>(const Plan&, const T*, const T*, const T*, const T*, const T*, const T*,   \
                                    const T*, const T*, T*, T*, T*, T*, cudaStream_t);
CDM_STF_INSTANTIATE(float)
CDM_STF_INSTANTIATE(double)
#undef CDM_STF_INSTANTIATE

}  // namespace cuda
}  // namespace stf
}  // namespace cdm
