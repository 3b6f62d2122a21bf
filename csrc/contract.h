// The launcher contract of the ops of cdm_kernels_C (the forms of cdm_kernels/contract.py), checked
// by the torch glue of every device before anything is launched. Python checks the same contract
// once per call through the registry; the ops check it again because a torch op can be called
// directly (torch.ops.cdm_kernels_C.*), and a kernel that trusts a wrong shape reads out of bounds.
// One set of checks for the CPU and the CUDA glue. Since the ops check it, the registry does not
// check it again in Python for the compiled backends (cdm_kernels/registry.py, checks_contract).
// A violation is a ValueError (TORCH_CHECK_VALUE), like cdm_kernels.contract.ContractError, with the
// same wording where the forms allow.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <string>
#include <tuple>

#include "common.h"

namespace cdm {
namespace contract {

// Every tensor has the anchor's dtype (float32 or float64) and device and is contiguous.
inline void same_placement(const char* op, const at::Tensor& anchor,
                           std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  TORCH_CHECK_VALUE(anchor.scalar_type() == at::kFloat || anchor.scalar_type() == at::kDouble, op,
                    ": tensors must be float32 or float64, got ", anchor.scalar_type());
  for (const auto& [name, t] : tensors) {
    const bool ok = t->scalar_type() == anchor.scalar_type() && t->device() == anchor.device() && t->is_contiguous();
    TORCH_CHECK_VALUE(ok, op, ": ", name, " must be a contiguous ", anchor.scalar_type(), " tensor on ",
                      anchor.device(), ", got ", t->scalar_type(), " on ", t->device(),
                      t->is_contiguous() ? "" : " (not contiguous)");
  }
}

inline void shape_is(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// stf_forward(x (B, D), sigma (B,), ref (n >= 1, D), centre (D,), chunk_size >= 1, precision);
// returns the precision's code (common.h, Precision).
inline int stf(const char* op, const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ref,
               const at::Tensor& centre, int64_t chunk_size, c10::string_view precision) {
  same_placement(op, x, {{"x", &x}, {"sigma", &sigma}, {"ref", &ref}, {"centre", &centre}});
  TORCH_CHECK_VALUE(x.dim() == 2 && ref.dim() == 2 && ref.size(1) == x.size(1) && ref.size(0) >= 1, op,
                    ": x must be (B, D) and ref (n >= 1, D), got ", x.sizes(), " and ", ref.sizes());
  shape_is(op, "sigma", sigma, {x.size(0)});
  shape_is(op, "centre", centre, {x.size(1)});
  TORCH_CHECK_VALUE(chunk_size >= 1, op, ": chunk_size must be a positive int, got ", chunk_size);
  const int code = precision_code(std::string(precision).c_str());
  TORCH_CHECK_VALUE(code >= 0, op, ": unknown precision '", std::string(precision), "'");
  return code;
}

// stf_backward: stf_forward's arguments plus grad_mu (B, D), grad_lse (B,), mu (B, D), aux (B, AUX_COLS)
// and dist, the forward's kept distances (B n,) or empty (0,): then the backward recomputes them.
inline int stf_backward(const char* op, const at::Tensor& grad_mu, const at::Tensor& grad_lse, const at::Tensor& x,
                        const at::Tensor& sigma, const at::Tensor& ref, const at::Tensor& centre, const at::Tensor& mu,
                        const at::Tensor& aux, const at::Tensor& dist, int64_t chunk_size, c10::string_view precision) {
  const int code = stf(op, x, sigma, ref, centre, chunk_size, precision);
  same_placement(op, x, {{"grad_mu", &grad_mu}, {"grad_lse", &grad_lse}, {"mu", &mu}, {"aux", &aux}, {"dist", &dist}});
  shape_is(op, "grad_mu", grad_mu, x.sizes());
  shape_is(op, "mu", mu, x.sizes());
  shape_is(op, "grad_lse", grad_lse, {x.size(0)});
  shape_is(op, "aux", aux, {x.size(0), AUX_COLS});
  TORCH_CHECK_VALUE(dist.dim() == 1 && (dist.size(0) == 0 || dist.size(0) == x.size(0) * ref.size(0)), op,
                    ": dist must be the forward's kept distances (B n,) = (", x.size(0) * ref.size(0),
                    ",) or empty (0,), got ", dist.sizes());
  return code;
}

// rollout_step(x (B, M), denoised (B, M), t_cur (B,), t_next (B,), x_euler, denoised_euler, noise
// (each (B, M) or absent), seed >= 0, offset >= 0, kind); returns the kind's code (common.h, StepKind).
inline int rollout_step(const char* op, const at::Tensor& x, const at::Tensor& denoised, const at::Tensor& t_cur,
                        const at::Tensor& t_next, const c10::optional<at::Tensor>& x_euler,
                        const c10::optional<at::Tensor>& denoised_euler, const c10::optional<at::Tensor>& noise,
                        int64_t seed, int64_t offset, c10::string_view kind) {
  const int code = step_kind_code(std::string(kind).c_str());
  TORCH_CHECK_VALUE(code >= 0, op, ": kind must be one of ('sde', 'euler', 'heun', 'churn'), got '", std::string(kind),
                    "'");
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be (B, M), got ", x.sizes());
  same_placement(op, x, {{"denoised", &denoised}, {"t_cur", &t_cur}, {"t_next", &t_next}});
  shape_is(op, "denoised", denoised, x.sizes());
  shape_is(op, "t_cur", t_cur, {x.size(0)});
  shape_is(op, "t_next", t_next, {x.size(0)});
  TORCH_CHECK_VALUE(code != KIND_HEUN || (x_euler.has_value() && denoised_euler.has_value()), op,
                    ": kind 'heun' needs x_euler and denoised_euler");
  for (const auto& [name, t] : {std::pair<const char*, const c10::optional<at::Tensor>*>{"x_euler", &x_euler},
                                {"denoised_euler", &denoised_euler}, {"noise", &noise}}) {
    if (!t->has_value()) continue;
    same_placement(op, x, {{name, &t->value()}});
    shape_is(op, name, t->value(), x.sizes());
  }
  TORCH_CHECK_VALUE(seed >= 0 && offset >= 0, op, ": seed and offset must be >= 0, got ", seed, ", ", offset);
  return code;
}

// martingale_loss_*(D0, D1a, D1b, y (B, M) and the others), weight (B,) per row or (B, M).
inline void martingale(const char* op, const at::Tensor& D0, std::initializer_list<const at::Tensor*> others,
                       const at::Tensor& weight) {
  TORCH_CHECK_VALUE(D0.dim() == 2, op, ": D0 must be (B, M), got ", D0.sizes());
  same_placement(op, D0, {{"D0", &D0}, {"weight", &weight}});
  for (const at::Tensor* t : others) {
    same_placement(op, D0, {{"input", t}});
    shape_is(op, "every input", *t, D0.sizes());
  }
  TORCH_CHECK_VALUE((weight.dim() == 1 && weight.size(0) == D0.size(0)) || weight.sizes() == D0.sizes(), op,
                    ": weight must be (B,) or (B, M) with (B, M) = ", D0.sizes(), ", got ", weight.sizes());
}

// The outputs of stf_forward (mu, lse, aux, dist: (B n,) with keep, else (0,)) and stf_backward
// (grad_x, grad_sigma, grad_ref: (0,) without ref_grad, zeros for an empty batch), uninitialised
// otherwise.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stf_forward_outputs(
    const at::Tensor& x, const at::Tensor& ref, bool keep) {
  const int64_t B = x.size(0);
  return {at::empty_like(x), at::empty({B}, x.options()), at::empty({B, AUX_COLS}, x.options()),
          at::empty({keep ? B * ref.size(0) : 0}, x.options())};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> stf_backward_outputs(const at::Tensor& x, const at::Tensor& sigma,
                                                                           const at::Tensor& ref, bool ref_grad) {
  at::Tensor grad_ref = ref_grad ? at::empty_like(ref) : at::empty({0}, ref.options());
  if (ref_grad && x.size(0) == 0) grad_ref.zero_();
  return {at::empty_like(x), at::empty_like(sigma), grad_ref};
}

inline void philox(const char* op, int64_t seed, int64_t offset) {
  TORCH_CHECK_VALUE(seed >= 0 && offset >= 0, op, ": seed and offset must be >= 0, got ", seed, ", ", offset);
}

}  // namespace contract
}  // namespace cdm
