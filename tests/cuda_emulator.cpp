// Host execution of the CUDA stable-target kernels (csrc/cuda/stf_kernels.h), for
// tests/test_cuda_emulation.py, which compiles this file with the system C++ compiler and calls it
// through ctypes.
//
// HostExec runs the same launch sequences as csrc/cuda/stf.cu. A per-thread kernel runs every flat
// thread index in turn. A tiled product runs each block as the GPU's barriers allow: all 256 threads
// load the slice, then all multiply, then (after the K loop) all store, each thread with its own
// accumulator registers and the block's one shared tile. Only the __global__ wrappers and the
// <<<...>>> launches of stf.cu are not executed here.
#include <stdint.h>

#include <vector>

#include "cuda/stf_kernels.h"

namespace {

using namespace cdm::stf::cuda;

// The multiprocessor count the plans are made for: it decides the split-K of the products, so the
// tests run both a large GPU (many splits on small problems) and a single-SM one (no splits).
int64_t g_sm_count = 132;

struct HostExec {
  int64_t launches = 0;

  template <class F>
  bool run(const F& f, const char*) {
    ++launches;
    for (int64_t t = 0; t < f.threads; ++t) f(t);
    return true;
  }

  template <typename T>
  bool gemm(const GemmArgs<T>& g, const char*) {
    ++launches;
    std::vector<GemmAcc<T>> acc(GEMM_THREADS);
    GemmSmem<T> smem;
    for (int64_t block = 0; block < gemm_blocks(g); ++block) {
      int64_t m0, n0, k_begin, k_end, split;
      gemm_block_range(g, block, &m0, &n0, &k_begin, &k_end, &split);
      for (int tid = 0; tid < GEMM_THREADS; ++tid) gemm_zero(acc[tid]);
      for (int64_t k0 = k_begin; k0 < k_end; k0 += GEMM_BK) {
        // Poison the tile so a thread reading an element no thread wrote would show as NaN.
        for (int kk = 0; kk < GEMM_BK; ++kk) {
          for (int mm = 0; mm <= GEMM_BM; ++mm) smem.a[kk][mm] = T(0) / T(0);
          for (int nn = 0; nn <= GEMM_BN; ++nn) smem.b[kk][nn] = T(0) / T(0);
        }
        for (int tid = 0; tid < GEMM_THREADS; ++tid) gemm_load(g, smem, tid, m0, n0, k0, k_end);
        for (int tid = 0; tid < GEMM_THREADS; ++tid) gemm_multiply(smem, tid, acc[tid]);
      }
      for (int tid = 0; tid < GEMM_THREADS; ++tid) gemm_store(g, tid, m0, n0, split, acc[tid]);
    }
    return true;
  }
};

template <typename T>
int64_t forward(int64_t B, int64_t D, int64_t n, int64_t chunk, const T* x, const T* sigma, const T* ref,
                const T* ref_sqnorm, T* mu, T* lse, T* aux) {
  const Plan plan = make_plan(B, D, n, chunk, g_sm_count);
  // Poisoned workspace: anything read before it is written turns the result into NaN.
  std::vector<T> ws(ForwardWorkspace<T>::size(plan), T(0) / T(0));
  HostExec ex;
  forward_run<T>(ex, plan, x, sigma, ref, ref_sqnorm, mu, lse, aux, ws.data());
  return ex.launches;
}

template <typename T>
int64_t backward(int64_t B, int64_t D, int64_t n, int64_t chunk, const T* grad_mu, const T* grad_lse, const T* x,
                 const T* sigma, const T* ref, const T* ref_sqnorm, const T* mu, const T* aux, T* grad_x,
                 T* grad_sigma, T* grad_ref) {
  const Plan plan = make_plan(B, D, n, chunk, g_sm_count);
  std::vector<T> ws(BackwardWorkspace<T>::size(plan, grad_ref != nullptr), T(0) / T(0));
  HostExec ex;
  backward_run<T>(ex, plan, grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, grad_x, grad_sigma, grad_ref,
                  ws.data());
  return ex.launches;
}

}  // namespace

extern "C" {

// The plan's parts per row, so a test can choose shapes that exercise several parts.
void cdm_emu_set_sm_count(int64_t sm_count) { g_sm_count = sm_count; }

int64_t cdm_emu_parts(int64_t B, int64_t D, int64_t n, int64_t chunk) { return make_plan(B, D, n, chunk, g_sm_count).P; }

// How many K ranges the logits and the accumulate products of a full chunk are split into.
int64_t cdm_emu_logits_splits(int64_t B, int64_t D, int64_t n, int64_t chunk) {
  const Plan p = make_plan(B, D, n, chunk, g_sm_count);
  return gemm_splits(D, p.k_len_logits);
}

int64_t cdm_emu_accumulate_splits(int64_t B, int64_t D, int64_t n, int64_t chunk) {
  const Plan p = make_plan(B, D, n, chunk, g_sm_count);
  return gemm_splits(p.c, gemm_split_len(gemm_tiles(B, D), p.c, p.sm_count));
}

int64_t cdm_emu_forward_f32(int64_t B, int64_t D, int64_t n, int64_t chunk, const float* x, const float* sigma,
                            const float* ref, const float* ref_sqnorm, float* mu, float* lse, float* aux) {
  return forward<float>(B, D, n, chunk, x, sigma, ref, ref_sqnorm, mu, lse, aux);
}

int64_t cdm_emu_forward_f64(int64_t B, int64_t D, int64_t n, int64_t chunk, const double* x, const double* sigma,
                            const double* ref, const double* ref_sqnorm, double* mu, double* lse, double* aux) {
  return forward<double>(B, D, n, chunk, x, sigma, ref, ref_sqnorm, mu, lse, aux);
}

int64_t cdm_emu_backward_f32(int64_t B, int64_t D, int64_t n, int64_t chunk, const float* grad_mu,
                             const float* grad_lse, const float* x, const float* sigma, const float* ref,
                             const float* ref_sqnorm, const float* mu, const float* aux, float* grad_x,
                             float* grad_sigma, float* grad_ref) {
  return backward<float>(B, D, n, chunk, grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, grad_x, grad_sigma,
                         grad_ref);
}

int64_t cdm_emu_backward_f64(int64_t B, int64_t D, int64_t n, int64_t chunk, const double* grad_mu,
                             const double* grad_lse, const double* x, const double* sigma, const double* ref,
                             const double* ref_sqnorm, const double* mu, const double* aux, double* grad_x,
                             double* grad_sigma, double* grad_ref) {
  return backward<double>(B, D, n, chunk, grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, grad_x,
                          grad_sigma, grad_ref);
}

}  // extern "C"
