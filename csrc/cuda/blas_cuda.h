// One matrix product of the CUDA stable target through cuBLAS with its compute type chosen per call
// (csrc/cuda/blas_cuda.cpp). No CUDA header: the glue that calls it stays toolkit-free.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace cdm {
namespace cuda {

// The arithmetic of one product: exact float32, TF32 tensor cores (for operands the kernels rounded
// to TF32 values), float64, or bfloat16 operands with float32 sums and a float32 result.
enum class GemmMath { kFloat32, kTf32, kFloat64, kBf16 };

// C = A B (accumulate: C += A B) on the current stream of `device`, row-major: C is M x N with
// leading dimension ldc; A is M x K with leading dimension lda, stored transposed (K x M) when
// a_trans; B is K x N with ldb, stored transposed when b_trans. Raises with `op` on a cuBLAS error.
void gemm(const at::Device& device, GemmMath math, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda,
          bool a_trans, const void* B, int64_t ldb, bool b_trans, void* C, int64_t ldc, bool accumulate,
          const char* op);

}  // namespace cuda
}  // namespace cdm
