// The convention between every CUDA kernel file (csrc/cuda/<op>.cu, built by nvcc with only the CUDA
// runtime and the project's headers) and its torch glue (csrc/cuda/<op>_cuda.cpp, built by the host
// compiler with no CUDA header): a launch function takes device pointers, sizes and the stream as
// void*, and returns nullptr on success or the CUDA error string of the first failed launch.
// Its declarations are in csrc/cuda/<op>_cuda.h. This header is the .cu side.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cdm {
namespace cuda {

// The error of the last launch on this thread, or nullptr.
inline const char* launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace cuda
}  // namespace cdm
