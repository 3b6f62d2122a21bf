// Shared arithmetic of the stable-target kernels (docs/math.md, "Exact distances" and "Streaming in
// distance space").
//
// Every per-element and per-row formula of the stable target lives here, as CDM_HD inline functions.
// The CPU backend (csrc/cpu/stf.cpp) executes exactly these lines, and the CUDA kernels
// (csrc/cuda/stf_kernels.h) call the same ones, so the arithmetic that runs on a GPU is tested on
// the CPU. Includes nothing from torch or the CUDA runtime.
//
// Notation: x' = x - c and r' = r - c for the call's centre c (any c gives the same distances; one
// inside the data keeps the products' rounding at the data's spread), k_i = 1 / (2 sigma_i^2) and
// the reduced distance delta_ij = ||r'_j||^2 - 2 x'_i . r'_j = d_ij - ||x'_i||^2, which differs from
// the squared distance d_ij = ||x_i - r_j||^2 by a constant of the row. The softmax needs only
// differences of distances, so the kernels stream delta: the row constant ||x'_i||^2, whose float32
// rounding is far above the spread of the distances when x is far from the data (at large sigma),
// never enters. Where a distance itself is needed (lse = log l - d_min k and d_bar = d_min + t / l,
// with d_min the smallest squared distance) it is that of the nearest reference j* (the argument of
// the state's minimum, tracked while streaming), computed exactly at the end as ||x_i - r_j*||^2:
// recovered as ||x'||^2 + m it would cancel, and lose lse's digits at small sigma, where lse is
// about -d_min / (2 sigma^2). A row's softmax state is kept in this
// distance space: m = min_j delta_j, l = sum_j e_j, l2 = sum_j e_j^2, t = sum_j e_j (delta_j - m),
// e_j = exp(-(delta_j - m) k). Only differences delta - m ever meet k, so the state never
// overflows: a sigma whose 1/sigma^2 is past the dtype's range (k clamped to its largest number)
// gives weight 1 to the nearest references and 0 to the others, the sigma -> 0 limit.
#pragma once

#include <cfloat>
#include <cmath>

#include "common.h"

namespace cdm {
namespace stf {

// log picked by type, so float stays float on the host and the device (no double detour).
CDM_HD float flog(float v) { return logf(v); }
CDM_HD double flog(double v) { return log(v); }

// exp(v) of a weight exponent v <= 0, with everything below the smallest normal number flushed to
// exactly 0. A weight under 1e-38 next to the row's largest weight 1 changes no sum, and libm's expf
// takes a slow error-reporting path for every underflow: on image data at EDM's small sigma almost
// every weight underflows, and that path cost more than all the other per-element work. GPUs flush
// subnormals anyway. NaN goes through to exp (the comparison is false).
CDM_HD float wexp(float v) { return v < -87.0f ? 0.0f : expf(v); }
CDM_HD double wexp(double v) { return v < -708.0 ? 0.0 : exp(v); }

// From the INFINITY macro rather than std::numeric_limits, whose constexpr host functions device
// code may only call under nvcc's --expt-relaxed-constexpr.
template <typename T>
CDM_HD T pos_inf() {
  return static_cast<T>(INFINITY);
}

CDM_HD float max_finite(float) { return FLT_MAX; }
CDM_HD double max_finite(double) { return DBL_MAX; }

// min that propagates NaN from either side, so a NaN row stays NaN whatever the order of a reduction.
template <typename T>
CDM_HD T nan_min(T a, T b) {
  if (a != a) return a;
  if (b != b) return b;
  return a < b ? a : b;
}

// k = 1 / (2 sigma^2), clamped to the largest finite number: 0 * k stays 0 (a distance equal to the
// row's minimum keeps weight 1) where an overflowed k would give NaN. A NaN sigma stays NaN (the
// comparison is false): the GPU paths mark a bad noise level by NaN (cdm_kernels/level_status.py).
template <typename T>
CDM_HD T half_inv_sq(T sigma) {
  const T k = T(0.5) / (sigma * sigma);
  return k > max_finite(k) ? max_finite(k) : k;
}

// delta_ij = ||r'_j||^2 - 2 x'_i . r'_j from the shifted operands: xn = ||x'_i||^2, rn = ||r'_j||^2,
// dot = x'_i . r'_j. Clamped at -xn (d = xn + delta >= 0; rounding can go below), with NaN passing
// through (the comparison is false).
template <typename T>
CDM_HD T reduced_dist(T xn, T rn, T dot) {
  const T delta = rn - T(2) * dot;
  return delta < -xn ? -xn : delta;
}

// Running softmax state of one query row over the references seen so far, in distance space (of the
// reduced distances delta; "d" below is a delta). The
// accumulator a = sum_j e_j r'_j is a D-vector kept by the caller; it is rescaled by the factor
// that state_rebase returns. l2 gives the effective number of references, t the mean distance d_bar.
template <typename T>
struct RowState {
  T m, l, l2, t;
};

template <typename T>
CDM_HD RowState<T> state_empty() {
  return RowState<T>{pos_inf<T>(), T(0), T(0), T(0)};
}

// Moves a state to a new running minimum m_new <= s.m; returns the factor for the accumulator,
// alpha = exp(-(m - m_new) k) (0 for an empty state, whose m is +inf).
template <typename T>
CDM_HD T state_rebase(RowState<T>& s, T m_new, T k) {
  if (s.m == pos_inf<T>()) {
    s.m = m_new;
    return T(0);
  }
  const T gap = s.m - m_new;
  const T alpha = wexp(-gap * k);
  // t = sum e (d - m): with e' = alpha e and d - m' = (d - m) + (m - m'), t' = alpha (t + (m - m') l).
  s.t = alpha * (s.t + gap * s.l);
  s.l *= alpha;
  s.l2 *= alpha * alpha;
  s.m = m_new;
  return alpha;
}

// Adds one distance d to a state whose m <= d. Returns e = exp(-(d - m) k), the weight that
// multiplies r'_j in the accumulator. The state may be kept in a wider type A than the distances
// (the CPU keeps float rows in double): a float sum that starts at the dominant e = 1 rounds every
// later small e at 1's ulp, which at sigma ~ 8 on image data put 15% errors into the small weights.
template <typename A, typename T>
CDM_HD T state_add(RowState<A>& s, T d, T k) {
  const T dm = d - T(s.m);  // exact: s.m is one of the distances (or +inf)
  const T e = wexp(-dm * k);
  s.l += A(e);
  s.l2 += A(e) * A(e);
  s.t += A(e) * A(dm);
  return e;
}

// Merges state b into a (associative and commutative up to rounding). Writes the factors
// (alpha_a, alpha_b) by which the two accumulators are scaled before they are added.
template <typename T>
CDM_HD void state_merge(RowState<T>& a, RowState<T> b, T k, T* alpha_a, T* alpha_b) {
  const T m = nan_min(a.m, b.m);
  *alpha_a = state_rebase(a, m, k);
  *alpha_b = state_rebase(b, m, k);
  a.l += b.l;
  a.l2 += b.l2;
  a.t += b.t;
}

// Per-row results of a finished state, with dmin the exact squared distance of the reference at the
// state's minimum: 1 / l (mu = a / l + c), log l, lse = log l - dmin k, the weighted mean squared
// distance d_bar = dmin + t / l, the effective number of references l^2 / l2 and the largest weight
// 1 / l (the largest e is exp(0) = 1).
template <typename T>
struct RowResult {
  T inv_l, log_l, lse, dbar, neff, wmax;
};

template <typename T>
CDM_HD RowResult<T> state_finalize(RowState<T> s, T k, T dmin) {
  RowResult<T> r;
  r.inv_l = T(1) / s.l;
  r.log_l = flog(s.l);
  r.lse = r.log_l - dmin * k;
  r.dbar = dmin + s.t * r.inv_l;
  r.neff = s.l * s.l / s.l2;
  r.wmax = r.inv_l;
  return r;
}

// ---- backward (docs/math.md, "Gradients"), in the centred forms that avoid cancellation ----
// With w = exp(-(delta - m) k - log l) (the forward's m and log l), c = g_i . r'_j, mg = g_i . mu'_i
// (mu' = mu - c_centre) and the forward's d_bar:
//   dL/dx_i     = (sum_j w (c - mg) r'_j + g_lse (mu' - x')) / sigma^2
//   dL/dsigma_i = (sum_j w (d - d_bar)(c - mg) + g_lse d_bar) / sigma^3
// because sum_j w r'_j = mu' and sum_j w = 1 make the subtracted means exact. d - d_bar is computed
// as delta - delta_bar with delta_bar = d_bar - ||x'||^2 (mean_delta): its rounding does not matter,
// since sum_j w (delta - delta_bar)(c - mg) depends on delta_bar only through -delta_bar s, which the
// s correction below (cov - s dev) removes exactly.
template <typename T>
CDM_HD T backward_weight(T d, T m, T log_l, T k) {
  return wexp(-(d - m) * k - log_l);
}

// The coefficient of r'_j in dL/dx_i (before the division by sigma^2).
template <typename T>
CDM_HD T backward_x_coef(T w, T c, T mg) {
  return w * (c - mg);
}

// The row's mean reduced distance delta_bar = d_bar - ||x'||^2.
template <typename T>
CDM_HD T mean_delta(T dbar, T xn) {
  return dbar - xn;
}

// The contribution of reference j to sum_j w (d - d_bar)(c - mg), with d - d_bar = delta - delta_bar.
template <typename T>
CDM_HD T backward_sigma_term(T w, T d, T dbar, T c, T mg) {
  return w * (d - dbar) * (c - mg);
}

// dL/dr_j = sum_i [ w g_i + a_ij (x'_i - r'_j) ],  a_ij = w ((c - mg) + g_lse) / sigma^2.
template <typename T>
CDM_HD T backward_ref_coef(T w, T c, T mg, T glse, T inv_s2) {
  return w * ((c - mg) + glse) * inv_s2;
}

// dL/dx_i for one coordinate, from px = sum_j w (c - mg) r'_j, with the first-order correction for
// an mg that is not rounded like the products' c: with s = sum_j w (c - mg) (0 in exact arithmetic),
// sum_j w (c - mg - s) r'_j = px - s mu'. When one reference holds the weight, c - mg is a rounding
// difference of two dot products of size ||g|| ||r'|| divided by sigma^2 = 4e-6; the correction
// cancels it (17% errors in float32 without).
template <typename T>
CDM_HD T grad_x_corrected(T px, T s, T mu_c, T x_c, T glse, T inv_s2) {
  return (px - s * mu_c + glse * (mu_c - x_c)) * inv_s2;
}

// dL/dsigma_i from cov = sum_j w (d - d_bar)(c - mg), its matching correction by
// s dev (dev = sum_j w (d - d_bar)) and d_bar.
template <typename T>
CDM_HD T grad_sigma(T cov, T s, T dev, T dbar, T glse, T sigma) {
  return ((cov - s * dev) + glse * dbar) / (sigma * sigma * sigma);
}

// ---- precision modes: operands as the tensor cores read them (docs/math.md, "Precision modes") ----

// TF32 keeps 10 of float32's 23 mantissa bits: adding half a TF32 ulp to the magnitude bits and
// truncating rounds half away from zero (cvt.rna.tf32.f32). NaN and inf pass unchanged.
CDM_HD float round_tf32(float v) {
  if (!(v - v == 0.0f)) return v;  // NaN or inf
  return bits_float((float_bits(v) + 0x1000u) & 0xFFFFE000u);
}

// bfloat16 keeps 7 mantissa bits: round to nearest even, as the GPU's conversion does.
CDM_HD float round_bf16(float v) {
  if (!(v - v == 0.0f)) return v;
  const uint32_t b = float_bits(v);
  return bits_float((b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u);
}

// v as the mode's matrix units read it; "tf32x3" reads the pair (round_tf32(v), round_tf32(v - hi)).
CDM_HD float round_operand(float v, int precision) {
  if (precision == PREC_TF32 || precision == PREC_TF32X3) return round_tf32(v);
  if (precision == PREC_BF16) return round_bf16(v);
  return v;
}

CDM_HD double round_operand(double v, int) { return v; }

}  // namespace stf
}  // namespace cdm
