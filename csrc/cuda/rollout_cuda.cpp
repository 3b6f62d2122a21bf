// Torch glue of the CUDA rollout kernels (csrc/cuda/rollout.cu): the contract checks of
// csrc/contract.h, the device guard, the current stream, the launch-error check, and the CUDA
// implementations of the ops whose schemas csrc/ops.cpp defines.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "contract.h"
#include "cuda/glue.h"
#include "cuda/level_status.h"
#include "cuda/rollout_cuda.h"

namespace cdm {
namespace rollout {
namespace cuda {
namespace {

// Per device index: the level status word the rollout kernels record into and its pinned host copy
// (cdm_kernels/level_status.py keeps both tensors alive for the process). Null until set.
constexpr int kMaxDevices = 64;
struct StatusWords {
  int64_t* dev = nullptr;
  int64_t* host = nullptr;
};
StatusWords g_status[kMaxDevices];

using cdm::cuda::check_cuda;
using cdm::cuda::check_launch;
using cdm::cuda::current_stream;

at::Tensor philox_randn_cuda(const at::Tensor& anchor, at::IntArrayRef shape, int64_t seed, int64_t offset) {
  contract::philox("philox_randn (cuda)", seed, offset);
  check_cuda(anchor, "philox_randn (cuda)");
  const c10::DeviceGuard guard(anchor.device());
  at::Tensor out = at::empty(shape, anchor.options().dtype(at::kFloat));
  check_launch(launch_philox_randn(out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(seed),
                                   static_cast<uint64_t>(offset), current_stream(anchor.device())),
               "philox_randn (cuda)");
  return out;
}

at::Tensor rollout_step_cuda(const at::Tensor& x, const at::Tensor& denoised, const at::Tensor& t_cur,
                             const at::Tensor& t_next, const c10::optional<at::Tensor>& x_euler,
                             const c10::optional<at::Tensor>& denoised_euler, const c10::optional<at::Tensor>& noise,
                             int64_t seed, int64_t offset, c10::string_view kind_name, double s_noise) {
  const char* op = "rollout_step (cuda)";
  const int kind = contract::rollout_step(op, x, denoised, t_cur, t_next, x_euler, denoised_euler, noise, seed,
                                          offset, kind_name);
  check_cuda(x, op);
  const c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int index = x.device().index();
  const StatusWords status = index >= 0 && index < kMaxDevices ? g_status[index] : StatusWords{};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rollout_step_cuda", [&] {
    const scalar_t* xe = kind == KIND_HEUN ? x_euler->data_ptr<scalar_t>() : nullptr;
    const scalar_t* De = kind == KIND_HEUN ? denoised_euler->data_ptr<scalar_t>() : nullptr;
    const scalar_t* z = noise.has_value() ? noise->data_ptr<scalar_t>() : nullptr;
    check_launch(launch_rollout_step<scalar_t>(
                     x.data_ptr<scalar_t>(), denoised.data_ptr<scalar_t>(), xe, De, z, t_cur.data_ptr<scalar_t>(),
                     t_next.data_ptr<scalar_t>(), static_cast<scalar_t>(s_noise), static_cast<uint64_t>(seed),
                     static_cast<uint64_t>(offset), x.size(0), x.size(1), kind, out.data_ptr<scalar_t>(),
                     status.dev, status.host, current_stream(x.device())),
                 op);
  });
  return out;
}

// grad undefined: the loss; else its three gradients.
std::vector<at::Tensor> martingale(const char* op, const at::Tensor& grad, const at::Tensor& D0, const at::Tensor& D1a,
                                   const at::Tensor& D1b, const at::Tensor& y, const at::Tensor& weight,
                                   double lambda_m) {
  const bool backward = grad.defined();
  if (backward) {
    contract::martingale(op, D0, {&grad, &D1a, &D1b, &y}, weight);
  } else {
    contract::martingale(op, D0, {&D1a, &D1b, &y}, weight);
  }
  check_cuda(D0, op);
  const c10::DeviceGuard guard(D0.device());
  std::vector<at::Tensor> out{at::empty_like(D0)};
  if (backward) out.insert(out.end(), {at::empty_like(D0), at::empty_like(D0)});
  AT_DISPATCH_FLOATING_TYPES(D0.scalar_type(), "martingale_cuda", [&] {
    check_launch(launch_martingale<scalar_t>(
                     backward ? grad.data_ptr<scalar_t>() : nullptr, D0.data_ptr<scalar_t>(),
                     D1a.data_ptr<scalar_t>(), D1b.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                     weight.data_ptr<scalar_t>(), weight.dim() == 1, static_cast<scalar_t>(lambda_m), D0.size(0),
                     D0.size(1), out[0].data_ptr<scalar_t>(), backward ? out[1].data_ptr<scalar_t>() : nullptr,
                     backward ? out[2].data_ptr<scalar_t>() : nullptr, current_stream(D0.device())),
                 op);
  });
  return out;
}

at::Tensor martingale_loss_cuda(const at::Tensor& D0, const at::Tensor& D1a, const at::Tensor& D1b,
                                const at::Tensor& y, const at::Tensor& weight, double lambda_m) {
  return martingale("martingale_loss_forward (cuda)", at::Tensor(), D0, D1a, D1b, y, weight, lambda_m)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> martingale_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& D0, const at::Tensor& D1a, const at::Tensor& D1b, const at::Tensor& y,
    const at::Tensor& weight, double lambda_m) {
  auto g = martingale("martingale_loss_backward (cuda)", grad, D0, D1a, D1b, y, weight, lambda_m);
  return {g[0], g[1], g[2]};
}

}  // namespace

at::Tensor check_levels(const at::Tensor& a, const c10::optional<at::Tensor>& b, int64_t source) {
  const char* op = "check_levels (cuda)";
  TORCH_CHECK_VALUE(a.is_cuda() && a.dim() == 1 && a.is_contiguous() &&
                        (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
                    op, ": a must be a contiguous 1-D float32 or float64 CUDA tensor, got ", a.scalar_type(), " ",
                    a.sizes(), " on ", a.device());
  if (b.has_value()) contract::same_placement(op, a, {{"b", &b.value()}});
  TORCH_CHECK_VALUE(!b.has_value() || b->sizes() == a.sizes(), op, ": b must have a's shape ", a.sizes());
  TORCH_CHECK_VALUE(source > kSourceRolloutStep, op, ": source ", source, " is not one of the checks' sources");
  const c10::DeviceGuard guard(a.device());
  const int index = a.device().index();
  const StatusWords status = index >= 0 && index < kMaxDevices ? g_status[index] : StatusWords{};
  TORCH_CHECK(status.dev != nullptr, op, ": no level status word for ", a.device(),
              " (cdm_kernels.level_status.status_of makes it)");
  at::Tensor out = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "check_levels_cuda", [&] {
    const scalar_t* bp = b.has_value() ? b->data_ptr<scalar_t>() : nullptr;
    check_launch(launch_check_levels<scalar_t>(a.data_ptr<scalar_t>(), bp, a.numel(), source, out.data_ptr<scalar_t>(),
                                               status.dev, status.host, current_stream(a.device())),
                 op);
  });
  return out;
}

void set_level_status(const at::Tensor& dev, const at::Tensor& host) {
  TORCH_CHECK(dev.is_cuda() && dev.scalar_type() == at::kLong && dev.numel() == kStatusWords && dev.is_contiguous(),
              "rollout_set_level_status: dev must be a contiguous int64 CUDA tensor of ", kStatusWords,
              " elements, got ", dev.scalar_type(), " ", dev.sizes(), " on ", dev.device());
  TORCH_CHECK(host.device().is_cpu() && host.is_pinned() && host.scalar_type() == at::kLong &&
                  host.numel() == kStatusWords && host.is_contiguous(),
              "rollout_set_level_status: host must be a contiguous pinned int64 CPU tensor of ", kStatusWords,
              " elements");
  const int index = dev.device().index();
  TORCH_CHECK(index >= 0 && index < kMaxDevices, "rollout_set_level_status: device index ", index, " out of range");
  g_status[index] = StatusWords{dev.data_ptr<int64_t>(), host.data_ptr<int64_t>()};
}

}  // namespace cuda
}  // namespace rollout
}  // namespace cdm

TORCH_LIBRARY_IMPL(cdm_kernels_C, CUDA, m) {
  m.impl("philox_randn", &cdm::rollout::cuda::philox_randn_cuda);
  m.impl("rollout_step", &cdm::rollout::cuda::rollout_step_cuda);
  m.impl("martingale_loss_forward", &cdm::rollout::cuda::martingale_loss_cuda);
  m.impl("martingale_loss_backward", &cdm::rollout::cuda::martingale_loss_backward_cuda);
}
