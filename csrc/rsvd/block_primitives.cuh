// Block primitives for the CUDA rsvd (docs/DESIGN.md §10): warp reductions, Householder QR and
// its Q, orthonormalisation, a small matmul, one-sided Jacobi and orthonormal completion, each
// the block-parallel form of the one-matrix routine of the same name in dense.h (same
// reflectors, same rotations, same stopping rules). rsvd_block.cuh builds the rsvd paths on them.
//
// Every routine is written once against a thread context `Ctx` that provides
//   tid, lane, warp                 this thread's index in the block, in its warp, its warp
//   sync()                          __syncthreads()
//   sync_or(bool)                   __syncthreads_or()
//   syncwarp()                      __syncwarp()
//   shfl_xor(v, mask)               __shfl_xor_sync(0xffffffff, v, mask), float/double/int
// The CUDA kernels (rsvd_cuda.cu) pass a context over threadIdx; the CPU test harness
// (tests/rsvd_block_emulator.cpp) passes one over cooperative fibers, so the numerical logic of
// the kernels is exercised against the CPU kernel and lsef_ref without a GPU.
//
// Blocks have kThreads threads. Matrices are column-major (column c of an n-row matrix at
// c * n). Work arrays live in a per-block "arena": dynamic shared memory when it fits, else a
// global scratch slice (the code is the same; __syncthreads orders both).
#pragma once

#include <math.h>
#include <stdint.h>

#include <cmath>

#include "common/macros.h"
#include "rsvd/rotation.h"

namespace lsef {
namespace rsvd {
namespace block {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSweeps = 60;  // Jacobi sweeps at most

template <typename A>
struct Eps;
template <>
struct Eps<float> {
  static constexpr float value = 1.1920928955078125e-07f;
};
template <>
struct Eps<double> {
  static constexpr double value = 2.220446049250313e-16;
};

// The range of norms within which sqrt(sum of squares) can be trusted (no square that matters
// underflowed, none overflowed), as dense::squares_are_safe: 2^(+-max_exponent / 3).
template <typename A>
struct SafeRange;
template <>
struct SafeRange<float> {
  static constexpr float lo = 0x1p-42f, hi = 0x1p42f;
};
template <>
struct SafeRange<double> {
  static constexpr double lo = 0x1p-341, hi = 0x1p341;
};

template <typename A>
LSEF_BLOCK_HD A quiet_nan() {
  return static_cast<A>(NAN);
}

// ---- warp reductions (every lane gets the same bits: a + b == b + a) ----------------------

template <class Ctx, typename A>
LSEF_BLOCK_FN A warp_sum(Ctx& ctx, A v) {
  for (int m = 16; m > 0; m >>= 1) v += ctx.shfl_xor(v, m);
  return v;
}

template <class Ctx, typename A>
LSEF_BLOCK_FN A warp_max(Ctx& ctx, A v) {
  for (int m = 16; m > 0; m >>= 1) {
    const A o = ctx.shfl_xor(v, m);
    v = o > v ? o : v;
  }
  return v;
}

// The largest v over the block (NaN ignored), in every thread. slots: kWarps scratch values.
template <class Ctx, typename A>
LSEF_BLOCK_FN A block_max(Ctx& ctx, A v, A* slots) {
  v = warp_max(ctx, v);
  if (ctx.lane == 0) slots[ctx.warp] = v;
  ctx.sync();
  A m = slots[0];
  for (int w = 1; w < kWarps; ++w) m = slots[w] > m ? slots[w] : m;
  ctx.sync();  // the slots may be reused at once
  return m;
}

// The norm of v[0, len) with v[0] read as v0, by one warp (every lane gets the same value):
// scaled by the largest magnitude first, so that no square under- or overflows (for columns
// whose plain norm is outside SafeRange), as dense::scaled_norm.
template <class Ctx, typename A>
LSEF_BLOCK_FN A warp_scaled_norm(Ctx& ctx, const A* v, int64_t len, A v0) {
  using std::fabs;
  using std::sqrt;
  A m = 0;
  for (int64_t i = ctx.lane; i < len; i += 32) {
    const A x = fabs(i == 0 ? v0 : v[i]);
    m = x > m ? x : m;
  }
  m = warp_max(ctx, m);
  A ss = 0;
  if (m != A(0)) {  // m is the same in every lane
    for (int64_t i = ctx.lane; i < len; i += 32) {
      const A x = (i == 0 ? v0 : v[i]) / m;
      ss += x * x;
    }
  }
  const A s = warp_sum(ctx, ss);
  return m == A(0) ? A(0) : m * sqrt(s);
}

// The largest |x| of a warp and its index, the smallest index on ties.
template <class Ctx, typename A>
LSEF_BLOCK_FN void warp_argmax(Ctx& ctx, A& val, int& idx) {
  for (int m = 16; m > 0; m >>= 1) {
    const A v = ctx.shfl_xor(val, m);
    const int i = ctx.shfl_xor(idx, m);
    if (v > val || (v == val && i < idx)) {
      val = v;
      idx = i;
    }
  }
}

// ---- dense building blocks ----------------------------------------------------------------

// w <- (I - 2 v vᵀ / vv) w over len entries, by one warp (every lane returns the same w).
template <class Ctx, typename A>
LSEF_BLOCK_FN void reflect_warp(Ctx& ctx, const A* v, A vv, int64_t len, A* w) {
  A d = 0;
  for (int64_t i = ctx.lane; i < len; i += 32) d += v[i] * w[i];
  const A f = -A(2) * warp_sum(ctx, d) / vv;
  for (int64_t i = ctx.lane; i < len; i += 32) w[i] += f * v[i];
}

// Householder QR of W (n x c, n >= c) in place, as dense::householder: W keeps the reflectors
// v_j from the diagonal down, vv[j] = v_j . v_j (0 for a zero column: identity reflector, so Q
// stays orthonormal for rank-deficient W), beta[j] = R_jj. A column whose norm is outside
// SafeRange has its norm taken again with rescaling and its reflector scaled to unit length, as
// on the CPU. Warp 0 forms each reflector; the warps then update the trailing columns, one
// column per warp at a time.
template <class Ctx, typename A>
LSEF_BLOCK_FN void householder(Ctx& ctx, A* W, int64_t n, int c, A* vv, A* beta) {
  using std::sqrt;
  for (int j = 0; j < c; ++j) {
    A* v = W + j * n + j;
    const int64_t len = n - j;
    if (ctx.warp == 0) {
      A ss = 0;
      for (int64_t i = ctx.lane; i < len; i += 32) ss += v[i] * v[i];
      A alpha = sqrt(warp_sum(ctx, ss));
      const bool safe = alpha >= SafeRange<A>::lo && alpha <= SafeRange<A>::hi;
      if (!safe) alpha = warp_scaled_norm(ctx, v, len, v[0]);
      A b = 0, nv = 0;
      if (alpha != A(0)) {
        b = v[0] >= A(0) ? -alpha : alpha;
        const A v0 = v[0] - b;
        if (!safe) {  // v scaled to unit length: nv and the products with v stay normal
          const A norm = warp_scaled_norm(ctx, v, len, v0);
          ctx.syncwarp();  // every lane has read v[0]
          for (int64_t i = ctx.lane; i < len; i += 32) v[i] = (i == 0 ? v0 : v[i]) / norm;
          ctx.syncwarp();
          ss = 0;
          for (int64_t i = ctx.lane; i < len; i += 32) ss += v[i] * v[i];
          nv = warp_sum(ctx, ss);
        } else {
          ss = 0;
          for (int64_t i = ctx.lane; i < len; i += 32) {
            const A x = i == 0 ? v0 : v[i];
            ss += x * x;
          }
          nv = warp_sum(ctx, ss);
          ctx.syncwarp();  // every lane has read v[0]
          if (ctx.lane == 0) v[0] = v0;
        }
      }
      if (ctx.lane == 0) {
        vv[j] = nv;
        beta[j] = b;
      }
    }
    ctx.sync();
    const A vvj = vv[j];
    if (vvj != A(0)) {
      for (int col = j + 1 + ctx.warp; col < c; col += kWarps)
        reflect_warp(ctx, v, vvj, len, W + col * n + j);
    }
    ctx.sync();
  }
}

// C (n x r) = H_0 ... H_{c-1} [diag(scale) X; 0] for the reflectors householder() left in W, X
// (c x r, leading dimension ldx; the identity when X is null), scale optional (null: 1). As
// dense::apply_q; a sign in scale commutes exactly with the reflectors.
template <class Ctx, typename A>
LSEF_BLOCK_FN void apply_q(Ctx& ctx, const A* W, const A* vv, int64_t n, int c, const A* X, int ldx,
                           int r, const A* scale, A* C) {
  for (int64_t e = ctx.tid; e < n * r; e += kThreads) {
    const int64_t col = e / n, i = e % n;
    A x = 0;
    if (i < c) x = X == nullptr ? A(i == col ? 1 : 0) : X[col * ldx + i];
    C[e] = scale == nullptr ? x : scale[col] * x;
  }
  ctx.sync();
  for (int j = c - 1; j >= 0; --j) {
    const A vvj = vv[j];
    if (vvj == A(0)) continue;
    const A* v = W + j * n + j;
    const int64_t len = n - j;
    for (int col = ctx.warp; col < r; col += kWarps)
      reflect_warp(ctx, v, vvj, len, C + col * n + j);
    ctx.sync();
  }
}

// Q (n x c) with orthonormal columns spanning range(Y) (Y destroyed), as dense::orthonormalize.
template <class Ctx, typename A>
LSEF_BLOCK_FN void orthonormalize(Ctx& ctx, A* Y, int64_t n, int c, A* Q, A* vv, A* beta) {
  householder(ctx, Y, n, c, vv, beta);
  apply_q(ctx, Y, vv, n, c, static_cast<const A*>(nullptr), c, c, static_cast<const A*>(nullptr),
          Q);
}

// C (n x r) = A (n x t) B (t x r), one element per thread at a time, summing over t in order.
template <class Ctx, typename A>
LSEF_BLOCK_FN void matmul(Ctx& ctx, const A* X, const A* B, A* C, int64_t n, int t, int r,
                          int ldb) {
  for (int64_t e = ctx.tid; e < n * r; e += kThreads) {
    const int64_t col = e / n, i = e % n;
    A s = 0;
    for (int u = 0; u < t; ++u) s += X[u * n + i] * B[col * ldb + u];
    C[e] = s;
  }
  ctx.sync();
}

// One-sided (Hestenes) Jacobi on the c x c X in place, rotations accumulated in V (set to I
// here): X V^T-orthogonal columns, as dense::jacobi_svd's sweep, in the same order: each
// sweep is c - 1 (c for odd c) rounds of disjoint pairs (the round-robin order), one pair per
// warp here, so rotations of a round commute.
// Same rotation formula and the same stopping rule: a pair is left alone when
// |g| <= eps sqrt(a b); the sweeps stop when one rotates nothing, after kMaxSweeps at most.
template <class Ctx, typename A>
LSEF_BLOCK_FN void jacobi(Ctx& ctx, A* X, A* V, int c) {
  using std::sqrt;
  for (int64_t e = ctx.tid; e < int64_t{c} * c; e += kThreads) V[e] = A(e % c == e / c ? 1 : 0);
  ctx.sync();
  const int players = c + (c & 1);  // an odd c gets a dummy player, whose pairs are skipped
  const A eps = Eps<A>::value, inv_sqrt_eps = A(1) / sqrt(eps);
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    bool rotated = false;
    for (int round = 0; round < players - 1; ++round) {
      for (int slot = ctx.warp; slot < players / 2; slot += kWarps) {
        int i, j;
        if (!round_robin_pair(round, slot, c, i, j)) continue;
        A* xi = X + i * c;
        A* xj = X + j * c;
        A sa = 0, sb = 0, sg = 0;
        for (int r = ctx.lane; r < c; r += 32) {
          sa += xi[r] * xi[r];
          sb += xj[r] * xj[r];
          sg += xi[r] * xj[r];
        }
        const A aa = warp_sum(ctx, sa), bb = warp_sum(ctx, sb), g = warp_sum(ctx, sg);
        A cs, sn;
        if (!jacobi_rotation(aa, bb, g, eps, inv_sqrt_eps, cs, sn)) continue;
        rotated = true;
        for (int pass = 0; pass < 2; ++pass) {
          A* u = (pass == 0 ? X : V) + i * c;
          A* w = (pass == 0 ? X : V) + j * c;
          for (int r = ctx.lane; r < c; r += 32) {
            const A ur = u[r], wr = w[r];
            u[r] = cs * ur - sn * wr;
            w[r] = sn * ur + cs * wr;
          }
        }
      }
      ctx.sync();
    }
    if (!ctx.sync_or(rotated)) break;
  }
}

// Warp 0 replaces the columns of U (n x c) with valid[col] == 0 by unit vectors orthogonal to
// all others (Gram-Schmidt, twice, on standard basis vectors), as dense::complete_orthonormal,
// whose search likewise goes on from where the last column's ended.
// cand: n scratch values. Each lane touches only rows lane, lane + 32, ...
template <class Ctx, typename A>
LSEF_BLOCK_FN void complete_orthonormal(Ctx& ctx, A* U, int n, int c, A* valid, A* cand) {
  using std::sqrt;
  if (ctx.warp == 0) {
    int e = 0;  // the same in every lane: each lane runs the same loop
    for (int col = 0; col < c; ++col) {
      if (valid[col] != A(0)) continue;
      for (; e < n; ++e) {
        for (int i = ctx.lane; i < n; i += 32) cand[i] = A(i == e ? 1 : 0);
        for (int pass = 0; pass < 2; ++pass) {
          for (int o = 0; o < c; ++o) {
            if (valid[o] == A(0)) continue;
            const A* u = U + o * n;
            A d = 0;
            for (int i = ctx.lane; i < n; i += 32) d += u[i] * cand[i];
            d = warp_sum(ctx, d);
            for (int i = ctx.lane; i < n; i += 32) cand[i] -= d * u[i];
          }
        }
        A ss = 0;
        for (int i = ctx.lane; i < n; i += 32) ss += cand[i] * cand[i];
        const A norm = sqrt(warp_sum(ctx, ss));
        if (norm > A(0.5)) {
          for (int i = ctx.lane; i < n; i += 32) U[col * n + i] = cand[i] / norm;
          ctx.syncwarp();
          if (ctx.lane == 0) valid[col] = A(1);
          ctx.syncwarp();
          ++e;
          break;
        }
      }
    }
  }
  ctx.sync();
}

}  // namespace block
}  // namespace rsvd
}  // namespace lsef
