// Shared arithmetic of the stable-target kernels (math.md section 1).
//
// Every per-element and per-row formula of the stable target lives here, as __host__ __device__
// inline functions. The CPU backend (csrc/cpu/stf.cpp) executes exactly these lines, and the CUDA
// kernels (csrc/cuda/) call the same ones, so the arithmetic that runs on a GPU is tested on the CPU.
// This header includes nothing from torch or the CUDA runtime.
//
// Notation (math.md): z_ij = (x_i . r_j - ||r_j||^2 / 2) / sigma_i^2 is the logit without the
// row constant -||x_i||^2 / (2 sigma_i^2). The constant cancels in the softmax, so kernels stream
// z and add it back only when they finalise lse. Keeping it out of the stream matters: at
// sigma = 0.002 it is ~1e8 and adding it to every logit would cost all of float32's precision.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define CDM_HD __host__ __device__ __forceinline__
#else
#define CDM_HD inline
#endif

namespace cdm {
namespace stf {

// Columns of the auxiliary per-row output `aux` (B, 4) of the forward pass.
enum AuxColumn : int { AUX_ZLSE = 0, AUX_DBAR = 1, AUX_NEFF = 2, AUX_WMAX = 3, AUX_COLS = 4 };

// exp and log picked by type, so float stays float on the host and the device (no double detour).
CDM_HD float fexp(float v) { return expf(v); }
CDM_HD double fexp(double v) { return exp(v); }
CDM_HD float flog(float v) { return logf(v); }
CDM_HD double flog(double v) { return log(v); }

// exp(v) of a weight exponent v <= 0, with everything below the smallest normal number flushed to
// exactly 0. A weight under 1e-38 next to the row's largest weight 1 changes no sum, and libm's expf
// takes a slow error-reporting path for every underflow: on image data at EDM's small sigma almost
// every logit underflows, and that path cost more than all the other per-element work. GPUs flush
// subnormals anyway. NaN goes through to exp (the comparison is false).
CDM_HD float wexp(float v) { return v < -87.0f ? 0.0f : expf(v); }
CDM_HD double wexp(double v) { return v < -708.0 ? 0.0 : exp(v); }

// From the INFINITY macro rather than std::numeric_limits, whose constexpr host functions device
// code may only call under nvcc's --expt-relaxed-constexpr.
template <typename T>
CDM_HD T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// max that propagates NaN from either side, so a NaN row stays NaN whatever the order of a reduction.
template <typename T>
CDM_HD T nan_max(T a, T b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

// exp(a - b) for a rescale from an old running maximum a to a new one b >= a; an empty state
// (a = -inf) has nothing to rescale, and exp(-inf - -inf) would be NaN.
template <typename T>
CDM_HD T rescale_factor(T m_old, T m_new) {
  return m_old == neg_inf<T>() ? T(0) : fexp(m_old - m_new);
}

// z_ij from the matmul form: dot = x_i . r_j, rn = ||r_j||^2, inv_s2 = 1 / sigma_i^2.
template <typename T>
CDM_HD T logit(T dot, T rn, T inv_s2) {
  return (dot - T(0.5) * rn) * inv_s2;
}

// Squared distance d_ij recovered from z_ij: d = ||x||^2 - 2 sigma^2 z (clamped: d >= 0 exactly).
template <typename T>
CDM_HD T sqdist_from_logit(T z, T xn, T s2) {
  T d = xn - T(2) * s2 * z;
  return d > T(0) ? d : T(0);
}

// Running softmax state of one query row over the references seen so far (math.md, the merge):
//   m  = max_j z_j,  l = sum_j e_j,  l2 = sum_j e_j^2,  t = sum_j e_j (z_j - m),  e_j = exp(z_j - m).
// The accumulator a = sum_j e_j r_j is a D-vector kept by the caller; it is rescaled by the factor
// that the update returns. l2 gives the effective number of references, t the mean distance d_bar.
template <typename T>
struct RowState {
  T m, l, l2, t;
};

template <typename T>
CDM_HD RowState<T> state_empty() {
  return RowState<T>{neg_inf<T>(), T(0), T(0), T(0)};
}

// Moves a state to a new running maximum m_new >= s.m; returns the factor for the accumulator.
template <typename T>
CDM_HD T state_rebase(RowState<T>& s, T m_new) {
  const T alpha = rescale_factor(s.m, m_new);
  // t = sum e (z - m): with e' = alpha e and z - m' = (z - m) + (m - m'), t' = alpha (t + (m - m') l).
  s.t = s.l == T(0) ? T(0) : alpha * (s.t + (s.m - m_new) * s.l);
  s.l *= alpha;
  s.l2 *= alpha * alpha;
  s.m = m_new;
  return alpha;
}

// Adds one logit z (the absolute z) to a state whose m >= z. Returns e = exp(z - m), the weight
// that multiplies r_j in the accumulator. The state may be kept in a wider type A than the logits
// (the CPU keeps float rows in double): a float sum that starts at the dominant e = 1 rounds every
// later small e at 1's ulp, which at sigma ~ 8 on image data put 15% errors into the small weights.
template <typename A, typename T>
CDM_HD T state_add(RowState<A>& s, T z) {
  const T zm = z - T(s.m);  // exact: s.m is one of the float logits (or -inf)
  const T e = wexp(zm);
  s.l += A(e);
  s.l2 += A(e) * A(e);
  s.t += A(e) * A(zm);
  return e;
}

// Merges state b into a (associative and commutative up to rounding). Returns the factors
// (alpha_a, alpha_b) by which the two accumulators are scaled before they are added.
template <typename T>
CDM_HD void state_merge(RowState<T>& a, RowState<T> b, T* alpha_a, T* alpha_b) {
  const T m = nan_max(a.m, b.m);
  *alpha_a = state_rebase(a, m);
  *alpha_b = state_rebase(b, m);
  a.l += b.l;
  a.l2 += b.l2;
  a.t += b.t;
}

// Per-row results of a finished state: the log-normaliser of z (zlse), of the full logits (lse),
// the weighted mean distance d_bar = sum_j w_j d_j, the effective number of references
// 1 / sum_j w_j^2 and the largest weight. xn = ||x||^2, s2 = sigma^2.
template <typename T>
struct RowResult {
  T inv_l, zlse, lse, dbar, neff, wmax;
};

template <typename T>
CDM_HD RowResult<T> state_finalize(RowState<T> s, T xn, T s2) {
  RowResult<T> r;
  r.inv_l = T(1) / s.l;
  r.zlse = s.m + flog(s.l);
  r.lse = r.zlse - T(0.5) * xn / s2;
  // sum_j w_j z_j = m + t / l, and d = ||x||^2 - 2 sigma^2 z.
  r.dbar = sqdist_from_logit(s.m + s.t * r.inv_l, xn, s2);
  r.neff = s.l * s.l / s.l2;
  r.wmax = r.inv_l;  // the largest e_j is exp(0) = 1
  return r;
}

// ---- backward (math.md, Gradients), in the centred forms that avoid cancellation ----
// With w = exp(z - zlse), c = r_j . g_i, mg = mu_i . g_i, the forward's d_bar and the mean logit
// z_bar = sum_j w z_j:
//   dL/dx_i     = sum_j w (c - mg) r_j / sigma^2 + g_lse (mu - x) / sigma^2
//   dL/dsigma_i = (sum_j w (d - d_bar)(c - mg) + g_lse d_bar) / sigma^3
//               = (-2 sigma^2 sum_j w (z - z_bar)(c - mg) + g_lse d_bar) / sigma^3
// because sum_j w r_j = mu and sum_j w = 1 make the subtracted means exact, and
// d - d_bar = -2 sigma^2 (z - z_bar). The kernels stream the z form: recovering each d in float
// (||x||^2 - 2 sigma^2 z, two terms of ~||x||^2 whose rounding is far above the spread of d)
// made dL/dsigma 50x less accurate than eager PyTorch's float32 autograd at D = 3072, sigma ~ 20.
template <typename T>
CDM_HD T backward_weight(T z, T zlse) {
  return wexp(z - zlse);
}

// The coefficient of r_j in dL/dx_i (before the division by sigma^2).
template <typename T>
CDM_HD T backward_x_coef(T w, T c, T mg) {
  return w * (c - mg);
}

// The row's mean logit z_bar from the forward's d_bar. Its rounding does not matter: z_bar enters
// only through sum_j w (z - z_bar)(c - mg), whose first-order dependence on it is -s (s below, zero
// in exact arithmetic) and is removed with the s correction anyway.
template <typename T>
CDM_HD T mean_logit(T dbar, T xn, T s2) {
  return (xn - dbar) / (T(2) * s2);
}

// The contribution of reference j to sum_j w (z - z_bar)(c - mg).
template <typename T>
CDM_HD T backward_sigma_term(T w, T z, T zbar, T c, T mg) {
  return w * (z - zbar) * (c - mg);
}

// dL/dr_j = sum_i [ w g_i + a_ij (x_i - r_j) ],  a_ij = w ((c - mg) + g_lse) / sigma^2.
template <typename T>
CDM_HD T backward_ref_coef(T w, T c, T mg, T glse, T inv_s2) {
  return w * ((c - mg) + glse) * inv_s2;
}

// Row finalisers of the backward pass. px = sum_j w (c - mg) r_j[k] for one coordinate k.
template <typename T>
CDM_HD T grad_x(T px, T mu, T x, T glse, T inv_s2) {
  return (px + glse * (mu - x)) * inv_s2;
}

// The same with a first-order correction for an mg that is not rounded like the products' c:
// with s = sum_j w (c - mg) (0 in exact arithmetic), sum_j w (c - mg - s) r_j = px - s mu. When one
// reference holds the weight, c - mg is a rounding difference of two dot products of size
// ||g|| ||r|| divided by sigma^2 = 4e-6; the correction cancels it (17% errors in float32 without).
template <typename T>
CDM_HD T grad_x_corrected(T px, T s, T mu, T x, T glse, T inv_s2) {
  return (px - s * mu + glse * (mu - x)) * inv_s2;
}

// The matching correction of sum_j w (z - z_bar)(c - mg): minus s sum_j w (z - z_bar).
template <typename T>
CDM_HD T cov_corrected(T cov, T s, T dev_z) {
  return cov - s * dev_z;
}

// dL/dsigma from cov_z = sum_j w (z - z_bar)(c - mg) (corrected) and d_bar.
template <typename T>
CDM_HD T grad_sigma(T cov_z, T dbar, T glse, T sigma) {
  const T s2 = sigma * sigma;
  return (glse * dbar - T(2) * s2 * cov_z) / (s2 * sigma);
}

}  // namespace stf
}  // namespace cdm
