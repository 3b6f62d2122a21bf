// The stable target's products through cuBLAS with a compute type per call: CUBLAS_COMPUTE_32F under
// the default math mode (exact float32, whatever torch's TF32 setting), CUBLAS_COMPUTE_32F_FAST_TF32,
// CUBLAS_COMPUTE_64F, and bfloat16 operands with CUBLAS_COMPUTE_32F. The handle is ATen's for this
// thread and device (its stream and workspace set by ATen); its math mode, which ATen sets from the
// user's TF32 setting, is set for the call and restored. The only file of the glue that sees cuBLAS.
#include "cuda/blas_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/core/DeviceGuard.h>
#include <cublas_v2.h>

#include <limits>

namespace cdm {
namespace cuda {
namespace {

void check(cublasStatus_t status, const char* what, const char* op) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, op, ": cuBLAS ", what, " failed: ", cublasGetStatusString(status));
}

int as_int(int64_t v, const char* name, const char* op) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), op, ": internal error: product ", name, " = ", v,
              " does not fit cuBLAS's 32-bit sizes");
  return static_cast<int>(v);
}

// The handle's math mode for one call, restored when the call ends (also when it throws).
class HandleMath {
 public:
  HandleMath(cublasHandle_t h, cublasMath_t mode, const char* op) : h_(h) {
    check(cublasGetMathMode(h_, &old_), "cublasGetMathMode", op);
    check(cublasSetMathMode(h_, mode), "cublasSetMathMode", op);
  }
  ~HandleMath() { cublasSetMathMode(h_, old_); }
  HandleMath(const HandleMath&) = delete;
  HandleMath& operator=(const HandleMath&) = delete;

 private:
  cublasHandle_t h_;
  cublasMath_t old_ = CUBLAS_DEFAULT_MATH;
};

}  // namespace

void gemm(const at::Device& device, GemmMath math, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda,
          bool a_trans, const void* B, int64_t ldb, bool b_trans, void* C, int64_t ldc, bool accumulate,
          const char* op) {
  if (M == 0 || N == 0) return;
  const c10::DeviceGuard guard(device);
  cublasHandle_t h = at::cuda::getCurrentCUDABlasHandle();
  const HandleMath mode(h, CUBLAS_DEFAULT_MATH, op);
  // Row-major C = A B is column-major C' = B' A': cuBLAS's first operand is B, its second A.
  const cublasOperation_t op_b = b_trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_a = a_trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int m = as_int(N, "N", op), n = as_int(M, "M", op), k = as_int(K, "K", op);
  const int ld_b = as_int(ldb, "ldb", op), ld_a = as_int(lda, "lda", op), ld_c = as_int(ldc, "ldc", op);
  if (math == GemmMath::kFloat64) {
    const double alpha = 1.0, beta = accumulate ? 1.0 : 0.0;
    check(cublasGemmEx(h, op_b, op_a, m, n, k, &alpha, B, CUDA_R_64F, ld_b, A, CUDA_R_64F, ld_a, &beta, C, CUDA_R_64F,
                       ld_c, CUBLAS_COMPUTE_64F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx (float64)", op);
    return;
  }
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const cudaDataType_t in = math == GemmMath::kBf16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasComputeType_t compute = math == GemmMath::kTf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  check(cublasGemmEx(h, op_b, op_a, m, n, k, &alpha, B, in, ld_b, A, in, ld_a, &beta, C, CUDA_R_32F, ld_c, compute,
                     CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx", op);
}

}  // namespace cuda
}  // namespace cdm
