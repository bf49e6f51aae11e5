// rsvd: host code shared by the CPU and CUDA backends (rsvd_host.h), and the generator's test
// hooks. ATen ops are boxed calls through the stable ABI (common/stable.h), scalars as 0-d
// tensors.
#include "rsvd/rsvd_host.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "common/philox.h"
#include "rsvd/rescale.h"

namespace lsef {
namespace rsvd {

Tensor test_matrix_t(int64_t q, int64_t l, int64_t seed, ScalarType dtype) {
  // Drawn in double and rounded once, straight into float32 or float64 (one allocation).
  const ScalarType direct = dtype == kFloat ? kFloat : kDouble;
  Tensor omega_t = empty_cpu({l, q}, direct);
  dispatch_floating(direct, "rsvd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* o = ptr<T>(omega_t);
    for (int64_t j = 0; j < q; ++j)
      for (int64_t c = 0; c < l; ++c)
        o[c * q + j] = static_cast<T>(philox::normal(j * l + c, static_cast<uint64_t>(seed)));
  });
  return aten::to_dtype(omega_t, dtype);
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  return env != nullptr && *env != '\0' ? std::atoll(env) : fallback;
}

namespace {

using aten::scalar;

// 2^s for integer-valued s (in `acc`, float or double) with 2^s normal in `acc`, built from its
// bits: exact on every backend. (The biased exponent is formed in floating point, where it is an
// exact small integer: boxed calls carry no Scalar, and integer tensors refuse a double alpha.)
Tensor pow2(const Tensor& s, ScalarType acc) {
  if (acc == kFloat) {
    const Tensor biased = aten::to_dtype(aten::add(s, 127.0), kInt);
    return aten::view_dtype(aten::bitwise_left_shift(biased, scalar(23, kInt)), kFloat);
  }
  const Tensor biased = aten::to_dtype(aten::add(s, 1023.0), kLong);
  return aten::view_dtype(aten::bitwise_left_shift(biased, scalar(52, kLong)), kDouble);
}

// rescale_shift (rescale.h) of every matrix's largest magnitude amax, integer-valued in amax's
// dtype (float or double); with band = false, the shift that brings every nonzero finite amax
// into [1, 2).
Tensor shifts(const Tensor& amax, bool band, int64_t lim) {
  const ScalarType dtype = amax.scalar_type();
  const bool f32 = dtype == kFloat;
  const double lo = f32 ? ScaleBand<float>::lo : ScaleBand<double>::lo;
  const double hi = f32 ? ScaleBand<float>::hi : ScaleBand<double>::hi;
  const Tensor e = aten::to_dtype(aten::frexp_exponent(amax), dtype);
  Tensor keep =
      aten::logical_or(aten::eq(amax, scalar(0)), aten::logical_not(aten::isfinite(amax)));
  if (band) {
    keep = aten::logical_or(
        keep, aten::logical_and(aten::ge(amax, scalar(lo)), aten::le(amax, scalar(hi))));
  }
  const Tensor shift = aten::clamp(aten::sub(scalar(1, dtype), e), scalar(-lim, dtype),
                                   scalar(static_cast<double>(lim), dtype));
  return aten::where(keep, scalar(0, dtype), shift);
}

int64_t max_shift(ScalarType t) {
  switch (t) {
    case ScalarType::Double:
      return ScaleBand<double>::max_shift;
    case ScalarType::Half:
      return 14;  // 2^+-14 are normal float16 numbers
    default:
      return ScaleBand<float>::max_shift;  // float32, bfloat16
  }
}

}  // namespace

Tensor unit_scale(const Tensor& amax) {
  const ScalarType work = amax.scalar_type() == kDouble ? kDouble : kFloat;
  const Tensor s = shifts(aten::to_dtype(amax, work), false, max_shift(amax.scalar_type()));
  return aten::to_dtype(pow2(s, work), amax.scalar_type());
}

Projection project(const Tensor& A, const Shape& sh, int64_t n_iter, const Tensor& omega_t,
                   ScalarType acc, const Orthonormalize& orth, const Screen& screen) {
  Projection pr;
  pr.p = std::min(sh.m, sh.n);
  pr.q = std::max(sh.m, sh.n);
  pr.wide = sh.m <= sh.n;
  const Tensor A3 = aten::to_dtype(torch::stable::reshape(A, {sh.batch, sh.m, sh.n}), acc);
  Tensor scaled;
  const bool screened = screen.finite.defined();
  if (screened && A3.is_cpu() && screen.amax.scalar_type() == acc) {
    // The CPU with the backend's screen: the shifts are read off amax on the host (rescale.h's
    // scalar rule, the same bits as shifts() and pow2() below) instead of some thirty boxed
    // calls, which cost a lone small matrix more than its factorization.
    pr.finite = screen.finite;
    pr.unscale = empty_cpu({sh.batch}, acc);
    Tensor scale = empty_cpu({sh.batch, 1, 1}, acc);
    bool all_ok = true, any_shift = false;
    dispatch_floating(acc, "rsvd", [&](auto tag) {
      using T = typename decltype(tag)::type;
      const bool* ok = cptr<bool>(screen.finite);
      const T* amax = cptr<T>(screen.amax);
      T* unscale = ptr<T>(pr.unscale);
      T* sc = ptr<T>(scale);
      for (int64_t b = 0; b < sh.batch; ++b) {
        const int s = ok[b] ? rescale_shift(amax[b]) : 0;
        all_ok = all_ok && ok[b];
        any_shift = any_shift || s != 0;
        unscale[b] = rsvd::pow2(-s, T(0));
        sc[b] = rsvd::pow2(s, T(0));
      }
    });
    const Tensor clean =
        all_ok ? A3 : aten::where(torch::stable::view(pr.finite, {-1, 1, 1}), A3, scalar(0, acc));
    scaled = any_shift ? aten::mul(clean, scale) : clean;
  } else {
    // Non-finite matrices go through as zeros (the factorizations need finite input); the tails
    // write NaN for them, as the fused paths do. With a backend's screen, the usual all-finite
    // batch is used as it is (no masked copy).
    pr.finite = screened
                    ? screen.finite
                    : as_contiguous(aten::all(torch::stable::flatten(aten::isfinite(A3), 1), 1));
    const bool all_ok = screened && aten::item_bool(aten::all(pr.finite));
    const Tensor zero = scalar(0, acc);
    const Tensor clean =
        all_ok ? A3 : aten::where(torch::stable::view(pr.finite, {-1, 1, 1}), A3, zero);
    // Largest magnitude of each matrix (zero for the masked ones).
    const Tensor amax = screened ? aten::where(pr.finite, aten::to_dtype(screen.amax, acc), zero)
                                 : torch::stable::amax(aten::abs(clean), {1, 2}, false);
    const Tensor shift = shifts(amax, true, max_shift(acc));
    pr.unscale = pow2(aten::neg(shift), acc);
    // On the CPU a look at the shifts is free and saves a pass over A for the usual all-zero
    // case; on a GPU it would be a host sync, so the (cheap, elementwise) product is always
    // taken.
    const bool scale = !clean.is_cpu() || aten::item_bool(aten::any(shift));
    scaled = scale ? aten::mul(clean, torch::stable::view(pow2(shift, acc), {-1, 1, 1})) : clean;
  }
  const Tensor W = pr.wide ? scaled : aten::mT(scaled);  // (B, p, q)
  if (sh.exact()) {
    pr.l = pr.p;
    pr.Z = as_contiguous(W);  // (B, p, q) row-major = W^T column-major
    return pr;
  }
  pr.l = sh.l;
  Tensor Q = orth(torch::stable::matmul(W, aten::mT(omega_t)));
  for (int64_t it = 0; it < n_iter; ++it) {
    // W^T Q formed as (Q^T W)^T: the same products, but CPU BLAS (MKL, torch 2.13) ran the
    // transposed-operand form up to 10x slower for l = 9 or 10 columns (1 x 512 x 2048: 8.0 ms
    // against 0.8 ms); the transposed view is what both orthonormalisers read column-major.
    const Tensor Qz = orth(aten::mT(torch::stable::matmul(aten::mT(Q), W)));
    Q = orth(torch::stable::matmul(W, Qz));
  }
  pr.Z = as_contiguous(torch::stable::matmul(aten::mT(Q), W));  // W^T Q column-major
  pr.Q = Q;
  return pr;
}

}  // namespace rsvd
}  // namespace lsef
