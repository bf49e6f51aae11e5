// Small dense linear algebra in cache on the CPU: the building blocks of the rsvd kernels, for one
// matrix at a time, and (the *_lanes routines) for a group of matrices at once, one per vector
// lane. Matrices are column-major (column c of a p x q matrix W starts at W + c * p) unless a
// comment says otherwise.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "rsvd/rotation.h"

namespace lsef {
namespace dense {

// 32-byte vectors (GCC/Clang vector extensions): one AVX register, or two SSE registers in a
// baseline build. The register-tiled products below are written on them, because the
// auto-vectoriser does not keep a tile of accumulators in registers.
template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(32)));
  static constexpr int64_t kWidth = 32 / sizeof(T);
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(T* p, const V& v) { std::memcpy(p, &v, sizeof v); }
  // The lanes' sum as a tree (log2 kWidth dependent adds, not kWidth - 1).
  static T sum(const V& v) {
    T h[kWidth];
    store(h, v);
    for (int64_t w = kWidth / 2; w > 0; w /= 2)
      for (int64_t t = 0; t < w; ++t) h[t] += h[t + w];
    return h[0];
  }
};

// x . y with four vector accumulators (independent chains: the loop runs at the load rate,
// not at the latency of one chain of adds), then one vector, then the scalar tail.
template <typename T>
T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  using S = Simd<T>;
  constexpr int64_t w = S::kWidth;
  typename S::V acc[4] = {};
  int64_t i = 0;
  for (; i + 4 * w <= n; i += 4 * w)
    for (int u = 0; u < 4; ++u) acc[u] += S::load(a + i + u * w) * S::load(b + i + u * w);
  for (; i + w <= n; i += w) acc[0] += S::load(a + i) * S::load(b + i);
  T s = S::sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
void axpy(T alpha, const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// One TI x TJ tile of dot_table: out[i * si + j * sj] = a_i . b_j, the rows a_i = A + i * lda and
// b_j = B + j * ldb of length n read once per tile (TI + TJ loads feed TI * TJ products).
template <typename T, int TI, int TJ>
void dot_tile(const T* A, int64_t lda, const T* B, int64_t ldb, int64_t n, T* out, int64_t si,
              int64_t sj) {
  using S = Simd<T>;
  typename S::V acc[TI][TJ] = {};
  int64_t t = 0;
  for (; t + S::kWidth <= n; t += S::kWidth) {
    typename S::V a[TI];
    for (int i = 0; i < TI; ++i) a[i] = S::load(A + i * lda + t);
    for (int j = 0; j < TJ; ++j) {
      const typename S::V b = S::load(B + j * ldb + t);
      for (int i = 0; i < TI; ++i) acc[i][j] += a[i] * b;
    }
  }
  for (int i = 0; i < TI; ++i)
    for (int j = 0; j < TJ; ++j) {
      T s = S::sum(acc[i][j]);
      for (int64_t r = t; r < n; ++r) s += A[i * lda + r] * B[j * ldb + r];
      out[i * si + j * sj] = s;
    }
}

template <typename T, int TI>
void dot_row_of_tiles(const T* A, int64_t lda, const T* B, int64_t ldb, int64_t j0, int64_t nb,
                      int64_t n, T* out, int64_t si, int64_t sj) {
  constexpr int TJ = 4;
  int64_t j = j0;
  for (; j + TJ <= nb; j += TJ)
    dot_tile<T, TI, TJ>(A, lda, B + j * ldb, ldb, n, out + j * sj, si, sj);
  switch (nb - j) {
    case 3:
      return dot_tile<T, TI, 3>(A, lda, B + j * ldb, ldb, n, out + j * sj, si, sj);
    case 2:
      return dot_tile<T, TI, 2>(A, lda, B + j * ldb, ldb, n, out + j * sj, si, sj);
    case 1:
      return dot_tile<T, TI, 1>(A, lda, B + j * ldb, ldb, n, out + j * sj, si, sj);
    default:
      return;
  }
}

// out[i * si + j * sj] = a_i . b_j for the rows a_i = A + i * lda (i < na) and b_j = B + j * ldb
// (j < nb), each of length n, in 3 x 4 register tiles. With `upper` (A == B, na == nb: a Gram
// matrix), only the tiles that reach j >= i are computed, and out[j, i] is set to out[i, j]
// for j > i, so the result is exactly symmetric.
template <typename T>
void dot_table(const T* A, int64_t lda, int64_t na, const T* B, int64_t ldb, int64_t nb, int64_t n,
               T* out, int64_t si, int64_t sj, bool upper = false) {
  constexpr int TI = 3;
  int64_t i = 0;
  for (; i + TI <= na; i += TI) {
    const int64_t j0 = upper ? i / 4 * 4 : 0;
    dot_row_of_tiles<T, TI>(A + i * lda, lda, B, ldb, j0, nb, n, out + i * si, si, sj);
  }
  const int64_t j0 = upper ? i / 4 * 4 : 0;
  if (na - i == 2)
    dot_row_of_tiles<T, 2>(A + i * lda, lda, B, ldb, j0, nb, n, out + i * si, si, sj);
  if (na - i == 1)
    dot_row_of_tiles<T, 1>(A + i * lda, lda, B, ldb, j0, nb, n, out + i * si, si, sj);
  if (upper)
    for (int64_t r = 0; r < na; ++r)
      for (int64_t c = r + 1; c < na; ++c) out[c * si + r * sj] = out[r * si + c * sj];
}

// One tile of combine(): TC output columns, 2 vectors of each at a time.
template <typename T, int TC>
void combine_tile(const T* A, int64_t lda, int64_t na, const T* coef, int64_t ldcoef, int64_t n,
                  T* C, int64_t ldC) {
  using S = Simd<T>;
  constexpr int64_t W = 2 * S::kWidth;
  int64_t t = 0;
  for (; t + W <= n; t += W) {
    typename S::V acc[TC][2] = {};
    for (int64_t i = 0; i < na; ++i) {
      const typename S::V a0 = S::load(A + i * lda + t), a1 = S::load(A + i * lda + t + S::kWidth);
      for (int c = 0; c < TC; ++c) {
        const T w = coef[c * ldcoef + i];
        acc[c][0] += w * a0;
        acc[c][1] += w * a1;
      }
    }
    for (int c = 0; c < TC; ++c) {
      S::store(C + c * ldC + t, acc[c][0]);
      S::store(C + c * ldC + t + S::kWidth, acc[c][1]);
    }
  }
  for (; t < n; ++t)
    for (int c = 0; c < TC; ++c) {
      T s = 0;
      for (int64_t i = 0; i < na; ++i) s += coef[c * ldcoef + i] * A[i * lda + t];
      C[c * ldC + t] = s;
    }
}

// C_c = sum_i coef[c * ldcoef + i] a_i for c < nc: linear combinations of the rows
// a_i = A + i * lda (i < na, length n), written to C + c * ldC. It is W^T X for a row-major W
// (na x n) and a column-major X (na x nc), each row of W read once per 4 output columns.
template <typename T>
void combine(const T* A, int64_t lda, int64_t na, const T* coef, int64_t ldcoef, int64_t nc,
             int64_t n, T* C, int64_t ldC) {
  int64_t c = 0;
  for (; c + 4 <= nc; c += 4)
    combine_tile<T, 4>(A, lda, na, coef + c * ldcoef, ldcoef, n, C + c * ldC, ldC);
  switch (nc - c) {
    case 3:
      return combine_tile<T, 3>(A, lda, na, coef + c * ldcoef, ldcoef, n, C + c * ldC, ldC);
    case 2:
      return combine_tile<T, 2>(A, lda, na, coef + c * ldcoef, ldcoef, n, C + c * ldC, ldC);
    case 1:
      return combine_tile<T, 1>(A, lda, na, coef + c * ldcoef, ldcoef, n, C + c * ldC, ldC);
    default:
      return;
  }
}

template <typename T>
T max_abs(const T* x, int64_t n) {
  T m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::abs(x[i]));
  return m;
}

// Whether a norm computed as sqrt(x . x) can be trusted: within 2^(+-max_exponent / 3)
// (2^(+-42) in float32, 2^(+-341) in float64) no square that matters underflowed and none
// overflowed. Outside it (a column of rounding noise at 1e-23 in float32, or huge entries) the
// routines below rescale by the largest magnitude first; inside it they compute exactly what
// the plain formulas do, at no extra cost.
template <typename T>
bool squares_are_safe(T norm) {
  const int e = std::numeric_limits<T>::max_exponent / 3;
  return norm >= std::ldexp(T(1), -e) && norm <= std::ldexp(T(1), e);
}

// sqrt(x . x) computed on x scaled by its largest magnitude, so that no square under- or
// overflows (for vectors whose plain norm is outside squares_are_safe).
template <typename T>
T scaled_norm(const T* x, int64_t n) {
  const T m = max_abs(x, n);
  if (m == T(0)) return T(0);
  T s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T t = x[i] / m;
    s += t * t;
  }
  return m * std::sqrt(s);
}

// Applies the reflector I - 2 v v^T / vv (v of length len) to the ncols columns C + c * ld
// (each of length len): their dots with v four at a time (v read once per four), then the
// updates.
template <typename T>
void reflect(const T* v, T vv, int64_t len, T* C, int64_t ld, int64_t ncols) {
  int64_t c = 0;
  for (; c + 4 <= ncols; c += 4) {
    T d[4];
    dot_tile<T, 1, 4>(v, 0, C + c * ld, ld, len, d, 0, 1);
    for (int u = 0; u < 4; ++u) axpy(-T(2) * d[u] / vv, v, C + (c + u) * ld, len);
  }
  for (; c < ncols; ++c) axpy(-T(2) * dot(v, C + c * ld, len) / vv, v, C + c * ld, len);
}

// Householder QR of W (p x q, p >= q), in place: W keeps the reflectors v_j (column j from the
// diagonal down), vv[j] = v_j . v_j, and R (q x q, optional) gets the upper-triangular factor,
// W = H_0 ... H_{q-1} [R; 0]. A zero column is left alone (its reflector is the identity, vv = 0),
// so the Q factor stays orthonormal when W is rank-deficient, unlike Cholesky- or
// Gram-Schmidt-based QR. A column outside squares_are_safe has its norm taken with rescaling and
// its reflector scaled to unit length, so vv (and each product with v) stays a normal number:
// the reflector is then still orthogonal to working precision (it was not, for float32 columns
// of rounding noise: vv underflowed).
template <typename T>
void householder(T* W, int64_t p, int64_t q, T* R, std::vector<T>& vv) {
  vv.assign(q, T(0));
  std::vector<T> beta(q, T(0));
  for (int64_t j = 0; j < q; ++j) {
    T* v = W + j * p + j;
    const int64_t len = p - j;
    T alpha = std::sqrt(dot(v, v, len));
    const bool safe = squares_are_safe(alpha);
    if (!safe) alpha = scaled_norm(v, len);
    if (alpha == T(0)) continue;
    beta[j] = v[0] >= T(0) ? -alpha : alpha;
    v[0] -= beta[j];
    if (!safe) {
      const T nv = scaled_norm(v, len);
      for (int64_t i = 0; i < len; ++i) v[i] /= nv;
    }
    vv[j] = dot(v, v, len);
    reflect(v, vv[j], len, W + (j + 1) * p + j, p, q - j - 1);
  }
  if (R == nullptr) return;
  std::fill(R, R + q * q, T(0));
  for (int64_t c = 0; c < q; ++c) {
    for (int64_t i = 0; i < c; ++i) R[c * q + i] = W[c * p + i];
    R[c * q + c] = beta[c];
  }
}

// C (p x r) = H_0 ... H_{q-1} [X; 0] for the reflectors left in W by householder() and a q x r
// X (r <= q), without forming Q: the product with Q costs what forming Q would.
template <typename T>
void apply_q(const T* W, const std::vector<T>& vv, int64_t p, int64_t q, const T* X, int64_t r,
             T* C) {
  std::fill(C, C + p * r, T(0));
  for (int64_t c = 0; c < r; ++c) std::copy(X + c * q, X + (c + 1) * q, C + c * p);
  for (int64_t j = q - 1; j >= 0; --j) {
    if (vv[j] == T(0)) continue;
    reflect(W + j * p + j, vv[j], p - j, C + j, p, r);
  }
}

// Q (p x q) with orthonormal columns spanning range(W) (W destroyed).
template <typename T>
void orthonormalize(T* W, int64_t p, int64_t q, T* Q, std::vector<T>& vv) {
  householder(W, p, q, static_cast<T*>(nullptr), vv);
  // Q = H_0 ... H_{q-1} [I; 0], as apply_q would form it, without its products with zeros: a
  // reflector H_j touches rows j.. only, where column c < j of [I; 0] is still zero (its dot
  // with v_j is zero), so column c needs H_c, ..., H_0 alone (as LAPACK's orgqr).
  std::fill(Q, Q + p * q, T(0));
  for (int64_t c = 0; c < q; ++c) {
    Q[c * p + c] = T(1);
    for (int64_t j = c; j >= 0; --j) {
      if (vv[j] == T(0)) continue;
      reflect(W + j * p + j, vv[j], p - j, Q + c * p + j, p, 1);
    }
  }
}

// The lane layout of a group of matrices, one per vector lane: nm column-major rows x cols
// matrices M[t], element (r, c) of lane t at ((c * rows + r) * L + t) (L = Simd<T>::kWidth),
// each element a vector of L, read and written unaligned (std::vector does not promise the
// vectors' 32-byte alignment everywhere). Spare lanes (t >= nm) get the identity's columns.
template <typename T>
std::vector<T> to_lanes(const T* const* M, int64_t nm, int64_t rows, int64_t cols) {
  constexpr int64_t L = Simd<T>::kWidth;
  std::vector<T> X(rows * cols * L);
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < L; ++t)
        X[(c * rows + r) * L + t] = t < nm ? M[t][c * rows + r] : T(r == c);
  return X;
}

// Lane t of X (n elements in the lane layout) into out.
template <typename T>
void from_lane(const T* X, int64_t t, int64_t n, T* out) {
  constexpr int64_t L = Simd<T>::kWidth;
  for (int64_t e = 0; e < n; ++e) out[e] = X[e * L + t];
}

// x . y in every lane, for two columns of length len in the lane layout (element i of lane t at
// i * L + t): dot() for a group of matrices.
template <typename T>
typename Simd<T>::V dot_lanes(const T* x, const T* y, int64_t len) {
  using S = Simd<T>;
  constexpr int64_t L = S::kWidth;
  typename S::V d = {};
  for (int64_t i = 0; i < len; ++i) d += S::load(x + i * L) * S::load(y + i * L);
  return d;
}

// w += (f (v . w)) v in every lane, for a reflector v and a column w of length len in the lane
// layout and the lanes' factors f (-2 / v . v, or 0 for an identity reflector): reflect() for a
// group of matrices.
template <typename T>
void reflect_lanes(const T* v, const T* f, int64_t len, T* w) {
  using S = Simd<T>;
  constexpr int64_t L = S::kWidth;
  const typename S::V coef = S::load(f) * dot_lanes(v, w, len);
  for (int64_t i = 0; i < len; ++i) {
    const typename S::V x = S::load(w + i * L) + coef * S::load(v + i * L);
    S::store(w + i * L, x);
  }
}

// orthonormalize for up to Simd<T>::kWidth matrices at once, matrix t in vector lane t: Y[t]
// (p x q, column-major, left unchanged) gives Q[t], by the same Householder steps as
// orthonormalize (a zero column gets the identity as its reflector), with the sums taken in
// another order. The per-column scalars (a norm, a division) and the short dots, latency-bound
// for one small matrix, serve every lane at once. A matrix with a nonzero column whose norm
// leaves squares_are_safe's range (rounding noise of a rank-deficient input) is redone alone by
// orthonormalize, which rescales such columns: which routine a matrix gets depends on its data
// only, never on its group.
template <typename T>
void orthonormalize_lanes(const T* const* Y, int64_t nm, int64_t p, int64_t q, T* const* Q) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t L = S::kWidth;
  std::vector<T> W = to_lanes(Y, nm, p, q), Qv(p * q * L, T(0)), f(q * L);
  bool unsafe[L] = {};
  T ss[L], am[L], vv[L];
  for (int64_t j = 0; j < q; ++j) {
    T* v = W.data() + (j * p + j) * L;
    const int64_t len = p - j;
    const V sq = dot_lanes(v, v, len);
    S::store(ss, sq);
    std::fill(am, am + L, T(0));
    for (int64_t i = 0; i < len; ++i)
      for (int64_t t = 0; t < L; ++t) am[t] = std::max(am[t], std::abs(v[i * L + t]));
    for (int64_t t = 0; t < L; ++t) {  // the reflector's head, as householder() makes it
      const T alpha = std::sqrt(ss[t]);
      unsafe[t] = unsafe[t] || (am[t] > T(0) && !squares_are_safe(alpha));
      const T beta = alpha == T(0) ? T(0) : (v[t] >= T(0) ? -alpha : alpha);
      v[t] -= beta;
    }
    const V vsq = dot_lanes(v, v, len);
    S::store(vv, vsq);
    for (int64_t t = 0; t < L; ++t) f[j * L + t] = vv[t] == T(0) ? T(0) : T(-2) / vv[t];
    for (int64_t c = j + 1; c < q; ++c)  // the trailing columns: w -= 2 (v . w) / vv v
      reflect_lanes(v, &f[j * L], len, W.data() + (c * p + j) * L);
  }
  // Q = H_0 ... H_{q-1} [I; 0], column c from H_c ... H_0 alone (as orthonormalize)
  for (int64_t c = 0; c < q; ++c) {
    for (int64_t t = 0; t < L; ++t) Qv[(c * p + c) * L + t] = T(1);
    for (int64_t j = c; j >= 0; --j)
      reflect_lanes(W.data() + (j * p + j) * L, &f[j * L], p - j, Qv.data() + (c * p + j) * L);
  }
  std::vector<T> y, vv_scalar;
  for (int64_t t = 0; t < nm; ++t) {
    if (unsafe[t]) {
      y.assign(Y[t], Y[t] + p * q);
      orthonormalize(y.data(), p, q, Q[t], vv_scalar);
      continue;
    }
    from_lane(Qv.data(), t, p * q, Q[t]);
  }
}

// Replaces the columns of U (p x q, orthonormal where valid[c]) that are not valid by unit
// vectors orthogonal to all others (Gram-Schmidt, twice, on standard basis vectors).
template <typename T>
void complete_orthonormal(T* U, int64_t p, int64_t q, std::vector<char>& valid) {
  std::vector<T> cand(p);
  // The search over e_0, e_1, ... goes on where the last column's ended: a basis vector found
  // too close to the span once stays so as columns are added, so going back to e_0 for every
  // missing column (O(p^4) for a rank-deficient square matrix) would only repeat rejections.
  int64_t e = 0;
  for (int64_t c = 0; c < q; ++c) {
    if (valid[c]) continue;
    for (; e < p; ++e) {
      std::fill(cand.begin(), cand.end(), T(0));
      cand[e] = T(1);
      for (int pass = 0; pass < 2; ++pass)
        for (int64_t o = 0; o < q; ++o)
          if (valid[o]) axpy(-dot(U + o * p, cand.data(), p), U + o * p, cand.data(), p);
      const T norm = std::sqrt(dot(cand.data(), cand.data(), p));
      if (norm > T(0.5)) {
        for (int64_t i = 0; i < p; ++i) U[c * p + i] = cand[i] / norm;
        valid[c] = 1;
        ++e;
        break;
      }
    }
  }
}

// (u, w) <- (cs u - sn w, sn u + cs w) over n elements (a whole number of vectors): a Jacobi
// rotation of two columns, by scalars cs, sn (jacobi_svd) or by one per lane (vectors,
// jacobi_svd_lanes).
template <typename T, typename C>
void rotate(T* u, T* w, int64_t n, C cs, C sn) {
  using S = Simd<T>;
  for (int64_t r = 0; r < n; r += S::kWidth) {
    const typename S::V ur = S::load(u + r), wr = S::load(w + r);
    S::store(u + r, cs * ur - sn * wr);
    S::store(w + r, sn * ur + cs * wr);
  }
}

// The end of jacobi_svd, from the rotated X (q columns, ld apart) and the accumulated rotations
// Vacc (same layout): s = the column norms in descending order, Vr and Ur (X's columns
// normalised) in that order, columns of Ur for numerically zero singular values completed.
template <typename T>
void jacobi_finish(const T* X, const T* Vacc, int64_t ld, int64_t q, T* Ur, T* s, T* Vr) {
  const T eps = std::numeric_limits<T>::epsilon();
  std::vector<T> norms(q);
  for (int64_t c = 0; c < q; ++c) norms[c] = std::sqrt(dot(X + c * ld, X + c * ld, q));
  std::vector<int64_t> order(q);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return norms[a] > norms[b]; });
  const T tiny = (q > 0 ? norms[order[0]] : T(0)) * T(q) * eps;
  std::vector<char> valid(q, 0);
  for (int64_t c = 0; c < q; ++c) {
    const int64_t o = order[c];
    s[c] = norms[o];
    std::copy(Vacc + o * ld, Vacc + o * ld + q, Vr + c * q);
    valid[c] = norms[o] > tiny && norms[o] > T(0);
    for (int64_t r = 0; r < q; ++r) Ur[c * q + r] = valid[c] ? X[o * ld + r] / norms[o] : T(0);
  }
  complete_orthonormal(Ur, q, q, valid);
}

// One-sided Jacobi SVD (Hestenes) of a small square R (q x q): R = Ur diag(s) Vr^T with s
// sorted in descending order. Rotating column pairs until all are orthogonal to working
// precision gives singular values with high relative accuracy (Demmel & Veselic, 1992).
// Columns of Ur for (numerically) zero singular values are completed to an orthonormal set.
template <typename T>
void jacobi_svd(const T* R, int64_t q, T* Ur, T* s, T* Vr) {
  // X and the accumulated rotations hold their columns padded with zeros to whole vectors (ld
  // rows), so a pair's three dots and its rotation are a few vector operations with no tail;
  // rotations keep the padding zero.
  using S = Simd<T>;
  const int64_t ld = (q + S::kWidth - 1) / S::kWidth * S::kWidth;
  std::vector<T> X(q * ld, T(0)), Vacc(q * ld, T(0));
  for (int64_t c = 0; c < q; ++c) {
    std::copy(R + c * q, R + (c + 1) * q, X.begin() + c * ld);
    Vacc[c * ld + c] = T(1);
  }
  const T eps = std::numeric_limits<T>::epsilon(), inv_sqrt_eps = T(1) / std::sqrt(eps);
  // Each sweep visits the pairs in the round-robin order of the CUDA block code
  // (rsvd::round_robin_pair): rounds of disjoint pairs. Pairs of a round share no column, so
  // the processor overlaps their rotations, whose scalar part (divisions, square roots) is a
  // long dependent chain; visited row by row, each pair waited for the previous one's.
  const int64_t players = q + (q & 1);
  for (int sweep = 0; sweep < 60; ++sweep) {
    bool rotated = false;
    for (int64_t round = 0; round < players - 1; ++round) {
      for (int64_t slot = 0; slot < players / 2; ++slot) {
        int64_t i, j;
        if (!rsvd::round_robin_pair(round, slot, q, i, j)) continue;
        T* xi = X.data() + i * ld;
        T* xj = X.data() + j * ld;
        typename S::V va = {}, vb = {}, vg = {};  // the three dots in one pass over the pair
        for (int64_t r = 0; r < ld; r += S::kWidth) {
          const typename S::V u = S::load(xi + r), w = S::load(xj + r);
          va += u * u;
          vb += w * w;
          vg += u * w;
        }
        T cs, sn;
        if (!rsvd::jacobi_rotation(S::sum(va), S::sum(vb), S::sum(vg), eps, inv_sqrt_eps, cs, sn))
          continue;
        rotated = true;
        for (T* pair : {X.data(), Vacc.data()}) rotate(pair + i * ld, pair + j * ld, ld, cs, sn);
      }
    }
    if (!rotated) break;
  }
  jacobi_finish(X.data(), Vacc.data(), ld, q, Ur, s, Vr);
}

// jacobi_svd of up to Simd<T>::kWidth matrices at once, matrix t in vector lane t: R[t]
// (q x q, column-major) gives Ur[t], s[t], Vr[t], as jacobi_svd(R[t], ...) does (the same
// sweeps, rotations and stopping rule per lane; a lane whose sweep rotated nothing is left as
// it is while the others go on, which is what it would do alone; the dots sum in another
// order). Each vector operation serves every lane, so the rotations' square roots and
// divisions, the part of a sweep that one matrix cannot keep the processor busy with, cost
// one instruction for all of them.
template <typename T>
void jacobi_svd_lanes(const T* const* R, int64_t nm, int64_t q, T* const* Ur, T* const* s,
                      T* const* Vr) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t L = S::kWidth;
  // spare lanes: the identity, never rotated; Vacc: the identity in every lane
  std::vector<T> X = to_lanes(R, nm, q, q), Vacc = to_lanes(R, 0, q, q);
  const T eps = std::numeric_limits<T>::epsilon(), inv_sqrt_eps = T(1) / std::sqrt(eps);
  // Each round (the round-robin order of jacobi_svd) in three steps: the dots of its pairs; the
  // rotations of every pair and lane, as jacobi_svd computes them (cs = 1, sn = 0 where a pair
  // is left alone), in one loop with no dependence between iterations, which the compiler
  // turns into vector square roots and divisions (-fno-math-errno); then the rotations.
  const int64_t players = q + (q & 1), half = players / 2;
  std::vector<int64_t> pi(half), pj(half);
  std::vector<T> la(half * L), lb(half * L), lg(half * L), lc(half * L), ls(half * L);
  for (int sweep = 0; sweep < 60; ++sweep) {
    bool rotated = false;
    for (int64_t round = 0; round < players - 1; ++round) {
      int64_t n = 0;
      for (int64_t slot = 0; slot < half; ++slot) {
        if (!rsvd::round_robin_pair(round, slot, q, pi[n], pj[n])) continue;
        const T* xi = X.data() + pi[n] * q * L;
        const T* xj = X.data() + pj[n] * q * L;
        V a0 = {}, b0 = {}, g0 = {}, a1 = {}, b1 = {}, g1 = {};  // two chains each
        int64_t r = 0;
        for (; r + 2 <= q; r += 2) {
          const V u0 = S::load(xi + r * L), w0 = S::load(xj + r * L);
          const V u1 = S::load(xi + (r + 1) * L), w1 = S::load(xj + (r + 1) * L);
          a0 += u0 * u0;
          b0 += w0 * w0;
          g0 += u0 * w0;
          a1 += u1 * u1;
          b1 += w1 * w1;
          g1 += u1 * w1;
        }
        if (r < q) {
          const V u0 = S::load(xi + r * L), w0 = S::load(xj + r * L);
          a0 += u0 * u0;
          b0 += w0 * w0;
          g0 += u0 * w0;
        }
        S::store(&la[n * L], a0 + a1);
        S::store(&lb[n * L], b0 + b1);
        S::store(&lg[n * L], g0 + g1);
        ++n;
      }
      int any = 0;
      for (int64_t e = 0; e < n * L; ++e)
        any |= rsvd::jacobi_rotation(la[e], lb[e], lg[e], eps, inv_sqrt_eps, lc[e], ls[e]);
      if (!any) continue;
      rotated = true;
      for (int64_t e = 0; e < n; ++e) {
        const V cs = S::load(&lc[e * L]), sn = S::load(&ls[e * L]);
        for (T* pair : {X.data(), Vacc.data()})
          rotate(pair + pi[e] * q * L, pair + pj[e] * q * L, q * L, cs, sn);
      }
    }
    if (!rotated) break;
  }
  std::vector<T> Xm(q * q), Vm(q * q);
  for (int64_t t = 0; t < nm; ++t) {
    from_lane(X.data(), t, q * q, Xm.data());
    from_lane(Vacc.data(), t, q * q, Vm.data());
    jacobi_finish(Xm.data(), Vm.data(), q, q, Ur[t], s[t], Vr[t]);
  }
}

// C (p x r) = A (p x q) B (q x r), all column-major.
template <typename T>
void matmul(const T* A, const T* B, T* C, int64_t p, int64_t q, int64_t r) {
  std::fill(C, C + p * r, T(0));
  for (int64_t c = 0; c < r; ++c)
    for (int64_t t = 0; t < q; ++t) axpy(B[c * q + t], A + t * p, C + c * p, p);
}

// Thin SVD of a tall W (p x q, p >= q, destroyed): W = Uw diag(s) Vw^T with Vw q x q and s
// complete, and of Uw (p x q) only the first r columns formed (the reflectors are applied to r
// columns: 4 p q r flops, the largest term when r = q and only r < q columns are wanted).
template <typename T>
void svd_tall(T* W, int64_t p, int64_t q, T* Uw, T* s, T* Vw, int64_t r) {
  std::vector<T> R(q * q), Ur(q * q), vv;
  householder(W, p, q, R.data(), vv);
  jacobi_svd(R.data(), q, Ur.data(), s, Vw);
  apply_q(W, vv, p, q, Ur.data(), r, Uw);
}

}  // namespace dense
}  // namespace lsef
