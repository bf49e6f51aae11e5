// Runs the CUDA rsvd kernels' per-block code (csrc/rsvd/rsvd_block.cuh) on the CPU, so its
// numerical logic can be tested without a GPU (tests/test_rsvd_cuda_logic.py builds and drives
// this program). Each of a block's 256 threads is a cooperative fiber (ucontext) run in turn
// until it reaches a barrier; __syncthreads, __syncthreads_or, __syncwarp and __shfl_xor_sync
// are emulated with their CUDA semantics: a barrier that not every thread of its block (or
// warp) reaches, or one reached after some thread has finished, aborts as a deadlock would hang.
// What this cannot show: speed, memory coalescing, bank conflicts, races that the emulated
// schedule happens to order (fibers run one at a time, in thread order), device math libraries.
//
// Usage: rsvd_block_emulator IN OUT. IN holds nine int64 (path: 0 fused, 1 large; dtype: 0
// float32, 1 float64; batch, m, n, k, oversample, n_iter, seed) then A (batch, m, n) row-major;
// OUT receives U (batch, m, k), S (batch, k), V (batch, n, k) in that dtype. The large path's
// matrix products (cuBLAS through ATen on the GPU) are plain loops here; its QRs and the tail
// run through the emulated blocks, as the kernels do.
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <vector>

#include "common/philox.h"
#include "rsvd/rsvd_block.cuh"

namespace blk = lsef::rsvd::block;

namespace {

constexpr int N = blk::kThreads;
constexpr size_t kStack = 256 * 1024;

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "emulator: %s\n", what);
  std::exit(3);
}

struct Scheduler {
  ucontext_t main_ctx;
  ucontext_t fiber[N];
  std::vector<char> stacks = std::vector<char>(kStack * N);
  bool done[N];
  int finished = 0;
  int current = 0;
  long long progress = 0;
  // block barrier
  int arrived = 0;
  unsigned long long gen = 0;
  bool or_acc = false, or_result = false;
  // warp barriers and shuffle exchange
  int warp_arrived[N / 32] = {};
  unsigned long long warp_gen[N / 32] = {};
  double xd[N / 32][32];
  long long xi[N / 32][32];
  std::function<void(int)> body;

  void yield() { swapcontext(&fiber[current], &main_ctx); }

  void block_barrier(bool v) {
    if (finished > 0) die("__syncthreads after a thread of the block has returned");
    const unsigned long long g = gen;
    or_acc |= v;
    ++progress;
    if (++arrived == N) {
      arrived = 0;
      or_result = or_acc;
      or_acc = false;
      ++gen;
    } else {
      while (gen == g) yield();
    }
  }

  void warp_barrier(int w) {
    const unsigned long long g = warp_gen[w];
    ++progress;
    if (++warp_arrived[w] == 32) {
      warp_arrived[w] = 0;
      ++warp_gen[w];
    } else {
      while (warp_gen[w] == g) yield();
    }
  }

  static void trampoline(int tid);

  // Runs body(tid) for every thread of one block to completion.
  void run(std::function<void(int)> f) {
    body = std::move(f);
    finished = 0;
    arrived = 0;
    for (int t = 0; t < N; ++t) {
      done[t] = false;
      getcontext(&fiber[t]);
      fiber[t].uc_stack.ss_sp = stacks.data() + kStack * t;
      fiber[t].uc_stack.ss_size = kStack;
      fiber[t].uc_link = &main_ctx;
      makecontext(&fiber[t], reinterpret_cast<void (*)()>(&Scheduler::trampoline), 1, t);
    }
    while (finished < N) {
      const long long before = progress;
      for (int t = 0; t < N; ++t) {
        if (done[t]) continue;
        current = t;
        swapcontext(&main_ctx, &fiber[t]);
      }
      if (progress == before && finished < N)
        die("deadlock: threads wait at a barrier others never reach");
    }
  }
};

Scheduler S;

void Scheduler::trampoline(int tid) {
  S.body(tid);
  S.done[tid] = true;
  ++S.finished;
  ++S.progress;
}

struct EmuCtx {
  int tid, lane, warp;
  explicit EmuCtx(int t) : tid(t), lane(t % 32), warp(t / 32) {}
  void sync() { S.block_barrier(false); }
  bool sync_or(bool v) {
    S.block_barrier(v);
    return S.or_result;
  }
  void syncwarp() { S.warp_barrier(warp); }
  float shfl_xor(float v, int m) { return static_cast<float>(shfl_xor(static_cast<double>(v), m)); }
  double shfl_xor(double v, int m) {
    S.xd[warp][lane] = v;
    syncwarp();
    const double r = S.xd[warp][lane ^ m];
    syncwarp();
    return r;
  }
  int shfl_xor(int v, int m) {
    S.xi[warp][lane] = v;
    syncwarp();
    const int r = static_cast<int>(S.xi[warp][lane ^ m]);
    syncwarp();
    return r;
  }
};

// The poison every arena starts with: results must never depend on what was there.
template <typename A>
void poison(std::vector<A>& v) {
  std::fill(v.begin(), v.end(), static_cast<A>(1e30));
}

template <typename A>
std::vector<A> omega_transposed(int64_t q, int64_t l, int64_t seed) {
  std::vector<A> o(l * q);
  for (int64_t j = 0; j < q; ++j)
    for (int64_t c = 0; c < l; ++c)
      o[c * q + j] = static_cast<A>(lsef::philox::normal(j * l + c, static_cast<uint64_t>(seed)));
  return o;
}

// The large path for one matrix: products as plain loops, QRs and the tail in emulated blocks.
template <typename A>
void large_matrix(const blk::Wide<A>& W, int l, int k, int n_iter, const A* omega_t,
                  const blk::Out<A>& out, bool wide) {
  const int p = W.p;
  const int64_t q = W.q;
  bool bad = false;
  A amax = 0;
  for (int i = 0; i < p; ++i)
    for (int64_t j = 0; j < q; ++j) {
      bad |= !blk::finite(W(i, j));
      amax = std::max(amax, std::abs(W(i, j)));
    }
  // Zeros for a non-finite matrix, and the power-of-two scaling, as the kernels' caller does.
  const int shift = bad ? 0 : lsef::rsvd::rescale_shift(amax);
  const A scale = lsef::rsvd::pow2(shift, A(0));
  std::vector<A> Wc(p * q);
  for (int i = 0; i < p; ++i)
    for (int64_t j = 0; j < q; ++j) Wc[i * q + j] = bad ? A(0) : W(i, j) * scale;
  auto w = [&](int64_t i, int64_t j) { return Wc[i * q + j]; };
  const blk::TailLayout T = blk::tail_layout(p, q, l, k, 2 * int64_t{l});
  std::vector<A> arena(T.total), Z(q * l), Q, Qz(q * l);
  poison(arena);
  auto orth = [&](std::vector<A>& Y, int64_t rows, std::vector<A>& Qout) {
    Qout.assign(rows * l, A(7));
    S.run([&](int tid) {
      EmuCtx ctx(tid);
      blk::orthonormalize(ctx, Y.data(), rows, l, Qout.data(), arena.data(), arena.data() + l);
    });
  };
  const bool exact = omega_t == nullptr;
  if (exact) {
    for (int i = 0; i < p; ++i)
      for (int64_t j = 0; j < q; ++j) Z[i * q + j] = w(i, j);
  } else {
    std::vector<A> Y(p * l), Yz(q * l);
    auto W_times = [&](const std::vector<A>& X) {  // W (p x q) X (q x l)
      for (int c = 0; c < l; ++c)
        for (int i = 0; i < p; ++i) {
          A s = 0;
          for (int64_t j = 0; j < q; ++j) s += w(i, j) * X[c * q + j];
          Y[c * p + i] = s;
        }
    };
    auto Wt_times = [&](const std::vector<A>& X, std::vector<A>& R) {  // W^T (q x p) X (p x l)
      for (int c = 0; c < l; ++c)
        for (int64_t j = 0; j < q; ++j) {
          A s = 0;
          for (int i = 0; i < p; ++i) s += w(i, j) * X[c * p + i];
          R[c * q + j] = s;
        }
    };
    std::vector<A> Om(omega_t, omega_t + l * q);  // Omega column-major q x l = Omega^T row-major
    W_times(Om);
    orth(Y, p, Q);
    for (int it = 0; it < n_iter; ++it) {
      Wt_times(Q, Yz);
      orth(Yz, q, Qz);
      W_times(Qz);
      orth(Y, p, Q);
    }
    Wt_times(Q, Z);
  }
  S.run([&](int tid) {
    EmuCtx ctx(tid);
    if (bad) return blk::write_nan<EmuCtx, A, A>(ctx, out, k);
    blk::tail(ctx, Z.data(), q, exact ? p : l, exact ? static_cast<const A*>(nullptr) : Q.data(), p,
              k, arena.data(), T, out, wide, lsef::rsvd::pow2(-shift, A(0)));
  });
}

template <typename A>
int run(const std::vector<int64_t>& h, std::ifstream& in, const char* out_path) {
  const int64_t path = h[0], batch = h[2], m = h[3], n = h[4], k = h[5], oversample = h[6],
                n_iter = h[7], seed = h[8];
  const int64_t p = std::min(m, n), q = std::max(m, n), l = std::min(k + oversample, p);
  const bool exact = l == p, wide = m <= n;
  std::vector<A> Ain(batch * m * n), U(batch * m * k, A(-7)), Sv(batch * k, A(-7)),
      V(batch * n * k, A(-7));
  in.read(reinterpret_cast<char*>(Ain.data()), Ain.size() * sizeof(A));
  if (!in) die("short input");
  const std::vector<A> om = exact ? std::vector<A>() : omega_transposed<A>(q, l, seed);
  const A* omega_t = exact ? nullptr : om.data();
  if (path == 0 && p > blk::kFusedMaxSide) die("the fused path takes short sides <= 64");
  const blk::FusedLayout F = blk::fused_layout(p, q, l, k, exact);
  std::vector<A> arena(F.total);
  for (int64_t b = 0; b < batch; ++b) {
    const A* a = Ain.data() + b * m * n;
    const blk::Wide<A> W{a, wide ? n : 1, wide ? 1 : n, static_cast<int>(p), q};
    const auto out = blk::Out<A>::at(U.data(), Sv.data(), V.data(), b, m, n, k);
    if (path == 0) {
      poison(arena);
      S.run([&](int tid) {
        EmuCtx ctx(tid);
        blk::fused_matrix<EmuCtx, A, A>(ctx, W, static_cast<int>(l), static_cast<int>(k),
                                        static_cast<int>(n_iter), omega_t, arena.data(), F, out,
                                        wide);
      });
    } else {
      large_matrix<A>(W, static_cast<int>(l), static_cast<int>(k), static_cast<int>(n_iter),
                      omega_t, out, wide);
    }
  }
  std::ofstream o(out_path, std::ios::binary);
  for (auto* v : {&U, &Sv, &V})
    o.write(reinterpret_cast<const char*>(v->data()), v->size() * sizeof(A));
  return o ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) die("usage: rsvd_block_emulator IN OUT");
  std::ifstream in(argv[1], std::ios::binary);
  std::vector<int64_t> h(9);
  in.read(reinterpret_cast<char*>(h.data()), 9 * sizeof(int64_t));
  if (!in) die("short header");
  return h[1] == 0 ? run<float>(h, in, argv[2]) : run<double>(h, in, argv[2]);
}
