// The CUDA stable-target kernels (docs/math.md), written so that the host can execute them.
//
// The GPU stable target is a stream of matrix products that cuBLAS does (through ATen, in the torch
// glue csrc/cuda/stf_cuda.cpp) and of small fused kernels between them that no library offers: the
// shift of a chunk by the centre with its norms and the precision mode's operand rounding, the
// distances with the online softmax update in distance space, the accumulator rescale, the backward
// weights with their row sums, the finishers. Those kernels are the per-thread functors below
// (`operator()(t)` for a flat thread index t, no shared memory, no barrier, no atomic), and the
// launch sequences `forward_run` / `backward_run` are templates over an executor that either
// launches them and calls cuBLAS (the glue, with csrc/cuda/stf.cu's launch function) or runs every
// thread on the host and multiplies with plain loops (tests/cuda_emulator.cpp). The arithmetic is
// the shared code of csrc/stf_math.h, which the CPU backend also executes.
//
// The forward pass prepares the queries (ShiftRows, then QueryRows: norms, k, empty row states), and
// per chunk of c references does
//   1. ShiftRows + LaneSum: r'_j = round(r_j - c), ||r'_j||^2          c x LANES threads, then c
//   2. S (B, c) = X' R'^T                                                cuBLAS
//   3. ChunkMin: reduced distances delta_ij into S, (row, part) minima  B x PARTS threads
//   4. ChunkUpdate: e_ij = exp(-(delta_ij - m_new) k_i) into S, sums    B x PARTS threads
//   5. RowMerge: rebase the row state to m_new, add the parts           B threads
//   6. ScaleRows: acc_i *= alpha_i (not for the first chunk)            B x D threads
//   7. acc (B, D) += E R'                                               cuBLAS
// and finishes with the exact d_min of each row's nearest reference (NearestParts), lse and aux
// (FinalizeRows), and mu = acc / l + c (FinalizeMu): 2 + 7 + 3 = 12 launches for one chunk, 8 more
// for each further one (docs/gpu_design.md, "The host's share of a call"). Row work is split into PARTS threads per row: thread
// t = i PARTS + p takes the columns j = p, p + PARTS, ... of row i, so the threads of a row read
// consecutive words (coalesced) and a chunk has B x PARTS threads even when B is small. Row sums and
// states are kept in double (as the CPU backend does): they are O(B c) work next to O(B c D).
// All indices are 64-bit: B D, B c and n D may exceed 2^31.
//
// Precision modes (docs/math.md, "Precision modes"): the operands are rounded here, explicitly, to
// what the mode's tensor cores read, so a product of rounded operands is exact up to its float32
// sums whatever the hardware's own conversion does, and the emulation reproduces the modes.
// "tf32x3" splits every operand v into hi = tf32(v), lo = tf32(v - hi); the logits product then
// runs once over 3D columns, queries laid out [hi | hi | lo] against references [hi | lo | hi]
// (hi hi + hi lo + lo hi), and the accumulation as three products. "bf16" stores its operands as
// bfloat16 (Operand's h): the products run on the bf16 tensor cores (bfloat16 in, float32 sums
// and out), which cannot add into a float32 matrix, so from the second chunk on the accumulator's
// product goes to a (B, D) tile that ScaleRows adds in the same pass as its rescale.
#pragma once

#include <stdint.h>

#include "stf_math.h"

namespace cdm {
namespace stf {
namespace cuda {

constexpr int64_t LANES = 32;  // threads per row of a row reduction over D (one warp: coalesced)
constexpr int64_t PARTS = 32;  // threads per query row over a chunk's columns

typedef double Acc;  // accumulator of long sums: norms, dot products, row states

// Columns of a mode's operand rows: 3D for "tf32x3" (hi, lo and a copy), else D.
CDM_HD int64_t operand_width(int64_t D, int prec) { return prec == PREC_TF32X3 ? 3 * D : D; }

// A bfloat16 value as its bits (the upper half of the float32 it rounds to; NaN as the quiet NaN,
// whatever payload it had in the lower half), and back.
typedef uint16_t Bf16;
CDM_HD Bf16 bf16_bits(float v) {
  return v == v ? static_cast<Bf16>(float_bits(round_bf16(v)) >> 16) : static_cast<Bf16>(0x7FC0u);
}
CDM_HD float bf16_value(Bf16 h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// An operand matrix in its mode's storage: T values (f), or bfloat16 bits (h) for "bf16" in float32
// problems; exactly one of the two is set.
template <typename T>
struct Operand {
  T* f;
  Bf16* h;
  // The matrix from element `offset` on.
  CDM_HD Operand from(int64_t offset) const {
    return Operand{f != nullptr ? f + offset : nullptr, h != nullptr ? h + offset : nullptr};
  }
  // Element i = v rounded to the mode (for "tf32x3" the caller stores the split itself).
  CDM_HD void put(int64_t i, T v, int prec) const {
    if (h != nullptr) {
      h[i] = bf16_bits(static_cast<float>(v));
    } else {
      f[i] = round_operand(v, prec);
    }
  }
};

// The (hi, lo) split of "tf32x3"; float64 has no such mode (the public function refuses it).
CDM_HD void split_tf32(float v, float* hi, float* lo) {
  *hi = round_tf32(v);
  *lo = round_tf32(v - *hi);
}
CDM_HD void split_tf32(double v, double* hi, double* lo) {
  *hi = v;
  *lo = 0.0;
}

// ------------------------------------------------------------------------------------------------
// Row preparation
// ------------------------------------------------------------------------------------------------

// Thread t = i LANES + l: the columns k = l, l + LANES, ... of row i of src (rows, D): v = src - centre
// (centre null: v = src) written in the mode's operand layout and storage to op (rows, W), and the
// partial sum of squares of the values the mode's norm uses (the exact v in "ieee" and "tf32x3", the
// rounded one in "tf32" and "bf16": the distance between the points the product sees) to part
// (rows, LANES).
// ref_layout: "tf32x3" rows [hi | lo | hi] (references) instead of [hi | hi | lo] (queries).
template <typename T>
struct ShiftRows {
  int64_t threads;  // rows * LANES
  int64_t D;
  int prec;
  bool ref_layout;
  const T* src;
  const T* centre;  // (D,) or null
  Operand<T> op;    // (rows, W)
  Acc* part;        // (rows, LANES) or null
  CDM_HD void operator()(int64_t t) const {
    const int64_t i = t / LANES, l = t % LANES, W = operand_width(D, prec);
    const T* s = src + i * D;
    Acc a = Acc(0);
    for (int64_t k = l; k < D; k += LANES) {
      const T v = centre != nullptr ? s[k] - centre[k] : s[k];
      T norm_term = v;
      if (prec == PREC_TF32X3) {
        T hi, lo;
        split_tf32(v, &hi, &lo);
        T* o = op.f + i * W;
        o[k] = hi;
        o[D + k] = ref_layout ? lo : hi;
        o[2 * D + k] = ref_layout ? hi : lo;
      } else {
        op.put(i * W + k, v, prec);
        if (prec != PREC_IEEE) norm_term = round_operand(v, prec);
      }
      a += Acc(norm_term) * Acc(norm_term);
    }
    if (part != nullptr) part[t] = a;
  }
};

// Thread t = i LANES + l: the partial dot product sum_k (a_ik - centre_k) b_ik over k = l, l + LANES, ...
// (mg_i = g_i . (mu_i - c) in the backward pass).
template <typename T>
struct DotRows {
  int64_t threads;  // rows * LANES
  int64_t D;
  const T* a;
  const T* centre;
  const T* b;
  Acc* part;  // (rows, LANES)
  CDM_HD void operator()(int64_t t) const {
    const int64_t i = t / LANES, l = t % LANES;
    Acc s = Acc(0);
    for (int64_t k = l; k < D; k += LANES) s += Acc(a[i * D + k] - centre[k]) * Acc(b[i * D + k]);
    part[t] = s;
  }
};

// sum_l part[i LANES + l] of row i, added in lane order (deterministic): every row reduction's end.
CDM_HD Acc lane_sum(const Acc* part, int64_t i) {
  Acc s = Acc(0);
  for (int64_t l = 0; l < LANES; ++l) s += part[i * LANES + l];
  return s;
}

// Thread i: out_i = lane_sum(part, i).
template <typename T, typename O>
struct LaneSum {
  int64_t threads;  // rows
  const Acc* part;
  O* out;
  CDM_HD void operator()(int64_t i) const {
    out[i] = O(lane_sum(part, i));
  }
};

// ------------------------------------------------------------------------------------------------
// Forward: the online softmax in distance space
// ------------------------------------------------------------------------------------------------

// The running state of every row: m, l, l2, t of stf_math.h's RowState, one plane each (4, B), and
// the index of the reference at the minimum (-1 before the first chunk).
struct StatePlanes {
  Acc* m;
  Acc* l;
  Acc* l2;
  Acc* t;
  int64_t* arg;
  CDM_HD RowState<Acc> get(int64_t i) const { return RowState<Acc>{m[i], l[i], l2[i], t[i]}; }
  CDM_HD void set(int64_t i, const RowState<Acc>& s) const {
    m[i] = s.m;
    l[i] = s.l;
    l2[i] = s.l2;
    t[i] = s.t;
  }
};

// Thread i, the per-row preparation of the queries in one launch: ||x'_i||^2 from the lane parts
// of ShiftRows (added in lane order, as LaneSum does), k_i = 1 / (2 sigma_i^2) clamped (stf_math.h,
// half_inv_sq), and with reset_state the state of an empty row (before the first chunk).
template <typename T>
struct QueryRows {
  int64_t threads;  // B
  const Acc* part;  // (B, LANES)
  T* xn;
  const T* sigma;
  T* k;
  bool reset_state;
  StatePlanes state;  // written only with reset_state
  CDM_HD void operator()(int64_t i) const {
    xn[i] = T(lane_sum(part, i));
    k[i] = half_inv_sq(sigma[i]);
    if (reset_state) {
      state.set(i, state_empty<Acc>());
      state.arg[i] = -1;
    }
  }
};

// Thread t = i PARTS + p: the reduced distance delta_ij = reduced_dist(||x'_i||^2, ||r'_j||^2, S_ij)
// written over S_ij (and to keep_ij, when the distances are kept for the backward), and the minimum
// of the part's distances to partmin[t] (+inf for a part without columns) with the chunk column of
// its first occurrence to partarg[t].
template <typename T>
struct ChunkMin {
  int64_t threads;  // B * PARTS
  int64_t c;
  const T* xn;
  const T* rn;
  T* S;             // (B, c): products in, distances out
  T* partmin;       // (B, PARTS)
  int64_t* partarg; // (B, PARTS)
  T* keep;          // (B, c): the distances kept for the backward, or null
  CDM_HD void operator()(int64_t t) const {
    const int64_t i = t / PARTS, p = t % PARTS;
    T mn = pos_inf<T>();
    int64_t arg = -1;
    for (int64_t j = p; j < c; j += PARTS) {
      const T d = reduced_dist(xn[i], rn[j], S[i * c + j]);
      S[i * c + j] = d;
      if (keep != nullptr) keep[i * c + j] = d;
      if (d < mn) arg = j;
      mn = nan_min(mn, d);
    }
    partmin[t] = mn;
    partarg[t] = arg;
  }
};

// The row's new running minimum: its state's m and the chunk's part minima, NaN-propagating. The
// same lines in ChunkUpdate and RowMerge, so both use the same m_new.
template <typename T>
CDM_HD T new_row_min(const StatePlanes& state, const T* partmin, int64_t i) {
  T m = T(state.m[i]);  // +inf or one of the T distances: exact
  for (int64_t p = 0; p < PARTS; ++p) m = nan_min(m, partmin[i * PARTS + p]);
  return m;
}

// Thread t = i PARTS + p: e_ij = exp(-(d_ij - m_new) k_i), written to E_ij in the mode (E's f is S
// itself, or for "bf16" its h; for "tf32x3" hi over S_ij and lo to S_lo), and the part's sums of
// e, e^2, e (d - m_new) to partsum (B, PARTS, 3), as stf_math.h's state_add accumulates them.
template <typename T>
struct ChunkUpdate {
  int64_t threads;  // B * PARTS
  int64_t c;
  int prec;
  StatePlanes state;
  const T* partmin;
  const T* k;
  T* S;     // (B, c): distances in
  Operand<T> E;  // (B, c): weights out
  T* S_lo;  // (B, c), "tf32x3" only
  Acc* partsum;
  CDM_HD void operator()(int64_t t) const {
    const int64_t i = t / PARTS, p = t % PARTS;
    const T m = new_row_min(state, partmin, i), ki = k[i];
    Acc l = Acc(0), l2 = Acc(0), tt = Acc(0);
    for (int64_t j = p; j < c; j += PARTS) {
      const int64_t ij = i * c + j;
      const T dm = S[ij] - m;
      const T e = wexp(-dm * ki);
      l += Acc(e);
      l2 += Acc(e) * Acc(e);
      tt += Acc(e) * Acc(dm);
      if (prec == PREC_TF32X3) {
        split_tf32(e, &E.f[ij], &S_lo[ij]);
      } else {
        E.put(ij, e, prec);
      }
    }
    partsum[3 * t] = l;
    partsum[3 * t + 1] = l2;
    partsum[3 * t + 2] = tt;
  }
};

// Thread i: the row state rebased to m_new (its accumulator factor to alpha_i) plus the parts' sums;
// for a new minimum, the index of its first reference (the smallest column among the parts at it).
template <typename T>
struct RowMerge {
  int64_t threads;  // B
  StatePlanes state;
  const T* partmin;
  const int64_t* partarg;
  int64_t start;  // the chunk's first reference
  const T* k;
  const Acc* partsum;
  T* alpha;
  CDM_HD void operator()(int64_t i) const {
    RowState<Acc> s = state.get(i);
    const T m_new = new_row_min(state, partmin, i);
    if (Acc(m_new) < s.m) {
      int64_t arg = -1;
      for (int64_t p = 0; p < PARTS; ++p) {
        const int64_t a = partarg[i * PARTS + p];
        if (partmin[i * PARTS + p] == m_new && (arg < 0 || a < arg)) arg = a;
      }
      state.arg[i] = start + arg;
    }
    alpha[i] = T(state_rebase(s, Acc(m_new), Acc(k[i])));
    for (int64_t p = 0; p < PARTS; ++p) {
      const Acc* ps = partsum + 3 * (i * PARTS + p);
      s.l += ps[0];
      s.l2 += ps[1];
      s.t += ps[2];
    }
    state.set(i, s);
  }
};

// Thread t = i D + k: a[t] = a[t] alpha_i + add[t] (alpha null: 1; add null: 0).
template <typename T>
struct ScaleRows {
  int64_t threads;  // B * D
  int64_t D;
  const T* alpha;
  const T* add;
  T* a;
  CDM_HD void operator()(int64_t t) const {
    const T v = alpha != nullptr ? a[t] * alpha[t / D] : a[t];
    a[t] = add != nullptr ? v + add[t] : v;
  }
};

// Thread t = i LANES + l: the partial sum over k = l, l + LANES, ... of (x_ik - r_jk)^2 for the
// reference j at row i's minimum: d_min = ||x_i - r_j||^2 subtract first (stf_math.h says why).
template <typename T>
struct NearestParts {
  int64_t threads;  // B * LANES
  int64_t D;
  const T* x;
  const T* ref;
  const int64_t* arg;
  Acc* part;  // (B, LANES)
  CDM_HD void operator()(int64_t t) const {
    const int64_t i = t / LANES, l = t % LANES, j = arg[i];
    Acc s = j < 0 ? Acc(NAN) : Acc(0);
    if (j >= 0) {
      for (int64_t k = l; k < D; k += LANES) {
        const Acc v = Acc(x[i * D + k]) - Acc(ref[j * D + k]);
        s += v * v;
      }
    }
    part[t] = s;
  }
};

// Thread i: lse_i, aux_i and 1 / l_i from the finished state and d_min.
template <typename T>
struct FinalizeRows {
  int64_t threads;  // B
  StatePlanes state;
  const T* k;
  const Acc* part;  // (B, LANES): NearestParts' lane parts of d_min, added here in lane order
  T* lse;
  T* aux;    // (B, AUX_COLS)
  T* inv_l;  // (B,)
  CDM_HD void operator()(int64_t i) const {
    const T dmin = T(lane_sum(part, i));
    const RowState<Acc> s = state.get(i);
    const RowResult<Acc> r = state_finalize(s, Acc(k[i]), Acc(dmin));
    lse[i] = T(r.lse);
    T* a = aux + i * AUX_COLS;
    a[AUX_M] = T(s.m);
    a[AUX_LOGL] = T(r.log_l);
    a[AUX_DBAR] = T(r.dbar);
    a[AUX_NEFF] = T(r.neff);
    a[AUX_WMAX] = T(r.wmax);
    a[AUX_DMIN] = dmin;
    inv_l[i] = T(r.inv_l);
  }
};

// Thread t = i D + k: mu = acc / l + c, in place.
template <typename T>
struct FinalizeMu {
  int64_t threads;  // B * D
  int64_t D;
  const T* inv_l;
  const T* centre;
  T* mu;  // acc in, mu out
  CDM_HD void operator()(int64_t t) const { mu[t] = mu[t] * inv_l[t / D] + centre[t % D]; }
};

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// The streamed row sums of the backward pass, one plane each (3, B): s = sum_j w (c - mg),
// cov = sum_j w (d - d_bar)(c - mg), dev = sum_j w (d - d_bar).
struct BackwardPlanes {
  Acc* s;
  Acc* cov;
  Acc* dev;
};

// Thread t = i PARTS + p, columns j = p, p + PARTS, ... of the chunk: from S_ij = x'_i . r'_j and
// C_ij = g_i . r'_j (with `given`, S_ij is the forward's kept distance itself), the distance,
// w = exp(-(d - m) k - log l), the x coefficient xc = w (c - mg) (written to E_ij in the mode, as
// ChunkUpdate writes its weights; lo to S_lo in "tf32x3") and the part's sums of xc,
// w (d - d_bar)(c - mg), w (d - d_bar) to partsum. With ref_grad, also a_ij (stf_math.h,
// backward_ref_coef) to A and w over C_ij. final = false: only the sums of xc (the ref gradient's
// first sweep, which moves mg by them).
template <typename T>
struct BackwardTerms {
  int64_t threads;  // B * PARTS
  int64_t c;
  int prec;
  bool final_sweep;
  bool ref_grad;
  bool given;
  const T* xn;
  const T* rn;
  const T* k;
  const T* sigma;
  const T* aux;
  const Acc* mg;
  const T* grad_lse;
  const T* S;  // (B, c): x' . r', or with `given` the distances
  T* C;     // (B, c)
  Operand<T> E;  // (B, c): x coefficients out
  T* S_lo;  // (B, c), "tf32x3" only
  T* A;     // (B, c), ref_grad only
  Acc* partsum;
  CDM_HD void operator()(int64_t t) const {
    const int64_t i = t / PARTS, p = t % PARTS;
    const T* ai = aux + i * AUX_COLS;
    const Acc mgi = mg[i], dbar = mean_delta(Acc(ai[AUX_DBAR]), Acc(xn[i]));
    const T inv_s2 = T(1) / (sigma[i] * sigma[i]);
    Acc s = Acc(0), cov = Acc(0), dev = Acc(0);
    for (int64_t j = p; j < c; j += PARTS) {
      const int64_t ij = i * c + j;
      const T d = given ? S[ij] : reduced_dist(xn[i], rn[j], S[ij]);
      const Acc w = backward_weight(d, ai[AUX_M], ai[AUX_LOGL], k[i]);
      const Acc cij = C[ij];
      const Acc xc = backward_x_coef(w, cij, mgi);
      s += xc;
      if (!final_sweep) continue;
      cov += backward_sigma_term(w, Acc(d), dbar, cij, mgi);
      dev += w * (Acc(d) - dbar);
      if (prec == PREC_TF32X3) {
        split_tf32(T(xc), &E.f[ij], &S_lo[ij]);
      } else {
        E.put(ij, T(xc), prec);
      }
      if (ref_grad) {
        A[ij] = T(backward_ref_coef(w, cij, mgi, Acc(grad_lse[i]), Acc(inv_s2)));
        C[ij] = T(w);
      }
    }
    partsum[3 * t] = s;
    partsum[3 * t + 1] = cov;
    partsum[3 * t + 2] = dev;
  }
};

// Thread i: the parts' sums added to the row sums.
struct RowSums {
  int64_t threads;  // B
  const Acc* partsum;
  BackwardPlanes rows;
  CDM_HD void operator()(int64_t i) const {
    for (int64_t p = 0; p < PARTS; ++p) {
      const Acc* ps = partsum + 3 * (i * PARTS + p);
      rows.s[i] += ps[0];
      rows.cov[i] += ps[1];
      rows.dev[i] += ps[2];
    }
  }
};

// Thread i: zero row sums (before a sweep), or, with shift_mg, mg moved by the first sweep's s
// (mg + s makes mg consistent with the products' rounding, for the ref gradient) and s zeroed.
struct RowsReset {
  int64_t threads;  // B
  bool shift_mg;
  Acc* mg;
  BackwardPlanes rows;
  CDM_HD void operator()(int64_t i) const {
    if (shift_mg) mg[i] += rows.s[i];
    rows.s[i] = Acc(0);
    rows.cov[i] = Acc(0);
    rows.dev[i] = Acc(0);
  }
};

// Thread j: colsum_j = sum_i A_ij (the ref gradient's sum_i a_ij r'_j term), in row order.
template <typename T>
struct ColumnSums {
  int64_t threads;  // c
  int64_t B, c;
  const T* A;
  T* colsum;
  CDM_HD void operator()(int64_t j) const {
    Acc s = Acc(0);
    for (int64_t i = 0; i < B; ++i) s += Acc(A[i * c + j]);
    colsum[j] = T(s);
  }
};

// Thread t = j D + k: grad_r_jk -= colsum_j (r_jk - c_k), the exact shifted reference.
template <typename T>
struct RefGradFinish {
  int64_t threads;  // c * D
  int64_t D;
  const T* colsum;
  const T* ref;  // the chunk's rows of ref
  const T* centre;
  T* grad_ref;  // the chunk's rows of grad_ref
  CDM_HD void operator()(int64_t t) const {
    const int64_t j = t / D, k = t % D;
    grad_ref[t] -= colsum[j] * (ref[t] - centre[k]);
  }
};

// Thread t = i D + k: dL/dx (stf_math.h, grad_x_corrected) from px = sum_j w (c - mg) r'_j.
template <typename T>
struct BackwardFinishX {
  int64_t threads;  // B * D
  int64_t D;
  const T* px;
  const T* mu;
  const T* x;
  const T* centre;
  const T* sigma;
  const T* grad_lse;
  BackwardPlanes rows;
  T* grad_x;
  CDM_HD void operator()(int64_t t) const {
    const int64_t i = t / D, k = t % D;
    const Acc inv_s2 = Acc(1) / (Acc(sigma[i]) * Acc(sigma[i]));
    grad_x[t] = T(grad_x_corrected<Acc>(px[t], rows.s[i], Acc(mu[t] - centre[k]), Acc(x[t] - centre[k]),
                                        grad_lse[i], inv_s2));
  }
};

// Thread i: dL/dsigma (stf_math.h, grad_sigma).
template <typename T>
struct BackwardFinishSigma {
  int64_t threads;  // B
  const T* aux;
  const T* sigma;
  const T* grad_lse;
  BackwardPlanes rows;
  T* grad_sigma;
  CDM_HD void operator()(int64_t i) const {
    grad_sigma[i] = T(stf::grad_sigma<Acc>(rows.cov[i], rows.s[i], rows.dev[i], aux[i * AUX_COLS + AUX_DBAR],
                                           grad_lse[i], sigma[i]));
  }
};

// ------------------------------------------------------------------------------------------------
// Products, workspace and the launch sequences
// ------------------------------------------------------------------------------------------------

// C (M, N) [+]= op(A) (M, K) op(B) (K, N), row-major with leading dimensions: op(A)_mk = A[m lda + k]
// (a_trans: A[k lda + m]), op(B)_kn = B[k ldb + n] (b_trans: B[n ldb + k]). tf32: the operands are
// TF32-exact (rounded by the kernels above), so the product may run on TF32 tensor cores; otherwise
// it must be exact float32. A16, B16 set (both, instead of A and B): bfloat16 operands, float32
// sums into C, never with accumulate (the bf16 product cannot add into a float32 C).
template <typename T>
struct Gemm {
  int64_t M, N, K;
  const T* A;
  int64_t lda;
  bool a_trans;
  const T* B;
  int64_t ldb;
  bool b_trans;
  T* C;
  int64_t ldc;
  bool accumulate;
  bool tf32;
  const Bf16* A16 = nullptr;
  const Bf16* B16 = nullptr;
};

// Carves aligned buffers out of one workspace; a first pass over a null base measures its size.
// 256-byte alignment (the caching allocator's blocks are 512-aligned): every operand a product reads
// has the same alignment whatever the layout (one slot or two), so cuBLAS picks the same algorithm
// and the chunk pipeline gives the one-stream bits.
struct Carver {
  static constexpr int64_t ALIGN = 256;
  char* base;
  int64_t used;
  template <typename U>
  U* take(int64_t count) {
    used = (used + ALIGN - 1) / ALIGN * ALIGN;
    U* p = base != nullptr ? reinterpret_cast<U*>(base + used) : nullptr;
    used += count * static_cast<int64_t>(sizeof(U));
    return p;
  }
};

template <typename T>
struct Problem {
  int64_t B, D, n, chunk;
  int prec;
  const T* x;      // (B, D)
  const T* sigma;  // (B,)
  const T* ref;    // (n, D)
  const T* centre; // (D,)
  bool overlap = false;  // shift the next chunk on a side stream (ChunkFeed); needs n > chunk
};

// Whether the chunk pipeline (ChunkFeed) can run when it is asked for: with more than one chunk.
template <typename T>
inline bool overlap_applies(const Problem<T>& p) { return p.n > p.chunk; }

// Whether the mode's operands are stored as bfloat16 ("bf16"; float64 takes "ieee" only).
template <typename T>
inline bool bf16_storage(const Problem<T>& p) { return p.prec == PREC_BF16 && sizeof(T) == sizeof(float); }

// An operand buffer of `count` elements in the mode's storage.
template <typename T>
Operand<T> take_operand(Carver& cv, const Problem<T>& p, int64_t count) {
  if (bf16_storage(p)) return Operand<T>{nullptr, cv.take<Bf16>(count)};
  return Operand<T>{cv.take<T>(count), nullptr};
}

// The buffers both passes share: x' operands, norms, k, the chunk's operands and norms, the
// (B, c) tiles and the part buffers.
template <typename T>
struct Common {
  Operand<T> xop; // (B, W), the backward's (2B, W): queries then grad_mu
  T* xn;      // (B,)
  T* k;       // (B,)
  Operand<T> rop[2]; // (chunk, W): a chunk's shifted references, in two slots with p.overlap
  T* rn[2];   // (chunk,): their squared norms
  Acc* rlanes; // (chunk, LANES): the shift's lane parts (lanes itself without p.overlap)
  T* S;       // (B, chunk); the backward's (2B, chunk): x' . r' then g . r'
  Operand<T> E;   // (B, chunk): the weights (or x coefficients) in the mode: S itself, or bfloat16
  T* S_lo;    // (B, chunk), tf32x3
  T* tile;    // (B, D), "bf16": a product to add into the accumulator
  Acc* lanes; // (max(B, chunk) * 2, LANES)
  Acc* partsum; // (B, PARTS, 3)

  static Common carve(Carver& cv, const Problem<T>& p, int64_t query_rows) {
    const int64_t W = operand_width(p.D, p.prec);
    const bool half = bf16_storage(p);
    Common m;
    m.xop = take_operand(cv, p, query_rows * W);
    m.xn = cv.take<T>(p.B);
    m.k = cv.take<T>(p.B);
    for (int slot = 0; slot < 2; ++slot) {
      m.rop[slot] = slot == 0 || p.overlap ? take_operand(cv, p, p.chunk * W) : m.rop[0];
      m.rn[slot] = slot == 0 || p.overlap ? cv.take<T>(p.chunk) : m.rn[0];
    }
    m.S = cv.take<T>(query_rows * p.chunk);
    m.E = half ? Operand<T>{nullptr, cv.take<Bf16>(p.B * p.chunk)} : Operand<T>{m.S, nullptr};
    m.S_lo = p.prec == PREC_TF32X3 ? cv.take<T>(p.B * p.chunk) : nullptr;
    m.tile = half ? cv.take<T>(p.B * p.D) : nullptr;
    m.lanes = cv.take<Acc>((query_rows > p.chunk ? query_rows : p.chunk) * LANES);
    m.rlanes = p.overlap ? cv.take<Acc>(p.chunk * LANES) : m.lanes;
    m.partsum = cv.take<Acc>(p.B * PARTS * 3);
    return m;
  }
};

// op(A) op(B) of two operand matrices in their storage (A16, B16 for bfloat16), into C.
template <typename T>
Gemm<T> operand_gemm(int64_t M, int64_t N, int64_t K, const Operand<T>& A, int64_t lda, const Operand<T>& B,
                     int64_t ldb, bool b_trans, T* C, int64_t ldc, bool accumulate, bool tf32) {
  Gemm<T> g{M, N, K, A.f, lda, false, B.f, ldb, b_trans, C, ldc, accumulate, tf32};
  g.A16 = A.h;
  g.B16 = B.h;
  return g;
}

template <typename T>
struct ForwardWorkspace {
  Common<T> cm;
  T* partmin;        // (B, PARTS)
  int64_t* partarg;  // (B, PARTS)
  T* alpha;          // (B,)
  T* inv_l;          // (B,)
  StatePlanes state;

  static ForwardWorkspace carve(Carver& cv, const Problem<T>& p) {
    ForwardWorkspace w;
    w.cm = Common<T>::carve(cv, p, p.B);
    w.partmin = cv.take<T>(p.B * PARTS);
    w.partarg = cv.take<int64_t>(p.B * PARTS);
    w.alpha = cv.take<T>(p.B);
    w.inv_l = cv.take<T>(p.B);
    w.state = StatePlanes{cv.take<Acc>(p.B), cv.take<Acc>(p.B), cv.take<Acc>(p.B), cv.take<Acc>(p.B),
                          cv.take<int64_t>(p.B)};
    return w;
  }
  static int64_t bytes(const Problem<T>& p) {
    Carver cv{nullptr, 0};
    carve(cv, p);
    return cv.used;
  }
};

// Shared steps of both passes: the queries' operands and norms (rows 0..B-1 of xop), k (and with
// `reset`, the empty row states of the forward pass), and per chunk the references' operands and norms.
template <typename T, class Exec>
void prepare_queries(Exec& ex, const Problem<T>& p, const Common<T>& cm, const StatePlanes* reset = nullptr) {
  ex.run(ShiftRows<T>{p.B * LANES, p.D, p.prec, false, p.x, p.centre, cm.xop, cm.lanes});
  const bool empty = reset != nullptr;
  ex.run(QueryRows<T>{p.B, cm.lanes, cm.xn, p.sigma, cm.k, empty, empty ? *reset : StatePlanes{}});
}

// The streams and events of an executor: work runs on the stream selected last (MAIN at first);
// the products always on MAIN. record(e) marks the selected stream's work so far as event e,
// wait(e) makes the selected stream wait for the last mark of e.
enum StreamId { MAIN = 0, SIDE = 1 };
enum EventId { EV_START = 0, EV_SHIFTED = 1, EV_FREE = 3, EVENTS = 5 };  // EV_SHIFTED, EV_FREE: + slot

// The chunks of a sweep over the references, k = 0 .. chunks - 1, and their shifted operands
// (ShiftRows + LaneSum into a slot of cm.rop / cm.rn). Without p.overlap chunk k is shifted on the
// main stream just before its products, in slot 0. With it, on the side stream one chunk ahead, in
// slot k % 2, so that the shift (memory-bound) runs beside the products of the chunk before
// (compute-bound): the side stream starts after the main stream's work so far (EV_START), shifts
// chunk k + 1 once the main stream is done with chunk k - 1 (EV_FREE of its slot), and the main
// stream takes chunk k once its shift is done (EV_SHIFTED of its slot). Use: `take(k)` before chunk
// k's work on the main stream, `done(k)` after its last read of the slot.
template <typename T, class Exec>
struct ChunkFeed {
  Exec& ex;
  const Problem<T>& p;
  const Common<T>& cm;
  int64_t chunks;

  ChunkFeed(Exec& e, const Problem<T>& pr, const Common<T>& c)
      : ex(e), p(pr), cm(c), chunks((pr.n + pr.chunk - 1) / pr.chunk) {
    if (!p.overlap) return;
    ex.record(EV_START);
    ex.stream(SIDE);
    ex.wait(EV_START);
    shift(0);
    ex.stream(MAIN);
  }
  int64_t start(int64_t k) const { return k * p.chunk; }
  int64_t count(int64_t k) const { return p.chunk < p.n - start(k) ? p.chunk : p.n - start(k); }
  int slot(int64_t k) const { return p.overlap ? static_cast<int>(k % 2) : 0; }

  // The slot holding chunk k, shifted, for the main stream's work that follows.
  int take(int64_t k) {
    if (!p.overlap) {
      shift(k);
      return 0;
    }
    if (k + 1 < chunks) {
      ex.stream(SIDE);
      if (k + 1 >= 2) ex.wait(EV_FREE + slot(k + 1));  // chunk k - 1's products are done with the slot
      shift(k + 1);
      ex.stream(MAIN);
    }
    ex.wait(EV_SHIFTED + slot(k));
    return slot(k);
  }
  void done(int64_t k) {
    if (p.overlap) ex.record(EV_FREE + slot(k));
  }

 private:
  void shift(int64_t k) {
    const int s = slot(k);
    const int64_t c = count(k);
    ex.run(ShiftRows<T>{c * LANES, p.D, p.prec, true, p.ref + start(k) * p.D, p.centre, cm.rop[s], cm.rlanes});
    ex.run(LaneSum<T, T>{c, cm.rlanes, cm.rn[s]});
    if (p.overlap) ex.record(EV_SHIFTED + s);
  }
};

// out (B, D) = out alpha + E (B, c) R' (c, D) in the precision mode (alpha null: 1; first:
// out = E R'): one product, or for "tf32x3" the three hi hi + hi lo + lo hi (E's hi in cm.E, its lo
// in cm.S_lo; R''s hi, lo at columns 0 and D of rop). The rescale by alpha runs before the products that add
// into out, or for "bf16" after its product into cm.tile, in the same pass as the addition.
template <typename T, class Exec>
void add_product(Exec& ex, const Problem<T>& p, const Common<T>& cm, const Operand<T>& rop, int64_t c,
                 const T* alpha, bool first, T* out) {
  const int64_t width = operand_width(p.D, p.prec);
  const bool tf32 = p.prec != PREC_IEEE;
  if (!first && cm.tile != nullptr) {
    ex.gemm(operand_gemm(p.B, p.D, c, cm.E, c, rop, width, false, cm.tile, p.D, false, tf32));
    ex.run(ScaleRows<T>{p.B * p.D, p.D, alpha, cm.tile, out});
    return;
  }
  if (!first && alpha != nullptr) ex.run(ScaleRows<T>{p.B * p.D, p.D, alpha, nullptr, out});
  ex.gemm(operand_gemm(p.B, p.D, c, cm.E, c, rop, width, false, out, p.D, !first, tf32));
  if (p.prec == PREC_TF32X3) {
    const T* hi = rop.f;
    ex.gemm(Gemm<T>{p.B, p.D, c, cm.E.f, c, false, hi + p.D, width, false, out, p.D, true, true});
    ex.gemm(Gemm<T>{p.B, p.D, c, cm.S_lo, c, false, hi, width, false, out, p.D, true, true});
  }
}

// The forward pass: mu (B, D), lse (B,), aux (B, AUX_COLS) into out pointers; mu doubles as the
// accumulator. With `dist` (B n) not null, each chunk's distances are kept there for the backward, a
// (B, c) tile after the other, stored by ChunkMin beside its own: every other step, and so every
// result, is that of a call that keeps nothing.
template <typename T, class Exec>
void forward_run(Exec& ex, const Problem<T>& p, const ForwardWorkspace<T>& ws, T* mu, T* lse, T* aux,
                 T* dist = nullptr) {
  const Common<T>& cm = ws.cm;
  const int64_t W = operand_width(p.D, p.prec);
  prepare_queries(ex, p, cm, &ws.state);
  ChunkFeed<T, Exec> feed(ex, p, cm);
  for (int64_t k = 0; k < feed.chunks; ++k) {
    const int64_t start = feed.start(k), c = feed.count(k);
    const int s = feed.take(k);
    T* keep = dist != nullptr ? dist + p.B * start : nullptr;
    ex.gemm(operand_gemm(p.B, c, W, cm.xop, W, cm.rop[s], W, true, cm.S, c, false, p.prec != PREC_IEEE));
    ex.run(ChunkMin<T>{p.B * PARTS, c, cm.xn, cm.rn[s], cm.S, ws.partmin, ws.partarg, keep});
    ex.run(ChunkUpdate<T>{p.B * PARTS, c, p.prec, ws.state, ws.partmin, cm.k, cm.S, cm.E, cm.S_lo, cm.partsum});
    ex.run(RowMerge<T>{p.B, ws.state, ws.partmin, ws.partarg, start, cm.k, cm.partsum, ws.alpha});
    add_product(ex, p, cm, cm.rop[s], c, ws.alpha, k == 0, mu);
    feed.done(k);
  }
  ex.run(NearestParts<T>{p.B * LANES, p.D, p.x, p.ref, ws.state.arg, cm.lanes});
  ex.run(FinalizeRows<T>{p.B, ws.state, cm.k, cm.lanes, lse, aux, ws.inv_l});
  ex.run(FinalizeMu<T>{p.B * p.D, p.D, ws.inv_l, p.centre, mu});
}

template <typename T>
struct BackwardInputs {
  const T* grad_mu;   // (B, D)
  const T* grad_lse;  // (B,)
  const T* mu;        // (B, D)
  const T* aux;       // (B, AUX_COLS)
  const T* dist = nullptr;  // (B n): the forward's kept distances (forward_run), or null
};

template <typename T>
struct BackwardWorkspace {
  Common<T> cm;
  T* A;        // (B, chunk), ref_grad
  T* xs;       // (B, D): exact x', ref_grad
  T* colsum;   // (chunk,), ref_grad
  T* px;       // (B, D)
  Acc* mg;     // (B,)
  BackwardPlanes rows;

  static BackwardWorkspace carve(Carver& cv, const Problem<T>& p, bool ref_grad) {
    BackwardWorkspace w;
    w.cm = Common<T>::carve(cv, p, 2 * p.B);
    w.A = ref_grad ? cv.take<T>(p.B * p.chunk) : nullptr;
    w.xs = ref_grad ? cv.take<T>(p.B * p.D) : nullptr;
    w.colsum = ref_grad ? cv.take<T>(p.chunk) : nullptr;
    w.px = cv.take<T>(p.B * p.D);
    w.mg = cv.take<Acc>(p.B);
    w.rows = BackwardPlanes{cv.take<Acc>(p.B), cv.take<Acc>(p.B), cv.take<Acc>(p.B)};
    return w;
  }
  static int64_t bytes(const Problem<T>& p, bool ref_grad) {
    Carver cv{nullptr, 0};
    carve(cv, p, ref_grad);
    return cv.used;
  }
};

// One sweep of the backward over the chunks (final = false: the ref gradient's first sweep, sums of
// xc only).
template <typename T, class Exec>
void backward_sweep(Exec& ex, const Problem<T>& p, const BackwardInputs<T>& in, const BackwardWorkspace<T>& ws,
                    bool final_sweep, T* grad_ref) {
  const Common<T>& cm = ws.cm;
  const int64_t W = operand_width(p.D, p.prec);
  const bool ref_grad = grad_ref != nullptr;
  ChunkFeed<T, Exec> feed(ex, p, cm);
  for (int64_t k = 0; k < feed.chunks; ++k) {
    const int64_t start = feed.start(k), c = feed.count(k);
    const int s = feed.take(k);
    // S = X' R'^T and C = G R'^T from the stacked (2B, W) operands: one product into the (2B, c)
    // tile whose rows B..2B-1 are C; with the forward's kept distances, C = G R'^T alone.
    const bool given = in.dist != nullptr;
    const T* S = given ? in.dist + p.B * start : cm.S;
    T* C = cm.S + p.B * c;
    if (given) {
      const Operand<T> gop = cm.xop.from(p.B * W);
      ex.gemm(operand_gemm(p.B, c, W, gop, W, cm.rop[s], W, true, C, c, false, p.prec != PREC_IEEE));
    } else {
      ex.gemm(operand_gemm(2 * p.B, c, W, cm.xop, W, cm.rop[s], W, true, cm.S, c, false, p.prec != PREC_IEEE));
    }
    ex.run(BackwardTerms<T>{p.B * PARTS, c, p.prec, final_sweep, ref_grad && final_sweep, given, cm.xn, cm.rn[s],
                            cm.k, p.sigma, in.aux, ws.mg, in.grad_lse, S, C, cm.E, cm.S_lo, ws.A, cm.partsum});
    ex.run(RowSums{p.B, cm.partsum, ws.rows});
    if (final_sweep) add_product(ex, p, cm, cm.rop[s], c, static_cast<const T*>(nullptr), k == 0, ws.px);
    feed.done(k);  // the slot's last reader: the products above
    if (!final_sweep) continue;
    if (ref_grad) {
      // dL/dr_j = sum_i w_ij g_i + a_ij (x'_i - r'_j), products in exact float32 in every mode.
      T* g = grad_ref + start * p.D;
      ex.gemm(Gemm<T>{c, p.D, p.B, C, c, true, in.grad_mu, p.D, false, g, p.D, false, false});
      ex.gemm(Gemm<T>{c, p.D, p.B, ws.A, c, true, ws.xs, p.D, false, g, p.D, true, false});
      ex.run(ColumnSums<T>{c, p.B, c, ws.A, ws.colsum});
      ex.run(RefGradFinish<T>{c * p.D, p.D, ws.colsum, p.ref + start * p.D, p.centre, g});
    }
  }
}

// The backward pass: grad_x (B, D), grad_sigma (B,) and, when grad_ref is not null, grad_ref (n, D).
template <typename T, class Exec>
void backward_run(Exec& ex, const Problem<T>& p, const BackwardInputs<T>& in, const BackwardWorkspace<T>& ws,
                  T* grad_x, T* grad_sigma, T* grad_ref) {
  const Common<T>& cm = ws.cm;
  const int64_t W = operand_width(p.D, p.prec);
  prepare_queries(ex, p, cm);
  ex.run(ShiftRows<T>{p.B * LANES, p.D, p.prec, false, in.grad_mu, nullptr, cm.xop.from(p.B * W), nullptr});
  ex.run(DotRows<T>{p.B * LANES, p.D, in.mu, p.centre, in.grad_mu, cm.lanes});
  ex.run(LaneSum<T, Acc>{p.B, cm.lanes, ws.mg});
  ex.run(RowsReset{p.B, false, ws.mg, ws.rows});
  if (grad_ref != nullptr) {
    ex.run(ShiftRows<T>{p.B * LANES, p.D, PREC_IEEE, false, p.x, p.centre, Operand<T>{ws.xs, nullptr}, nullptr});
    backward_sweep(ex, p, in, ws, false, grad_ref);
    ex.run(RowsReset{p.B, true, ws.mg, ws.rows});
  }
  backward_sweep(ex, p, in, ws, true, grad_ref);
  ex.run(BackwardFinishX<T>{p.B * p.D, p.D, ws.px, in.mu, p.x, p.centre, p.sigma, in.grad_lse, ws.rows, grad_x});
  ex.run(BackwardFinishSigma<T>{p.B, in.aux, p.sigma, in.grad_lse, ws.rows, grad_sigma});
}

}  // namespace cuda
}  // namespace stf
}  // namespace cdm
