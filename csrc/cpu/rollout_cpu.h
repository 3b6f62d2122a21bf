// CPU helpers of the rollout ops that Python calls through the pybind module (csrc/module.cpp)
// rather than through torch.ops: they are checks, not ops, and a torch.ops call costs more than
// the whole check on a batch of noise levels.
#pragma once

#include <ATen/ATen.h>

namespace cdm {
namespace rollout {

// True when every t_cur is finite and > 0 and, with t_next, every t_next is finite, >= 0 (> 0 when
// next_positive) and <= t_cur. t_cur and t_next: 1-D CPU tensors of one float dtype and length
// (any strides). rollout_step's fast check; Python works out which sample is wrong when this fails.
bool levels_valid(const at::Tensor& t_cur, const c10::optional<at::Tensor>& t_next, bool next_positive);

}  // namespace rollout
}  // namespace cdm
