// rsvd: CPU kernel (float32, float64), five paths chosen per call by the cost model of
// cost_model.h: in cache, each matrix start to finish by one task (fused: sketch, power
// iterations, exact SVD of the small projection, sign convention; jacobi: the exact SVD), or
// through ATen for the batch (blas, lapack, exact). See docs/DESIGN.md §6 for the algorithm.
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/cpu_utils.h"
#include "common/philox.h"
#include "rsvd/cost_model.h"
#include "rsvd/dense.h"
#include "rsvd/rsvd_args.h"
#include "rsvd/rescale.h"
#include "rsvd/rsvd_host.h"

namespace lsef {
namespace rsvd {
namespace {

constexpr const char* kOp = "rsvd";

// The bits of a float type: with the sign cleared, a finite value's bits order like the value,
// and NaN or +-Inf have all exponent bits set (at least kInf).
template <typename T>
struct Bits;
template <>
struct Bits<float> {
  using U = uint32_t;
  static constexpr U kAbs = 0x7FFFFFFFu, kInf = 0x7F800000u;
};
template <>
struct Bits<double> {
  using U = uint64_t;
  static constexpr U kAbs = 0x7FFFFFFFFFFFFFFFull, kInf = 0x7FF0000000000000ull;
};

// Whether a[0, n) is all finite, and its largest magnitude: one pass of integer max over the
// sign-cleared bits (a reduction compilers vectorise, unlike a float max that must respect
// NaN), so the check costs a fraction of an instruction per entry.
template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default"))) bool all_finite(const T* a, int64_t n,
                                                                            T& amax) {
  using U = typename Bits<T>::U;
  U mx = 0;
  for (int64_t i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, a + i, sizeof(U));
    u &= Bits<T>::kAbs;
    mx = u > mx ? u : mx;
  }
  std::memcpy(&amax, &mx, sizeof(T));
  return mx < Bits<T>::kInf;
}

// Writes the first k columns of Ucol (m x r) and Vcol (n x r), column-major, as row-major
// U (m x k) and V (n x k), flipping each pair so the largest-magnitude entry of u is positive,
// and S = unscale * s (2^-shift for an input scaled by 2^shift, rescale.h; exact).
template <typename T>
void write_factors(const T* Ucol, const T* Vcol, const T* s, int64_t m, int64_t n, int64_t k, T* U,
                   T* S, T* V, T unscale) {
  for (int64_t c = 0; c < k; ++c) {
    const T* u = Ucol + c * m;
    int64_t arg = 0;
    for (int64_t i = 1; i < m; ++i)
      if (std::abs(u[i]) > std::abs(u[arg])) arg = i;
    const T sign = u[arg] < T(0) ? T(-1) : T(1);
    for (int64_t i = 0; i < m; ++i) U[i * k + c] = sign * u[i];
    for (int64_t j = 0; j < n; ++j) V[j * k + c] = sign * Vcol[c * n + j];
    S[c] = s[c] * unscale;
  }
}

template <typename T>
void fill_nan(T* U, T* S, T* V, int64_t m, int64_t n, int64_t k) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::fill(U, U + m * k, nan);
  std::fill(S, S + k, nan);
  std::fill(V, V + n * k, nan);
}

// The wide orientation W (p x q row-major, p <= q) of one matrix A (m x n) scaled by 2^shift:
// A itself when m <= n and shift = 0, else a copy in buf (scaled, transposed when m > n). A
// tall A is factored as its transpose, so the sketch is always taken along the long side
// (Omega is max(m, n) x l); a matrix whose largest magnitude is outside rescale.h's band is
// factored as 2^shift A.
template <typename T>
const T* wide_view(const T* A, int64_t m, int64_t n, int shift, std::vector<T>& buf) {
  const T scale = pow2(shift, T(0));
  if (m <= n) {
    if (shift == 0) return A;
    buf.assign(A, A + m * n);
    for (T& x : buf) x *= scale;
    return buf.data();
  }
  buf.resize(n * m);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) buf[j * m + i] = A[i * n + j] * scale;
  return buf.data();
}

// Writes the factors of W (wide, as wide_view gave it) as A's: U, V swapped for a tall A.
template <typename T>
void write_wide(const T* Uc, const T* Vc, const T* s, int64_t m, int64_t n, int64_t k, T* U, T* S,
                T* V, T unscale) {
  if (m <= n) return write_factors(Uc, Vc, s, m, n, k, U, S, V, unscale);
  write_factors(Vc, Uc, s, m, n, k, U, S, V, unscale);
}

// The exact path (l = p) for a wide W: W^T (q x p) is W's row-major buffer read column-major,
// factored by svd_tall; Vc (q x k) and Uc (p x p, its first k columns used) column-major.
// Compiled twice (baseline and x86-64-v3: AVX2 + FMA), the loader picking the clone for the CPU
// at hand; `flatten` inlines the dense routines into each clone so they get its instructions.
template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten)) void exact_wide(
    const T* W, int64_t p, int64_t q, int64_t k, T* Uc, T* s, T* Vc) {
  std::vector<T> Wt(W, W + p * q);
  dense::svd_tall(Wt.data(), q, p, Vc, s, Uc, k);
}

// The randomized fused path for a wide W (p x q, p small), everything in cache, in phases so
// that the small dense steps of a group of matrices (Simd<T>::kWidth of them: the QRs of the
// p x l range finder, the Jacobi SVDs) run together, one matrix per vector lane (dense.h's
// *_lanes routines; a matrix's result does not depend on its group).
// Range finder: Q spans (W W^T)^n_iter W Omega, re-orthonormalised (Householder) after every
// product; with p small, the p x p Gram matrix G = W W^T makes each power iteration p^2 l
// instead of 2 p q l flops (same subspace; DESIGN.md §6 on accuracy). Then B = Q^T W is factored
// exactly from W itself: Z = B^T = W^T Q, Householder Z = Q_h [R; 0], R = Ur diag(s) Vw^T
// (Jacobi), and only the k leading triplets are formed: Vc = Q_h [Ur; 0] and Uc = Q Vw (k
// columns each), so W ~ Uc diag(s) Vc^T. The products with W (Gram matrix, sketch, W^T Q) are
// register-tiled (dense::dot_table, dense::combine).
template <typename T>
struct Fused {
  const T* W = nullptr;  // the wide matrix (A's data or buf)
  std::vector<T> buf, G, Y, Q, Z, vv, R, Ur, s, Vw;
  T unscale = 1;
  int64_t b = 0;  // its index in the batch
};

// G = W W^T and the sketch Y = W Omega (column-major p x l).
template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten)) void fused_sketch(
    Fused<T>& f, int64_t p, int64_t q, int64_t l, const T* omega_t) {
  f.G.resize(p * p);
  f.Y.resize(p * l);
  f.Q.resize(p * l);
  dense::dot_table(f.W, q, p, f.W, q, p, q, f.G.data(), p, 1, /*upper=*/true);
  dense::dot_table(f.W, q, p, omega_t, q, l, q, f.Y.data(), 1, p);
}

// Q = orth(Y) for each matrix of the group.
template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten)) void fused_orth(
    Fused<T>* group, int64_t nm, int64_t p, int64_t l) {
  constexpr int64_t L = dense::Simd<T>::kWidth;
  const T* Y[L];
  T* Q[L];
  for (int64_t t = 0; t < nm; ++t) {
    Y[t] = group[t].Y.data();
    Q[t] = group[t].Q.data();
  }
  dense::orthonormalize_lanes(Y, nm, p, l, Q);
}

// Y = G Q (G is symmetric): one power iteration's product.
template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten)) void fused_power(Fused<T>& f,
                                                                                      int64_t p,
                                                                                      int64_t l) {
  dense::matmul(f.G.data(), f.Q.data(), f.Y.data(), p, p, l);
}

// Z = W^T Q (column-major q x l) and its Householder QR, Z = Q_h [R; 0].
template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten)) void fused_project(Fused<T>& f,
                                                                                        int64_t p,
                                                                                        int64_t q,
                                                                                        int64_t l) {
  f.Z.resize(q * l);
  f.R.resize(l * l);
  dense::combine(f.W, q, p, f.Q.data(), p, l, q, f.Z.data(), q);
  dense::householder(f.Z.data(), q, l, f.R.data(), f.vv);
}

template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten)) void fused_jacobi(
    Fused<T>* group, int64_t nm, int64_t l) {
  constexpr int64_t L = dense::Simd<T>::kWidth;
  const T* R[L];
  T *Ur[L], *s[L], *Vw[L];
  for (int64_t t = 0; t < nm; ++t) {
    Fused<T>& f = group[t];
    f.Ur.resize(l * l);
    f.s.resize(l);
    f.Vw.resize(l * l);
    R[t] = f.R.data();
    Ur[t] = f.Ur.data();
    s[t] = f.s.data();
    Vw[t] = f.Vw.data();
  }
  dense::jacobi_svd_lanes(R, nm, l, Ur, s, Vw);
}

template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten)) void fused_back(
    const Fused<T>& f, int64_t p, int64_t q, int64_t l, int64_t k, T* Uc, T* Vc) {
  dense::apply_q(f.Z.data(), f.vv, q, l, f.Ur.data(), k, Vc);
  dense::matmul(f.Q.data(), f.Vw.data(), Uc, p, l, k);
}

// Matrices [b0, b1) of the batch on the fused path: exact shapes one at a time, randomized ones
// in groups of Simd<T>::kWidth (8 float32, 4 float64). A matrix that is not all finite gets
// NaN factors.
template <typename T>
void fused_range(const T* A, const Shape& sh, int64_t n_iter, const T* omega_t, T* U, T* S, T* V,
                 int64_t b0, int64_t b1) {
  const int64_t m = sh.m, n = sh.n, k = sh.k, p = std::min(m, n), q = std::max(m, n), l = sh.l;
  std::vector<T> Uc(p * p), s(p), Vc(q * k);
  if (sh.exact()) {
    std::vector<T> buf;
    for (int64_t b = b0; b < b1; ++b) {
      const T* a = A + b * m * n;
      T *ub = U + b * m * k, *sb = S + b * k, *vb = V + b * n * k, amax;
      if (!all_finite(a, m * n, amax)) {
        fill_nan(ub, sb, vb, m, n, k);
        continue;
      }
      const int shift = rescale_shift(amax);
      exact_wide(wide_view(a, m, n, shift, buf), p, q, k, Uc.data(), s.data(), Vc.data());
      write_wide(Uc.data(), Vc.data(), s.data(), m, n, k, ub, sb, vb, pow2(-shift, T(0)));
    }
    return;
  }
  constexpr int64_t L = dense::Simd<T>::kWidth;
  std::vector<Fused<T>> group(L);
  for (int64_t g0 = b0; g0 < b1; g0 += L) {
    int64_t nm = 0;
    for (int64_t b = g0; b < std::min(b1, g0 + L); ++b) {
      const T* a = A + b * m * n;
      T amax;
      if (!all_finite(a, m * n, amax)) {
        fill_nan(U + b * m * k, S + b * k, V + b * n * k, m, n, k);
        continue;
      }
      Fused<T>& f = group[nm++];
      const int shift = rescale_shift(amax);
      f.W = wide_view(a, m, n, shift, f.buf);
      f.unscale = pow2(-shift, T(0));
      f.b = b;
      fused_sketch(f, p, q, l, omega_t);
    }
    if (nm == 0) continue;
    fused_orth(group.data(), nm, p, l);
    for (int64_t it = 0; it < n_iter; ++it) {
      for (int64_t t = 0; t < nm; ++t) fused_power(group[t], p, l);
      fused_orth(group.data(), nm, p, l);
    }
    for (int64_t t = 0; t < nm; ++t) fused_project(group[t], p, q, l);
    fused_jacobi(group.data(), nm, l);
    for (int64_t t = 0; t < nm; ++t) {
      const Fused<T>& f = group[t];
      fused_back(f, p, q, l, k, Uc.data(), Vc.data());
      write_wide(Uc.data(), Vc.data(), f.s.data(), m, n, k, U + f.b * m * k, S + f.b * k,
                 V + f.b * n * k, f.unscale);
    }
  }
}

// Householder-orthonormalises matrices [b0, b1) of y (column-major p x l each) into q; and the
// tail's thin SVDs of z's (column-major q x l) matrices, k columns of their left factors formed.
// Compiled for x86-64-v3 and the baseline as the fused path's kernels are.
template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten)) void orthonormalize_range(
    T* y, T* q, int64_t p, int64_t l, int64_t b0, int64_t b1) {
  std::vector<T> vv;
  for (int64_t b = b0; b < b1; ++b) dense::orthonormalize(y + b * p * l, p, l, q + b * p * l, vv);
}
template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten)) void svd_tall_range(
    T* z, int64_t q, int64_t l, int64_t k, T* vc, T* s, T* vw, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b)
    dense::svd_tall(z + b * q * l, q, l, vc + b * q * k, s + b * l, vw + b * l * l, k);
}

// Householder-orthonormalises every matrix of Y (B, p, l); returns Q (B, p, l).
template <typename T>
Tensor orthonormalize(const Tensor& Y) {
  const int64_t batch = Y.size(0), p = Y.size(1), l = Y.size(2);
  Tensor Yc = as_contiguous(aten::mT(Y));  // column-major p x l per matrix
  Tensor Q = empty_as(Yc, Yc.sizes());
  T* y = ptr<T>(Yc);
  T* q = ptr<T>(Q);
  parallel_for(0, batch, 1,
               [&](int64_t b0, int64_t b1) { orthonormalize_range(y, q, p, l, b0, b1); });
  return aten::mT(Q);
}

// LAPACK through ATen (boxed calls). torch's CPU linear algebra loops over a batch on one
// thread and lets the library thread each call; here the batch is split over the threads
// instead when it has a matrix per thread (the library then runs single-threaded inside each
// task), else the whole batch is one call.
template <typename F>
void over_batch(int64_t batch, const F& f) {
  const int64_t threads = torch::stable::get_num_threads();
  if (threads > 1 && batch >= threads) {
    parallel_for(0, batch, 1, f);
  } else {
    f(0, batch);
  }
}

// Q of the Householder QR of every matrix of Y (B, p, l): LAPACK's geqrf and orgqr (blocked,
// BLAS-3), orthonormal whatever Y's rank, as the own Householder routine is.
Tensor lapack_orthonormalize(Tensor Y) {  // by value: torch::stable::narrow takes Tensor&
  Tensor Q = empty_as(Y, Y.sizes());
  over_batch(Y.size(0), [&](int64_t b0, int64_t b1) {
    const auto qr = aten::call_n<2>("aten::geqrf", "", torch::stable::narrow(Y, 0, b0, b1 - b0));
    Tensor dst = torch::stable::narrow(Q, 0, b0, b1 - b0);
    torch::stable::copy_(dst, aten::call("aten::linalg_householder_product", "", qr[0], qr[1]));
  });
  return Q;
}

// The thin SVD of every matrix of M (B, l, q), l <= q, by LAPACK (gesdd): Ux (B, l, l),
// s (B, l), Vh (B, l, q).
std::array<Tensor, 3> lapack_svd(Tensor M) {
  const int64_t batch = M.size(0), l = M.size(1), q = M.size(2);
  std::array<Tensor, 3> out{empty_as(M, {batch, l, l}), empty_as(M, {batch, l}),
                            empty_as(M, {batch, l, q})};
  over_batch(batch, [&](int64_t b0, int64_t b1) {
    const auto usv =
        aten::call_n<3>("aten::_linalg_svd", "", torch::stable::narrow(M, 0, b0, b1 - b0), false,
                        true, std::optional<int64_t>{});  // driver: None
    for (int i = 0; i < 3; ++i) {
      Tensor dst = torch::stable::narrow(out[i], 0, b0, b1 - b0);
      torch::stable::copy_(dst, usv[i]);
    }
  });
  return out;
}

// The paths built on ATen (docs/DESIGN.md §6): the shared large-path driver (rsvd_host.h: the
// same range finder as the fused path without the Gram matrix, which for a large short side
// costs more than the products; products through ATen, BLAS-3), then the exact SVD of the
// projection, Uc = Q Vw (k columns), signs and outputs.
//   kBlas:   own Householder QRs and Jacobi SVD of the projection, per matrix in parallel;
//   kLapack: LAPACK's QRs (geqrf + orgqr) and SVD (gesdd) of the projection;
//   kExact:  no sketch: LAPACK's SVD of the matrix itself (sh_exact is sh with l = min(m, n)).
template <typename T>
void aten_path(Path path, const Tensor& A, const Shape& sh_in, int64_t n_iter,
               const Tensor& omega_t, Tensor& U, Tensor& S, Tensor& V) {
  Shape sh = sh_in;
  if (path == Path::kExact) sh.l = std::min(sh.m, sh.n);
  // One vectorised pass per matrix for finiteness and largest magnitude (instead of ATen's three)
  Screen screen{empty_as(A, {sh.batch}, kBool), empty_as(A, {sh.batch})};
  {
    const T* a = cptr<T>(A);
    bool* ok = ptr<bool>(screen.finite);
    T* mx = ptr<T>(screen.amax);
    parallel_for(0, sh.batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) ok[b] = all_finite(a + b * sh.m * sh.n, sh.m * sh.n, mx[b]);
    });
  }
  const Orthonormalize orth = path == Path::kBlas ? Orthonormalize(orthonormalize<T>)
                                                  : Orthonormalize(lapack_orthonormalize);
  const Projection pr =
      project(A, sh, n_iter, sh.exact() ? Tensor() : omega_t, A.scalar_type(), orth, screen);
  const int64_t batch = sh.batch, p = pr.p, q = pr.q, l = pr.l, k = sh.k;
  Tensor Vcol, sv, Ucol;  // Vcol, Ucol: column-major q x k, p x k
  if (path == Path::kBlas) {
    Vcol = empty_as(pr.Z, {batch, k, q});
    sv = empty_as(pr.Z, {batch, l});
    Tensor Vw = empty_as(pr.Z, {batch, l, l});  // column-major
    T *z = ptr<T>(pr.Z), *vc = ptr<T>(Vcol), *ss = ptr<T>(sv);
    T* vw = ptr<T>(Vw);
    parallel_for(0, batch, 1,
                 [&](int64_t b0, int64_t b1) { svd_tall_range(z, q, l, k, vc, ss, vw, b0, b1); });
    // Q Vw's first k columns
    Ucol = as_contiguous(
        aten::mT(torch::stable::matmul(pr.Q, aten::mT(torch::stable::narrow(Vw, 1, 0, k)))));
  } else {
    // pr.Z (B, l, q) row-major is M = Q^T W (W itself when exact) = Ux diag(s) Vh, so
    // W ~ (Q Ux) diag(s) Vh: V's columns are Vh's rows.
    auto usv = lapack_svd(pr.Z);
    const Tensor Uk = torch::stable::narrow(usv[0], 2, 0, k);
    Ucol = as_contiguous(aten::mT(pr.Q.defined() ? torch::stable::matmul(pr.Q, Uk) : Uk));
    sv = usv[1];
    Vcol = as_contiguous(torch::stable::narrow(usv[2], 1, 0, k));
  }
  const T *uc = cptr<T>(Ucol), *vc = cptr<T>(Vcol), *ss = cptr<T>(sv);
  const bool* ok = cptr<bool>(pr.finite);
  const T* unscale = cptr<T>(pr.unscale);
  T *u = ptr<T>(U), *s = ptr<T>(S), *v = ptr<T>(V);
  parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T *ub = u + b * sh.m * k, *sb = s + b * k, *vb = v + b * sh.n * k;
      if (!ok[b]) {
        fill_nan(ub, sb, vb, sh.m, sh.n, k);
      } else if (pr.wide) {
        write_factors(uc + b * p * k, vc + b * q * k, ss + b * l, sh.m, sh.n, k, ub, sb, vb,
                      unscale[b]);
      } else {
        write_factors(vc + b * q * k, uc + b * p * k, ss + b * l, sh.m, sh.n, k, ub, sb, vb,
                      unscale[b]);
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> rsvd_cpu(const Tensor& A_in, int64_t k, int64_t oversample,
                                            int64_t n_iter, int64_t seed) {
  const Shape sh = check(kOp, A_in, k, oversample, n_iter);
  check_cpu_dtype(kOp, "A", A_in);
  const Tensor A = as_contiguous(A_in);
  Tensor U, S, V;
  std::tie(U, S, V) = empty_outputs(A, sh);
  if (sh.batch == 0) return {U, S, V};
  const Path path =
      choose_path(sh, n_iter, A.scalar_type() == kDouble, torch::stable::get_num_threads());
  const bool sketch = path == Path::kFused || path == Path::kBlas || path == Path::kLapack;
  const Tensor omega_t =
      sketch ? test_matrix_t(std::max(sh.m, sh.n), sh.l, seed, A.scalar_type()) : Tensor();
  dispatch_floating(A.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (path == Path::kBlas || path == Path::kLapack || path == Path::kExact) {
      return aten_path<T>(path, A, sh, n_iter, omega_t, U, S, V);
    }
    // kFused, or kJacobi (the fused routine with l = min(m, n): the exact branch)
    Shape run = sh;
    if (path == Path::kJacobi) run.l = std::min(sh.m, sh.n);
    const T* a = cptr<T>(A);
    const T* om = omega_t.defined() ? cptr<T>(omega_t) : nullptr;
    T *u = ptr<T>(U), *s = ptr<T>(S), *v = ptr<T>(V);
    parallel_for(0, sh.batch, 1, [&](int64_t b0, int64_t b1) {
      fused_range<T>(a, run, n_iter, om, u, s, v, b0, b1);
    });
  });
  return {U, S, V};
}

// lowrank's backward, dA = U (U^T G) + (G V - U (U^T G V)) V^T, one matrix at a time in cache
// for matrices [b0, b1) of row-major G (m x n), U (m x k), V (n x k): the composite's six
// batched products (four passes over G-sized data, three G-sized temporaries) become a pass
// to form U^T G and G V, and one to write dA as a combination of the 2k rows of U^T G and V^T.
template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten)) void tangent_range(
    const T* g, const T* u, const T* v, T* out, int64_t m, int64_t n, int64_t k, int64_t b0,
    int64_t b1) {
  std::vector<T> rows(2 * k * n), Ut(k * m), coef(m * 2 * k), X(k * k), GV(m * k);
  T* UtG = rows.data();         // k x n, row-major: U^T G
  T* Vt = rows.data() + k * n;  // k x n: V^T
  for (int64_t b = b0; b < b1; ++b) {
    const T* G = g + b * m * n;
    const T* U = u + b * m * k;
    const T* V = v + b * n * k;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < k; ++c) Ut[c * m + i] = U[i * k + c];
    for (int64_t j = 0; j < n; ++j)
      for (int64_t c = 0; c < k; ++c) Vt[c * n + j] = V[j * k + c];
    dense::combine(G, n, m, Ut.data(), m, k, n, UtG, n);       // row c: sum_i U[i, c] G_i
    dense::dot_table(G, n, m, Vt, n, k, n, GV.data(), k, 1);   // G V (m x k)
    dense::dot_table(UtG, n, k, Vt, n, k, n, X.data(), k, 1);  // U^T G V (k x k)
    for (int64_t i = 0; i < m; ++i)  // row i of dA = [U, G V - U X]_i [U^T G; V^T]
      for (int64_t c = 0; c < k; ++c) {
        T p = GV[i * k + c];
        for (int64_t d = 0; d < k; ++d) p -= U[i * k + d] * X[d * k + c];
        coef[i * 2 * k + c] = U[i * k + c];
        coef[i * 2 * k + k + c] = p;
      }
    dense::combine(rows.data(), n, 2 * k, coef.data(), 2 * k, m, n, out + b * m * n, n);
  }
}

// The CPU kernel of lowrank_backward: matching batches of float32/float64 go through
// tangent_range; anything else (broadcast batch shapes, mixed dtypes, empty) through the
// composite, which also gives the errors for bad input.
Tensor lowrank_backward_cpu(const Tensor& grad, const Tensor& U, const Tensor& V) {
  // The in-cache kernel wins for thin factors only: against the composite's batched GEMMs
  // (one thread, float32) 0.43-0.64x their time at k = 4, 0.84x at k = 8, 0.83-1.71x at
  // k = 16, 1.7-12x slower from k = 64 (docs/DESIGN.md §7); beyond k = 12 the GEMMs run.
  constexpr int64_t kKernelMaxRank = 12;
  const bool fast =
      U.defined() && U.dim() >= 2 && U.size(-1) <= kKernelMaxRank && grad.defined() &&
      V.defined() && grad.dim() >= 2 && U.dim() == grad.dim() && V.dim() == grad.dim() &&
      (grad.scalar_type() == kFloat || grad.scalar_type() == kDouble) &&
      U.scalar_type() == grad.scalar_type() && V.scalar_type() == grad.scalar_type() &&
      grad.numel() > 0 && U.numel() > 0 && leading(U, 2) == leading(grad, 2) &&
      leading(V, 2) == leading(grad, 2) && U.size(-2) == grad.size(-2) &&
      V.size(-2) == grad.size(-1) && U.size(-1) == V.size(-1);
  if (!fast) return lowrank_backward(grad, U, V);
  const int64_t m = grad.size(-2), n = grad.size(-1), k = U.size(-1);
  const int64_t batch = grad.numel() / (m * n);
  const Tensor g = as_contiguous(grad), u = as_contiguous(U);
  const Tensor v = as_contiguous(V);
  Tensor out = empty_as(g, grad.sizes());
  dispatch_floating(g.scalar_type(), "lowrank_backward", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t *gp = cptr<scalar_t>(g), *up = cptr<scalar_t>(u);
    const scalar_t* vp = cptr<scalar_t>(v);
    scalar_t* op = ptr<scalar_t>(out);
    parallel_for(0, batch, 1,
                 [&](int64_t b0, int64_t b1) { tangent_range(gp, up, vp, op, m, n, k, b0, b1); });
  });
  return out;
}

// The path rsvd's CPU kernel takes for a batch of `batch` (m, n) matrices with these settings at
// the current thread count (cost_model.h): its name's index in kPathNames, for tests and
// benchmarks.
int64_t rsvd_path(int64_t m, int64_t n, int64_t k, int64_t oversample, int64_t n_iter, bool f64,
                  int64_t batch) {
  LSEF_CHECK_VALUE(
      m >= 1 && n >= 1 && 1 <= k && k <= std::min(m, n) && oversample >= 0 && n_iter >= 0,
      "_rsvd_path: needs m, n >= 1, 1 <= k <= min(m, n), oversample, n_iter >= 0");
  LSEF_CHECK_VALUE(batch >= 1, "_rsvd_path: needs batch >= 1, got ", batch);
  const int64_t mn = std::min(m, n);
  const Shape sh{batch, m, n, k, oversample >= mn - k ? mn : k + oversample};
  return static_cast<int64_t>(choose_path(sh, n_iter, f64, torch::stable::get_num_threads()));
}

// The generator's raw words and normals, for tests that compare with python/lsef_ref.
Tensor philox_words(int64_t blocks, int64_t seed) {
  Tensor out = empty_cpu({blocks, 4}, kLong);
  int64_t* o = ptr<int64_t>(out);
  for (int64_t b = 0; b < blocks; ++b) {
    const philox::Words w =
        philox::philox4x32_10(static_cast<uint64_t>(b), static_cast<uint64_t>(seed));
    for (int t = 0; t < 4; ++t) o[b * 4 + t] = w.x[t];
  }
  return out;
}

Tensor philox_normal(int64_t count, int64_t seed) {
  Tensor out = empty_cpu({count}, kDouble);
  double* o = ptr<double>(out);
  for (int64_t i = 0; i < count; ++i)
    o[i] = philox::normal(static_cast<uint64_t>(i), static_cast<uint64_t>(seed));
  return out;
}

}  // namespace
}  // namespace rsvd
}  // namespace lsef

STABLE_TORCH_LIBRARY_IMPL(lsef, CPU, m) {
  m.impl("rsvd", TORCH_BOX(&lsef::rsvd::rsvd_cpu));
  m.impl("lowrank_backward", TORCH_BOX(&lsef::rsvd::lowrank_backward_cpu));
}

// No tensor inputs: these run on the CPU whatever the caller's device.
STABLE_TORCH_LIBRARY_IMPL(lsef, CompositeExplicitAutograd, m) {
  m.impl("_philox_words", TORCH_BOX(&lsef::rsvd::philox_words));
  m.impl("_philox_normal", TORCH_BOX(&lsef::rsvd::philox_normal));
  m.impl("_rsvd_path", TORCH_BOX(&lsef::rsvd::rsvd_path));
}
