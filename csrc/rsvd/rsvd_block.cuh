// rsvd on CUDA: the per-matrix algorithm of one thread block (docs/DESIGN.md §10), built on
// block_primitives.cuh: the tail shared by both paths (exact SVD of the projection, signs,
// outputs) and the fused path (one block, one matrix, start to finish). Each routine is the
// block-parallel form of rsvd_cpu.cpp's routine of the same name (same algorithm, same sign
// convention), written against the thread context `Ctx` described in block_primitives.cuh, so
// the CPU fiber emulator in tests/ runs it too.
#pragma once

#include <stdint.h>

#include "rsvd/block_primitives.cuh"
#include "rsvd/rescale.h"

namespace lsef {
namespace rsvd {
namespace block {

// The fused kernel takes matrices whose short side is at most this (and at least the sketch
// pass's register tiling below assumes it).
constexpr int kFusedMaxSide = 64;
// Sketch pass [G | Y] = W [W^T | Omega]: columns of W staged in shared memory per step, and
// outputs per thread (p (p + l) <= 64 * 128 = kThreads * kSlots).
constexpr int kChunk = 32;
constexpr int kSlots = 32;
// Z = W^T Q: columns of Z accumulated in registers per pass over W.
constexpr int kZCols = 16;

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
  // Matrix b's slice of batched outputs U (*, m, k), S (*, k), V (*, n, k).
  LSEF_BLOCK_HD static Out at(T* U, T* S, T* V, int64_t b, int64_t m, int64_t n, int64_t k) {
    return {U + b * m * k, S + b * k, V + b * n * k, m, n};
  }
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
// are written to `out` once (as U and V when `wide`, swapped for a tall A), S multiplied by
// `unscale` (2^-shift for an input scaled by 2^shift, rescale.h; exact). Z is destroyed.
template <class Ctx, typename T, typename A>
LSEF_BLOCK_FN void tail(Ctx& ctx, A* Z, int64_t q, int l, const A* Q, int64_t p, int k, A* arena,
                        const TailLayout& L, const Out<T>& out, bool wide, A unscale) {
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
  for (int col = ctx.tid; col < k; col += kThreads) out.S[col] = static_cast<T>(s[col] * unscale);
}

// ---- the fused path: one block, one matrix, start to finish --------------------------------

struct FusedLayout {
  int64_t Z, G, Y, Q, Wc, Oc, vv, beta, red, total;
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
  f.red = take(kWarps);
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
  // The coordinates (i, j) of the e-th element of a rows x cols region of W in memory order, so
  // consecutive threads read consecutive input elements in either orientation.
  template <typename I>
  LSEF_BLOCK_HD void coalesced(I e, I rows, I cols, I& i, I& j) const {
    if (sj == 1) {
      i = e / cols;
      j = e % cols;
    } else {
      j = e / rows;
      i = e % rows;
    }
  }
};

template <typename A>
LSEF_BLOCK_HD bool finite(A x) {
  return x - x == A(0);  // false for NaN and +-Inf
}

// The fused path for one matrix, as rsvd_cpu.cpp's fused_range + write_factors: with the p x p
// Gram matrix G = W W^T formed in the same pass over W as the sketch Y = W Omega, each power
// iteration is Q = orth(G Q); then Z = W^T Q (a second pass over W) goes to tail(). The exact
// path (l = p) copies W^T into Z. omega_t is Omega^T (l x q, row-major), null when exact.
// Scale (rescale.h): the first pass also finds max |W|; when it lies outside the band the pass
// is run again on 2^shift W (rare: such inputs only), and every later read of W is scaled too.
template <class Ctx, typename T, typename A>
LSEF_BLOCK_FN void fused_matrix(Ctx& ctx, const Wide<T>& W, int l, int k, int n_iter,
                                const A* omega_t, A* arena, const FusedLayout& F, const Out<T>& out,
                                bool wide) {
  const int p = W.p;
  const int64_t q = W.q;
  A* Z = arena + F.Z;
  A* red = arena + F.red;
  bool bad = false;
  A amax = 0;
  if (omega_t == nullptr) {
    for (int64_t e = ctx.tid; e < q * p; e += kThreads) {
      int64_t i, j;  // Z(j, i) = W(i, j)
      W.template coalesced<int64_t>(e, p, q, i, j);
      const A x = static_cast<A>(W(i, j));
      bad |= !finite(x);
      const A ax = x < A(0) ? -x : x;
      amax = ax > amax ? ax : amax;
      Z[i * q + j] = x;
    }
    if (ctx.sync_or(bad)) return write_nan<Ctx, T, A>(ctx, out, k);
    const int shift = rescale_shift(block_max(ctx, amax, red));
    if (shift != 0) {
      const A scale = pow2(shift, A(0));
      for (int64_t e = ctx.tid; e < q * p; e += kThreads) Z[e] *= scale;
      ctx.sync();
    }
    return tail(ctx, Z, q, p, static_cast<const A*>(nullptr), p, k, arena, F.tail, out, wide,
                pow2(-shift, A(0)));
  }

  A *G = arena + F.G, *Y = arena + F.Y, *Q = arena + F.Q, *Wc = arena + F.Wc, *Oc = arena + F.Oc;
  A *vv = arena + F.vv, *beta = arena + F.beta;
  constexpr int ld = kChunk + 1;                 // padded rows of the staged chunks
  const int64_t outputs = int64_t{p} * (p + l);  // [G | Y], column-major p x (p + l)
  A acc[kSlots];
  int shift = 0;
  A scale = 1;
  for (int pass = 0; pass < 2; ++pass) {  // the second only to rescale
    LSEF_UNROLL
    for (int s = 0; s < kSlots; ++s) acc[s] = 0;
    for (int64_t j0 = 0; j0 < q; j0 += kChunk) {
      const int64_t width = q - j0 < kChunk ? q - j0 : kChunk;
      for (int e = ctx.tid; e < p * kChunk; e += kThreads) {
        int r, jj;
        W.coalesced(e, p, kChunk, r, jj);
        A x = 0;
        if (jj < width) {
          x = static_cast<A>(W(r, j0 + jj));
          bad |= !finite(x);
          const A ax = x < A(0) ? -x : x;
          amax = ax > amax ? ax : amax;
          x *= scale;
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
    if (pass == 1) break;
    shift = rescale_shift(block_max(ctx, amax, red));
    if (shift == 0) break;
    scale = pow2(shift, A(0));
  }
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
        const A w = static_cast<A>(W(i, j)) * scale;
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
  tail(ctx, Z, q, l, static_cast<const A*>(Q), p, k, arena, F.tail, out, wide, pow2(-shift, A(0)));
}

}  // namespace block
}  // namespace rsvd
}  // namespace lsef
