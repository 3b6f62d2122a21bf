// Launch functions of the CUDA rollout kernels (csrc/cuda/rollout.cu), for the torch glue
// (csrc/cuda/rollout_cuda.cpp); the convention is csrc/cuda/launch.h's.
#pragma once

#include <cstdint>

namespace cdm {
namespace rollout {
namespace cuda {

const char* launch_philox_randn(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);

// Words of the level status (cdm_kernels/level_status.py): source, sample, two levels' bits; the
// source the rollout step records (level_status.py, ROLLOUT_STEP).
constexpr int64_t kStatusWords = 4;
constexpr int64_t kSourceRolloutStep = 1;

// status (device, may be null): the first sample with invalid levels is recorded there; status_host
// (pinned, may be null): the word is copied there after the kernel, on the same stream.
template <typename T>
const char* launch_rollout_step(const T* x, const T* D, const T* xe, const T* De, const T* noise, const T* t_cur,
                                const T* t_next, T s_noise, uint64_t seed, uint64_t offset, int64_t B, int64_t M,
                                int kind, T* out, int64_t* status, int64_t* status_host, void* stream);

// a, b (B,), b may be null: out = a with NaN where a sample's levels are not valid, the lowest such
// sample recorded in status for `source`; the word is then copied to status_host (see above).
template <typename T>
const char* launch_check_levels(const T* a, const T* b, int64_t B, int64_t source, T* out, int64_t* status,
                                int64_t* status_host, void* stream);

// grad null: the loss into out; else the three gradients into out, ga, gb.
template <typename T>
const char* launch_martingale(const T* grad, const T* D0, const T* D1a, const T* D1b, const T* y, const T* w,
                              bool per_row, T lambda_m, int64_t B, int64_t M, T* out, T* ga, T* gb, void* stream);

}  // namespace cuda
}  // namespace rollout
}  // namespace cdm
