// The torch side of the convention of csrc/cuda/launch.h, shared by every csrc/cuda/<op>_cuda.cpp:
// the current stream of a device as the void* the launch functions take (and a stream of ATen's
// pool for work beside it), a device guard, and the check of a launch function's result. No CUDA
// header is included (the host compiler of a CUDA build need not see the toolkit): both come from
// c10's device-generic interface.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace cdm {
namespace cuda {

// The current CUDA stream of `device` (its native_handle() is the cudaStream_t).
inline c10::Stream current_stream_of(const at::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
}

// The same as the cudaStream_t the launch functions expect.
inline void* current_stream(const at::Device& device) { return current_stream_of(device).native_handle(); }

// A stream of ATen's pool on `device`, for work beside the current stream's.
inline c10::Stream pool_stream(const at::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStreamFromGlobalPool(device, false);
}

// Raises with the op's name and CUDA's message when a launch function returned an error.
inline void check_launch(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, op, ": CUDA kernel launch failed: ", error);
}

inline void check_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": tensors must be on a CUDA device, got ", x.device());
}

}  // namespace cuda
}  // namespace cdm
