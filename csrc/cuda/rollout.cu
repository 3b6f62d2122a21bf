// CUDA kernels of the rollout steps, Philox noise and the martingale loss (docs/math.md).
//
// Only the CUDA runtime and the project's headers: the per-element arithmetic is the CDM_HD code of
// rollout_math.h and philox.h, which the CPU backend executes and the tests check (invalid noise
// levels give NaN rows there, so no launch waits for a host-side check). Torch glue (streams,
// guards, checks, registration) is in rollout_cuda.cpp; the convention between them is
// csrc/cuda/launch.h's.
//
// Layout: (B, M) contiguous. A 2-D grid, blockIdx.x over column tiles, blockIdx.y striding over
// rows (B may exceed the 65535 limit of gridDim.y); each block computes its row's coefficients
// once and each thread handles kItems elements, so x and D are read once and x' written once.
#include <cstdint>

#include "cuda/launch.h"
#include "cuda/rollout_cuda.h"
#include "philox.h"
#include "rollout_math.h"

namespace cdm {
namespace rollout {
namespace cuda {

using cdm::cuda::as_stream;
using cdm::cuda::launch_status;

constexpr int kThreads = 256;
constexpr int kItems = 4;
constexpr int64_t kTileCols = static_cast<int64_t>(kThreads) * kItems;
constexpr int kMaxGridY = 65535;

__global__ void philox_randn_kernel(float* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = philox::randn(seed, offset + static_cast<uint64_t>(i));
  }
}

// The first sample with levels that are not valid, into the status word [source, sample, a bits,
// b bits] (cdm_kernels/level_status.py): whoever sets the source writes the rest.
template <typename T>
__device__ void record_bad_levels(int64_t* status, int64_t source, int64_t row, T a, T b) {
  if (atomicCAS(reinterpret_cast<unsigned long long*>(status), 0ull, static_cast<unsigned long long>(source)) ==
      0ull) {
    status[1] = row;
    status[2] = __double_as_longlong(static_cast<double>(a));
    status[3] = __double_as_longlong(static_cast<double>(b));
  }
}

// LevelStatus.check of cdm_kernels/level_status.py: out = a, NaN where a sample's levels are not
// valid (a positive and finite; with b, both finite and 0 < b <= a), and the lowest such sample
// recorded for `source` (the Triton check's rule). One block: a batch of noise levels is small,
// and one launch from C++ is what this replaces a Triton launch and a copy from Python with.
template <typename T>
__global__ void check_levels_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t B, int64_t source,
                                    T* __restrict__ out, int64_t* status) {
  __shared__ unsigned long long first;
  if (threadIdx.x == 0) first = ~0ull;
  __syncthreads();
  const T nan = static_cast<T>(__longlong_as_double(0x7ff8000000000000ll));
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    const T ai = a[i];
    bool ok = ai > T(0) && ai - ai == T(0);  // false for NaN and inf
    if (b != nullptr) {
      const T bi = b[i];
      ok = ok && bi > T(0) && bi - bi == T(0) && bi <= ai;
    }
    out[i] = ok ? ai : nan;
    if (!ok) atomicMin(&first, static_cast<unsigned long long>(i));
  }
  __syncthreads();
  if (threadIdx.x == 0 && first != ~0ull) {
    const int64_t i = static_cast<int64_t>(first);
    record_bad_levels<T>(status, source, i, a[i], b != nullptr ? b[i] : a[i]);
  }
}

// Queued behind the kernel that wrote the status word: the host sees it once that work has run,
// without waiting for it.
const char* copy_status(int64_t* status, int64_t* status_host, void* stream) {
  if (status == nullptr || status_host == nullptr) return nullptr;
  const cudaError_t e = cudaMemcpyAsync(status_host, status, kStatusWords * sizeof(int64_t), cudaMemcpyDeviceToHost,
                                        as_stream(stream));
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <typename T>
__global__ void rollout_step_kernel(const T* __restrict__ x, const T* __restrict__ D, const T* __restrict__ xe,
                                    const T* __restrict__ De, const T* __restrict__ noise,
                                    const T* __restrict__ t_cur, const T* __restrict__ t_next, T s_noise,
                                    uint64_t seed, uint64_t offset, int64_t B, int64_t M, int kind,
                                    T* __restrict__ out, int64_t* status) {
  for (int64_t row = blockIdx.y; row < B; row += gridDim.y) {
    const T tc = t_cur[row], tn = t_next[row];
    if (status != nullptr && blockIdx.x == 0 && threadIdx.x == 0 && !levels_ok<T>(kind, tc, tn)) {
      record_bad_levels<T>(status, kSourceRolloutStep, row, tc, tn);
    }
    const StepCoef<T> c = step_coef<T>(kind, tc, tn, s_noise);
    const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t col = col0 + static_cast<int64_t>(k) * kThreads;
      if (col >= M) break;
      const int64_t i = row * M + col;
      T v;
      if (kind == KIND_EULER) {
        v = euler_element<T>(x[i], D[i], c);
      } else if (kind == KIND_HEUN) {
        v = heun_element<T>(x[i], D[i], xe[i], De[i], c);
      } else {
        const T z = noise != nullptr ? noise[i] : static_cast<T>(philox::randn(seed, offset + static_cast<uint64_t>(i)));
        v = kind == KIND_SDE ? sde_element<T>(x[i], D[i], z, c) : churn_element<T>(x[i], z, c);
      }
      out[i] = v;
    }
  }
}

template <typename T>
__global__ void martingale_kernel(const T* __restrict__ grad, const T* __restrict__ D0, const T* __restrict__ D1a,
                                  const T* __restrict__ D1b, const T* __restrict__ y, const T* __restrict__ w,
                                  bool per_row, T lambda_m, int64_t B, int64_t M, T* __restrict__ out,
                                  T* __restrict__ ga, T* __restrict__ gb) {
  for (int64_t row = blockIdx.y; row < B; row += gridDim.y) {
    const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t col = col0 + static_cast<int64_t>(k) * kThreads;
      if (col >= M) break;
      const int64_t i = row * M + col;
      const T wi = per_row ? w[row] : w[i];
      if (grad == nullptr) {
        out[i] = martingale_loss<T>(D0[i], D1a[i], D1b[i], y[i], wi, lambda_m);
      } else {
        martingale_grads<T>(grad[i], D0[i], D1a[i], D1b[i], y[i], wi, lambda_m, &out[i], &ga[i], &gb[i]);
      }
    }
  }
}

dim3 grid_for(int64_t B, int64_t M) {
  const int64_t gx = (M + kTileCols - 1) / kTileCols;
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(B < kMaxGridY ? B : kMaxGridY));
}

const char* launch_philox_randn(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream) {
  if (n == 0) return nullptr;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
  philox_randn_kernel<<<grid, kThreads, 0, as_stream(stream)>>>(out, n, seed, offset);
  return launch_status();
}

template <typename T>
const char* launch_rollout_step(const T* x, const T* D, const T* xe, const T* De, const T* noise, const T* t_cur,
                                const T* t_next, T s_noise, uint64_t seed, uint64_t offset, int64_t B, int64_t M,
                                int kind, T* out, int64_t* status, int64_t* status_host, void* stream) {
  if (B == 0 || M == 0) return nullptr;
  rollout_step_kernel<T><<<grid_for(B, M), kThreads, 0, as_stream(stream)>>>(x, D, xe, De, noise, t_cur, t_next, s_noise, seed,
                                                                   offset, B, M, kind, out, status);
  if (const char* error = launch_status()) return error;
  return copy_status(status, status_host, stream);
}

template <typename T>
const char* launch_check_levels(const T* a, const T* b, int64_t B, int64_t source, T* out, int64_t* status,
                                int64_t* status_host, void* stream) {
  if (B == 0) return nullptr;
  check_levels_kernel<T><<<1, kThreads, 0, as_stream(stream)>>>(a, b, B, source, out, status);
  if (const char* error = launch_status()) return error;
  return copy_status(status, status_host, stream);
}

template <typename T>
const char* launch_martingale(const T* grad, const T* D0, const T* D1a, const T* D1b, const T* y, const T* w,
                              bool per_row, T lambda_m, int64_t B, int64_t M, T* out, T* ga, T* gb,
                              void* stream) {
  if (B == 0 || M == 0) return nullptr;
  martingale_kernel<T><<<grid_for(B, M), kThreads, 0, as_stream(stream)>>>(grad, D0, D1a, D1b, y, w, per_row, lambda_m, B, M,
                                                                out, ga, gb);
  return launch_status();
}

template const char* launch_rollout_step<float>(const float*, const float*, const float*, const float*, const float*,
                                                const float*, const float*, float, uint64_t, uint64_t, int64_t,
                                                int64_t, int, float*, int64_t*, int64_t*, void*);
template const char* launch_rollout_step<double>(const double*, const double*, const double*, const double*,
                                                 const double*, const double*, const double*, double, uint64_t,
                                                 uint64_t, int64_t, int64_t, int, double*, int64_t*, int64_t*, void*);
template const char* launch_check_levels<float>(const float*, const float*, int64_t, int64_t, float*, int64_t*,
                                                int64_t*, void*);
template const char* launch_check_levels<double>(const double*, const double*, int64_t, int64_t, double*, int64_t*,
                                                 int64_t*, void*);
template const char* launch_martingale<float>(const float*, const float*, const float*, const float*, const float*,
                                              const float*, bool, float, int64_t, int64_t, float*, float*, float*,
                                              void*);
template const char* launch_martingale<double>(const double*, const double*, const double*, const double*,
                                               const double*, const double*, bool, double, int64_t, int64_t, double*,
                                               double*, double*, void*);

}  // namespace cuda
}  // namespace rollout
}  // namespace cdm
