// Compiles the shared stable-target arithmetic (csrc/stf_math.h) for the device, so nvcc checks
// every __host__ __device__ function that the CPU backend executes, for float and double.
// The stable-target CUDA kernels themselves live in csrc/cuda/stf.cu.
#include <cuda_runtime.h>

#include "stf_math.h"

namespace cdm {
namespace stf {

template <typename T>
__global__ void shared_arithmetic_check(const T* z, int n, T* out) {
  RowState<T> s = state_empty<T>();
  T m = neg_inf<T>();
  for (int j = 0; j < n; ++j) m = nan_max(m, z[j]);
  state_rebase(s, m);
  T acc = T(0);
  for (int j = 0; j < n; ++j) acc += state_add(s, z[j]);
  RowState<T> other = state_empty<T>();
  T alpha_a, alpha_b;
  state_merge(s, other, &alpha_a, &alpha_b);
  RowResult<T> r = state_finalize(s, T(1), T(0.25));
  T w = backward_weight(z[0], r.zlse);
  T d = sqdist_from_logit(z[0], T(1), T(0.25));
  out[0] = acc * alpha_a + r.lse + r.dbar + r.neff + r.wmax + logit(z[0], z[0], T(4)) +
           backward_x_coef(w, d, T(1)) + backward_sigma_term(w, d, r.dbar, T(1), T(1)) +
           backward_ref_coef(w, T(1), T(1), T(1), T(4)) + grad_x(w, T(1), T(1), T(1), T(4)) +
           grad_sigma(w, r.dbar, T(1), T(0.5)) + alpha_b;
}

template __global__ void shared_arithmetic_check<float>(const float*, int, float*);
template __global__ void shared_arithmetic_check<double>(const double*, int, double*);

}  // namespace stf
}  // namespace cdm
