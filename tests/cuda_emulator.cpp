// Host emulation of the CUDA stable-target kernels (csrc/cuda/stf_kernels.h), for the tests.
//
// forward_run / backward_run are the launch sequences the CUDA glue runs; here their executor runs
// every thread of every per-thread kernel on the host, in ascending or descending thread order (the
// kernels must not depend on the order of their threads: no thread reads what another thread of the
// same launch writes), and does the products with plain loops. Work queued on the two streams runs
// in an order its waits allow, one queued item at a time: each stream as far ahead of the other as
// it can (the main stream first, or the side stream first), or a random choice between the two at
// every step (a seed), so that a missing wait or an early record of the chunk pipeline (ChunkFeed)
// reads a buffer before it is written or overwrites it while it is still read. The workspace is
// filled with NaN before a call, so a read of memory that no kernel wrote shows in the results. Only
// the __global__ wrapper, the launch and cuBLAS itself are not executed. The products accumulate in
// double and round once: the emulation checks the kernels' logic and arithmetic, and a float32 sum
// in plain sequence (worse than any blocked GEMM's) would bury them in its own rounding. Built by
// tests/cuda_emulation.py with the system C++ compiler.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <vector>

#include "cuda/stf_kernels.h"

using namespace cdm::stf::cuda;

namespace {

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "cuda_emulator: %s\n", what);
  std::abort();
}

// The order of the two streams' queued work in flush(): a stream that can run goes first, or a
// random one of the two with a seed >= 1 (xorshift).
struct Order {
  int first;  // MAIN or SIDE
  uint64_t seed;
};

struct HostExec {
  bool reverse;
  Order order;

  // One queued item of a stream: work, the mark of an event (record), or a wait for one.
  struct Item {
    std::function<void()> work;
    int mark = -1, wait = -1;  // event
    int64_t version = 0;       // of the event: its mark, or the mark waited for
  };
  std::deque<Item> queue[2];
  int current = MAIN;
  int64_t recorded[EVENTS] = {};  // marks queued so far, per event
  int64_t reached[EVENTS] = {};   // marks executed so far

  void stream(int s) { current = s; }
  void record(int e) { queue[current].push_back(Item{nullptr, e, -1, ++recorded[e]}); }
  void wait(int e) {
    if (recorded[e] > 0) queue[current].push_back(Item{nullptr, -1, e, recorded[e]});
  }

  template <class F>
  void run(const F& f) {
    const bool rev = reverse;
    queue[current].push_back(Item{[f, rev] {
      if (rev) {
        for (int64_t t = f.threads - 1; t >= 0; --t) f(t);
      } else {
        for (int64_t t = 0; t < f.threads; ++t) f(t);
      }
    }});
  }

  bool ready(int s) const {
    if (queue[s].empty()) return false;
    const Item& it = queue[s].front();
    return it.wait < 0 || reached[it.wait] >= it.version;
  }
  // Runs the queued work, one item at a time, in the order's choice among the streams that can run.
  void flush() {
    uint64_t x = order.seed;
    for (;;) {
      const bool main_ready = ready(MAIN), side_ready = ready(SIDE);
      if (!main_ready && !side_ready) {
        if (queue[MAIN].empty() && queue[SIDE].empty()) return;
        fail("the streams wait for each other, or for a mark that is never queued");
      }
      int s = main_ready ? MAIN : SIDE;
      if (main_ready && side_ready) {
        if (order.seed != 0) {
          x ^= x << 13;
          x ^= x >> 7;
          x ^= x << 17;
          s = static_cast<int>(x >> 63);
        } else {
          s = order.first;
        }
      }
      Item it = std::move(queue[s].front());
      queue[s].pop_front();
      if (it.mark >= 0) reached[it.mark] = it.version;
      if (it.work) it.work();
    }
  }

  // Element i of an operand: T, or bfloat16 bits (A16, B16) widened exactly.
  template <typename T>
  static double element(const T* f, const Bf16* h, int64_t i) {
    return h != nullptr ? double(bf16_value(h[i])) : double(f[i]);
  }

  template <typename T>
  void gemm(const Gemm<T>& g) {
    if ((g.A16 != nullptr) != (g.B16 != nullptr) || (g.A16 != nullptr && g.accumulate)) {
      fail("a bfloat16 product needs both operands bfloat16 and no accumulate");
    }
    if (current != MAIN) fail("a product queued on the side stream");
    queue[MAIN].push_back(Item{[g] { product(g); }});
  }

  template <typename T>
  static void product(const Gemm<T>& g) {
    for (int64_t m = 0; m < g.M; ++m) {
      for (int64_t n = 0; n < g.N; ++n) {
        double s = 0.0;
        for (int64_t k = 0; k < g.K; ++k) {
          const double a = element(g.A, g.A16, g.a_trans ? k * g.lda + m : m * g.lda + k);
          const double b = element(g.B, g.B16, g.b_trans ? n * g.ldb + k : k * g.ldb + n);
          s += a * b;
        }
        T* c = g.C + m * g.ldc + n;
        *c = g.accumulate ? T(double(*c) + s) : T(s);
      }
    }
  }
};

// schedule: 0 one stream (the pipeline off), 1 main first, 2 side first, s >= 3 random with seed s.
Order order_of(int schedule) {
  const uint64_t seed = schedule >= 3 ? static_cast<uint64_t>(schedule) * 0x9E3779B97F4A7C15ull : 0;
  return Order{schedule == 2 ? SIDE : MAIN, seed};
}

// A workspace of `bytes` whose every byte is 0xFF: each float and each double in it reads as NaN.
std::vector<double> nan_workspace(int64_t bytes) {
  std::vector<double> buf(static_cast<size_t>(bytes / 8 + 2));
  std::memset(buf.data(), 0xFF, buf.size() * sizeof(double));
  return buf;
}

template <typename T>
int64_t forward(int64_t B, int64_t D, int64_t n, int64_t chunk, int prec, const T* x, const T* sigma, const T* ref,
                const T* centre, T* mu, T* lse, T* aux, T* dist, int reverse, int schedule) {
  Problem<T> p{B, D, n, chunk < n ? chunk : n, prec, x, sigma, ref, centre};
  p.overlap = schedule != 0 && overlap_applies(p);
  std::vector<double> buf = nan_workspace(ForwardWorkspace<T>::bytes(p));
  Carver cv{reinterpret_cast<char*>(buf.data()), 0};
  HostExec ex{reverse != 0, order_of(schedule)};
  forward_run(ex, p, ForwardWorkspace<T>::carve(cv, p), mu, lse, aux, dist);
  ex.flush();
  return 0;
}

template <typename T>
int64_t backward(int64_t B, int64_t D, int64_t n, int64_t chunk, int prec, const T* grad_mu, const T* grad_lse,
                 const T* x, const T* sigma, const T* ref, const T* centre, const T* mu, const T* aux,
                 const T* dist, T* grad_x, T* grad_sigma, T* grad_ref, int reverse, int schedule) {
  Problem<T> p{B, D, n, chunk < n ? chunk : n, prec, x, sigma, ref, centre};
  p.overlap = schedule != 0 && overlap_applies(p);
  const bool ref_grad = grad_ref != nullptr;
  std::vector<double> buf = nan_workspace(BackwardWorkspace<T>::bytes(p, ref_grad));
  Carver cv{reinterpret_cast<char*>(buf.data()), 0};
  HostExec ex{reverse != 0, order_of(schedule)};
  const BackwardInputs<T> in{grad_mu, grad_lse, mu, aux, dist};
  backward_run(ex, p, in, BackwardWorkspace<T>::carve(cv, p, ref_grad), grad_x, grad_sigma, grad_ref);
  ex.flush();
  return 0;
}

}  // namespace

#define CDM_EMU_EXPORTS(T, SUFFIX)                                                                              \
  extern "C" int64_t cdm_emu_forward_##SUFFIX(int64_t B, int64_t D, int64_t n, int64_t chunk, int prec,        \
                                              const T* x, const T* sigma, const T* ref, const T* centre, T* mu, \
                                              T* lse, T* aux, T* dist, int reverse, int schedule) {             \
    return forward<T>(B, D, n, chunk, prec, x, sigma, ref, centre, mu, lse, aux, dist, reverse, schedule);     \
  }                                                                                                             \
  extern "C" int64_t cdm_emu_backward_##SUFFIX(int64_t B, int64_t D, int64_t n, int64_t chunk, int prec,       \
                                               const T* grad_mu, const T* grad_lse, const T* x, const T* sigma, \
                                               const T* ref, const T* centre, const T* mu, const T* aux,        \
                                               const T* dist, T* grad_x, T* grad_sigma, T* grad_ref,            \
                                               int reverse, int schedule) {                                     \
    return backward<T>(B, D, n, chunk, prec, grad_mu, grad_lse, x, sigma, ref, centre, mu, aux, dist, grad_x,  \
                       grad_sigma, grad_ref, reverse, schedule);                                                \
  }
CDM_EMU_EXPORTS(float, f32)
CDM_EMU_EXPORTS(double, f64)
#undef CDM_EMU_EXPORTS
