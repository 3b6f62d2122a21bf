// Rollout steps, Philox noise and the martingale loss on the CPU (docs/math.md sections 2 and 3).
//
// Each step reads x and D(x) once (Heun also x_euler and D_euler), draws its noise in the kernel
// (csrc/philox.h, keyed by seed and offset + flat index) and writes x' once. Work is split over
// both cores with at::parallel_for in flat-index ranges; within a range, per row, the coefficients
// come from rollout_math.h once and the element loops run in tiles of kTile: first the Philox
// words and uniforms (explicit AVX-512/AVX2 on x86-64, philox.h's scalar code elsewhere), then
// Box-Muller (philox.h's branch-free log/cos, auto-vectorised), then the multiply-adds (vectorised
// for AVX-512, AVX2 or baseline x86-64, whichever the CPU has), so no tile-sized temporary ever
// leaves the L1 cache.
//
// The ops' schemas are in csrc/ops.cpp, their contract checks in csrc/contract.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "contract.h"
#include "cpu/rollout_cpu.h"
#include "philox.h"
#include "rollout_math.h"

namespace cdm {
namespace rollout {
namespace {

constexpr int64_t kTile = 256;
constexpr int64_t kGrain = 1 << 15;  // elements per parallel task

#if defined(__GNUC__) && defined(__x86_64__)
#define CDM_ROLLOUT_AVX2 1
// GCC 12's AVX-512 intrinsics initialise their "undefined" operand from itself, which
// -Wuninitialized reports inside the header once per call: silenced for the intrinsics only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

// Philox 4x32-10 for 8 consecutive counters at once, with AVX2: the 32 x 32 -> 64-bit products
// as two _mm256_mul_epu32 (even and odd lanes), which GCC's auto-vectoriser does not find (its
// version of philox::philox_2words was several times slower here). Same words as philox.h: the tests
// compare the results with Triton's tl.randn through cdm_kernels.randn. Counters lo .. lo + 7 must
// not wrap past 2^32 (the caller checks), so the high counter word is the same for all 8.
__attribute__((target("avx2"))) void uniforms_avx2(uint32_t lo, uint32_t hi, uint64_t seed, float* u0,
                                                   float* u1) {
  const __m256i A = _mm256_set1_epi32(static_cast<int>(philox::kRoundA));
  const __m256i B = _mm256_set1_epi32(static_cast<int>(philox::kRoundB));
  const __m256i odd_mask = _mm256_set_epi32(-1, 0, -1, 0, -1, 0, -1, 0);
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(hi));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    // (hi, lo) halves of A * c0 and B * c2 in every lane.
    const __m256i p0e = _mm256_mul_epu32(c0, A), p0o = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), A);
    const __m256i p2e = _mm256_mul_epu32(c2, B), p2o = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), B);
    const __m256i hi0 = _mm256_or_si256(_mm256_srli_epi64(p0e, 32), _mm256_and_si256(p0o, odd_mask));
    const __m256i lo0 = _mm256_or_si256(_mm256_andnot_si256(odd_mask, p0e), _mm256_slli_epi64(p0o, 32));
    const __m256i hi2 = _mm256_or_si256(_mm256_srli_epi64(p2e, 32), _mm256_and_si256(p2o, odd_mask));
    const __m256i lo2 = _mm256_or_si256(_mm256_andnot_si256(odd_mask, p2e), _mm256_slli_epi64(p2o, 32));
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi2, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lo2;
    c3 = lo0;
    k0 += philox::kKeyA;
    k1 += philox::kKeyB;
  }
  // philox::uniform: int32 view, negatives folded by ~ (s ^ (s >> 31)), scaled in float32.
  const __m256 scale = _mm256_set1_ps(philox::kUniformScale);
  const __m256i s0 = _mm256_xor_si256(c0, _mm256_srai_epi32(c0, 31));
  const __m256i s1 = _mm256_xor_si256(c1, _mm256_srai_epi32(c1, 31));
  _mm256_storeu_ps(u0, _mm256_mul_ps(_mm256_cvtepi32_ps(s0), scale));
  _mm256_storeu_ps(u1, _mm256_mul_ps(_mm256_cvtepi32_ps(s1), scale));
}

// The same with AVX-512F: 16 counters at once.
__attribute__((target("avx512f"))) void uniforms_avx512(uint32_t lo, uint32_t hi, uint64_t seed, float* u0,
                                                       float* u1) {
  const __m512i A = _mm512_set1_epi32(static_cast<int>(philox::kRoundA));
  const __m512i B = _mm512_set1_epi32(static_cast<int>(philox::kRoundB));
  const __mmask16 odd = 0xAAAA;
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(hi));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m512i p0e = _mm512_mul_epu32(c0, A), p0o = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), A);
    const __m512i p2e = _mm512_mul_epu32(c2, B), p2o = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), B);
    const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p0e, 32), p0o);
    const __m512i lo0 = _mm512_mask_blend_epi32(odd, p0e, _mm512_slli_epi64(p0o, 32));
    const __m512i hi2 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p2e, 32), p2o);
    const __m512i lo2 = _mm512_mask_blend_epi32(odd, p2e, _mm512_slli_epi64(p2o, 32));
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi2, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c1 = lo2;
    c3 = lo0;
    k0 += philox::kKeyA;
    k1 += philox::kKeyB;
  }
  const __m512 scale = _mm512_set1_ps(philox::kUniformScale);
  const __m512i s0 = _mm512_xor_si512(c0, _mm512_srai_epi32(c0, 31));
  const __m512i s1 = _mm512_xor_si512(c1, _mm512_srai_epi32(c1, 31));
  _mm512_storeu_ps(u0, _mm512_mul_ps(_mm512_cvtepi32_ps(s0), scale));
  _mm512_storeu_ps(u1, _mm512_mul_ps(_mm512_cvtepi32_ps(s1), scale));
}

// z = sqrt(r2) * c with vector square roots (correctly rounded, as sqrtf): GCC keeps sqrtf scalar
// because of errno, and that scalar loop cost as much as the whole log/cos loop.
__attribute__((target("avx512f"))) void radius_times_cos_avx512(int64_t n, const float* r2, const float* c, float* z) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(z + i, _mm512_mul_ps(_mm512_sqrt_ps(_mm512_loadu_ps(r2 + i)), _mm512_loadu_ps(c + i)));
  }
  for (; i < n; ++i) z[i] = sqrtf(r2[i]) * c[i];
}

__attribute__((target("avx2"))) void radius_times_cos_avx2(int64_t n, const float* r2, const float* c, float* z) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(z + i, _mm256_mul_ps(_mm256_sqrt_ps(_mm256_loadu_ps(r2 + i)), _mm256_loadu_ps(c + i)));
  }
  for (; i < n; ++i) z[i] = sqrtf(r2[i]) * c[i];
}

#pragma GCC diagnostic pop

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#endif

// Fills z[0..n) with tl.randn(seed, counter0 + i). The Box-Muller loop is compiled for AVX-512,
// AVX2 and baseline x86-64, picked at load time. The AVX-512 clone may contract multiply-adds
// into FMAs, so results can differ by an ulp between CPU types (never in the Philox words).
#if defined(CDM_ROLLOUT_AVX2) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void box_muller_tile(int64_t n, float* u0, float* u1) {
  for (int64_t i = 0; i < n; ++i) {  // vectorised: log and cos are branch-free polynomials
    u0[i] = philox::box_muller_radius_sq(u0[i]);
    u1[i] = philox::box_muller_cos(u1[i]);
  }
}

void philox_tile(uint64_t seed, uint64_t counter0, int64_t n, float* z) {
  float u0[kTile], u1[kTile];
  int64_t i = 0;
#if defined(CDM_ROLLOUT_AVX2)
  const uint64_t lo = counter0 & 0xFFFFFFFFull;
  const bool same_hi = lo + static_cast<uint64_t>(n) <= (1ull << 32);  // high word constant in the tile
  if (same_hi && cpu_has_avx512()) {
    for (; i + 16 <= n; i += 16) {
      uniforms_avx512(static_cast<uint32_t>(lo + i), static_cast<uint32_t>(counter0 >> 32), seed, u0 + i, u1 + i);
    }
  }
  if (same_hi && cpu_has_avx2()) {
    for (; i + 8 <= n; i += 8) {
      uniforms_avx2(static_cast<uint32_t>(lo + i), static_cast<uint32_t>(counter0 >> 32), seed, u0 + i, u1 + i);
    }
  }
#endif
  for (; i < n; ++i) philox::uniforms(seed, counter0 + static_cast<uint64_t>(i), &u0[i], &u1[i]);
  box_muller_tile(n, u0, u1);  // u0 <- -2 log u0, u1 <- cos(2 pi u1)
#if defined(CDM_ROLLOUT_AVX2)
  if (cpu_has_avx512()) return radius_times_cos_avx512(n, u0, u1, z);
  if (cpu_has_avx2()) return radius_times_cos_avx2(n, u0, u1, z);
#endif
  for (int64_t j = 0; j < n; ++j) z[j] = sqrtf(u0[j]) * u1[j];
}

at::Tensor philox_randn_cpu(const at::Tensor& anchor, at::IntArrayRef shape, int64_t seed, int64_t offset) {
  contract::philox("philox_randn (cpu)", seed, offset);
  at::Tensor out = at::empty(shape, anchor.options().dtype(at::kFloat));
  float* p = out.data_ptr<float>();
  at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kTile) {
      const int64_t n = std::min(kTile, end - i);
      philox_tile(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset + i), n, p + i);
    }
  });
  return out;
}

// Always inlined: into each target clone of step_range_simd below, which vectorises it for its ISA.
template <typename T>
__attribute__((always_inline)) inline void step_range(int kind, const T* x, const T* D, const T* xe, const T* De,
                                                      const T* noise, const T* tc, const T* tn, T s_noise,
                                                      uint64_t seed, uint64_t offset, int64_t M, int64_t begin,
                                                      int64_t end, T* out) {
  float z[kTile];
  for (int64_t i = begin; i < end;) {
    const int64_t b = i / M;
    const int64_t row_end = std::min(end, (b + 1) * M);
    const StepCoef<T> c = step_coef<T>(kind, tc[b], tn[b], s_noise);
    for (; i < row_end; i += std::min(kTile, row_end - i)) {
      const int64_t n = std::min(kTile, row_end - i);
      const T* xi = x + i;
      T* oi = out + i;
      if (kind == KIND_EULER) {
        const T* Di = D + i;
        for (int64_t j = 0; j < n; ++j) oi[j] = euler_element<T>(xi[j], Di[j], c);
      } else if (kind == KIND_HEUN) {
        const T *Di = D + i, *xei = xe + i, *Dei = De + i;
        for (int64_t j = 0; j < n; ++j) oi[j] = heun_element<T>(xi[j], Di[j], xei[j], Dei[j], c);
      } else if (noise != nullptr) {
        const T* zi = noise + i;
        if (kind == KIND_SDE) {
          const T* Di = D + i;
          for (int64_t j = 0; j < n; ++j) oi[j] = sde_element<T>(xi[j], Di[j], zi[j], c);
        } else {
          for (int64_t j = 0; j < n; ++j) oi[j] = churn_element<T>(xi[j], zi[j], c);
        }
      } else {
        philox_tile(seed, offset + static_cast<uint64_t>(i), n, z);
        if (kind == KIND_SDE) {
          const T* Di = D + i;
          for (int64_t j = 0; j < n; ++j) oi[j] = sde_element<T>(xi[j], Di[j], static_cast<T>(z[j]), c);
        } else {
          for (int64_t j = 0; j < n; ++j) oi[j] = churn_element<T>(xi[j], static_cast<T>(z[j]), c);
        }
      }
    }
  }
}

// step_range_simd: step_range compiled for AVX-512, AVX2 and baseline x86-64, picked at load
// time. ATen's own element-wise ops use AVX2/AVX-512; with baseline SSE2 loops the Heun step (four
// inputs) was bound by arithmetic, not memory (213 us against a 4-input torch.addcmul's 133 us,
// one thread).
// GCC contracts a * b + c into an FMA wherever the target has one, even in ISO C++ mode: the
// clones turn that off, so every clone rounds each operation of rollout_math.h as float32 torch
// ops do and a step gives the same bits on every x86-64 CPU (tests/test_rollout.py checks it).
#if defined(CDM_ROLLOUT_AVX2) && !defined(__clang__)
#define CDM_ROLLOUT_CLONES \
  __attribute__((target_clones("avx512f", "avx2", "default"), optimize("fp-contract=off")))
#else
#define CDM_ROLLOUT_CLONES
#endif

#define CDM_STEP_RANGE_ARGS(T)                                                                                     \
  int kind, const T *x, const T *D, const T *xe, const T *De, const T *noise, const T *tc, const T *tn, T s_noise, \
      uint64_t seed, uint64_t offset, int64_t M, int64_t begin, int64_t end, T *out
CDM_ROLLOUT_CLONES void step_range_simd(CDM_STEP_RANGE_ARGS(float)) {
  step_range<float>(kind, x, D, xe, De, noise, tc, tn, s_noise, seed, offset, M, begin, end, out);
}
CDM_ROLLOUT_CLONES void step_range_simd(CDM_STEP_RANGE_ARGS(double)) {
  step_range<double>(kind, x, D, xe, De, noise, tc, tn, s_noise, seed, offset, M, begin, end, out);
}
#undef CDM_STEP_RANGE_ARGS

at::Tensor rollout_step_cpu(const at::Tensor& x, const at::Tensor& denoised, const at::Tensor& t_cur,
                            const at::Tensor& t_next, const c10::optional<at::Tensor>& x_euler,
                            const c10::optional<at::Tensor>& denoised_euler, const c10::optional<at::Tensor>& noise,
                            int64_t seed, int64_t offset, c10::string_view kind_name, double s_noise) {
  const int kind = contract::rollout_step("rollout_step (cpu)", x, denoised, t_cur, t_next, x_euler, denoised_euler,
                                          noise, seed, offset, kind_name);
  const int64_t B = x.size(0), M = x.size(1);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rollout_step_cpu", [&] {
    const scalar_t* xe = kind == KIND_HEUN ? x_euler->data_ptr<scalar_t>() : nullptr;
    const scalar_t* De = kind == KIND_HEUN ? denoised_euler->data_ptr<scalar_t>() : nullptr;
    const scalar_t* z = noise.has_value() ? noise->data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* Dp = denoised.data_ptr<scalar_t>();
    const scalar_t* tc = t_cur.data_ptr<scalar_t>();
    const scalar_t* tn = t_next.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * M, kGrain, [&](int64_t begin, int64_t end) {
      step_range_simd(static_cast<int>(kind), xp, Dp, xe, De, z, tc, tn, static_cast<scalar_t>(s_noise),
                      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), M, begin, end, op);
    });
  });
  return out;
}

// Runs f(i, w_i) over all flat indices, in parallel, with w_i the weight of element i.
template <typename T, typename F>
void for_each_weighted(const at::Tensor& D0, const at::Tensor& weight, F f) {
  const int64_t M = D0.size(1), N = D0.numel();
  const T* w = weight.data_ptr<T>();
  const bool per_row = weight.dim() == 1;
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / M, row_end = std::min(end, (b + 1) * M);
      if (per_row) {
        const T wb = w[b];
        for (int64_t j = i; j < row_end; ++j) f(j, wb);
      } else {
        for (int64_t j = i; j < row_end; ++j) f(j, w[j]);
      }
      i = row_end;
    }
  });
}

at::Tensor martingale_loss_cpu(const at::Tensor& D0, const at::Tensor& D1a, const at::Tensor& D1b,
                               const at::Tensor& y, const at::Tensor& weight, double lambda_m) {
  contract::martingale("martingale_loss (cpu)", D0, {&D1a, &D1b, &y}, weight);
  at::Tensor out = at::empty_like(D0);
  AT_DISPATCH_FLOATING_TYPES(D0.scalar_type(), "martingale_loss_cpu", [&] {
    const scalar_t *d0 = D0.data_ptr<scalar_t>(), *da = D1a.data_ptr<scalar_t>(), *db = D1b.data_ptr<scalar_t>(),
                   *yp = y.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t lm = static_cast<scalar_t>(lambda_m);
    for_each_weighted<scalar_t>(D0, weight, [&](int64_t j, scalar_t w) {
      op[j] = martingale_loss<scalar_t>(d0[j], da[j], db[j], yp[j], w, lm);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> martingale_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& D0, const at::Tensor& D1a, const at::Tensor& D1b, const at::Tensor& y,
    const at::Tensor& weight, double lambda_m) {
  contract::martingale("martingale_loss_backward (cpu)", D0, {&grad, &D1a, &D1b, &y}, weight);
  at::Tensor g0 = at::empty_like(D0), ga = at::empty_like(D0), gb = at::empty_like(D0);
  AT_DISPATCH_FLOATING_TYPES(D0.scalar_type(), "martingale_loss_backward_cpu", [&] {
    const scalar_t *g = grad.data_ptr<scalar_t>(), *d0 = D0.data_ptr<scalar_t>(), *da = D1a.data_ptr<scalar_t>(),
                   *db = D1b.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    scalar_t *p0 = g0.data_ptr<scalar_t>(), *pa = ga.data_ptr<scalar_t>(), *pb = gb.data_ptr<scalar_t>();
    const scalar_t lm = static_cast<scalar_t>(lambda_m);
    for_each_weighted<scalar_t>(D0, weight, [&](int64_t j, scalar_t w) {
      martingale_grads<scalar_t>(g[j], d0[j], da[j], db[j], yp[j], w, lm, &p0[j], &pa[j], &pb[j]);
    });
  });
  return {g0, ga, gb};
}

}  // namespace

bool levels_valid(const at::Tensor& t_cur, const c10::optional<at::Tensor>& t_next, bool next_positive) {
  const bool with_next = t_next.has_value();
  TORCH_CHECK(t_cur.device().is_cpu() && t_cur.dim() == 1 &&
                  (!with_next || (t_next->device().is_cpu() && t_next->sizes() == t_cur.sizes() &&
                                  t_next->scalar_type() == t_cur.scalar_type())),
              "levels_valid: t_cur and t_next must be 1-D CPU tensors of one shape and dtype");
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(t_cur.scalar_type(), "levels_valid", [&] {
    const auto tc = t_cur.accessor<scalar_t, 1>();
    const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
    for (int64_t b = 0; b < tc.size(0); ++b) ok &= tc[b] > 0 && tc[b] < inf;  // false for NaN
    if (with_next) {
      const auto tn = t_next->accessor<scalar_t, 1>();
      for (int64_t b = 0; b < tn.size(0); ++b) {
        ok &= (next_positive ? tn[b] > 0 : tn[b] >= 0) && tn[b] <= tc[b];  // <= t_cur < inf: finite
      }
    }
  });
  return ok;
}

}  // namespace rollout
}  // namespace cdm

TORCH_LIBRARY_IMPL(cdm_kernels_C, CPU, m) {
  m.impl("philox_randn", &cdm::rollout::philox_randn_cpu);
  m.impl("rollout_step", &cdm::rollout::rollout_step_cpu);
  m.impl("martingale_loss_forward", &cdm::rollout::martingale_loss_cpu);
  m.impl("martingale_loss_backward", &cdm::rollout::martingale_loss_backward_cpu);
}
