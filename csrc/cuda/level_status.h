// The level status of the CUDA kernels (cdm_kernels/level_status.py): where a step or a check records
// the first sample whose noise levels are not valid, and the pinned host word it is copied to.
#pragma once

#include <ATen/ATen.h>

namespace cdm {
namespace rollout {
namespace cuda {

// dev: int64 (4,) on a CUDA device; host: pinned int64 (4,). Both must outlive every later launch.
void set_level_status(const at::Tensor& dev, const at::Tensor& host);

// LevelStatus.check for a CUDA device: a (B,), b (B,) or absent, one float dtype; returns a with NaN
// where a sample's levels are not valid and records the lowest such sample for `source` in the
// device's word, then queues its copy to the host word (one launch and one copy, no sync).
at::Tensor check_levels(const at::Tensor& a, const c10::optional<at::Tensor>& b, int64_t source);

}  // namespace cuda
}  // namespace rollout
}  // namespace cdm
