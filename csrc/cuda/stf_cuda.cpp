// Torch glue of the CUDA stable target: the ops cdm_kernels_C::stf_forward_cuda / stf_backward_cuda
// (CUDA dispatch key). Checks the inputs (before anything is launched), sets the device guard,
// allocates outputs and the workspace through the caching allocator, and calls the launch sequences
// of stf.cu on the current stream. The kernels are in stf.cu / stf_kernels.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "stf_cuda.h"

namespace cdm {
namespace stf {
namespace cuda {
namespace {

// Device, dtype and rank: what .contiguous() keeps, so it is checked before any copy is made.
void check_placed(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "stf_cuda: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), "stf_cuda: ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; all tensors must be on one GPU");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "stf_cuda: ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.dim() == dim, "stf_cuda: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t dim) {
  check_placed(t, name, x, dim);
  TORCH_CHECK(t.is_contiguous(), "stf_cuda: ", name, " must be contiguous");
}

void check_inputs(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ref, const at::Tensor& ref_sqnorm,
                  int64_t chunk_size) {
  TORCH_CHECK(x.is_cuda(), "stf_cuda: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "stf_cuda: x must be float32 or float64, got ", x.scalar_type());
  check_tensor(x, "x", x, 2);
  check_tensor(sigma, "sigma", x, 1);
  check_tensor(ref, "ref", x, 2);
  check_tensor(ref_sqnorm, "ref_sqnorm", x, 1);
  TORCH_CHECK(ref.size(1) == x.size(1), "stf_cuda: ref must be (n, D) with D = ", x.size(1), " (x is ", x.sizes(),
              "), got ", ref.sizes());
  TORCH_CHECK(sigma.size(0) == x.size(0), "stf_cuda: sigma must be (B,) with B = ", x.size(0), ", got ",
              sigma.sizes());
  TORCH_CHECK(ref_sqnorm.size(0) == ref.size(0), "stf_cuda: ref_sqnorm must be (n,) with n = ", ref.size(0),
              ", got ", ref_sqnorm.sizes());
  TORCH_CHECK(ref.size(0) >= 1, "stf_cuda: ref must hold at least one reference (n >= 1), got ", ref.sizes());
  TORCH_CHECK(chunk_size >= 1, "stf_cuda: chunk_size must be >= 1, got ", chunk_size);
}

// The multiprocessors of x's GPU: the products split their K axis when their tiles alone would
// leave most of them idle (stf_kernels.h, gemm_split_len).
int64_t sm_count(const at::Tensor& x) {
  return at::cuda::getDeviceProperties(x.device().index())->multiProcessorCount;
}

void check_status(const LaunchStatus& s, const char* op) {
  TORCH_CHECK(s.ok, op, ": launch of kernel ", s.kernel ? s.kernel : "?", " failed: ", s.message);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stf_forward_cuda(const at::Tensor& x, const at::Tensor& sigma,
                                                                const at::Tensor& ref, const at::Tensor& ref_sqnorm,
                                                                int64_t chunk_size) {
  check_inputs(x, sigma, ref, ref_sqnorm, chunk_size);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), D = x.size(1), n = ref.size(0);
  at::Tensor mu = at::empty_like(x);
  at::Tensor lse = at::empty({B}, x.options());
  at::Tensor aux = at::empty({B, AUX_COLS}, x.options());
  if (B == 0) return {mu, lse, aux};
  const Plan plan = make_plan(B, D, n, chunk_size, sm_count(x));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stf_forward_cuda", [&] {
    at::Tensor ws = at::empty({ForwardWorkspace<scalar_t>::size(plan)}, x.options());
    check_status(forward<scalar_t>(plan, x.data_ptr<scalar_t>(), sigma.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(),
                                   ref_sqnorm.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                   aux.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(), stream),
                 "stf_forward_cuda");
  });
  return {mu, lse, aux};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stf_backward_cuda(
    const at::Tensor& grad_mu, const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& sigma,
    const at::Tensor& ref, const at::Tensor& ref_sqnorm, const at::Tensor& mu, const at::Tensor& aux,
    int64_t chunk_size, bool ref_grad) {
  check_inputs(x, sigma, ref, ref_sqnorm, chunk_size);
  // Checked before .contiguous(), which would otherwise copy a misplaced tensor first.
  check_placed(grad_mu, "grad_mu", x, 2);
  check_placed(grad_lse, "grad_lse", x, 1);
  check_placed(mu, "mu", x, 2);
  check_placed(aux, "aux", x, 2);
  const at::Tensor g = grad_mu.contiguous(), gl = grad_lse.contiguous(), m = mu.contiguous(), a = aux.contiguous();
  TORCH_CHECK(g.sizes() == x.sizes() && m.sizes() == x.sizes(), "stf_backward_cuda: grad_mu and mu must be ",
              x.sizes(), ", got ", g.sizes(), " and ", m.sizes());
  TORCH_CHECK(gl.size(0) == x.size(0), "stf_backward_cuda: grad_lse must be (", x.size(0), ",), got ", gl.sizes());
  TORCH_CHECK(a.size(0) == x.size(0) && a.size(1) == AUX_COLS, "stf_backward_cuda: aux must be (", x.size(0), ", ",
              AUX_COLS, "), got ", a.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), D = x.size(1), n = ref.size(0);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_sigma = at::empty_like(sigma);
  at::Tensor grad_ref = ref_grad ? at::empty_like(ref) : at::empty({0}, ref.options());
  if (B == 0) {
    if (ref_grad) grad_ref.zero_();
    return {grad_x, grad_sigma, grad_ref};
  }
  const Plan plan = make_plan(B, D, n, chunk_size, sm_count(x));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stf_backward_cuda", [&] {
    at::Tensor ws = at::empty({BackwardWorkspace<scalar_t>::size(plan, ref_grad)}, x.options());
    check_status(backward<scalar_t>(plan, g.data_ptr<scalar_t>(), gl.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                    sigma.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(),
                                    ref_sqnorm.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                                    grad_x.data_ptr<scalar_t>(), grad_sigma.data_ptr<scalar_t>(),
                                    ref_grad ? grad_ref.data_ptr<scalar_t>() : nullptr, ws.data_ptr<scalar_t>(),
                                    stream),
                 "stf_backward_cuda");
  });
  return {grad_x, grad_sigma, grad_ref};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cdm_kernels_C, m) {
  m.def("stf_forward_cuda(Tensor x, Tensor sigma, Tensor ref, Tensor ref_sqnorm, int chunk_size) "
        "-> (Tensor mu, Tensor lse, Tensor aux)");
  m.def("stf_backward_cuda(Tensor grad_mu, Tensor grad_lse, Tensor x, Tensor sigma, Tensor ref, "
        "Tensor ref_sqnorm, Tensor mu, Tensor aux, int chunk_size, bool ref_grad) "
        "-> (Tensor grad_x, Tensor grad_sigma, Tensor grad_ref)");
}

TORCH_LIBRARY_IMPL(cdm_kernels_C, CUDA, m) {
  m.impl("stf_forward_cuda", &stf_forward_cuda);
  m.impl("stf_backward_cuda", &stf_backward_cuda);
}

}  // namespace cuda
}  // namespace stf
}  // namespace cdm
