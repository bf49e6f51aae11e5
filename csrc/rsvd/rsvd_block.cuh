// rsvd on CUDA: the per-matrix algorithm of one thread block (docs/DESIGN.md §10).
//
// Every routine here is the block-parallel form of the one-matrix routine of the same name in
// dense.h / rsvd_cpu.cpp (same algorithm, same reflectors, same stopping rules, same sign
// convention), written once against a thread context `Ctx` that provides
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
// c * n). All work arrays live in one per-block "arena": dynamic shared memory when it fits,
// else a global scratch slice (the code is the same; __syncthreads orders both).
#pragma once

#include <math.h>
#include <stdint.h>

#include <cmath>

#include "common/macros.h"

namespace lsef {
namespace rsvd {
namespace block {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// The fused kernel takes matrices whose short side is at most this (and at least the sketch
// pass's register tiling below assumes it).
constexpr int kFusedMaxSide = 64;
// Sketch pass [G | Y] = W [W^T | Omega]: columns of W staged in shared memory per step, and
// outputs per thread (p (p + l) <= 64 * 128 = kThreads * kSlots).
constexpr int kChunk = 32;
constexpr int kSlots = 32;
// Z = W^T Q: columns of Z accumulated in registers per pass over W.
constexpr int kZCols = 16;
constexpr int kMaxSweeps = 60;

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

// Householder QR of W (n x c, n >= c) in place, as dense::householder: W keeps the reflectors
// v_j from the diagonal down, vv[j] = v_j . v_j (0 for a zero column: identity reflector, so Q
// stays orthonormal for rank-deficient W), beta[j] = R_jj. A column whose norm is outside
// SafeRange has its norm taken again with rescaling and its reflector scaled to unit length, as
// on the CPU. Warp 0 forms each reflector; the warps then update the trailing columns, one
// column per warp at a time.
// w <- (I - 2 v vᵀ / vv) w over len entries, by one warp (every lane returns the same w).
template <class Ctx, typename A>
LSEF_BLOCK_FN void reflect_warp(Ctx& ctx, const A* v, A vv, int64_t len, A* w) {
  A d = 0;
  for (int64_t i = ctx.lane; i < len; i += 32) d += v[i] * w[i];
  const A f = -A(2) * warp_sum(ctx, d) / vv;
  for (int64_t i = ctx.lane; i < len; i += 32) w[i] += f * v[i];
}

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
// here): X V^T-orthogonal columns, as dense::jacobi_svd's sweep. dense.h visits the pairs
// row-cyclically, one after the other; here each sweep is c - 1 (c + 1 for odd c) rounds of
// disjoint pairs (the round-robin order), one pair per warp, so rotations of a round commute.
// Same rotation formula and the same stopping rule: a pair is left alone when
// |g| <= eps sqrt(a b); the sweeps stop when one rotates nothing, after kMaxSweeps at most.
template <class Ctx, typename A>
LSEF_BLOCK_FN void jacobi(Ctx& ctx, A* X, A* V, int c) {
  using std::abs;
  using std::hypot;
  using std::sqrt;
  for (int64_t e = ctx.tid; e < int64_t{c} * c; e += kThreads) V[e] = A(e % c == e / c ? 1 : 0);
  ctx.sync();
  const int players = c + (c & 1);  // an odd c gets a dummy player, whose pairs are skipped
  const A eps = Eps<A>::value;
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    bool rotated = false;
    for (int round = 0; round < players - 1; ++round) {
      for (int slot = ctx.warp; slot < players / 2; slot += kWarps) {
        int a = round, b = players - 1;
        if (slot > 0) {
          a = (round + slot) % (players - 1);
          b = (round - slot + players - 1) % (players - 1);
        }
        const int i = a < b ? a : b, j = a < b ? b : a;
        if (j >= c) continue;
        A* xi = X + i * c;
        A* xj = X + j * c;
        A sa = 0, sb = 0, sg = 0;
        for (int r = ctx.lane; r < c; r += 32) {
          sa += xi[r] * xi[r];
          sb += xj[r] * xj[r];
          sg += xi[r] * xj[r];
        }
        const A aa = warp_sum(ctx, sa), bb = warp_sum(ctx, sb), g = warp_sum(ctx, sg);
        if (abs(g) <= eps * sqrt(aa * bb) || g == A(0)) continue;
        rotated = true;
        const A zeta = (bb - aa) / (A(2) * g);
        const A t = (zeta >= A(0) ? A(1) : A(-1)) / (abs(zeta) + hypot(A(1), zeta));
        const A cs = A(1) / sqrt(A(1) + t * t), sn = cs * t;
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

// ---- the tail shared by both paths: exact SVD of the projection, signs, outputs ------------

// Offsets (in elements of A) of the tail's work arrays.
struct TailLayout {
  int64_t X, Vacc, Ur, Vw, vv, beta, norms, s, order, valid, sign, Uc, C, cand, total;
};

LSEF_BLOCK_HD TailLayout tail_layout(int64_t p, int64_t q, int64_t l, int64_t k, int64_t base) {
  TailLayout t;
  int64_t o = base;
  auto take = [&o](int64_t n) {
    const int64_t at = o;
    o += (n + 1) / 2 * 2;  // keep every array 8-byte aligned for float
    return at;
  };
  t.X = take(l * l);
  t.Vacc = take(l * l);
  t.Ur = take(l * l);
  t.Vw = take(l * l);
  t.vv = take(l);
  t.beta = take(l);
  t.norms = take(l);
  t.s = take(l);
  t.order = take(l);
  t.valid = take(l);
  t.sign = take(k);
  t.Uc = take(p * k);
  t.C = take(q * k);
  t.cand = take(l);
  t.total = o;
  return t;
}

// Where one matrix's results go: U (m x k), S (k), V (n x k), row-major, in the output dtype.
template <typename T>
struct Out {
  T* U;
  T* S;
  T* V;
  int64_t m, n;
};

template <class Ctx, typename T, typename A>
LSEF_BLOCK_FN void write_nan(Ctx& ctx, const Out<T>& out, int k) {
  const A nan = quiet_nan<A>();
  for (int64_t e = ctx.tid; e < out.m * k; e += kThreads) out.U[e] = static_cast<T>(nan);
  for (int64_t e = ctx.tid; e < out.n * k; e += kThreads) out.V[e] = static_cast<T>(nan);
  for (int e = ctx.tid; e < k; e += kThreads) out.S[e] = static_cast<T>(nan);
}

// For the wide orientation W (p x q, p <= q) of one matrix: Z = W^T Q (q x l; W^T itself on the
// exact path, where Q is null and l = p) is factored Z = H [R; 0], R = Ur diag(s) Vw^T (Jacobi),
// so W ~ (Q Vw) diag(s) (H Ur)^T: the left factor Uc = Q Vw[:, :k] (Vw on the exact path), the
// right one H Ur[:, :k]. Both get the sign convention (decided on the factor that becomes U) and
// are written to `out` once (as U and V when `wide`, swapped for a tall A). Z is destroyed.
template <class Ctx, typename T, typename A>
LSEF_BLOCK_FN void tail(Ctx& ctx, A* Z, int64_t q, int l, const A* Q, int64_t p, int k, A* arena,
                        const TailLayout& L, const Out<T>& out, bool wide) {
  using std::sqrt;
  A *X = arena + L.X, *Vacc = arena + L.Vacc, *Ur = arena + L.Ur, *Vw = arena + L.Vw;
  A *vv = arena + L.vv, *beta = arena + L.beta, *norms = arena + L.norms, *s = arena + L.s;
  A *order = arena + L.order, *valid = arena + L.valid, *sign = arena + L.sign;
  A *Uc = arena + L.Uc, *C = arena + L.C, *cand = arena + L.cand;

  householder(ctx, Z, q, l, vv, beta);
  for (int64_t e = ctx.tid; e < int64_t{l} * l; e += kThreads) {
    const int64_t col = e / l, i = e % l;
    X[e] = i < col ? Z[col * q + i] : (i == col ? beta[col] : A(0));
  }
  ctx.sync();
  jacobi(ctx, X, Vacc, l);
  for (int col = ctx.warp; col < l; col += kWarps) {
    A ss = 0;
    for (int i = ctx.lane; i < l; i += 32) ss += X[col * l + i] * X[col * l + i];
    ss = sqrt(warp_sum(ctx, ss));
    if (ctx.lane == 0) norms[col] = ss;
  }
  ctx.sync();
  // Descending, stable: the rank of column c is the number of columns before it in that order.
  for (int col = ctx.tid; col < l; col += kThreads) {
    int rank = 0;
    for (int o = 0; o < l; ++o)
      rank += norms[o] > norms[col] || (norms[o] == norms[col] && o < col);
    order[rank] = A(col);
  }
  ctx.sync();
  const A tiny = norms[static_cast<int>(order[0])] * A(l) * Eps<A>::value;
  for (int col = ctx.tid; col < l; col += kThreads) {
    const A nrm = norms[static_cast<int>(order[col])];
    s[col] = nrm;
    valid[col] = A(nrm > tiny && nrm > A(0) ? 1 : 0);
  }
  for (int64_t e = ctx.tid; e < int64_t{l} * l; e += kThreads) {
    const int64_t col = e / l, i = e % l;
    const int o = static_cast<int>(order[col]);
    const A nrm = norms[o];
    Vw[e] = Vacc[o * l + i];
    Ur[e] = nrm > tiny && nrm > A(0) ? X[o * l + i] / nrm : A(0);
  }
  ctx.sync();
  complete_orthonormal(ctx, Ur, l, l, valid, cand);
  if (Q == nullptr) {
    for (int64_t e = ctx.tid; e < p * k; e += kThreads) Uc[e] = Vw[(e / p) * l + e % p];
    ctx.sync();
  } else {
    matmul(ctx, Q, Vw, Uc, p, l, k, l);
  }
  apply_q(ctx, Z, vv, q, l, Ur, l, k, static_cast<const A*>(nullptr), C);  // ends with a barrier
  // Sign convention, on the output U (Uc for a wide A, C for a tall one): the largest-magnitude
  // entry of each column (the first on ties) is made positive.
  const A* Uout = wide ? Uc : C;
  const int64_t rows = wide ? p : q;
  for (int col = ctx.warp; col < k; col += kWarps) {
    const A* u = Uout + col * rows;
    A best = -1;
    int arg = 0;
    for (int64_t i = ctx.lane; i < rows; i += 32) {
      const A a = u[i] < A(0) ? -u[i] : u[i];
      if (a > best) {
        best = a;
        arg = static_cast<int>(i);
      }
    }
    warp_argmax(ctx, best, arg);
    if (ctx.lane == 0) sign[col] = u[arg] < A(0) ? A(-1) : A(1);
  }
  ctx.sync();
  // Row-major writes, consecutive threads on consecutive elements.
  T* left = wide ? out.U : out.V;
  T* right = wide ? out.V : out.U;
  for (int64_t e = ctx.tid; e < p * k; e += kThreads) {
    const int64_t i = e / k, col = e % k;
    left[e] = static_cast<T>(sign[col] * Uc[col * p + i]);
  }
  for (int64_t e = ctx.tid; e < q * k; e += kThreads) {
    const int64_t i = e / k, col = e % k;
    right[e] = static_cast<T>(sign[col] * C[col * q + i]);
  }
  for (int col = ctx.tid; col < k; col += kThreads) out.S[col] = static_cast<T>(s[col]);
}

// ---- the fused path: one block, one matrix, start to finish --------------------------------

struct FusedLayout {
  int64_t Z, G, Y, Q, Wc, Oc, vv, beta, total;
  TailLayout tail;
};

LSEF_BLOCK_HD FusedLayout fused_layout(int64_t p, int64_t q, int64_t l, int64_t k, bool exact) {
  FusedLayout f;
  int64_t o = 0;
  auto take = [&o](int64_t n) {
    const int64_t at = o;
    o += (n + 1) / 2 * 2;
    return at;
  };
  f.Z = take(q * l);
  f.G = take(exact ? 0 : p * p);
  f.Y = take(exact ? 0 : p * l);
  f.Q = take(exact ? 0 : p * l);
  f.Wc = take(exact ? 0 : p * (kChunk + 1));
  f.Oc = take(exact ? 0 : l * (kChunk + 1));
  f.vv = take(l);
  f.beta = take(l);
  f.tail = tail_layout(p, q, l, k, o);
  f.total = f.tail.total;
  return f;
}

// The wide orientation of one input matrix: W(i, j) = W[i * sr + j * sj], p x q, p <= q.
template <typename T>
struct Wide {
  const T* W;
  int64_t sr, sj;
  int p;
  int64_t q;
  LSEF_BLOCK_HD const T& operator()(int64_t i, int64_t j) const { return W[i * sr + j * sj]; }
};

template <typename A>
LSEF_BLOCK_HD bool finite(A x) {
  return x - x == A(0);  // false for NaN and +-Inf
}

// The fused path for one matrix, as rsvd_cpu.cpp's fused_wide + write_factors: with the p x p
// Gram matrix G = W W^T formed in the same pass over W as the sketch Y = W Omega, each power
// iteration is Q = orth(G Q); then Z = W^T Q (a second pass over W) goes to tail(). The exact
// path (l = p) copies W^T into Z. omega_t is Omega^T (l x q, row-major), null when exact.
template <class Ctx, typename T, typename A>
LSEF_BLOCK_FN void fused_matrix(Ctx& ctx, const Wide<T>& W, int l, int k, int n_iter,
                                const A* omega_t, A* arena, const FusedLayout& F, const Out<T>& out,
                                bool wide) {
  const int p = W.p;
  const int64_t q = W.q;
  A* Z = arena + F.Z;
  bool bad = false;
  if (omega_t == nullptr) {
    for (int64_t e = ctx.tid; e < q * p; e += kThreads) {
      // Z(j, i) = W(i, j); consecutive threads on consecutive input elements.
      int64_t i, j;
      if (W.sj == 1) {
        i = e / q;
        j = e % q;
      } else {
        j = e / p;
        i = e % p;
      }
      const A x = static_cast<A>(W(i, j));
      bad |= !finite(x);
      Z[i * q + j] = x;
    }
    if (ctx.sync_or(bad)) return write_nan<Ctx, T, A>(ctx, out, k);
    return tail(ctx, Z, q, p, static_cast<const A*>(nullptr), p, k, arena, F.tail, out, wide);
  }

  A *G = arena + F.G, *Y = arena + F.Y, *Q = arena + F.Q, *Wc = arena + F.Wc, *Oc = arena + F.Oc;
  A *vv = arena + F.vv, *beta = arena + F.beta;
  constexpr int ld = kChunk + 1;                 // padded rows of the staged chunks
  const int64_t outputs = int64_t{p} * (p + l);  // [G | Y], column-major p x (p + l)
  A acc[kSlots];
  LSEF_UNROLL
  for (int s = 0; s < kSlots; ++s) acc[s] = 0;
  for (int64_t j0 = 0; j0 < q; j0 += kChunk) {
    const int64_t width = q - j0 < kChunk ? q - j0 : kChunk;
    for (int e = ctx.tid; e < p * kChunk; e += kThreads) {
      int r, jj;
      if (W.sj == 1) {
        r = e / kChunk;
        jj = e % kChunk;
      } else {
        jj = e / p;
        r = e % p;
      }
      A x = 0;
      if (jj < width) {
        x = static_cast<A>(W(r, j0 + jj));
        bad |= !finite(x);
      }
      Wc[r * ld + jj] = x;
    }
    for (int e = ctx.tid; e < l * kChunk; e += kThreads) {
      const int c = e / kChunk, jj = e % kChunk;
      Oc[c * ld + jj] = jj < width ? omega_t[c * q + j0 + jj] : A(0);
    }
    ctx.sync();
    LSEF_UNROLL
    for (int s = 0; s < kSlots; ++s) {
      const int64_t o = ctx.tid + int64_t{s} * kThreads;
      if (o < outputs) {
        const int r = static_cast<int>(o % p), c = static_cast<int>(o / p);
        const A* x = Wc + r * ld;
        const A* y = c < p ? Wc + c * ld : Oc + (c - p) * ld;
        A a = acc[s];
        LSEF_UNROLL
        for (int jj = 0; jj < kChunk; ++jj) a += x[jj] * y[jj];
        acc[s] = a;
      }
    }
    ctx.sync();
  }
  if (ctx.sync_or(bad)) return write_nan<Ctx, T, A>(ctx, out, k);
  LSEF_UNROLL
  for (int s = 0; s < kSlots; ++s) {
    const int64_t o = ctx.tid + int64_t{s} * kThreads;
    if (o < outputs) {
      const int64_t r = o % p, c = o / p;
      if (c < p) {
        G[c * p + r] = acc[s];
      } else {
        Y[(c - p) * p + r] = acc[s];
      }
    }
  }
  ctx.sync();
  orthonormalize(ctx, Y, p, l, Q, vv, beta);
  for (int it = 0; it < n_iter; ++it) {
    matmul(ctx, G, Q, Y, p, p, l, p);  // G is symmetric
    orthonormalize(ctx, Y, p, l, Q, vv, beta);
  }
  // Z = W^T Q: thread j owns row j of Z, kZCols columns per pass over W.
  for (int c0 = 0; c0 < l; c0 += kZCols) {
    for (int64_t j = ctx.tid; j < q; j += kThreads) {
      A z[kZCols];
      LSEF_UNROLL
      for (int cc = 0; cc < kZCols; ++cc) z[cc] = 0;
      for (int i = 0; i < p; ++i) {
        const A w = static_cast<A>(W(i, j));
        LSEF_UNROLL
        for (int cc = 0; cc < kZCols; ++cc)
          if (c0 + cc < l) z[cc] += w * Q[(c0 + cc) * p + i];
      }
      LSEF_UNROLL
      for (int cc = 0; cc < kZCols; ++cc)
        if (c0 + cc < l) Z[(c0 + cc) * q + j] = z[cc];
    }
  }
  ctx.sync();
  tail(ctx, Z, q, l, static_cast<const A*>(Q), p, k, arena, F.tail, out, wide);
}

}  // namespace block
}  // namespace rsvd
}  // namespace lsef
