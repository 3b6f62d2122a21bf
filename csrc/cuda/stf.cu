// Stable target on CUDA GPUs (docs/math.md): the kernels. The thread code is csrc/cuda/stf_kernels.h
// (executed on the host by tests/cuda_emulator.cpp) over the arithmetic of csrc/stf_math.h (executed
// by the CPU backend); this file turns each per-thread functor into a __global__ function and
// launches it on the caller's stream. The products and the launch sequences are in the torch glue,
// csrc/cuda/stf_cuda.cpp; the convention between the two is csrc/cuda/launch.h's.
#include "cuda/launch.h"
#include "cuda/stf_cuda.h"

namespace cdm {
namespace stf {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // a grid-stride loop covers the rest

template <class F>
__global__ void __launch_bounds__(kThreads) thread_kernel(const F f) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < f.threads; t += stride) f(t);
}

}  // namespace

template <class F>
const char* launch(const F& f, void* stream) {
  if (f.threads == 0) return nullptr;
  const int64_t blocks = (f.threads + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
  thread_kernel<F><<<grid, kThreads, 0, cdm::cuda::as_stream(stream)>>>(f);
  return cdm::cuda::launch_status();
}

#define CDM_STF_LAUNCH(F) template const char* launch<F>(const F&, void*);
#define CDM_STF_LAUNCH_T(T)                \
  CDM_STF_LAUNCH(ShiftRows<T>)             \
  CDM_STF_LAUNCH(DotRows<T>)               \
  CDM_STF_LAUNCH(QueryRows<T>)             \
  CDM_STF_LAUNCH(ChunkMin<T>)              \
  CDM_STF_LAUNCH(ChunkUpdate<T>)           \
  CDM_STF_LAUNCH(RowMerge<T>)              \
  CDM_STF_LAUNCH(ScaleRows<T>)             \
  CDM_STF_LAUNCH(NearestParts<T>)          \
  CDM_STF_LAUNCH(FinalizeRows<T>)          \
  CDM_STF_LAUNCH(FinalizeMu<T>)            \
  CDM_STF_LAUNCH(BackwardTerms<T>)         \
  CDM_STF_LAUNCH(ColumnSums<T>)            \
  CDM_STF_LAUNCH(RefGradFinish<T>)         \
  CDM_STF_LAUNCH(BackwardFinishX<T>)       \
  CDM_STF_LAUNCH(BackwardFinishSigma<T>)
typedef LaneSum<float, float> LaneSumF;
typedef LaneSum<double, double> LaneSumD;
typedef LaneSum<float, Acc> LaneSumFA;
CDM_STF_LAUNCH_T(float)
CDM_STF_LAUNCH_T(double)
CDM_STF_LAUNCH(LaneSumF)
CDM_STF_LAUNCH(LaneSumD)
CDM_STF_LAUNCH(LaneSumFA)
CDM_STF_LAUNCH(RowSums)
CDM_STF_LAUNCH(RowsReset)
#undef CDM_STF_LAUNCH_T
#undef CDM_STF_LAUNCH

}  // namespace cuda
}  // namespace stf
}  // namespace cdm
