// The CUDA stable-target kernels (math.md section 1), written so that the host can execute them.
//
// Everything a CUDA thread of csrc/cuda/stf.cu executes is here, as __host__ __device__ code:
//   - per-thread functors (`operator()(t)` for a flat thread index t): logits and the online
//     softmax update, the row merges, the backward weights, the finalisers;
//   - the three phases of the tiled matrix-product kernel (load a tile into shared memory, multiply,
//     store with an epilogue), separated exactly where the kernel has its barriers;
//   - the launch sequences `forward_run` / `backward_run`, templated on an executor that either
//     launches kernels (stf.cu) or runs every thread of every block on the host, phase by phase
//     (tests/cuda_emulator.cpp). A sequential run of all threads between two barriers is one legal
//     schedule of a CUDA block, so the host run executes these same lines with the same indices.
// The arithmetic itself (logits, the softmax update, the merge, the backward weights) is the shared
// code of csrc/stf_math.h, which the CPU backend also executes.
//
// Layout of the work (why: see docs/gpu_design.md). The references are streamed in chunks of c rows.
// Per chunk, the forward pass does
//   1. dots  (B, c)  = X (B, D) R_c^T          tiled matrix product, D tiled by GEMM_BK
//   2. z = logit(dots), per-(row, part) maxima  B x P threads, part p takes j = p, p + P, ...
//   3. e = exp(z - m_new), partial (l, l2, t)    B x P threads, m_new = max(old m, part maxima)
//   4. merge the P partial states into the row state, alpha = exp(m_old - m_new)   B threads
//   5. acc (B, D) = alpha * acc + E (B, c) R_c  tiled matrix product, D tiled by the grid
// and finishes with mu = acc / l. The backward pass streams the same chunks with its own weights.
// A product with fewer output tiles than 2 blocks per SM (small B) also splits its K axis across
// blocks and adds the partial sums in order afterwards (gemm_split_len, GemmSplitReduce).
// All global indices are 64-bit: B * D, B * c and n * D may exceed 2^31.
#pragma once

#include <stdint.h>

#include "stf_math.h"

// Keeps the device compiler from unrolling a loop (the host compiler has no such pragma).
#if defined(__CUDA_ARCH__)
#define CDM_NO_UNROLL _Pragma("unroll 1")
#else
#define CDM_NO_UNROLL
#endif

namespace cdm {
namespace stf {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// Tiled matrix product: C (M, N) [+]= A (M, K) B (K, N), any strides (so X R^T, E R and W^T G are
// one kernel). 256 threads compute a GEMM_BM x GEMM_BN tile, 4 x 4 outputs each, stepping over K
// in slices of GEMM_BK held in shared memory.
// ------------------------------------------------------------------------------------------------

constexpr int GEMM_THREADS = 256;
constexpr int GEMM_BM = 64;
constexpr int GEMM_BN = 64;
constexpr int GEMM_BK = 16;
constexpr int GEMM_TM = GEMM_BM / 16;  // rows per thread (threads form a 16 x 16 grid)
constexpr int GEMM_TN = GEMM_BN / 16;  // columns per thread

// Fused multiply-add, explicitly: the device contracts a * b + c to one FMA anyway, and saying so
// makes the host emulation round exactly as the GPU does, and gemm_dot below equal to the product's
// entries bit for bit.
CDM_HD float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
CDM_HD double fmadd(double a, double b, double c) { return fma(a, b, c); }

template <typename T>
struct GemmArgs {
  int64_t M, N, K;
  const T* A;
  int64_t a_sm, a_sk;  // A[m, k] = A[m * a_sm + k * a_sk]
  const T* Bm;
  int64_t b_sk, b_sn;  // B[k, n] = Bm[k * b_sk + n * b_sn]
  T* C;
  int64_t ldc;          // C[m, n] = C[m * ldc + n]
  bool accumulate;      // C = row_scale[m] * C + AB (row_scale may be null: 1) instead of C = AB
  const T* row_scale;   // (M,) or null
  const T* sub_scale;   // if not null: C[m, n] -= sub_scale[m] * sub_mat[m * ld_sub + n]
  const T* sub_mat;
  int64_t ld_sub;
  // Split-K: the K axis is cut into `splits` ranges of k_len (a multiple of GEMM_BK, so the slices
  // are those of the unsplit product). With splits > 1 each block writes its raw sums to
  // partial (splits, M, N) and GemmSplitReduce adds them in split order and applies the epilogue.
  int64_t splits, k_len;
  T* partial;
};

template <typename T>
struct GemmSmem {
  // +1 column of padding breaks the bank conflicts of the transposed stores into the tiles.
  T a[GEMM_BK][GEMM_BM + 1];
  T b[GEMM_BK][GEMM_BN + 1];
};

template <typename T>
struct GemmAcc {
  T v[GEMM_TM][GEMM_TN];
};

CDM_HD int64_t gemm_tiles(int64_t M, int64_t N) {
  return ((M + GEMM_BM - 1) / GEMM_BM) * ((N + GEMM_BN - 1) / GEMM_BN);
}

template <typename T>
CDM_HD int64_t gemm_blocks(const GemmArgs<T>& g) {
  return gemm_tiles(g.M, g.N) * g.splits;
}

// Where block `block` works (a flat grid: gridDim.y would cap M / GEMM_BM at 65535): the tile at
// (m0, n0), the K range [k_begin, k_end) and its split index.
template <typename T>
CDM_HD void gemm_block_range(const GemmArgs<T>& g, int64_t block, int64_t* m0, int64_t* n0, int64_t* k_begin,
                             int64_t* k_end, int64_t* split) {
  const int64_t tiles = gemm_tiles(g.M, g.N);
  const int64_t nb = (g.N + GEMM_BN - 1) / GEMM_BN;
  const int64_t t = block % tiles;
  *split = block / tiles;
  *m0 = (t / nb) * GEMM_BM;
  *n0 = (t % nb) * GEMM_BN;
  *k_begin = *split * g.k_len;
  *k_end = *k_begin + g.k_len < g.K ? *k_begin + g.k_len : g.K;
}

template <typename T>
CDM_HD void gemm_zero(GemmAcc<T>& acc) {
  for (int r = 0; r < GEMM_TM; ++r)
    for (int c = 0; c < GEMM_TN; ++c) acc.v[r][c] = T(0);
}

// Phase 1 (before a barrier): thread `tid` copies its share of the A and B slices at k0 into shared
// memory, zero outside the matrices. Consecutive threads read consecutive addresses along whichever
// axis of each operand is contiguous, so the global loads coalesce for every layout used here.
template <typename T>
CDM_HD void gemm_load(const GemmArgs<T>& g, GemmSmem<T>& s, int tid, int64_t m0, int64_t n0, int64_t k0,
                      int64_t k_end) {
  const bool a_k_fast = g.a_sk == 1;
  for (int q = 0; q < GEMM_BM * GEMM_BK / GEMM_THREADS; ++q) {
    const int e = tid + q * GEMM_THREADS;
    const int mm = a_k_fast ? e / GEMM_BK : e % GEMM_BM;
    const int kk = a_k_fast ? e % GEMM_BK : e / GEMM_BM;
    const int64_t m = m0 + mm, k = k0 + kk;
    s.a[kk][mm] = (m < g.M && k < k_end) ? g.A[m * g.a_sm + k * g.a_sk] : T(0);
  }
  const bool b_n_fast = g.b_sn == 1;
  for (int q = 0; q < GEMM_BN * GEMM_BK / GEMM_THREADS; ++q) {
    const int e = tid + q * GEMM_THREADS;
    const int nn = b_n_fast ? e % GEMM_BN : e / GEMM_BK;
    const int kk = b_n_fast ? e / GEMM_BN : e % GEMM_BK;
    const int64_t n = n0 + nn, k = k0 + kk;
    s.b[kk][nn] = (n < g.N && k < k_end) ? g.Bm[k * g.b_sk + n * g.b_sn] : T(0);
  }
}

// Phase 2 (between barriers): the thread's 4 x 4 outer products over the slice. Thread (ty, tx)
// owns rows ty + 16 r and columns tx + 16 c, so a warp reads 16 consecutive words of each tile row.
// Each slice is summed apart and then added to the running sum (two-level summation): a dot product
// over K = 3072 summed in one float sequence loses ~sqrt(K) ulps, and the logits divide that error
// by sigma^2; in two levels it is ~sqrt(GEMM_BK) + sqrt(K / GEMM_BK) ulps, for 16 adds per 256 FMAs.
template <typename T>
CDM_HD void gemm_multiply(const GemmSmem<T>& s, int tid, GemmAcc<T>& acc) {
  const int ty = tid / 16, tx = tid % 16;
  GemmAcc<T> part;
  gemm_zero(part);
  for (int kk = 0; kk < GEMM_BK; ++kk) {
    T a[GEMM_TM], b[GEMM_TN];
    for (int r = 0; r < GEMM_TM; ++r) a[r] = s.a[kk][ty + 16 * r];
    for (int c = 0; c < GEMM_TN; ++c) b[c] = s.b[kk][tx + 16 * c];
    for (int r = 0; r < GEMM_TM; ++r)
      for (int c = 0; c < GEMM_TN; ++c) part.v[r][c] = fmadd(a[r], b[c], part.v[r][c]);
  }
  for (int r = 0; r < GEMM_TM; ++r)
    for (int c = 0; c < GEMM_TN; ++c) acc.v[r][c] += part.v[r][c];
}

// One dot product a . b (K) rounded exactly as an entry of the tiled product split in ranges of
// k_len: slices of GEMM_BK summed apart by FMAs, added in order within a range, then the ranges
// added in order (the product's zero padding leaves a slice unchanged, and 0 + v = v).
// mu_i . g_i computed this way cancels bit for bit against g_i . r_j when mu_i = r_j (sigma -> 0),
// which the centred backward form w (c - mg) / sigma^2 needs: one ulp of mismatch there is
// multiplied by 1 / sigma^2 = 2.5e5 at sigma = 0.002.
// The sum over one K range [r0, r1) (one split of the product).
template <typename T>
CDM_HD T gemm_dot_range(const T* a, const T* b, int64_t r0, int64_t r1) {
  T acc = T(0);
  for (int64_t k0 = r0; k0 < r1; k0 += GEMM_BK) {
    const int64_t k1 = k0 + GEMM_BK < r1 ? k0 + GEMM_BK : r1;
    T part = T(0);
    for (int64_t k = k0; k < k1; ++k) part = fmadd(a[k], b[k], part);
    acc += part;
  }
  return acc;
}

template <typename T>
CDM_HD T gemm_dot(const T* a, const T* b, int64_t K, int64_t k_len) {
  T total = T(0);
  for (int64_t r0 = 0; r0 < K; r0 += k_len) total += gemm_dot_range(a, b, r0, r0 + k_len < K ? r0 + k_len : K);
  return total;
}

// The epilogue of entry (m, n) whose sum over K is v: C = [row_scale C +] v [- sub_scale sub_mat].
template <typename T>
CDM_HD void gemm_epilogue(const GemmArgs<T>& g, int64_t m, int64_t n, T v) {
  T* out = g.C + m * g.ldc + n;
  if (g.accumulate) v += (g.row_scale != nullptr ? g.row_scale[m] : T(1)) * *out;
  if (g.sub_scale != nullptr) v -= g.sub_scale[m] * g.sub_mat[m * g.ld_sub + n];
  *out = v;
}

// Phase 3 (after the K loop): the epilogue, or with split-K the raw sums of this K range.
template <typename T>
CDM_HD void gemm_store(const GemmArgs<T>& g, int tid, int64_t m0, int64_t n0, int64_t split, const GemmAcc<T>& acc) {
  const int ty = tid / 16, tx = tid % 16;
  for (int r = 0; r < GEMM_TM; ++r) {
    const int64_t m = m0 + ty + 16 * r;
    if (m >= g.M) continue;
    for (int c = 0; c < GEMM_TN; ++c) {
      const int64_t n = n0 + tx + 16 * c;
      if (n >= g.N) continue;
      if (g.splits > 1)
        g.partial[(split * g.M + m) * g.N + n] = acc.v[r][c];
      else
        gemm_epilogue(g, m, n, acc.v[r][c]);
    }
  }
}

// Split-K reduction, one thread per entry: the ranges added in order (deterministic, no atomics).
template <typename T>
struct GemmSplitReduce {
  int64_t threads;  // M * N
  GemmArgs<T> g;
  CDM_HD void operator()(int64_t t) const {
    const int64_t mn = g.M * g.N;
    T v = T(0);
    for (int64_t s = 0; s < g.splits; ++s) v += g.partial[s * mn + t];
    gemm_epilogue(g, t / g.N, t % g.N, v);
  }
};

template <typename T>
GemmArgs<T> gemm_args(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_sm, int64_t a_sk, const T* Bm,
                      int64_t b_sk, int64_t b_sn, T* C, int64_t ldc) {
  GemmArgs<T> g;
  g.M = M, g.N = N, g.K = K;
  g.A = A, g.a_sm = a_sm, g.a_sk = a_sk;
  g.Bm = Bm, g.b_sk = b_sk, g.b_sn = b_sn;
  g.C = C, g.ldc = ldc;
  g.accumulate = false;
  g.row_scale = nullptr;
  g.sub_scale = nullptr;
  g.sub_mat = nullptr;
  g.ld_sub = 0;
  g.splits = 1;
  g.k_len = K;
  g.partial = nullptr;
  return g;
}

// The K range per split for a product with `tiles` output tiles: enough splits for ~2 blocks per
// SM when the tiles alone are fewer (B <= 128 at D = 3072), each range at least 8 slices so the
// partial sums stay a small fraction of the traffic; a multiple of GEMM_BK. k_len >= K: no split.
inline int64_t gemm_split_len(int64_t tiles, int64_t K, int64_t sm_count) {
  const int64_t target = 2 * sm_count;
  if (tiles >= target) return K > 0 ? K : 1;
  int64_t splits = (target + tiles - 1) / tiles;
  const int64_t max_splits = K / (8 * GEMM_BK);
  if (splits > max_splits) splits = max_splits;
  if (splits <= 1) return K > 0 ? K : 1;
  const int64_t per = (K + splits - 1) / splits;
  return (per + GEMM_BK - 1) / GEMM_BK * GEMM_BK;
}

inline int64_t gemm_splits(int64_t K, int64_t k_len) { return K <= k_len ? 1 : (K + k_len - 1) / k_len; }

template <typename T>
void gemm_set_split(GemmArgs<T>& g, int64_t k_len, T* partial) {
  g.k_len = k_len;
  g.splits = gemm_splits(g.K, k_len);
  g.partial = g.splits > 1 ? partial : nullptr;
}

// ------------------------------------------------------------------------------------------------
// Per-thread functors. Each has `threads` (how many flat indices to run) and operator()(t).
// Row work is split into P parts per row: thread t = i * P + p takes the columns j = p, p + P, ...
// of row i, so the P threads of a row read consecutive words (coalesced) and a chunk has B * P
// threads of parallelism even when B is small. Parts are merged exactly (math.md, the merge).
// ------------------------------------------------------------------------------------------------

// Accumulator of the long row sum ||x_i||^2: double for float inputs. A float sum
// of D = 3072 terms in sequence loses ~sqrt(D) ulps, and lse = zlse - ||x||^2 / (2 sigma^2)
// multiplies that by 1 / sigma^2. The double work is O(B D) once per call, against O(B n D) for
// the products.
template <typename T>
struct WideAcc {
  typedef double type;
};

// Per row: ||x_i||^2 (in double, see WideAcc), and (backward) mu_i . g_i (as the product rounds it,
// see gemm_dot). O(B D) once per call, in two steps so that a small batch still has parallelism:
// RowDotParts sums each K range of the logits product's split (Q = its number of ranges; Q = 1
// when the product is not split, which happens when B is large), RowDotSum adds the ranges in
// order, exactly as gemm_dot does.
template <typename T>
struct RowDotParts {
  int64_t threads;  // B * Q
  int64_t D, Q, k_len;
  const T* x;
  const T* mu;  // null in the forward pass
  const T* g;
  T* parts;  // (B, Q) parts of ||x||^2, then (B, Q) parts of mu . g
  CDM_HD void operator()(int64_t t) const {
    typedef typename WideAcc<T>::type W;
    const int64_t i = t / Q, q = t % Q;
    const int64_t r0 = q * k_len, r1 = r0 + k_len < D ? r0 + k_len : D;
    const T* xi = x + i * D;
    W a = W(0);
    for (int64_t k = r0; k < r1; ++k) a += W(xi[k]) * W(xi[k]);
    parts[t] = T(a);
    if (mu != nullptr) parts[threads + t] = gemm_dot_range(g + i * D, mu + i * D, r0, r1);
  }
};

template <typename T>
struct RowDotSum {
  int64_t threads;  // B
  int64_t Q;
  const T* parts;
  T* xn;  // (B,)
  T* mg;  // (B,) or null
  CDM_HD void operator()(int64_t i) const {
    typedef typename WideAcc<T>::type W;
    W a = W(0);
    for (int64_t q = 0; q < Q; ++q) a += W(parts[i * Q + q]);
    xn[i] = T(a);
    if (mg != nullptr) {
      const T* mp = parts + threads * Q + i * Q;
      T total = T(0);
      for (int64_t q = 0; q < Q; ++q) total += mp[q];
      mg[i] = total;
    }
  }
};

// The row state of the forward stream: (m, l, l2, t) of stf_math.h's RowState, one per row.
template <typename T>
struct StateInit {
  int64_t threads;  // B
  RowState<T>* state;
  CDM_HD void operator()(int64_t i) const { state[i] = state_empty<T>(); }
};

// Step 2: tile (B, c) holds x_i . r_j on entry and z_ij on exit; part_max (B, P) gets the part maxima.
template <typename T>
struct ForwardLogits {
  int64_t threads;  // B * P
  int64_t P, c, start;
  T* tile;
  const T* sigma;
  const T* ref_sqnorm;  // (n,), indexed by start + j
  T* part_max;
  CDM_HD void operator()(int64_t t) const {
    const int64_t i = t / P, p = t % P;
    const T inv_s2 = T(1) / (sigma[i] * sigma[i]);
    T* row = tile + i * c;
    T m = neg_inf<T>();
    for (int64_t j = p; j < c; j += P) {
      const T z = logit(row[j], ref_sqnorm[start + j], inv_s2);
      row[j] = z;
      m = nan_max(m, z);
    }
    part_max[t] = m;
  }
};

// The row's new running maximum: the old one and the P part maxima of this chunk.
template <typename T>
CDM_HD T chunk_max(const RowState<T>& s, const T* part_max, int64_t i, int64_t P) {
  T m = s.m;
  for (int64_t p = 0; p < P; ++p) m = nan_max(m, part_max[i * P + p]);
  return m;
}

// Step 3: z -> e = exp(z - m_new) in place; the part's (l, l2, t) relative to m_new.
template <typename T>
struct ForwardExp {
  int64_t threads;  // B * P
  int64_t P, c;
  T* tile;
  const T* part_max;
  const RowState<T>* state;
  RowState<T>* part_state;  // (B, P)
  CDM_HD void operator()(int64_t t) const {
    const int64_t i = t / P, p = t % P;
    RowState<T> s = state_empty<T>();
    s.m = chunk_max(state[i], part_max, i, P);
    T* row = tile + i * c;
    // Unrolled, the float64 instance spills 24 bytes on sm_90 (tools/ptxas_report.py); the loop is
    // bound by memory and exp, not by its branch.
    CDM_NO_UNROLL
    for (int64_t j = p; j < c; j += P) row[j] = state_add(s, row[j]);
    part_state[t] = s;
  }
};

// Step 4: row state <- merge(row state, parts); alpha_i rescales the accumulator row.
template <typename T>
struct ForwardMerge {
  int64_t threads;  // B
  int64_t P;
  const T* part_max;
  const RowState<T>* part_state;
  RowState<T>* state;
  T* alpha;
  CDM_HD void operator()(int64_t i) const {
    RowState<T> s = state[i];
    T alpha_a, alpha_b;
    // Merging the empty state at m_new first moves s to m_new even when every part is empty.
    RowState<T> base = state_empty<T>();
    base.m = chunk_max(s, part_max, i, P);
    state_merge(s, base, &alpha_a, &alpha_b);
    alpha[i] = alpha_a;
    for (int64_t p = 0; p < P; ++p) state_merge(s, part_state[i * P + p], &alpha_a, &alpha_b);
    state[i] = s;
  }
};

// Finish of the forward pass, per row: lse, aux, and 1 / l for the accumulator.
template <typename T>
struct ForwardFinalize {
  int64_t threads;  // B
  const RowState<T>* state;
  const T* xn;
  const T* sigma;
  T* inv_l;
  T* lse;
  T* aux;  // (B, AUX_COLS)
  CDM_HD void operator()(int64_t i) const {
    const RowResult<T> r = state_finalize(state[i], xn[i], sigma[i] * sigma[i]);
    inv_l[i] = r.inv_l;
    lse[i] = r.lse;
    T* a = aux + i * AUX_COLS;
    a[AUX_ZLSE] = r.zlse;
    a[AUX_DBAR] = r.dbar;
    a[AUX_NEFF] = r.neff;
    a[AUX_WMAX] = r.wmax;
  }
};

// mu = acc / l, elementwise over (B, D).
template <typename T>
struct ScaleRows {
  int64_t threads;  // B * D
  int64_t D;
  const T* acc;
  const T* inv_l;
  T* mu;
  CDM_HD void operator()(int64_t t) const { mu[t] = acc[t] * inv_l[t / D]; }
};

// Backward step 2, per (row, part): from dots (rows 0..B-1 of tile) and c_ij = g_i . r_j (rows
// B..2B-1) to the x-coefficients (in place of the dots), the weights w (in place of c, used by the
// ref gradient), the ref coefficients a_ij, and the part's shares of cov = sum_j w (z - z_bar)(c - mg),
// s = sum_j w (c - mg) and dev = sum_j w (z - z_bar) (s and dev feed the first-order corrections of
// stf_math.h), accumulated over chunks in cov_part (B, P, 3).
template <typename T>
struct BackwardWeights {
  int64_t threads;  // B * P
  int64_t P, B, c, start;
  T* tile;  // (2B, c)
  T* ref_coef;  // (B, c) or null (no ref gradient)
  const T* sigma;
  const T* ref_sqnorm;
  const T* aux;
  const T* xn;
  const T* mg;
  const T* grad_lse;
  T* cov_part;
  bool first;
  CDM_HD void operator()(int64_t t) const {
    const int64_t i = t / P, p = t % P;
    const T s2 = sigma[i] * sigma[i], inv_s2 = T(1) / s2;
    const T zlse = aux[i * AUX_COLS + AUX_ZLSE];
    const T zbar = mean_logit(aux[i * AUX_COLS + AUX_DBAR], xn[i], s2);
    T* zrow = tile + i * c;
    T* crow = tile + (B + i) * c;
    T cov = T(0), s_sum = T(0), dev = T(0);
    CDM_NO_UNROLL  // unrolled, the double variant spills 16 B on sm_90 (three accumulators)
    for (int64_t j = p; j < c; j += P) {
      const T z = logit(zrow[j], ref_sqnorm[start + j], inv_s2);
      const T w = backward_weight(z, zlse);
      const T cij = crow[j];
      const T xc = backward_x_coef(w, cij, mg[i]);
      zrow[j] = xc;
      s_sum += xc;
      dev += w * (z - zbar);
      cov += backward_sigma_term(w, z, zbar, cij, mg[i]);
      if (ref_coef != nullptr) {
        ref_coef[i * c + j] = backward_ref_coef(w, cij, mg[i], grad_lse[i], inv_s2);
        crow[j] = w;
      }
    }
    T* part = cov_part + 3 * t;
    part[0] = first ? cov : part[0] + cov;
    part[1] = first ? s_sum : part[1] + s_sum;
    part[2] = first ? dev : part[2] + dev;
  }
};

// s_j = sum_i a_ij for the term -(sum_i a_ij) r_j of the ref gradient.
template <typename T>
struct ColumnSum {
  int64_t threads;  // c
  int64_t B, c;
  const T* a;
  T* out;
  CDM_HD void operator()(int64_t j) const {
    T s = T(0);
    for (int64_t i = 0; i < B; ++i) s += a[i * c + j];
    out[j] = s;
  }
};

// Finish of the backward pass: dL/dsigma per row, and s per row for dL/dx.
template <typename T>
struct BackwardSigma {
  int64_t threads;  // B
  int64_t P;
  const T* cov_part;
  const T* aux;
  const T* grad_lse;
  const T* sigma;
  T* grad_sig;
  T* s_row;
  CDM_HD void operator()(int64_t i) const {
    T cov = T(0), s_sum = T(0), dev = T(0);
    for (int64_t p = 0; p < P; ++p) {
      const T* part = cov_part + 3 * (i * P + p);
      cov += part[0];
      s_sum += part[1];
      dev += part[2];
    }
    s_row[i] = s_sum;
    grad_sig[i] = grad_sigma(cov_corrected(cov, s_sum, dev), aux[i * AUX_COLS + AUX_DBAR], grad_lse[i], sigma[i]);
  }
};

// dL/dx elementwise over (B, D), px = sum_j w (c - mg) r_j from the accumulating product.
template <typename T>
struct BackwardX {
  int64_t threads;  // B * D
  int64_t D;
  const T* px;
  const T* mu;
  const T* x;
  const T* grad_lse;
  const T* sigma;
  const T* s_row;
  T* grad_x_out;
  CDM_HD void operator()(int64_t t) const {
    const int64_t i = t / D;
    const T inv_s2 = T(1) / (sigma[i] * sigma[i]);
    grad_x_out[t] = grad_x_corrected(px[t], s_row[i], mu[t], x[t], grad_lse[i], inv_s2);
  }
};

// ------------------------------------------------------------------------------------------------
// Sizes and the workspace, shared by the torch glue (which allocates it) and the host emulator.
// ------------------------------------------------------------------------------------------------

struct Plan {
  int64_t B, D, n, c, P;
  int64_t sm_count;
  int64_t k_len_logits;  // K split of the logits products, the same for every chunk (see RowDotParts)
  int64_t Q;             // its number of K ranges
  int64_t partial;       // elements of the split-K partial sums, the largest any product needs
};

// Upper bound of the splits gemm_split_len gives for a K up to `K` (it grows with K).
inline int64_t gemm_split_bound(int64_t tiles, int64_t K, int64_t sm_count) {
  return gemm_splits(K, gemm_split_len(tiles, K, sm_count));
}

// P parts per row: about 32 columns per part and at least ~32k threads per chunk when c allows.
// sm_count: the GPU's multiprocessors, which decide the split-K of the products.
inline Plan make_plan(int64_t B, int64_t D, int64_t n, int64_t chunk_size, int64_t sm_count) {
  Plan pl;
  pl.B = B, pl.D = D, pl.n = n;
  pl.c = chunk_size < n ? chunk_size : n;
  int64_t P = (32768 + B - 1) / B;
  const int64_t cap = (pl.c + 31) / 32;
  pl.P = P < cap ? P : cap;
  if (pl.P < 1) pl.P = 1;
  pl.sm_count = sm_count > 0 ? sm_count : 1;
  const int64_t c = pl.c;
  pl.k_len_logits = gemm_split_len(gemm_tiles(B, c), D, pl.sm_count);
  pl.Q = gemm_splits(D, pl.k_len_logits);
  const int64_t logits = gemm_splits(D, pl.k_len_logits) * B * c;
  // A shorter last chunk has fewer K (accumulate) or fewer tiles of the same K ranges (logits):
  // never more partial sums than a full chunk. The reference-gradient products (K = B, c x D
  // tiles) are not split.
  const int64_t accumulate = gemm_split_bound(gemm_tiles(B, D), c, pl.sm_count) * B * D;
  pl.partial = logits > accumulate ? logits : accumulate;
  return pl;
}

// Workspace in elements of T (RowState<T> is 4 T). Forward: state, part_state, part_max, alpha,
// xn, inv_l, tile (B, c), acc (B, D). Backward: xn, mg, cov_part, tile (2B, c), ref_coef (B, c),
// column sums (c), px (B, D).
template <typename T>
struct ForwardWorkspace {
  RowState<T>* state;
  RowState<T>* part_state;
  T *part_max, *alpha, *xn, *inv_l, *tile, *acc, *partial, *row_parts;
  static int64_t size(const Plan& p) {
    return 4 * p.B + 4 * p.B * p.P + p.B * p.P + 3 * p.B + p.B * p.c + p.B * p.D + p.partial + 2 * p.B * p.Q;
  }
  static ForwardWorkspace carve(T* base, const Plan& p) {
    ForwardWorkspace w;
    w.state = reinterpret_cast<RowState<T>*>(base);
    w.part_state = reinterpret_cast<RowState<T>*>(base + 4 * p.B);
    T* q = base + 4 * p.B + 4 * p.B * p.P;
    w.part_max = q, q += p.B * p.P;
    w.alpha = q, q += p.B;
    w.xn = q, q += p.B;
    w.inv_l = q, q += p.B;
    w.tile = q, q += p.B * p.c;
    w.acc = q, q += p.B * p.D;
    w.partial = q, q += p.partial;
    w.row_parts = q;
    return w;
  }
};

template <typename T>
struct BackwardWorkspace {
  T *xn, *mg, *s_row, *cov_part, *tile, *ref_coef, *colsum, *px, *partial, *row_parts;
  static int64_t size(const Plan& p, bool ref_grad) {
    return 3 * p.B + 3 * p.B * p.P + 2 * p.B * p.c + (ref_grad ? p.B * p.c + p.c : 0) + p.B * p.D + p.partial +
           2 * p.B * p.Q;
  }
  static BackwardWorkspace carve(T* base, const Plan& p, bool ref_grad) {
    BackwardWorkspace w;
    T* q = base;
    w.xn = q, q += p.B;
    w.mg = q, q += p.B;
    w.s_row = q, q += p.B;
    w.cov_part = q, q += 3 * p.B * p.P;
    w.tile = q, q += 2 * p.B * p.c;
    w.ref_coef = ref_grad ? q : nullptr, q += ref_grad ? p.B * p.c : 0;
    w.colsum = ref_grad ? q : nullptr, q += ref_grad ? p.c : 0;
    w.px = q, q += p.B * p.D;
    w.partial = q, q += p.partial;
    w.row_parts = q;
    return w;
  }
};

// A product and, when it is split, its reduction.
template <typename T, class Exec>
bool launch_gemm(Exec& ex, const GemmArgs<T>& g, const char* name) {
  if (!ex.gemm(g, name)) return false;
  return g.splits > 1 ? ex.run(GemmSplitReduce<T>{g.M * g.N, g}, "stf_gemm_split_reduce") : true;
}

// The products of a chunk: logits (K = D, the plan's fixed split), accumulate (K = c).
template <typename T>
GemmArgs<T> logits_product(const Plan& pl, int64_t c, const T* a, const T* r, T* out, T* partial) {
  GemmArgs<T> g = gemm_args<T>(pl.B, c, pl.D, a, pl.D, 1, r, 1, pl.D, out, c);  // B[k, j] = r[j, k]
  gemm_set_split(g, pl.k_len_logits, partial);
  return g;
}

template <typename T>
GemmArgs<T> accumulate_product(const Plan& pl, int64_t c, const T* coef, const T* r, T* acc, T* partial) {
  GemmArgs<T> g = gemm_args<T>(pl.B, pl.D, c, coef, c, 1, r, pl.D, 1, acc, pl.D);
  gemm_set_split(g, gemm_split_len(gemm_tiles(pl.B, pl.D), c, pl.sm_count), partial);
  return g;
}

// ------------------------------------------------------------------------------------------------
// Launch sequences. Exec provides `bool run(const F&, const char* name)` for a per-thread functor
// and `bool gemm(const GemmArgs<T>&, const char* name)`; each returns false on a launch error,
// which stops the sequence (the executor remembers the error and the kernel's name).
// ------------------------------------------------------------------------------------------------

// x (B, D), sigma (B,), ref (n, D), ref_sqnorm (n,) -> mu (B, D), lse (B,), aux (B, AUX_COLS).
template <typename T, class Exec>
bool forward_run(Exec& ex, const Plan& pl, const T* x, const T* sigma, const T* ref, const T* ref_sqnorm,
                 T* mu, T* lse, T* aux, T* workspace) {
  const int64_t B = pl.B, D = pl.D, P = pl.P;
  ForwardWorkspace<T> w = ForwardWorkspace<T>::carve(workspace, pl);
  if (!ex.run(StateInit<T>{B, w.state}, "stf_state_init")) return false;
  for (int64_t start = 0; start < pl.n; start += pl.c) {
    const int64_t c = pl.n - start < pl.c ? pl.n - start : pl.c;
    const T* r = ref + start * D;
    // dots = X R_c^T: A = X (B, D) row-major, B[k, j] = r[j, k].
    if (!launch_gemm(ex, logits_product<T>(pl, c, x, r, w.tile, w.partial), "stf_gemm_logits")) return false;
    if (!ex.run(ForwardLogits<T>{B * P, P, c, start, w.tile, sigma, ref_sqnorm, w.part_max}, "stf_fwd_logits"))
      return false;
    if (!ex.run(ForwardExp<T>{B * P, P, c, w.tile, w.part_max, w.state, w.part_state}, "stf_fwd_exp")) return false;
    if (!ex.run(ForwardMerge<T>{B, P, w.part_max, w.part_state, w.state, w.alpha}, "stf_fwd_merge")) return false;
    // acc = alpha acc + E R_c: A = E (B, c), B = r (c, D).
    GemmArgs<T> g = accumulate_product<T>(pl, c, w.tile, r, w.acc, w.partial);
    g.accumulate = start > 0;
    g.row_scale = w.alpha;
    if (!launch_gemm(ex, g, "stf_gemm_accumulate")) return false;
  }
  if (!ex.run(RowDotParts<T>{B * pl.Q, D, pl.Q, pl.k_len_logits, x, nullptr, nullptr, w.row_parts}, "stf_row_dots"))
    return false;
  if (!ex.run(RowDotSum<T>{B, pl.Q, w.row_parts, w.xn, nullptr}, "stf_row_dot_sum")) return false;
  if (!ex.run(ForwardFinalize<T>{B, w.state, w.xn, sigma, w.inv_l, lse, aux}, "stf_fwd_finalize")) return false;
  return ex.run(ScaleRows<T>{B * D, D, w.acc, w.inv_l, mu}, "stf_fwd_scale");
}

// -> grad_x (B, D), grad_sigma (B,), and grad_ref (n, D) when it is not null.
template <typename T, class Exec>
bool backward_run(Exec& ex, const Plan& pl, const T* grad_mu, const T* grad_lse, const T* x, const T* sigma,
                  const T* ref, const T* ref_sqnorm, const T* mu, const T* aux, T* grad_x_out, T* grad_sigma_out,
                  T* grad_ref, T* workspace) {
  const int64_t B = pl.B, D = pl.D, P = pl.P;
  const bool ref_grad = grad_ref != nullptr;
  BackwardWorkspace<T> w = BackwardWorkspace<T>::carve(workspace, pl, ref_grad);
  if (!ex.run(RowDotParts<T>{B * pl.Q, D, pl.Q, pl.k_len_logits, x, mu, grad_mu, w.row_parts}, "stf_row_dots"))
    return false;
  if (!ex.run(RowDotSum<T>{B, pl.Q, w.row_parts, w.xn, w.mg}, "stf_row_dot_sum")) return false;
  for (int64_t start = 0; start < pl.n; start += pl.c) {
    const int64_t c = pl.n - start < pl.c ? pl.n - start : pl.c;
    const T* r = ref + start * D;
    // Rows 0..B-1: x_i . r_j; rows B..2B-1: g_i . r_j.
    if (!launch_gemm(ex, logits_product<T>(pl, c, x, r, w.tile, w.partial), "stf_gemm_logits")) return false;
    if (!launch_gemm(ex, logits_product<T>(pl, c, grad_mu, r, w.tile + B * c, w.partial), "stf_gemm_logits"))
      return false;
    BackwardWeights<T> bw{B * P, P, B, c, start, w.tile, w.ref_coef, sigma, ref_sqnorm, aux,
                          w.xn, w.mg, grad_lse, w.cov_part, start == 0};
    if (!ex.run(bw, "stf_bwd_weights")) return false;
    // px += coef R_c.
    GemmArgs<T> g = accumulate_product<T>(pl, c, w.tile, r, w.px, w.partial);
    g.accumulate = start > 0;
    if (!launch_gemm(ex, g, "stf_gemm_accumulate")) return false;
    if (ref_grad) {
      T* gr = grad_ref + start * D;
      if (!ex.run(ColumnSum<T>{c, B, c, w.ref_coef, w.colsum}, "stf_bwd_colsum")) return false;
      // grad_r = W^T G: A[j, i] = w_ij (the weights sit in rows B..2B-1), B = grad_mu (B, D).
      if (!launch_gemm(ex, gemm_args<T>(c, D, B, w.tile + B * c, 1, c, grad_mu, D, 1, gr, D), "stf_gemm_ref"))
        return false;
      // grad_r += A^T X - (sum_i a_ij) r_j.
      GemmArgs<T> h = gemm_args<T>(c, D, B, w.ref_coef, 1, c, x, D, 1, gr, D);
      h.accumulate = true;
      h.sub_scale = w.colsum;
      h.sub_mat = r;
      h.ld_sub = D;
      if (!launch_gemm(ex, h, "stf_gemm_ref")) return false;
    }
  }
  if (!ex.run(BackwardSigma<T>{B, P, w.cov_part, aux, grad_lse, sigma, grad_sigma_out, w.s_row}, "stf_bwd_sigma")) return false;
  return ex.run(BackwardX<T>{B * D, D, w.px, mu, x, grad_lse, sigma, w.s_row, grad_x_out}, "stf_bwd_x");
}

}  // namespace cuda
}  // namespace stf
}  // namespace cdm
