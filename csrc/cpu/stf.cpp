// Stable target on the CPU (docs/math.md): forward and backward, fused over reference chunks.
//
// Per chunk of c references: one pass shifts the chunk by the centre and takes the norms of the
// shifted rows while they are in cache (r'_j = r_j - c, ||r'_j||^2); the two matrix products run
// through ATen's BLAS (both cores); the per-element work between them (reduced distances, the
// online softmax update in distance space, the backward weights) is one pass over the (B, c) tile,
// in place, by the shared functions of stf_math.h, parallel over query rows. Extra memory: the shifted
// queries and chunk, the (B, c) tile (2B x c in the backward) and the (B, D) accumulator; never a
// B x n tensor. Row states are kept in double whatever T is (see stf_math.h, state_add).
//
// The ops' schemas are in csrc/ops.cpp; the launcher contract (checked in Python before every
// launch, and again here because a torch op can be called directly) in cdm_kernels/contract.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// out[i, :] = src[i, :] - centre and norms[i] = ||out[i, :]||^2 (summed in double), rows [0, rows).
template <typename T, typename N>
void shift_rows(const T* src, const T* centre, int64_t rows, int64_t D, T* out, N* norms) {
  at::parallel_for(0, rows, row_grain(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* s = src + i * D;
      T* o = out + i * D;
      double nrm = 0.0;
      for (int64_t k = 0; k < D; ++k) {
        const T v = s[k] - centre[k];
        o[k] = v;
        nrm += double(v) * double(v);
      }
      norms[i] = N(nrm);
    }
  });
}

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

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ref, const at::Tensor& centre,
                  int64_t chunk_size, at::Tensor& mu, at::Tensor& lse, at::Tensor& aux) {
  const int64_t B = x.size(0), D = x.size(1), n = ref.size(0);
  const int64_t chunk = std::min(chunk_size, n);
  const Queries<T> q = shifted_queries<T>(x, sigma, centre);
  const T* cp = centre.data_ptr<T>();

  std::vector<RowState<double>> state(B, state_empty<double>());
  std::vector<int64_t> arg(B, -1);  // the reference at each row's minimum (stf_math.h: for d_min)
  at::Tensor acc = at::zeros({B, D}, x.options());  // a_i = sum_j e_ij r'_j
  at::Tensor rs_buf = at::empty({chunk, D}, x.options());
  at::Tensor tile_buf = at::empty({B * chunk}, x.options());
  std::vector<T> rn(chunk), m_tile(B);
  T* accp = acc.data_ptr<T>();

  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t c = std::min(chunk, n - start);
    at::Tensor rs = rs_buf.narrow(0, 0, c);
    shift_rows(ref.data_ptr<T>() + start * D, cp, c, D, rs.data_ptr<T>(), rn.data());
    // The tile is kept transposed, (c, B): BLAS runs R'_c X'^T (the long side first) markedly faster
    // than X' R'_c^T for B in the hundreds. Rows are then walked with j outer and i inner, so each
    // thread's slice of queries is read contiguously.
    at::Tensor tile = tile_buf.narrow(0, 0, c * B).view({c, B});
    at::mm_out(tile, rs, q.xs.t());  // tile[j, i] = x'_i . r'_j
    T* tp = tile.data_ptr<T>();
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
      for (int64_t i = i0; i < i1; ++i) {
        RowState<double>& s = state[i];
        if (double(m_tile[i]) < s.m) {  // a new minimum: its first reference in the chunk
          int64_t j = 0;
          while (j + 1 < c && tp[j * B + i] != m_tile[i]) ++j;
          arg[i] = start + j;
        }
        const double alpha = state_rebase(s, nan_min(s.m, double(m_tile[i])), double(q.k[i]));
        if (alpha != 1.0) {
          const T alpha_t = T(alpha);
          T* a = accp + i * D;
          for (int64_t kk = 0; kk < D; ++kk) a[kk] *= alpha_t;
        }
      }
      for (int64_t j = 0; j < c; ++j) {
        T* row = tp + j * B;
        for (int64_t i = i0; i < i1; ++i) row[i] = state_add(state[i], row[i], q.k[i]);  // now e_ij
      }
    });
    acc.addmm_(tile.t(), rs);  // a_i += sum_j e_ij r'_j
  }

  T* mup = mu.data_ptr<T>();
  T* lsep = lse.data_ptr<T>();
  T* auxp = aux.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* rp = ref.data_ptr<T>();
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
      const T* a = accp + i * D;
      T* out = mup + i * D;
      for (int64_t kk = 0; kk < D; ++kk) out[kk] = a[kk] * inv_l + cp[kk];
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> stf_forward_cpu(const at::Tensor& x, const at::Tensor& sigma,
                                                               const at::Tensor& ref, const at::Tensor& centre,
                                                               int64_t chunk_size, c10::string_view precision) {
  check_ieee("stf_forward (cpu)", contract::stf("stf_forward (cpu)", x, sigma, ref, centre, chunk_size, precision));
  auto [mu, lse, aux] = contract::stf_forward_outputs(x);
  if (x.size(0) == 0) return {mu, lse, aux};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stf_forward_cpu", [&] {
    forward_impl<scalar_t>(x, sigma, ref, centre, chunk_size, mu, lse, aux);
  });
  return {mu, lse, aux};
}

// Per-row scalars of the backward, in double: mg = g . mu', and the streamed sums
// s = sum_j w (c - mg), cov = sum_j w (d - d_bar)(c - mg), dev = sum_j w (d - d_bar), with
// d - d_bar = delta - delta_bar (stf_math.h, mean_delta).
struct BackwardRows {
  std::vector<double> mg, s, cov, dev;
  explicit BackwardRows(int64_t B) : mg(B, 0.0), s(B, 0.0), cov(B, 0.0), dev(B, 0.0) {}
};

template <typename T>
void backward_impl(const at::Tensor& grad_mu, const at::Tensor& grad_lse, const at::Tensor& x,
                   const at::Tensor& sigma, const at::Tensor& ref, const at::Tensor& centre, const at::Tensor& mu,
                   const at::Tensor& aux, int64_t chunk_size, bool ref_grad, at::Tensor& grad_x,
                   at::Tensor& grad_sigma, at::Tensor& grad_ref) {
  const int64_t B = x.size(0), D = x.size(1), n = ref.size(0);
  const int64_t chunk = std::min(chunk_size, n);
  const Queries<T> q = shifted_queries<T>(x, sigma, centre);
  const T* sp = sigma.data_ptr<T>();
  const T* auxp = aux.data_ptr<T>();
  const T* glp = grad_lse.data_ptr<T>();
  const T* cp = centre.data_ptr<T>();

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

  // One product gives both x'_i . r'_j (rows 0..B-1) and g_i . r'_j (rows B..2B-1).
  at::Tensor xg = at::cat({q.xs, grad_mu}, 0);
  at::Tensor rs_buf = at::empty({chunk, D}, x.options());
  at::Tensor tile_buf = at::empty({2 * B * chunk}, x.options());
  at::Tensor coef_buf = ref_grad ? at::empty({B * chunk}, x.options()) : at::Tensor();
  at::Tensor px = at::zeros({B, D}, x.options());
  std::vector<T> rn(chunk);

  // final = false: only s (the ref gradient's coefficients need the consistent mg before use).
  auto sweep = [&](bool final) {
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t c = std::min(chunk, n - start);
      at::Tensor rs = rs_buf.narrow(0, 0, c);
      shift_rows(ref.data_ptr<T>() + start * D, cp, c, D, rs.data_ptr<T>(), rn.data());
      at::Tensor tile = tile_buf.narrow(0, 0, 2 * B * c).view({2 * B, c});
      at::mm_out(tile, xg, rs.t());
      T* zp = tile.data_ptr<T>();  // dots in, x-coefficients out
      T* cpp = zp + B * c;          // c_ij = g_i . r'_j in, weights w_ij out (used by the ref gradient)
      T* ap = (final && ref_grad) ? coef_buf.data_ptr<T>() : nullptr;
      at::parallel_for(0, B, row_grain(c), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const T* ai = auxp + i * AUX_COLS;
          const T inv_s2 = T(1) / (sp[i] * sp[i]);
          const double dbar = mean_delta(double(ai[AUX_DBAR]), q.xn64[i]), mg = rows.mg[i];
          double s_i = 0.0, cov_i = 0.0, dev_i = 0.0;
          for (int64_t j = 0; j < c; ++j) {
            const int64_t ij = i * c + j;
            const T d = reduced_dist(q.xn[i], rn[j], zp[ij]);
            const double w = backward_weight(d, ai[AUX_M], ai[AUX_LOGL], q.k[i]);
            const double cij = cpp[ij];
            const double xc = backward_x_coef(w, cij, mg);
            s_i += xc;
            if (!final) continue;
            zp[ij] = T(xc);
            cov_i += backward_sigma_term(w, double(d), dbar, cij, mg);
            dev_i += w * (double(d) - dbar);
            if (ap != nullptr) {
              ap[ij] = T(backward_ref_coef(w, cij, mg, double(glp[i]), double(inv_s2)));
              cpp[ij] = T(w);
            }
          }
          rows.s[i] += s_i;
          rows.cov[i] += cov_i;
          rows.dev[i] += dev_i;
        }
      });
      if (!final) continue;
      px.addmm_(tile.narrow(0, 0, B), rs);
      if (ref_grad) {
        at::Tensor w = tile.narrow(0, B, B);
        at::Tensor a = coef_buf.narrow(0, 0, B * c).view({B, c});
        at::Tensor g = grad_ref.narrow(0, start, c);
        at::mm_out(g, w.t(), grad_mu);       // sum_i w_ij g_i
        g.addmm_(a.t(), q.xs);               // + sum_i a_ij (x'_i
        g.sub_(a.sum(0).unsqueeze(1) * rs);  //                   - r'_j)
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

  const T* pxp = px.data_ptr<T>();
  const T* xsp = q.xs.template data_ptr<T>();
  T* gxp = grad_x.data_ptr<T>();
  T* gsp = grad_sigma.data_ptr<T>();
  at::parallel_for(0, B, row_grain(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const double inv_s2 = 1.0 / (double(sp[i]) * double(sp[i]));
      for (int64_t kk = 0; kk < D; ++kk) {
        const int64_t ik = i * D + kk;
        gxp[ik] = T(grad_x_corrected<double>(pxp[ik], rows.s[i], musp[ik], xsp[ik], glp[i], inv_s2));
      }
      const double dbar = auxp[i * AUX_COLS + AUX_DBAR];
      gsp[i] = T(stf::grad_sigma<double>(rows.cov[i], rows.s[i], rows.dev[i], dbar, glp[i], sp[i]));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stf_backward_cpu(
    const at::Tensor& grad_mu, const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& sigma,
    const at::Tensor& ref, const at::Tensor& centre, const at::Tensor& mu, const at::Tensor& aux,
    int64_t chunk_size, c10::string_view precision, bool ref_grad) {
  check_ieee("stf_backward (cpu)", contract::stf_backward("stf_backward (cpu)", grad_mu, grad_lse, x, sigma, ref,
                                                          centre, mu, aux, chunk_size, precision));
  auto [grad_x, grad_sigma, grad_ref] = contract::stf_backward_outputs(x, sigma, ref, ref_grad);
  if (x.size(0) == 0) return {grad_x, grad_sigma, grad_ref};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stf_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_mu, grad_lse, x, sigma, ref, centre, mu, aux, chunk_size, ref_grad, grad_x,
                            grad_sigma, grad_ref);
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
