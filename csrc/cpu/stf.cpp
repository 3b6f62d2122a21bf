// Stable target on the CPU (docs/math.md): forward and backward, fused over reference chunks.
//
// Per chunk of c references: one pass shifts the chunk by the centre and takes the norms of the
// shifted rows while they are in cache (r'_j = r_j - c, ||r'_j||^2); the two matrix products run
// through ATen's BLAS (both cores); the per-element work between them (reduced distances, the
// online softmax update in distance space, the backward weights) is one pass over the (B, c) tile,
// in place, by the shared functions of stf_math.h, parallel over query rows. Extra memory: the shifted
// queries and chunk, the (B, c) tile (2B x c in the backward) and the (B, D) accumulator; a B x n
// tensor only when the forward keeps its distances for the backward (`keep`, which saves the
// backward its product of the queries). Row states are kept in double whatever T is (see
// stf_math.h, state_add).
//
// The ops' schemas are in csrc/ops.cpp; the launcher contract (checked in Python before every
// launch, and again here because a torch op can be called directly) in cdm_kernels/contract.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "contract.h"
#include "stf_math.h"

namespace cdm {
namespace stf {
namespace {

void check_ieee(const char* op, int precision) {
  TORCH_CHECK(precision == PREC_IEEE, op, ": the CPU kernels compute in precision 'ieee' only");
}

// Rows per parallel task: enough elements per task to amortise the scheduling.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// out[i, :] = src[i, :] - centre and norms[i] = ||out[i, :]||^2, rows [0, rows): one pass over the
// rows while they stream from memory. The squares are summed in double (in vector lanes): ||r'||^2
// is the largest term of a reduced distance, and a float sum's few ulps of it, times k = 1 /
// (2 sigma^2), were a weight error of several percent at sigma = 0.05.
template <typename T, typename N>
void shift_rows(const T* src, const T* centre, int64_t rows, int64_t D, T* out, N* norms) {
  at::parallel_for(0, rows, row_grain(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* __restrict s = src + i * D;
      T* __restrict o = out + i * D;
      double nrm = 0.0;
#pragma omp simd reduction(+ : nrm)
      for (int64_t k = 0; k < D; ++k) {
        const T v = s[k] - centre[k];
        o[k] = v;
        nrm += double(v) * double(v);
      }
      norms[i] = N(nrm);
    }
  });
}

// norms[i] = ||src[i, :]||^2 alone (the centre is 0: the references need no shifted copy).
template <typename T>
void row_norms(const T* src, int64_t rows, int64_t D, T* norms) {
  at::parallel_for(0, rows, row_grain(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* __restrict s = src + i * D;
      double nrm = 0.0;
#pragma omp simd reduction(+ : nrm)
      for (int64_t k = 0; k < D; ++k) nrm += double(s[k]) * double(s[k]);
      norms[i] = T(nrm);
    }
  });
}

// The chunk of references [start, start + c) as the products read it, r' = r - centre, with its
// norms: a shifted copy in buf, or, when the centre is 0, the references themselves (stf.py picks a
// zero centre for data near the origin, where shifting gains nothing).
template <typename T>
at::Tensor shifted_chunk(const at::Tensor& ref, const at::Tensor& centre, bool zero_centre, int64_t start, int64_t c,
                         at::Tensor& buf, T* norms) {
  const int64_t D = ref.size(1);
  if (zero_centre) {
    row_norms(ref.data_ptr<T>() + start * D, c, D, norms);
    return ref.narrow(0, start, c);
  }
  at::Tensor rs = buf.narrow(0, 0, c);
  shift_rows(ref.data_ptr<T>() + start * D, centre.data_ptr<T>(), c, D, rs.data_ptr<T>(), norms);
  return rs;
}

// exp(v) for a weight exponent v <= 0, branch-free, so that a loop over a row of weights vectorises
// (libm's expf is a call per element): Cephes' expf, 2^f p(r) with v = f log 2 + r, |r| <= log(2) / 2,
// within 1-2 ulps of the exact value; below -87 exactly 0, as stf_math.h's wexp (the weights that
// round to nothing next to the row's largest, 1). NaN stays NaN.
inline float exp_weight(float v) {
  const float vc = v < -87.0f ? -87.0f : v;
  const float f = std::floor(vc * 1.44269504088896341f + 0.5f);
  float r = vc - f * 0.693359375f;
  r = r - f * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * z + r + 1.0f;
  const float scale = bits_float(static_cast<uint32_t>(static_cast<int32_t>(f) + 127) << 23);
  const float e = y * scale;
  return v < -87.0f ? 0.0f : (v != v ? v : e);
}

inline double exp_weight(double v) { return wexp(v); }

// The weights of a chunk, rows [i0, i1) of a (c, B) tile of reduced distances, in place: e_ij =
// exp(-(delta_ij - m_i) k_i) against the rows' rebased states, and the states' sums (stf_math.h,
// state_add: l, l2, t in double) over the chunk, column after column so that the loops run along
// the rows (contiguous, vectorised).
template <typename T>
__attribute__((always_inline)) inline void add_chunk_weights_impl(T* tile, int64_t c, int64_t B, int64_t i0,
                                                                  int64_t i1, std::vector<RowState<double>>& state,
                                                                  const T* k) {
  const int64_t rows = i1 - i0;
  std::vector<T> m(rows), kk(rows);
  std::vector<double> l(rows, 0.0), l2(rows, 0.0), t(rows, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    m[i] = T(state[i0 + i].m);  // exact: one of the T distances (or +inf)
    kk[i] = k[i0 + i];
  }
  const T* __restrict mp = m.data();
  const T* __restrict kp = kk.data();
  double* __restrict lp = l.data();
  double* __restrict l2p = l2.data();
  double* __restrict tpp = t.data();
  for (int64_t j = 0; j < c; ++j) {
    T* __restrict row = tile + j * B + i0;
#pragma omp simd
    for (int64_t i = 0; i < rows; ++i) {
      const T dm = row[i] - mp[i];
      const T e = exp_weight(-dm * kp[i]);
      row[i] = e;
      lp[i] += double(e);
      l2p[i] += double(e) * double(e);
      tpp[i] += double(e) * double(dm);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    RowState<double>& s = state[i0 + i];
    s.l += l[i];
    s.l2 += l2[i];
    s.t += t[i];
  }
}

// add_chunk_weights_impl compiled for AVX-512, AVX2 and baseline x86-64, picked at load time (the
// element loop converts to double for the sums: 2 lanes in SSE2, 8 in AVX-512).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CDM_STF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CDM_STF_CLONES
#endif

CDM_STF_CLONES void add_chunk_weights(float* tile, int64_t c, int64_t B, int64_t i0, int64_t i1,
                                      std::vector<RowState<double>>& state, const float* k) {
  add_chunk_weights_impl(tile, c, B, i0, i1, state, k);
}

CDM_STF_CLONES void add_chunk_weights(double* tile, int64_t c, int64_t B, int64_t i0, int64_t i1,
                                      std::vector<RowState<double>>& state, const double* k) {
  add_chunk_weights_impl(tile, c, B, i0, i1, state, k);
}
#undef CDM_STF_CLONES

// The shifted operands of a call: x' (B, D) and ||x'||^2 (rounded to T for the distances, in double
// for the row results), plus per-row k = 1 / (2 sigma^2).
template <typename T>
struct Queries {
  at::Tensor xs;
  std::vector<T> xn, k;
  std::vector<double> xn64;
};

template <typename T>
Queries<T> shifted_queries(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& centre) {
  const int64_t B = x.size(0), D = x.size(1);
  Queries<T> q{at::empty({B, D}, x.options()), std::vector<T>(B), std::vector<T>(B), std::vector<double>(B)};
  shift_rows(x.data_ptr<T>(), centre.data_ptr<T>(), B, D, q.xs.template data_ptr<T>(), q.xn64.data());
  const T* sp = sigma.data_ptr<T>();
  for (int64_t i = 0; i < B; ++i) {
    q.xn[i] = T(q.xn64[i]);
    q.k[i] = half_inv_sq(sp[i]);
  }
  return q;
}

// B rows of D sums over the chunks, sum_j t_ij r'_j, added by BLAS from a (c, B) tile: the forward's
// accumulator a_i, the backward's px_i. From 16 rows on they are kept transposed, (D, B): R'^T E
// (D x c by c x B) ran at 0.93 of the square-product rate against 0.71 for E^T R' into (B, D) at
// B = 128, c = 2048, D = 3072 on 2 cores. Below that MKL's narrow (D x c) x (c x B) product is the
// slow one: 30-32 ms against 2.5-4.8 ms for E^T R' at B = 2 to 8 (c = 2048, D = 3072, one thread),
// which made a call at B = 4 four times slower than one at B = 16 (n = 4096).
template <typename T>
struct RowSums {
  static constexpr int64_t kTransposedFrom = 16;
  int64_t B, D;
  bool transposed;
  at::Tensor t;    // (D, B) or (B, D)
  int64_t si, sk;  // element (i, k) at data[i * si + k * sk]

  RowSums(int64_t rows, int64_t cols, const at::TensorOptions& options)
      : B(rows),
        D(cols),
        transposed(B >= kTransposedFrom),
        t(transposed ? at::zeros({D, B}, options) : at::zeros({B, D}, options)),
        si(transposed ? 1 : D),
        sk(transposed ? B : 1) {}

  // Row i += sum_j tile[j, i] r'_j, for the chunk's shifted references rs (c, D).
  void add(const at::Tensor& rs, const at::Tensor& tile) {
    if (transposed) {
      t.addmm_(rs.t(), tile);
    } else {
      t.addmm_(tile.t(), rs);
    }
  }

  // Row i *= alpha[i].
  void scale(const T* alpha) {
    T* p = t.data_ptr<T>();
    if (transposed) {
      at::parallel_for(0, D, row_grain(B), [&](int64_t k0, int64_t k1) {
        const T* __restrict al = alpha;
        for (int64_t kk = k0; kk < k1; ++kk) {
          T* __restrict a = p + kk * B;
          for (int64_t i = 0; i < B; ++i) a[i] *= al[i];
        }
      });
    } else {
      at::parallel_for(0, B, row_grain(D), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          T* __restrict a = p + i * D;
          const T al = alpha[i];
          for (int64_t kk = 0; kk < D; ++kk) a[kk] *= al;
        }
      });
    }
  }

  const T* data() const { return t.data_ptr<T>(); }
};

// With a non-empty `dist` (B n,), the chunks' distance tiles are also copied there for the backward,
// chunk after chunk, each (c, B) as the loop lays it out; everything else is as without it.
template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ref, const at::Tensor& centre,
                  int64_t chunk_size, at::Tensor& mu, at::Tensor& lse, at::Tensor& aux, at::Tensor& dist) {
  const int64_t B = x.size(0), D = x.size(1), n = ref.size(0);
  const int64_t chunk = std::min(chunk_size, n);
  const Queries<T> q = shifted_queries<T>(x, sigma, centre);
  const T* cp = centre.data_ptr<T>();
  const bool zero_centre = !centre.any().item<bool>();

  std::vector<RowState<double>> state(B, state_empty<double>());
  std::vector<int64_t> arg(B, -1);  // the reference at each row's minimum (stf_math.h: for d_min)
  RowSums<T> acc(B, D, x.options());  // a_i = sum_j e_ij r'_j
  at::Tensor rs_buf = zero_centre ? at::Tensor() : at::empty({chunk, D}, x.options());
  at::Tensor tile_buf = at::empty({B * chunk}, x.options());
  std::vector<T> rn(chunk), m_tile(B), alpha(B);

  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t c = std::min(chunk, n - start);
    const at::Tensor rs = shifted_chunk(ref, centre, zero_centre, start, c, rs_buf, rn.data());
    // The tile is kept transposed, (c, B): BLAS runs R'_c X'^T (the long side first) markedly faster
    // than X' R'_c^T for B in the hundreds. Rows are then walked with j outer and i inner, so each
    // thread's slice of queries is read contiguously.
    at::Tensor tile = tile_buf.narrow(0, 0, c * B).view({c, B});
    at::mm_out(tile, rs, q.xs.t());  // tile[j, i] = x'_i . r'_j
    T* tp = tile.data_ptr<T>();
    T* keep = dist.numel() != 0 ? dist.data_ptr<T>() + start * B : nullptr;
    at::parallel_for(0, B, std::max<int64_t>(8, row_grain(c)), [&](int64_t i0, int64_t i1) {
      // Restrict-qualified views: without them the compiler must assume the tile aliases the row
      // minima and keeps this loop scalar.
      T* __restrict mt = m_tile.data();
      const T* __restrict xn = q.xn.data();
      for (int64_t i = i0; i < i1; ++i) mt[i] = pos_inf<T>();
      for (int64_t j = 0; j < c; ++j) {
        T* __restrict row = tp + j * B;
        const T rnj = rn[j];
        for (int64_t i = i0; i < i1; ++i) {
          const T d = reduced_dist(xn[i], rnj, row[i]);
          row[i] = d;
          mt[i] = nan_min(mt[i], d);
        }
      }
      if (keep != nullptr) {  // the distances for the backward, while the rows are in cache
        for (int64_t j = 0; j < c; ++j) std::memcpy(keep + j * B + i0, tp + j * B + i0, (i1 - i0) * sizeof(T));
      }
      for (int64_t i = i0; i < i1; ++i) {
        RowState<double>& s = state[i];
        if (double(m_tile[i]) < s.m) {  // a new minimum: its first reference in the chunk
          int64_t j = 0;
          while (j + 1 < c && tp[j * B + i] != m_tile[i]) ++j;
          arg[i] = start + j;
        }
        alpha[i] = T(state_rebase(s, nan_min(s.m, double(m_tile[i])), double(q.k[i])));
      }
      add_chunk_weights(tp, c, B, i0, i1, state, q.k.data());  // the tile now holds e_ij
    });
    if (start > 0) acc.scale(alpha.data());  // rebase the accumulator: a_i by alpha_i
    acc.add(rs, tile);                         // a_i += sum_j e_ij r'_j
  }

  T* mup = mu.data_ptr<T>();
  T* lsep = lse.data_ptr<T>();
  T* auxp = aux.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* rp = ref.data_ptr<T>();
  const T* accp = acc.data();
  at::parallel_for(0, B, row_grain(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      // d_min = ||x_i - r_j*||^2, subtract first (stf_math.h: ||x'||^2 + m would cancel).
      double dmin = std::numeric_limits<double>::quiet_NaN();
      if (arg[i] >= 0) {
        dmin = 0.0;
        const T* r = rp + arg[i] * D;
        for (int64_t kk = 0; kk < D; ++kk) {
          const double v = double(xp[i * D + kk]) - double(r[kk]);
          dmin += v * v;
        }
      }
      const RowResult<double> res = state_finalize(state[i], double(q.k[i]), double(T(dmin)));
      const T inv_l = T(res.inv_l);
      T* out = mup + i * D;
      for (int64_t kk = 0; kk < D; ++kk) out[kk] = accp[i * acc.si + kk * acc.sk] * inv_l + cp[kk];
      lsep[i] = T(res.lse);
      T* ai = auxp + i * AUX_COLS;
      ai[AUX_M] = T(state[i].m);
      ai[AUX_LOGL] = T(res.log_l);
      ai[AUX_DBAR] = T(res.dbar);
      ai[AUX_NEFF] = T(res.neff);
      ai[AUX_WMAX] = T(res.wmax);
      ai[AUX_DMIN] = T(dmin);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stf_forward_cpu(
    const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ref, const at::Tensor& centre,
    int64_t chunk_size, c10::string_view precision, bool keep) {
  check_ieee("stf_forward (cpu)", contract::stf("stf_forward (cpu)", x, sigma, ref, centre, chunk_size, precision));
  auto [mu, lse, aux, dist] = contract::stf_forward_outputs(x, ref, keep);
  if (x.size(0) == 0) return {mu, lse, aux, dist};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stf_forward_cpu", [&] {
    forward_impl<scalar_t>(x, sigma, ref, centre, chunk_size, mu, lse, aux, dist);
  });
  return {mu, lse, aux, dist};
}

// Per-row scalars of the backward, in double: mg = g . mu', and the streamed sums
// s = sum_j w (c - mg), cov = sum_j w (d - d_bar)(c - mg), dev = sum_j w (d - d_bar), with
// d - d_bar = delta - delta_bar (stf_math.h, mean_delta).
struct BackwardRows {
  std::vector<double> mg, s, cov, dev;
  explicit BackwardRows(int64_t B) : mg(B, 0.0), s(B, 0.0), cov(B, 0.0), dev(B, 0.0) {}
};

// With the forward's kept distances (`dist` not empty) the products give g_i . r'_j alone.
template <typename T>
void backward_impl(const at::Tensor& grad_mu, const at::Tensor& grad_lse, const at::Tensor& x,
                   const at::Tensor& sigma, const at::Tensor& ref, const at::Tensor& centre, const at::Tensor& mu,
                   const at::Tensor& aux, const at::Tensor& dist, int64_t chunk_size, bool ref_grad,
                   at::Tensor& grad_x, at::Tensor& grad_sigma, at::Tensor& grad_ref) {
  const int64_t B = x.size(0), D = x.size(1), n = ref.size(0);
  const int64_t chunk = std::min(chunk_size, n);
  const Queries<T> q = shifted_queries<T>(x, sigma, centre);
  const T* sp = sigma.data_ptr<T>();
  const T* auxp = aux.data_ptr<T>();
  const T* glp = grad_lse.data_ptr<T>();
  const bool zero_centre = !centre.any().item<bool>();

  at::Tensor mus = mu - centre;  // mu' (B, D)
  const T* musp = mus.data_ptr<T>();
  BackwardRows rows(B);
  {
    const T* gp = grad_mu.data_ptr<T>();
    at::parallel_for(0, B, row_grain(D), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        double b = 0.0;
        for (int64_t kk = 0; kk < D; ++kk) b += double(musp[i * D + kk]) * double(gp[i * D + kk]);
        rows.mg[i] = b;
      }
    });
  }

  // One product gives both x'_i . r'_j (columns 0..B-1) and g_i . r'_j (columns B..2B-1), into a
  // (c, 2B) tile: the forward's layout, which BLAS computes faster (R'_c on the long side), walked
  // with j outer and i inner; with kept distances, only the columns B..2B-1. px is laid out as the
  // forward's accumulator (RowSums).
  const bool kept = dist.numel() != 0;
  const T* dist_p = kept ? dist.data_ptr<T>() : nullptr;
  at::Tensor xg = kept ? at::Tensor() : at::cat({q.xs, grad_mu}, 0);
  at::Tensor rs_buf = zero_centre ? at::Tensor() : at::empty({chunk, D}, x.options());
  at::Tensor tile_buf = at::empty({2 * B * chunk}, x.options());
  at::Tensor coef_buf = ref_grad ? at::empty({B * chunk}, x.options()) : at::Tensor();
  RowSums<T> px(B, D, x.options());
  std::vector<T> rn(chunk), inv_s2(B), dbar_t(B), mg_t(B);
  for (int64_t i = 0; i < B; ++i) {
    inv_s2[i] = T(1) / (sp[i] * sp[i]);
    dbar_t[i] = T(mean_delta(double(auxp[i * AUX_COLS + AUX_DBAR]), q.xn64[i]));
  }

  // final = false: only s (the ref gradient's coefficients need the consistent mg before use).
  auto sweep = [&](bool final) {
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t c = std::min(chunk, n - start);
      const at::Tensor rs = shifted_chunk(ref, centre, zero_centre, start, c, rs_buf, rn.data());
      at::Tensor tile = tile_buf.narrow(0, 0, 2 * B * c).view({c, 2 * B});
      if (kept) {
        at::Tensor ct = tile.narrow(1, B, B);
        at::mm_out(ct, rs, grad_mu.t());
      } else {
        at::mm_out(tile, rs, xg.t());
      }
      T* tp = tile.data_ptr<T>();  // [j, i]: dots in, x-coefficients out; [j, B + i]: c_ij in, w_ij out
      const T* dk = kept ? dist_p + start * B : nullptr;  // (c, B): the forward's distances
      T* ap = (final && ref_grad) ? coef_buf.data_ptr<T>() : nullptr;  // (c, B): a_ij
      at::parallel_for(0, B, std::max<int64_t>(8, row_grain(c)), [&](int64_t i0, int64_t i1) {
        std::vector<double> s_i(i1 - i0, 0.0), cov_i(i1 - i0, 0.0), dev_i(i1 - i0, 0.0);
        for (int64_t j = 0; j < c; ++j) {
          T* zrow = tp + j * 2 * B;
          T* crow = zrow + B;
          for (int64_t i = i0; i < i1; ++i) {
            const T* ai = auxp + i * AUX_COLS;
            const double mg = rows.mg[i];
            const T d = kept ? dk[j * B + i] : reduced_dist(q.xn[i], rn[j], zrow[i]);
            const double w = backward_weight(d, ai[AUX_M], ai[AUX_LOGL], q.k[i]);
            const double cij = crow[i];
            const double xc = backward_x_coef(w, cij, mg);
            s_i[i - i0] += xc;
            if (!final) continue;
            zrow[i] = T(xc);
            cov_i[i - i0] += backward_sigma_term(w, double(d), double(dbar_t[i]), cij, mg);
            dev_i[i - i0] += w * (double(d) - double(dbar_t[i]));
            if (ap != nullptr) {
              ap[j * B + i] = T(backward_ref_coef(w, cij, mg, double(glp[i]), double(inv_s2[i])));
              crow[i] = T(w);
            }
          }
        }
        for (int64_t i = i0; i < i1; ++i) {
          rows.s[i] += s_i[i - i0];
          rows.cov[i] += cov_i[i - i0];
          rows.dev[i] += dev_i[i - i0];
        }
      });
      if (!final) continue;
      px.add(rs, tile.narrow(1, 0, B));  // px_i += sum_j xc_ij r'_j
      if (ref_grad) {
        at::Tensor w = tile.narrow(1, B, B);  // (c, B)
        at::Tensor a = coef_buf.narrow(0, 0, B * c).view({c, B});
        at::Tensor g = grad_ref.narrow(0, start, c);
        at::mm_out(g, w, grad_mu);           // sum_i w_ij g_i
        g.addmm_(a, q.xs);                   // + sum_i a_ij (x'_i
        g.sub_(a.sum(1).unsqueeze(1) * rs);  //                   - r'_j)
      }
    }
  };
  if (ref_grad) {
    // The ref gradient's a_ij = w (c - mg + g_lse) / sigma^2 cannot be corrected afterwards like
    // dL/dx: a first sweep makes mg consistent with the products' rounding (mg + s), at the price
    // of one more product per chunk, paid only when ref requires grad.
    sweep(false);
    for (int64_t i = 0; i < B; ++i) {
      rows.mg[i] += rows.s[i];
      rows.s[i] = 0.0;
    }
  }
  sweep(true);

  const T* pxp = px.data();
  const T* xsp = q.xs.template data_ptr<T>();
  T* gxp = grad_x.data_ptr<T>();
  T* gsp = grad_sigma.data_ptr<T>();
  at::parallel_for(0, B, row_grain(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const double inv_s2 = 1.0 / (double(sp[i]) * double(sp[i]));
      for (int64_t kk = 0; kk < D; ++kk) {
        const int64_t ik = i * D + kk;
        gxp[ik] = T(grad_x_corrected<double>(pxp[i * px.si + kk * px.sk], rows.s[i], musp[ik], xsp[ik], glp[i],
                                             inv_s2));
      }
      const double dbar = auxp[i * AUX_COLS + AUX_DBAR];
      gsp[i] = T(stf::grad_sigma<double>(rows.cov[i], rows.s[i], rows.dev[i], dbar, glp[i], sp[i]));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stf_backward_cpu(
    const at::Tensor& grad_mu, const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& sigma,
    const at::Tensor& ref, const at::Tensor& centre, const at::Tensor& mu, const at::Tensor& aux,
    const at::Tensor& dist, int64_t chunk_size, c10::string_view precision, bool ref_grad) {
  check_ieee("stf_backward (cpu)", contract::stf_backward("stf_backward (cpu)", grad_mu, grad_lse, x, sigma, ref,
                                                          centre, mu, aux, dist, chunk_size, precision));
  auto [grad_x, grad_sigma, grad_ref] = contract::stf_backward_outputs(x, sigma, ref, ref_grad);
  if (x.size(0) == 0) return {grad_x, grad_sigma, grad_ref};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stf_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_mu, grad_lse, x, sigma, ref, centre, mu, aux, dist, chunk_size, ref_grad,
                            grad_x, grad_sigma, grad_ref);
  });
  return {grad_x, grad_sigma, grad_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(cdm_kernels_C, CPU, m) {
  m.impl("stf_forward", &stf_forward_cpu);
  m.impl("stf_backward", &stf_backward_cpu);
}

}  // namespace stf
}  // namespace cdm
