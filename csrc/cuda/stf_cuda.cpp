// Torch glue of the CUDA stable target: the CUDA implementations of cdm_kernels_C::stf_forward and
// stf_backward (schemas in csrc/ops.cpp). Checks the contract (csrc/contract.h) before anything is
// launched, sets the device guard, allocates the outputs and one workspace through the caching
// allocator, and runs the launch sequences of stf_kernels.h with an executor that launches their
// kernels (csrc/cuda/stf.cu) and does their matrix products with cuBLAS (csrc/cuda/blas_cuda.cpp),
// on the current stream. No CUDA header is included (csrc/cuda/glue.h says why).
//
// Each product's arithmetic is chosen per call (csrc/cuda/blas_cuda.h), never through torch's global
// TF32 switch: exact float32 where the operands are not TF32-exact; TF32 tensor cores where the
// kernels rounded them to TF32 values ("tf32x3", "tf32"); bf16 tensor cores (bfloat16 operands,
// float32 sums and output) for "bf16", whose kernels store their operands as bfloat16.
#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

#include "contract.h"
#include "cuda/blas_cuda.h"
#include "cuda/glue.h"
#include "cuda/stf_cuda.h"

namespace cdm {
namespace stf {
namespace cuda {
namespace {

// The chunk pipeline (stf_kernels.h, ChunkFeed: the next chunk's shift on a side stream beside this
// chunk's products) is an experiment until the H200 has measured it (docs/gpu_design.md): on with
// the environment variable CDM_STF_OVERLAP=1, read at every call.
bool overlap_requested() {
  const char* v = std::getenv("CDM_STF_OVERLAP");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Launches on the caller's current stream (MAIN) or on a stream of ATen's pool (SIDE, taken when
// first selected), products on the current stream (ATen's), events created when first recorded.
struct CudaExec {
  c10::Stream main;
  const char* op;
  std::unique_ptr<c10::Stream> side;
  int current = MAIN;
  std::unique_ptr<c10::Event> events[EVENTS];

  CudaExec(const at::Device& device, const char* name) : main(cdm::cuda::current_stream_of(device)), op(name) {}
  CudaExec(const CudaExec&) = delete;
  CudaExec& operator=(const CudaExec&) = delete;

  // The main stream waits for all the side stream's work, also when a call throws halfway (a product
  // out of memory, a failed launch): the workspace, freed after this, belongs to the main stream.
  ~CudaExec() {
    if (side == nullptr) return;
    try {
      c10::Event tail(c10::DeviceType::CUDA);
      tail.record(*side);
      tail.block(main);
    } catch (...) {  // a destructor must not throw; the call's own error is already on its way
    }
  }

  const c10::Stream& selected() const { return current == SIDE ? *side : main; }

  void stream(int s) {
    if (s == SIDE && side == nullptr) {
      // The pool hands its streams out in turn and may give back the caller's own: then the next.
      c10::Stream pooled = cdm::cuda::pool_stream(main.device());
      if (pooled == main) pooled = cdm::cuda::pool_stream(main.device());
      side = std::make_unique<c10::Stream>(pooled);
    }
    current = s;
  }
  void record(int e) {
    if (events[e] == nullptr) events[e] = std::make_unique<c10::Event>(c10::DeviceType::CUDA);
    events[e]->record(selected());
  }
  void wait(int e) {
    if (events[e] != nullptr) events[e]->block(selected());
  }

  template <class F>
  void run(const F& f) {
    cdm::cuda::check_launch(launch(f, selected().native_handle()), op);
  }

  template <typename T>
  void gemm(const Gemm<T>& g) {
    TORCH_CHECK(current == MAIN, op, ": internal error: a product queued on the side stream");
    if (g.A16 != nullptr) {
      TORCH_CHECK(g.B16 != nullptr && !g.accumulate && (std::is_same_v<T, float>), op,
                  ": internal error: a bfloat16 product needs bfloat16 operands and a float32 output, no accumulate");
      cdm::cuda::gemm(main.device(), cdm::cuda::GemmMath::kBf16, g.M, g.N, g.K, g.A16, g.lda, g.a_trans, g.B16, g.ldb,
                      g.b_trans, g.C, g.ldc, false, op);
      return;
    }
    const cdm::cuda::GemmMath math = std::is_same_v<T, double> ? cdm::cuda::GemmMath::kFloat64
                                     : g.tf32                  ? cdm::cuda::GemmMath::kTf32
                                                               : cdm::cuda::GemmMath::kFloat32;
    cdm::cuda::gemm(main.device(), math, g.M, g.N, g.K, g.A, g.lda, g.a_trans, g.B, g.ldb, g.b_trans, g.C, g.ldc,
                    g.accumulate, op);
  }
};

template <typename T>
Problem<T> problem(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ref, const at::Tensor& centre,
                   int64_t chunk_size, int prec) {
  Problem<T> p{x.size(0), x.size(1), ref.size(0), std::min(chunk_size, ref.size(0)), prec,
               x.data_ptr<T>(), sigma.data_ptr<T>(), ref.data_ptr<T>(), centre.data_ptr<T>()};
  p.overlap = overlap_requested() && overlap_applies(p);
  return p;
}

void check_precision(const char* op, const at::Tensor& x, int prec) {
  TORCH_CHECK(prec == PREC_IEEE || x.scalar_type() == at::kFloat, op, ": float64 inputs take precision 'ieee' only");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stf_forward_cuda(
    const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ref, const at::Tensor& centre,
    int64_t chunk_size, c10::string_view precision, bool keep) {
  const char* op = "stf_forward (cuda)";
  const int prec = contract::stf(op, x, sigma, ref, centre, chunk_size, precision);
  cdm::cuda::check_cuda(x, op);
  check_precision(op, x, prec);
  const c10::DeviceGuard guard(x.device());
  auto [mu, lse, aux, dist] = contract::stf_forward_outputs(x, ref, keep);
  if (x.size(0) == 0) return {mu, lse, aux, dist};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stf_forward_cuda", [&] {
    const Problem<scalar_t> p = problem<scalar_t>(x, sigma, ref, centre, chunk_size, prec);
    at::Tensor ws = at::empty({ForwardWorkspace<scalar_t>::bytes(p)}, x.options().dtype(at::kByte));
    Carver cv{reinterpret_cast<char*>(ws.data_ptr()), 0};
    CudaExec ex(x.device(), op);
    forward_run(ex, p, ForwardWorkspace<scalar_t>::carve(cv, p), mu.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                aux.data_ptr<scalar_t>(), keep ? dist.data_ptr<scalar_t>() : nullptr);
  });
  return {mu, lse, aux, dist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stf_backward_cuda(
    const at::Tensor& grad_mu, const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& sigma,
    const at::Tensor& ref, const at::Tensor& centre, const at::Tensor& mu, const at::Tensor& aux,
    const at::Tensor& dist, int64_t chunk_size, c10::string_view precision, bool ref_grad) {
  const char* op = "stf_backward (cuda)";
  const int prec =
      contract::stf_backward(op, grad_mu, grad_lse, x, sigma, ref, centre, mu, aux, dist, chunk_size, precision);
  cdm::cuda::check_cuda(x, op);
  check_precision(op, x, prec);
  const c10::DeviceGuard guard(x.device());
  auto [grad_x, grad_sigma, grad_ref] = contract::stf_backward_outputs(x, sigma, ref, ref_grad);
  if (x.size(0) == 0) return {grad_x, grad_sigma, grad_ref};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stf_backward_cuda", [&] {
    const Problem<scalar_t> p = problem<scalar_t>(x, sigma, ref, centre, chunk_size, prec);
    at::Tensor ws = at::empty({BackwardWorkspace<scalar_t>::bytes(p, ref_grad)}, x.options().dtype(at::kByte));
    Carver cv{reinterpret_cast<char*>(ws.data_ptr()), 0};
    CudaExec ex(x.device(), op);
    const BackwardInputs<scalar_t> in{grad_mu.data_ptr<scalar_t>(), grad_lse.data_ptr<scalar_t>(),
                                      mu.data_ptr<scalar_t>(), aux.data_ptr<scalar_t>(),
                                      dist.numel() != 0 ? dist.data_ptr<scalar_t>() : nullptr};
    backward_run(ex, p, in, BackwardWorkspace<scalar_t>::carve(cv, p, ref_grad), grad_x.data_ptr<scalar_t>(),
                 grad_sigma.data_ptr<scalar_t>(), ref_grad ? grad_ref.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_x, grad_sigma, grad_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(cdm_kernels_C, CUDA, m) {
  m.impl("stf_forward", &stf_forward_cuda);
  m.impl("stf_backward", &stf_backward_cuda);
}

}  // namespace cuda
}  // namespace stf
}  // namespace cdm
