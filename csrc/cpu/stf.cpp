// Stable target on the CPU (math.md section 1): forward and backward, fused over reference chunks.
//
// Per chunk of c references the two matrix products run through ATen's BLAS (both cores), and the
// per-element work between them (logits, the online softmax update, the backward weights) is done
// in one pass over the (B, c) tile, in place, by the shared functions of stf_math.h, parallel over
// query rows. Extra memory: the (B, c) tile (2B x c in the backward) and the (B, D) accumulator;
// never a B x n tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "stf_math.h"

namespace cdm {
namespace stf {
namespace {

void check_inputs(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ref,
                  const at::Tensor& ref_sqnorm, int64_t chunk_size) {
  TORCH_CHECK(x.dim() == 2 && ref.dim() == 2 && x.size(1) == ref.size(1),
              "stf_cpu: x must be (B, D) and ref (n, D), got ", x.sizes(), " and ", ref.sizes());
  TORCH_CHECK(sigma.dim() == 1 && sigma.size(0) == x.size(0), "stf_cpu: sigma must be (B,), got ",
              sigma.sizes());
  TORCH_CHECK(ref_sqnorm.dim() == 1 && ref_sqnorm.size(0) == ref.size(0),
              "stf_cpu: ref_sqnorm must be (n,), got ", ref_sqnorm.sizes());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type() && x.scalar_type() == sigma.scalar_type() &&
                  x.scalar_type() == ref_sqnorm.scalar_type(),
              "stf_cpu: x, sigma, ref and ref_sqnorm must share one dtype");
  TORCH_CHECK(x.is_contiguous() && ref.is_contiguous() && sigma.is_contiguous() && ref_sqnorm.is_contiguous(),
              "stf_cpu: inputs must be contiguous");
  TORCH_CHECK(chunk_size >= 1, "stf_cpu: chunk_size must be >= 1, got ", chunk_size);
}

// Rows per parallel task: enough elements per task to amortise the scheduling.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ref,
                  const at::Tensor& ref_sqnorm, int64_t chunk_size, at::Tensor& mu, at::Tensor& lse,
                  at::Tensor& aux) {
  const int64_t B = x.size(0), D = x.size(1), n = ref.size(0);
  const int64_t chunk = std::min(chunk_size, n);
  const T* xp = x.data_ptr<T>();
  const T* sp = sigma.data_ptr<T>();
  const T* rnp = ref_sqnorm.data_ptr<T>();

  // Row states in double whatever T is (see state_add): a few scalars a row, next to GEMM work.
  std::vector<RowState<double>> state(B, state_empty<double>());
  at::Tensor acc = at::zeros({B, D}, x.options());  // a_i = sum_j e_ij r_j
  at::Tensor tile_buf = at::empty({B * chunk}, x.options());
  T* accp = acc.data_ptr<T>();

  std::vector<T> inv_s2(B), m_tile(B);
  for (int64_t i = 0; i < B; ++i) inv_s2[i] = T(1) / (sp[i] * sp[i]);
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t c = std::min(chunk, n - start);
    at::Tensor r = ref.narrow(0, start, c);
    // The tile is kept transposed, (c, B): BLAS runs R_c X^T (the long side first) markedly faster
    // than X R_c^T for B in the hundreds. Rows are then walked with j outer and i inner, so each
    // thread's slice of queries is read contiguously.
    at::Tensor tile = tile_buf.narrow(0, 0, c * B).view({c, B});
    at::mm_out(tile, r, x.t());  // tile[j, i] = x_i . r_j
    T* tp = tile.data_ptr<T>();
    at::parallel_for(0, B, std::max<int64_t>(8, row_grain(c)), [&](int64_t i0, int64_t i1) {
      // Restrict-qualified views: without them the compiler must assume the tile aliases the row
      // maxima and keeps this loop scalar.
      T* __restrict mt = m_tile.data();
      const T* __restrict is2 = inv_s2.data();
      for (int64_t i = i0; i < i1; ++i) mt[i] = neg_inf<T>();
      for (int64_t j = 0; j < c; ++j) {
        T* __restrict row = tp + j * B;
        const T rn = rnp[start + j];
        for (int64_t i = i0; i < i1; ++i) {
          const T z = logit(row[i], rn, is2[i]);
          row[i] = z;
          mt[i] = nan_max(mt[i], z);
        }
      }
      for (int64_t i = i0; i < i1; ++i) {
        RowState<double>& s = state[i];
        const double alpha = state_rebase(s, nan_max(s.m, double(m_tile[i])));
        if (alpha != 1.0) {
          const T alpha_t = T(alpha);
          T* a = accp + i * D;
          for (int64_t k = 0; k < D; ++k) a[k] *= alpha_t;
        }
      }
      for (int64_t j = 0; j < c; ++j) {
        T* row = tp + j * B;
        for (int64_t i = i0; i < i1; ++i) row[i] = state_add(state[i], row[i]);  // now e_ij
      }
    });
    acc.addmm_(tile.t(), r);  // a_i += sum_j e_ij r_j
  }

  T* mup = mu.data_ptr<T>();
  T* lsep = lse.data_ptr<T>();
  T* auxp = aux.data_ptr<T>();
  at::parallel_for(0, B, row_grain(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* xi = xp + i * D;
      double xn = 0.0;
      for (int64_t k = 0; k < D; ++k) xn += double(xi[k]) * double(xi[k]);
      const RowResult<double> res = state_finalize(state[i], xn, double(sp[i]) * double(sp[i]));
      const T inv_l = T(res.inv_l);
      const T* a = accp + i * D;
      T* out = mup + i * D;
      for (int64_t k = 0; k < D; ++k) out[k] = a[k] * inv_l;
      lsep[i] = T(res.lse);
      T* ai = auxp + i * AUX_COLS;
      ai[AUX_ZLSE] = T(res.zlse);
      ai[AUX_DBAR] = T(res.dbar);
      ai[AUX_NEFF] = T(res.neff);
      ai[AUX_WMAX] = T(res.wmax);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stf_forward_cpu(const at::Tensor& x, const at::Tensor& sigma,
                                                               const at::Tensor& ref,
                                                               const at::Tensor& ref_sqnorm,
                                                               int64_t chunk_size) {
  check_inputs(x, sigma, ref, ref_sqnorm, chunk_size);
  const int64_t B = x.size(0);
  at::Tensor mu = at::empty_like(x);
  at::Tensor lse = at::empty({B}, x.options());
  at::Tensor aux = at::empty({B, AUX_COLS}, x.options());
  if (B == 0) return {mu, lse, aux};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stf_forward_cpu", [&] {
    forward_impl<scalar_t>(x, sigma, ref, ref_sqnorm, chunk_size, mu, lse, aux);
  });
  return {mu, lse, aux};
}

template <typename T>
void backward_impl(const at::Tensor& grad_mu, const at::Tensor& grad_lse, const at::Tensor& x,
                   const at::Tensor& sigma, const at::Tensor& ref, const at::Tensor& ref_sqnorm,
                   const at::Tensor& mu, const at::Tensor& aux, int64_t chunk_size, bool ref_grad,
                   at::Tensor& grad_x, at::Tensor& grad_sigma, at::Tensor& grad_ref) {
  const int64_t B = x.size(0), D = x.size(1), n = ref.size(0);
  const int64_t chunk = std::min(chunk_size, n);
  const T* xp = x.data_ptr<T>();
  const T* sp = sigma.data_ptr<T>();
  const T* rnp = ref_sqnorm.data_ptr<T>();
  const T* auxp = aux.data_ptr<T>();
  const T* glp = grad_lse.data_ptr<T>();
  const T* mup = mu.data_ptr<T>();

  // Per-row scalars, in double: ||x||^2, mg = mu . g, and the streamed sums
  // s = sum_j w (c - mg), cov = sum_j w (z - z_bar)(c - mg), dev = sum_j w (z - z_bar).
  std::vector<double> xn(B), mg(B), s_sum(B, 0.0), cov(B, 0.0), dev(B, 0.0);
  {
    const T* gp = grad_mu.data_ptr<T>();
    at::parallel_for(0, B, row_grain(D), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        double a = 0.0, b = 0.0;
        for (int64_t k = 0; k < D; ++k) {
          a += double(xp[i * D + k]) * double(xp[i * D + k]);
          b += double(mup[i * D + k]) * double(gp[i * D + k]);
        }
        xn[i] = a;
        mg[i] = b;
      }
    });
  }

  // One product gives both x_i . r_j (rows 0..B-1) and g_i . r_j (rows B..2B-1).
  at::Tensor xg = at::cat({x, grad_mu}, 0);
  at::Tensor tile_buf = at::empty({2 * B * chunk}, x.options());
  at::Tensor coef_buf = ref_grad ? at::empty({B * chunk}, x.options()) : at::Tensor();
  at::Tensor px = at::zeros({B, D}, x.options());

  // final = false: only s (the ref gradient's coefficients need the consistent mg before use).
  auto sweep = [&](bool final) {
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t c = std::min(chunk, n - start);
      at::Tensor r = ref.narrow(0, start, c);
      at::Tensor tile = tile_buf.narrow(0, 0, 2 * B * c).view({2 * B, c});
      at::mm_out(tile, xg, r.t());
      T* zp = tile.data_ptr<T>();  // logits in, x-coefficients out
      T* cp = zp + B * c;          // c_ij = g_i . r_j in, weights w_ij out (used by the ref gradient)
      T* ap = (final && ref_grad) ? coef_buf.data_ptr<T>() : nullptr;
      at::parallel_for(0, B, row_grain(c), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const T s2 = sp[i] * sp[i], inv_s2 = T(1) / s2;
          const T zlse = auxp[i * AUX_COLS + AUX_ZLSE];
          const double zbar = mean_logit<double>(auxp[i * AUX_COLS + AUX_DBAR], xn[i], double(s2));
          double s_i = 0.0, cov_i = 0.0, dev_i = 0.0;
          for (int64_t j = 0; j < c; ++j) {
            const int64_t ij = i * c + j;
            const T z = logit(zp[ij], rnp[start + j], inv_s2);
            const double w = backward_weight(z, zlse);
            const double cij = cp[ij];
            const double xc = backward_x_coef(w, cij, mg[i]);
            s_i += xc;
            if (!final) continue;
            zp[ij] = T(xc);
            cov_i += backward_sigma_term(w, double(z), zbar, cij, mg[i]);
            dev_i += w * (double(z) - zbar);
            if (ap != nullptr) {
              ap[ij] = T(backward_ref_coef(w, cij, mg[i], double(glp[i]), double(inv_s2)));
              cp[ij] = T(w);
            }
          }
          s_sum[i] += s_i;
          cov[i] += cov_i;
          dev[i] += dev_i;
        }
      });
      if (!final) continue;
      px.addmm_(tile.narrow(0, 0, B), r);
      if (ref_grad) {
        at::Tensor w = tile.narrow(0, B, B);
        at::Tensor a = coef_buf.narrow(0, 0, B * c).view({B, c});
        at::Tensor g = grad_ref.narrow(0, start, c);
        at::mm_out(g, w.t(), grad_mu);      // sum_i w_ij g_i
        g.addmm_(a.t(), x);                 // + sum_i a_ij (x_i
        g.sub_(a.sum(0).unsqueeze(1) * r);  //                  - r_j)
      }
    }
  };
  if (ref_grad) {
    // The ref gradient's a_ij = w (c - mg + g_lse) / sigma^2 cannot be corrected afterwards like
    // dL/dx: a first sweep makes mg consistent with the products' rounding (mg + s), at the price
    // of one more product per chunk, paid only when ref requires grad.
    sweep(false);
    for (int64_t i = 0; i < B; ++i) {
      mg[i] += s_sum[i];
      s_sum[i] = 0.0;
    }
  }
  sweep(true);

  const T* pxp = px.data_ptr<T>();
  T* gxp = grad_x.data_ptr<T>();
  T* gsp = grad_sigma.data_ptr<T>();
  at::parallel_for(0, B, row_grain(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const double inv_s2 = 1.0 / (double(sp[i]) * double(sp[i]));
      for (int64_t k = 0; k < D; ++k) {
        const int64_t ik = i * D + k;
        gxp[ik] = T(grad_x_corrected<double>(pxp[ik], s_sum[i], mup[ik], xp[ik], glp[i], inv_s2));
      }
      const double dbar = auxp[i * AUX_COLS + AUX_DBAR];
      gsp[i] = T(stf::grad_sigma<double>(cov_corrected(cov[i], s_sum[i], dev[i]), dbar, glp[i], sp[i]));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stf_backward_cpu(
    const at::Tensor& grad_mu, const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& sigma,
    const at::Tensor& ref, const at::Tensor& ref_sqnorm, const at::Tensor& mu, const at::Tensor& aux,
    int64_t chunk_size, bool ref_grad) {
  check_inputs(x, sigma, ref, ref_sqnorm, chunk_size);
  TORCH_CHECK(grad_mu.sizes() == x.sizes() && mu.sizes() == x.sizes(), "stf_backward_cpu: grad_mu and mu must be ",
              x.sizes());
  TORCH_CHECK(grad_lse.dim() == 1 && grad_lse.size(0) == x.size(0), "stf_backward_cpu: grad_lse must be (B,)");
  TORCH_CHECK(aux.dim() == 2 && aux.size(0) == x.size(0) && aux.size(1) == AUX_COLS,
              "stf_backward_cpu: aux must be (B, 4)");
  at::Tensor g = grad_mu.contiguous(), gl = grad_lse.contiguous(), m = mu.contiguous(), a = aux.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_sigma = at::empty_like(sigma);
  at::Tensor grad_ref = ref_grad ? at::empty_like(ref) : at::empty({0}, ref.options());
  if (x.size(0) == 0) {
    if (ref_grad) grad_ref.zero_();
    return {grad_x, grad_sigma, grad_ref};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stf_backward_cpu", [&] {
    backward_impl<scalar_t>(g, gl, x, sigma, ref, ref_sqnorm, m, a, chunk_size, ref_grad, grad_x, grad_sigma,
                            grad_ref);
  });
  return {grad_x, grad_sigma, grad_ref};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cdm_kernels_C, m) {
  m.def("stf_forward_cpu(Tensor x, Tensor sigma, Tensor ref, Tensor ref_sqnorm, int chunk_size) "
        "-> (Tensor mu, Tensor lse, Tensor aux)");
  m.def("stf_backward_cpu(Tensor grad_mu, Tensor grad_lse, Tensor x, Tensor sigma, Tensor ref, "
        "Tensor ref_sqnorm, Tensor mu, Tensor aux, int chunk_size, bool ref_grad) "
        "-> (Tensor grad_x, Tensor grad_sigma, Tensor grad_ref)");
}

TORCH_LIBRARY_IMPL(cdm_kernels_C, CPU, m) {
  m.impl("stf_forward_cpu", &stf_forward_cpu);
  m.impl("stf_backward_cpu", &stf_backward_cpu);
}

}  // namespace stf
}  // namespace cdm
