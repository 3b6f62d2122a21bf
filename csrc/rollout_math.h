// Shared arithmetic of the rollout steps and the martingale loss (docs/math.md).
//
// The CPU kernels (csrc/cpu/rollout.cpp) and the CUDA kernels (csrc/cuda/rollout.cu) call exactly
// these __host__ __device__ functions, so the arithmetic a GPU runs is executed and tested on the
// CPU. Each step is split into a per-sample part (coefficients from t_cur, t_next: computed once
// per row, including the one sqrt) and a per-element part (a few multiply-adds), which keeps the
// element loops free of divisions and vectorisable. Includes nothing from torch or CUDA.
#pragma once

#include <cmath>

#include "common.h"

namespace cdm {
namespace rollout {

CDM_HD float tsqrt(float v) { return sqrtf(v); }
CDM_HD double tsqrt(double v) { return sqrt(v); }

// Per-sample coefficients of  x' = x + g (x - D) + e (x_e - D_e) + s z.
template <typename T>
struct StepCoef {
  T g;  // on (x - D)
  T e;  // on (x_euler - D_euler), Heun only
  T s;  // on the noise z
};

// Whether a sample's levels are valid for a step of `kind`: 0 < t_cur < inf and, for the reverse
// steps, 0 <= t_next <= t_cur (t_next > 0 for Heun, which divides by it); for churn t_next is
// t_hat >= t_cur. False for NaN (every comparison with NaN is).
template <typename T>
CDM_HD bool levels_ok(int kind, T t_cur, T t_next) {
  const bool cur = t_cur > T(0) && t_cur - t_cur == T(0);
  if (kind == KIND_CHURN) return cur && t_next >= t_cur && t_next - t_next == T(0);
  return cur && (kind == KIND_HEUN ? t_next > T(0) : t_next >= T(0)) && t_next <= t_cur;
}

// h = t_next - t_cur; for KIND_CHURN t_next is t_hat. A sample whose levels are not valid gets NaN
// coefficients, so its whole row of x' is NaN, never a plausible value: the GPU paths check the
// levels here, inside the kernel, instead of synchronising with the host before the launch.
template <typename T>
CDM_HD StepCoef<T> step_coef(int kind, T t_cur, T t_next, T s_noise) {
  if (!levels_ok(kind, t_cur, t_next)) return StepCoef<T>{T(NAN), T(NAN), T(NAN)};
  const T h = t_next - t_cur;
  StepCoef<T> c{T(0), T(0), T(0)};
  if (kind == KIND_SDE) {  // docs/math.md, the reverse SDE: 2 h (x - D) / t + sqrt(2 |h| t) z
    c.g = T(2) * h / t_cur;
    c.s = tsqrt(T(2) * (h < T(0) ? -h : h) * t_cur);
  } else if (kind == KIND_EULER) {  // EDM: h (x - D) / t
    c.g = h / t_cur;
  } else if (kind == KIND_HEUN) {  // EDM: h/2 (d + d'), d = (x - D)/t, d' = (x_e - D_e)/t'
    c.g = T(0.5) * h / t_cur;
    c.e = T(0.5) * h / t_next;
  } else {  // churn: sqrt(t_hat^2 - t^2) S_noise z
    c.s = tsqrt(t_next * t_next - t_cur * t_cur) * s_noise;
  }
  return c;
}

template <typename T>
CDM_HD T sde_element(T x, T D, T z, const StepCoef<T>& c) {
  return x + c.g * (x - D) + c.s * z;
}

template <typename T>
CDM_HD T euler_element(T x, T D, const StepCoef<T>& c) {
  return x + c.g * (x - D);
}

template <typename T>
CDM_HD T heun_element(T x, T D, T x_e, T D_e, const StepCoef<T>& c) {
  return x + c.g * (x - D) + c.e * (x_e - D_e);
}

template <typename T>
CDM_HD T churn_element(T x, T z, const StepCoef<T>& c) {
  return x + c.s * z;
}

// loss = w (D0 - y)^2 + lambda_m (D1a - D0)(D1b - D0)    (docs/math.md section 3 step 1 and step 6)
template <typename T>
CDM_HD T martingale_loss(T D0, T D1a, T D1b, T y, T w, T lambda_m) {
  const T r = D0 - y;
  return w * r * r + lambda_m * (D1a - D0) * (D1b - D0);
}

// The fused backward: dL/dD0, dL/dD1a, dL/dD1b times the incoming gradient g (docs/math.md section 3).
template <typename T>
CDM_HD void martingale_grads(T g, T D0, T D1a, T D1b, T y, T w, T lambda_m, T* g0, T* ga, T* gb) {
  const T ea = D1a - D0, eb = D1b - D0;
  *g0 = g * (T(2) * w * (D0 - y) - lambda_m * (ea + eb));
  *ga = g * lambda_m * eb;
  *gb = g * lambda_m * ea;
}

}  // namespace rollout
}  // namespace cdm
