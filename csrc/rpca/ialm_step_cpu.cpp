// _ialm_step_: the elementwise half of one robust-PCA (IALM) iteration on the CPU, in one pass
// (float32, float64). lsef_ext/rpca.py's rpca_ialm carries the scaled multiplier W = Y / mu; after
// the singular value thresholding has given L, the rest of the iteration is, per entry,
//
//   B = (X + W) - L      C = clamp(B, -t, t)      S = B - C  (the soft threshold)
//   Z = C - W  (the residual X - L - S)      W' = C * ratio
//   A = (X + W') - S  (the next SVT's input)
//
// with t = lam / mu and ratio = mu / mu' per matrix, and err2 = sum Z^2 per matrix. The same
// operations in the same order as the ATen expressions of the Python loop, one rounding each:
// this file is compiled with -ffp-contract=off (CMakeLists.txt), so no product is fused into
// an add and S, W' and A are those of the Python loop bit for bit. Only err2, a sum, is
// accumulated in its own order (16 lanes, then double); it decides when a matrix stops.
//
// One task per matrix: X, L and W are read once, W, S and A written once, in place (instead of
// eight ATen passes over the batch, each through memory and into freshly allocated pages).
#include <algorithm>
#include <utility>

#include "common/checks.h"
#include "common/cpu_utils.h"

namespace lsef {
namespace ialm {
namespace {

constexpr const char* kOp = "_ialm_step";

// kLanes independent partial sums of Z^2, so the loop vectorises without reassociating one
// running sum; they are added in double at the end of the matrix.
constexpr int64_t kLanes = 16;

template <typename T>
inline T step_entry(const T* __restrict__ x, const T* __restrict__ l, T* __restrict__ w, T t,
                    T ratio, T* __restrict__ s, T* __restrict__ a, int64_t j) {
  const T r = x[j] + w[j];
  const T b = r - l[j];
  const T lo = -t;
  // torch.clamp(b, -t, t): a NaN b or a NaN t gives NaN
  const T c = t != t ? t : (b < lo ? lo : (t < b ? t : b));
  const T sj = b - c;
  const T z = c - w[j];
  const T wn = c * ratio;
  const T rn = x[j] + wn;
  s[j] = sj;
  w[j] = wn;  // W is updated in place: entry j is read above, before this write
  a[j] = rn - sj;
  return z * z;
}

template <typename T>
double step_matrix(const T* __restrict__ x, const T* __restrict__ l, T* __restrict__ w, T t,
                   T ratio, T* __restrict__ s, T* __restrict__ a, int64_t n) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t q = 0; q < kLanes; ++q) acc[q] += step_entry<T>(x, l, w, t, ratio, s, a, j + q);
  double err2 = 0.0;
  for (; j < n; ++j) err2 += static_cast<double>(step_entry<T>(x, l, w, t, ratio, s, a, j));
  for (int64_t q = 0; q < kLanes; ++q) err2 += static_cast<double>(acc[q]);
  return err2;
}

void check_batch(const Tensor& t, const char* name, const Tensor& X) {
  check_same_dtype(kOp, name, t, "X", X);
  check_same_device(kOp, name, t, "X", X);
}

// W, S and A are updated in place (they are the loop's own buffers): no output is allocated (an
// out-of-place version, three fresh outputs a call and their page faults, ran at about 9 GB/s,
// docs/DESIGN.md §8). Matrices whose `done` flag is set are left as they are (the loop's hold),
// and get err2 = 0.
Tensor ialm_step_cpu(const Tensor& X, const Tensor& L, Tensor W, Tensor S, Tensor A,
                     const Tensor& t_in, const Tensor& ratio_in, const Tensor& done_in) {
  check_defined(kOp, "X", X);
  check_cpu_dtype(kOp, "X", X);
  check_min_dim(kOp, "X", X, 2, "(*, m, n)");
  LSEF_CHECK(X.is_contiguous(), kOp, ": X must be contiguous");
  for (auto [t, name] :
       {std::pair<const Tensor*, const char*>{&L, "L"}, {&W, "W"}, {&S, "S"}, {&A, "A"}}) {
    check_batch(*t, name, X);
    LSEF_CHECK_VALUE(same_sizes(t->sizes(), X.sizes()), kOp, ": ", name, " must have X's shape ",
                     shape(X), ", got ", shape(*t));
    LSEF_CHECK(t->is_contiguous(), kOp, ": ", name, " must be contiguous");
  }
  const int64_t m = X.size(X.dim() - 2), n = X.size(X.dim() - 1);
  const int64_t per = m * n;
  int64_t count = 1;
  for (int64_t d = 0; d < X.dim() - 2; ++d) count *= X.size(d);
  for (auto [t, name] : {std::pair{&t_in, "t"}, std::pair{&ratio_in, "ratio"}}) {
    check_batch(*t, name, X);
    LSEF_CHECK_VALUE(t->numel() == count, kOp, ": ", name, " must hold one value per matrix (",
                     count, "), got shape ", shape(*t));
  }
  LSEF_CHECK(done_in.scalar_type() == kBool, kOp, ": done must be a bool tensor, got ",
             done_in.scalar_type());
  check_same_device(kOp, "done", done_in, "X", X);
  LSEF_CHECK_VALUE(done_in.numel() == count, kOp, ": done must hold one value per matrix (", count,
                   "), got shape ", shape(done_in));
  const Tensor tt = as_contiguous(t_in), ratio = as_contiguous(ratio_in);
  const Tensor done = as_contiguous(done_in);
  Tensor err2 = empty_as(X, {count}, kDouble);
  double* e = ptr<double>(err2);
  const bool* skip = cptr<bool>(done);
  if (per == 0) {
    std::fill(e, e + count, 0.0);
    return err2;
  }
  dispatch_floating(X.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T *x = cptr<T>(X), *l = cptr<T>(L);
    const T *tv = cptr<T>(tt), *rv = cptr<T>(ratio);
    T *w = ptr<T>(W), *s = ptr<T>(S), *a = ptr<T>(A);
    parallel_for(0, count, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * per;
        e[b] = skip[b] ? 0.0 : step_matrix<T>(x + o, l + o, w + o, tv[b], rv[b], s + o, a + o, per);
      }
    });
  });
  return err2;
}

}  // namespace
}  // namespace ialm
}  // namespace lsef

STABLE_TORCH_LIBRARY_IMPL(lsef, CPU, m) {
  m.impl("_ialm_step_", TORCH_BOX(&lsef::ialm::ialm_step_cpu));
}
