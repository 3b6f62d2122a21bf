// The launch function of the CUDA stable-target kernels (csrc/cuda/stf.cu), for the torch glue
// (csrc/cuda/stf_cuda.cpp), which runs the launch sequences of stf_kernels.h with cuBLAS products;
// the convention is csrc/cuda/launch.h's.
#pragma once

#include "cuda/stf_kernels.h"

namespace cdm {
namespace stf {
namespace cuda {

// Runs f(t) for every t in [0, f.threads) on the stream; nullptr or the CUDA error string.
// Instantiated in stf.cu for every functor of stf_kernels.h, in float and double.
template <class F>
const char* launch(const F& f, void* stream);

}  // namespace cuda
}  // namespace stf
}  // namespace cdm
