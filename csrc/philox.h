// Philox 4x32-10 (Salmon et al., SC 2011) and the Box-Muller normal of Triton's tl.randn.
//
// Element i of a noise tensor is a pure function of (seed, counter = offset + i), so a fused
// kernel can draw its noise anywhere in any order, and the same numbers are reproduced by
// `cdm_kernels.randn` and by `tl.randn(seed, offset + i)` in a Triton kernel. The construction
// copies triton/language/random.py (randint4x -> philox -> uint_to_uniform_float ->
// pair_uniform_to_normal) word for word:
//   counter (c0, c1, c2, c3) = (lo32(counter), hi32(counter), 0, 0), key (k0, k1) = (lo32(seed), hi32(seed))
//   10 rounds; outputs c0, c1 -> two uniforms -> z = sqrt(-2 log max(u0, 1e-7)) cos(2 pi u1).
// The integer part is bit exact on every platform; log and cos are each platform's float32 ones.
// Includes nothing from torch or the CUDA runtime.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace cdm {
namespace philox {

constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kKeyB = 0xBB67AE85u;  // sqrt(3) - 1
// Triton's scale: the largest float with (2^31 - 1) * scale < 1, so u is in [0, 1).
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;  // keeps log(u0) finite

CDM_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The first two output words of Philox4x32-10 for counter (lo, hi, 0, 0) and key (k0, k1): the
// only words tl.randn uses.
CDM_HD void philox_2words(uint32_t lo, uint32_t hi, uint32_t k0, uint32_t k1, uint32_t* r0,
                                 uint32_t* r1) {
  uint32_t c0 = lo, c1 = hi, c2 = 0u, c3 = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t p0_lo = kRoundA * c0, p0_hi = mulhi(kRoundA, c0);
    const uint32_t p2_lo = kRoundB * c2, p2_hi = mulhi(kRoundB, c2);
    c0 = p2_hi ^ c1 ^ k0;
    c2 = p0_hi ^ c3 ^ k1;
    c1 = p2_lo;
    c3 = p0_lo;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  *r0 = c0;
  *r1 = c1;
}

// uint32 -> [0, 1) as Triton: reinterpret as int32, fold negatives with ~, scale in float32.
CDM_HD float uniform(uint32_t r) {
  int32_t s = static_cast<int32_t>(r);
  s = s < 0 ? ~s : s;
  return static_cast<float>(s) * kUniformScale;
}

// float32 log and cos written without branches or table look-ups, so CPU loops vectorise them
// (glibc's logf/cosf are scalar calls and cost 3x the Philox rounds). Cephes' minimax polynomials:
// both are within 1-2 float32 ulps of the exact value on the arguments used here (u0 in
// [1e-7, 1), theta in [0, 2 pi)), checked against float64 in tests/test_random.py.
// log(v) for normal positive v.
CDM_HD float log_poly(float v) {
  const uint32_t bits = float_bits(v);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126);
  const float m = bits_float((bits & 0x007fffffu) | 0x3f000000u);  // v = m 2^e, m in [0.5, 1)
  // Below sqrt(1/2) take m' = 2m, e' = e - 1, as arithmetic rather than a branch (vectorises).
  // m < sqrt(1/2) (= 0x3f3504f3 in float) read off the mantissa bits: the sign bit of their
  // difference, pure arithmetic that vectorises (a compare here kept GCC from vectorising).
  const float low = static_cast<float>(static_cast<int32_t>(((bits & 0x007fffffu) - 0x003504f3u) >> 31));
  e -= low;
  const float x = m * (1.0f + low) - 1.0f;  // log(1 + x), x in [-0.29, 0.41]
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y += -2.12194440e-4f * e;  // log 2 split in two: 0.693359375 is exact in 10 bits
  y += -0.5f * z;
  return (x + y) + 0.693359375f * e;
}

// cos(theta) for theta in [0, 2 pi]: quadrant q = rint(theta / (pi/2)), a three-part Cody-Waite
// reduction (q <= 4, so q * kPio2Hi is exact), and the quadrant's sin or cos polynomial.
CDM_HD float cos_poly(float theta) {
  const float q = static_cast<float>(static_cast<int32_t>(theta * 0.63661977236758134308f + 0.5f));  // theta >= 0
  float r = theta - q * 1.5703125f;
  r = r - q * 4.837512969970703125e-4f;
  r = r - q * 7.54978995489188216e-8f;  // r in [-pi/4, pi/4]
  const float z = r * r;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                  0.5f * z + 1.0f;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  // cos(r + q pi/2) = cos r, -sin r, -cos r, sin r for q mod 4 = 0..3: select and sign by bit masks.
  const uint32_t quadrant = static_cast<uint32_t>(static_cast<int32_t>(q));
  const uint32_t odd = 0u - (quadrant & 1u);
  const uint32_t sign = ((quadrant + 1u) & 2u) << 30;
  return bits_float(((float_bits(s) & odd) | (float_bits(c) & ~odd)) ^ sign);
}

// Box-Muller, z = sqrt(-2 log max(u0, 1e-7)) cos(2 pi u1), in three parts so that CPU loops can
// vectorise the first two (sqrtf with errno semantics stops GCC's vectoriser) and take the sqrt in
// a short scalar loop. box_muller() composes them: the same operations, the same bits.
CDM_HD float box_muller_radius_sq(float u0) {
  // max(u0, 1e-7) on the bit patterns (u0 >= 0, so they order as the floats do): an all-ones mask
  // from the sign of the difference. A float compare here stops GCC's vectoriser (trapping math).
  const uint32_t b = float_bits(u0), k = float_bits(kMinUniform);
  const uint32_t below = static_cast<uint32_t>(static_cast<int32_t>(b - k) >> 31);
  return -2.0f * log_poly(bits_float((b & ~below) | (k & below)));
}

CDM_HD float box_muller_cos(float u1) { return cos_poly(kTwoPi * u1); }

CDM_HD float box_muller(float u0, float u1) {
  return sqrtf(box_muller_radius_sq(u0)) * box_muller_cos(u1);
}

// The two uniforms of one element; split from box_muller so CPU loops can vectorise this part.
CDM_HD void uniforms(uint64_t seed, uint64_t counter, float* u0, float* u1) {
  uint32_t r0, r1;
  philox_2words(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), &r0, &r1);
  *u0 = uniform(r0);
  *u1 = uniform(r1);
}

// tl.randn(seed, counter) for one element.
CDM_HD float randn(uint64_t seed, uint64_t counter) {
  float u0, u1;
  uniforms(seed, counter, &u0, &u1);
  return box_muller(u0, u1);
}

}  // namespace philox
}  // namespace cdm
