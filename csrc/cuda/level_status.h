// The level status of the CUDA rollout kernels (cdm_kernels/level_status.py): where a step records
// the first sample whose noise levels are not valid, and the pinned host word it is copied to.
#pragma once

#include <ATen/ATen.h>

namespace cdm {
namespace rollout {
namespace cuda {

// dev: int64 (4,) on a CUDA device; host: pinned int64 (4,). Both must outlive every later launch.
void set_level_status(const at::Tensor& dev, const at::Tensor& host);

}  // namespace cuda
}  // namespace rollout
}  // namespace cdm
