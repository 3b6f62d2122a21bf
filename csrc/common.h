// What every kernel file of cdm_kernels shares: the host/device function macro and the enums that
// cross the boundary between Python, the torch glue and the kernels. Includes nothing from torch or
// the CUDA runtime, so the CPU kernels, the .cu files and the host emulation of the CUDA kernels
// (tests/cuda_emulator.cpp) all include it.
#pragma once

#include <cstdint>
#include <cstring>

// Functions the CPU kernels and the CUDA kernels both execute.
#if defined(__CUDACC__)
#define CDM_HD __host__ __device__ __forceinline__
#else
#define CDM_HD inline
#endif

namespace cdm {

// Columns of the stable target's per-row auxiliary output aux (B, AUX_COLS), in the order of
// cdm_kernels/contract.py: the state's level m (the smallest reduced distance), log l, the weighted
// mean squared distance d_bar, the effective number of references, the largest weight, and the
// exact smallest squared distance d_min.
enum AuxColumn : int {
  AUX_M = 0,
  AUX_LOGL = 1,
  AUX_DBAR = 2,
  AUX_NEFF = 3,
  AUX_WMAX = 4,
  AUX_DMIN = 5,
  AUX_COLS = 6
};

// Precision modes of the stable target's products, in the order of cdm_kernels.registry.PRECISIONS.
enum Precision : int { PREC_IEEE = 0, PREC_TF32X3 = 1, PREC_TF32 = 2, PREC_BF16 = 3, PREC_COUNT = 4 };

// Kinds of rollout step, in the order of cdm_kernels.contract.KINDS.
enum StepKind : int { KIND_SDE = 0, KIND_EULER = 1, KIND_HEUN = 2, KIND_CHURN = 3, KIND_COUNT = 4 };

// The bits of a float and back (memcpy: the one well-defined type pun, also in device code).
CDM_HD uint32_t float_bits(float f) {
  uint32_t b;
  memcpy(&b, &f, sizeof b);
  return b;
}

CDM_HD float bits_float(uint32_t b) {
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
}

// The enum value of a name passed from Python, or -1 for an unknown one (the glue turns that into
// an error naming the argument).
inline int precision_code(const char* name) {
  static const char* const names[PREC_COUNT] = {"ieee", "tf32x3", "tf32", "bf16"};
  for (int i = 0; i < PREC_COUNT; ++i)
    if (std::strcmp(name, names[i]) == 0) return i;
  return -1;
}

inline int step_kind_code(const char* name) {
  static const char* const names[KIND_COUNT] = {"sde", "euler", "heun", "churn"};
  for (int i = 0; i < KIND_COUNT; ++i)
    if (std::strcmp(name, names[i]) == 0) return i;
  return -1;
}

}  // namespace cdm
