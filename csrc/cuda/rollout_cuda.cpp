// Torch glue of the CUDA rollout kernels (csrc/cuda/rollout.cu): checks, device guard, the
// current stream, launch-error check, and registration for the CUDA dispatch key of the ops whose
// schemas csrc/cpu/rollout.cpp defines.
//
// No CUDA header is included (the host compiler of a CUDA build need not see the toolkit): the
// device guard and the current stream come from c10's device-generic interface, and launch
// errors come back from rollout.cu as strings.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdint>

#include "rollout_math.h"

namespace cdm {
namespace rollout {
namespace cuda {

// Defined in rollout.cu.
const char* launch_philox_randn(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);
template <typename T>
const char* launch_rollout_step(const T* x, const T* D, const T* xe, const T* De, const T* noise, const T* t_cur,
                                const T* t_next, T s_noise, uint64_t seed, uint64_t offset, int64_t B, int64_t M,
                                int kind, T* out, void* stream);
template <typename T>
const char* launch_martingale(const T* grad, const T* D0, const T* D1a, const T* D1b, const T* y, const T* w,
                              bool per_row, T lambda_m, int64_t B, int64_t M, T* out, T* ga, T* gb,
                              void* stream);

namespace {

// The current CUDA stream of `device`, as the cudaStream_t the launchers expect.
void* current_stream(const at::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
}

void check_launch(const char* error, const char* what) {
  TORCH_CHECK(error == nullptr, what, ": CUDA kernel launch failed: ", error);
}

void check_cuda_like(const at::Tensor& t, const char* what, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), what, ": every tensor must be on ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.is_contiguous(), what,
              ": every tensor must be contiguous with dtype ", x.scalar_type());
}

at::Tensor philox_randn_cuda(const at::Tensor& anchor, at::IntArrayRef shape, int64_t seed, int64_t offset) {
  TORCH_CHECK(seed >= 0 && offset >= 0, "philox_randn: seed and offset must be >= 0, got ", seed, ", ", offset);
  const c10::DeviceGuard guard(anchor.device());
  at::Tensor out = at::empty(shape, anchor.options().dtype(at::kFloat));
  check_launch(launch_philox_randn(out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(seed),
                                     static_cast<uint64_t>(offset), current_stream(anchor.device())), "philox_randn");
  return out;
}

at::Tensor rollout_step_cuda(const at::Tensor& x, const at::Tensor& denoised, const at::Tensor& t_cur,
                             const at::Tensor& t_next, const c10::optional<at::Tensor>& x_euler,
                             const c10::optional<at::Tensor>& denoised_euler, const c10::optional<at::Tensor>& noise,
                             int64_t seed, int64_t offset, int64_t kind, double s_noise) {
  TORCH_CHECK(kind >= 0 && kind < KIND_COUNT, "rollout_step: unknown kind ", kind);
  TORCH_CHECK(x.dim() == 2, "rollout_step: x must be (B, M), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "rollout_step: x must be float32 or float64, got ", x.scalar_type());
  check_cuda_like(x, "rollout_step", x);
  check_cuda_like(denoised, "rollout_step", x);
  TORCH_CHECK(denoised.sizes() == x.sizes(), "rollout_step: denoised must have x's shape");
  const int64_t B = x.size(0), M = x.size(1);
  for (const at::Tensor* t : {&t_cur, &t_next}) {
    check_cuda_like(*t, "rollout_step", x);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "rollout_step: t_cur, t_next must be (", B, ",), got ", t->sizes());
  }
  if (kind == KIND_HEUN) {
    TORCH_CHECK(x_euler.has_value() && denoised_euler.has_value(), "rollout_step: heun needs x_euler and denoised_euler");
    check_cuda_like(*x_euler, "rollout_step", x);
    check_cuda_like(*denoised_euler, "rollout_step", x);
    TORCH_CHECK(x_euler->sizes() == x.sizes() && denoised_euler->sizes() == x.sizes(),
                "rollout_step: x_euler and denoised_euler must have x's shape");
  }
  if (noise.has_value()) {
    check_cuda_like(*noise, "rollout_step", x);
    TORCH_CHECK(noise->sizes() == x.sizes(), "rollout_step: noise must have x's shape");
  }
  TORCH_CHECK(seed >= 0 && offset >= 0, "rollout_step: seed and offset must be >= 0");
  const c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rollout_step_cuda", [&] {
    const scalar_t* xe = kind == KIND_HEUN ? x_euler->data_ptr<scalar_t>() : nullptr;
    const scalar_t* De = kind == KIND_HEUN ? denoised_euler->data_ptr<scalar_t>() : nullptr;
    const scalar_t* z = noise.has_value() ? noise->data_ptr<scalar_t>() : nullptr;
    check_launch(launch_rollout_step<scalar_t>(
        x.data_ptr<scalar_t>(), denoised.data_ptr<scalar_t>(), xe, De, z, t_cur.data_ptr<scalar_t>(),
        t_next.data_ptr<scalar_t>(), static_cast<scalar_t>(s_noise), static_cast<uint64_t>(seed),
        static_cast<uint64_t>(offset), B, M, static_cast<int>(kind), out.data_ptr<scalar_t>(),
        current_stream(x.device())), "rollout_step");
  });
  return out;
}

void check_loss(const at::Tensor& D0, std::initializer_list<const at::Tensor*> others, const at::Tensor& weight) {
  TORCH_CHECK(D0.dim() == 2, "martingale_loss: D0 must be (B, M), got ", D0.sizes());
  TORCH_CHECK(D0.scalar_type() == at::kFloat || D0.scalar_type() == at::kDouble,
              "martingale_loss: tensors must be float32 or float64, got ", D0.scalar_type());
  check_cuda_like(D0, "martingale_loss", D0);
  for (const at::Tensor* t : others) {
    check_cuda_like(*t, "martingale_loss", D0);
    TORCH_CHECK(t->sizes() == D0.sizes(), "martingale_loss: every input must have D0's shape ", D0.sizes());
  }
  check_cuda_like(weight, "martingale_loss", D0);
  TORCH_CHECK((weight.dim() == 1 && weight.size(0) == D0.size(0)) || weight.sizes() == D0.sizes(),
              "martingale_loss: weight must be (B,) or (B, M), got ", weight.sizes());
}

at::Tensor martingale_loss_cuda(const at::Tensor& D0, const at::Tensor& D1a, const at::Tensor& D1b,
                                const at::Tensor& y, const at::Tensor& weight, double lambda_m) {
  check_loss(D0, {&D1a, &D1b, &y}, weight);
  const c10::DeviceGuard guard(D0.device());
  at::Tensor out = at::empty_like(D0);
  AT_DISPATCH_FLOATING_TYPES(D0.scalar_type(), "martingale_loss_cuda", [&] {
    check_launch(launch_martingale<scalar_t>(
        nullptr, D0.data_ptr<scalar_t>(), D1a.data_ptr<scalar_t>(), D1b.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
        weight.data_ptr<scalar_t>(), weight.dim() == 1, static_cast<scalar_t>(lambda_m), D0.size(0), D0.size(1),
        out.data_ptr<scalar_t>(), nullptr, nullptr, current_stream(D0.device())), "martingale_loss");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> martingale_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& D0, const at::Tensor& D1a, const at::Tensor& D1b, const at::Tensor& y,
    const at::Tensor& weight, double lambda_m) {
  check_loss(D0, {&grad, &D1a, &D1b, &y}, weight);
  const c10::DeviceGuard guard(D0.device());
  at::Tensor g0 = at::empty_like(D0), ga = at::empty_like(D0), gb = at::empty_like(D0);
  AT_DISPATCH_FLOATING_TYPES(D0.scalar_type(), "martingale_loss_backward_cuda", [&] {
    check_launch(launch_martingale<scalar_t>(
        grad.data_ptr<scalar_t>(), D0.data_ptr<scalar_t>(), D1a.data_ptr<scalar_t>(), D1b.data_ptr<scalar_t>(),
        y.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), weight.dim() == 1, static_cast<scalar_t>(lambda_m),
        D0.size(0), D0.size(1), g0.data_ptr<scalar_t>(), ga.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(),
        current_stream(D0.device())), "martingale_loss_backward");
  });
  return {g0, ga, gb};
}

}  // namespace
}  // namespace cuda
}  // namespace rollout
}  // namespace cdm

TORCH_LIBRARY_IMPL(cdm_kernels_C, CUDA, m) {
  m.impl("philox_randn", &cdm::rollout::cuda::philox_randn_cuda);
  m.impl("rollout_step", &cdm::rollout::cuda::rollout_step_cuda);
  m.impl("martingale_loss", &cdm::rollout::cuda::martingale_loss_cuda);
  m.impl("martingale_loss_backward", &cdm::rollout::cuda::martingale_loss_backward_cuda);
}
