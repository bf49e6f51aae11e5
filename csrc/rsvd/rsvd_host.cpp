// rsvd: host code shared by the CPU and CUDA backends (rsvd_host.h), and the generator's test
// hooks.
#include "rsvd/rsvd_host.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/bitwise_left_shift.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/frexp.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "common/philox.h"
#include "rsvd/rescale.h"

namespace lsef {
namespace rsvd {

at::Tensor test_matrix_t(int64_t q, int64_t l, int64_t seed, at::ScalarType dtype) {
  at::Tensor omega_t = at::empty({l, q}, at::TensorOptions().dtype(at::kDouble));
  double* o = omega_t.data_ptr<double>();
  for (int64_t j = 0; j < q; ++j)
    for (int64_t c = 0; c < l; ++c)
      o[c * q + j] = philox::normal(j * l + c, static_cast<uint64_t>(seed));
  return dtype == at::kDouble ? omega_t : omega_t.to(dtype);
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  return env != nullptr && *env != '\0' ? std::atoll(env) : fallback;
}

namespace {

// 2^s for integer s with 2^s normal in `acc` (float or double), built from its bits: exact on
// every backend.
at::Tensor pow2(const at::Tensor& s, at::ScalarType acc) {
  if (acc == at::kFloat) return at::bitwise_left_shift(s + 127, 23).to(at::kInt).view(at::kFloat);
  return at::bitwise_left_shift(s + 1023, 52).view(at::kDouble);
}

// rescale_shift (rescale.h) of every matrix's largest magnitude amax, as int64; with
// band = false, the shift that brings every nonzero finite amax into [1, 2).
at::Tensor shifts(const at::Tensor& amax, bool band, int64_t lim) {
  const bool f32 = amax.scalar_type() == at::kFloat;
  const double lo = f32 ? ScaleBand<float>::lo : ScaleBand<double>::lo;
  const double hi = f32 ? ScaleBand<float>::hi : ScaleBand<double>::hi;
  const at::Tensor e = std::get<1>(at::frexp(amax)).to(at::kLong);
  at::Tensor keep = (amax == 0) | ~at::isfinite(amax);
  if (band) keep = keep | ((amax >= lo) & (amax <= hi));
  return at::where(keep, at::zeros({}, e.options()), (1 - e).clamp(-lim, lim));
}

int64_t max_shift(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return ScaleBand<double>::max_shift;
    case at::kHalf:
      return 14;  // 2^+-14 are normal float16 numbers
    default:
      return ScaleBand<float>::max_shift;  // float32, bfloat16
  }
}

}  // namespace

at::Tensor unit_scale(const at::Tensor& amax) {
  const at::ScalarType work = amax.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor s = shifts(amax.to(work), false, max_shift(amax.scalar_type()));
  return pow2(s, work).to(amax.scalar_type());
}

Projection project(const at::Tensor& A, const Shape& sh, int64_t n_iter, const at::Tensor& omega_t,
                   at::ScalarType acc, const Orthonormalize& orth, const Screen& screen) {
  Projection pr;
  pr.p = std::min(sh.m, sh.n);
  pr.q = std::max(sh.m, sh.n);
  pr.wide = sh.m <= sh.n;
  const at::Tensor A3 = A.reshape({sh.batch, sh.m, sh.n}).to(acc);
  // Non-finite matrices go through as zeros (the factorizations need finite input); the tails
  // write NaN for them, as the fused paths do. With a backend's screen, the usual all-finite
  // batch is used as it is (no masked copy).
  const bool screened = screen.finite.defined();
  pr.finite = screened ? screen.finite : at::isfinite(A3).flatten(1).all(1).contiguous();
  const bool all_ok = screened && pr.finite.all().item<bool>();
  const at::Tensor clean =
      all_ok ? A3 : at::where(pr.finite.view({-1, 1, 1}), A3, at::zeros({}, A3.options()));
  const at::Tensor amax = screened ? at::where(pr.finite, screen.amax.to(acc),
                                               at::zeros({}, screen.amax.options().dtype(acc)))
                                   : at::linalg_vector_norm(clean, INFINITY, at::IntArrayRef{1, 2});
  const at::Tensor shift = shifts(amax, true, max_shift(acc));
  pr.unscale = pow2(-shift, acc);
  // On the CPU a look at the shifts is free and saves a pass over A for the usual all-zero case;
  // on a GPU it would be a host sync, so the (cheap, elementwise) product is always taken.
  const bool scale = !clean.is_cpu() || shift.any().item<bool>();
  const at::Tensor scaled = scale ? clean * pow2(shift, acc).view({-1, 1, 1}) : clean;
  const at::Tensor W = pr.wide ? scaled : scaled.mT();  // (B, p, q)
  if (sh.exact()) {
    pr.l = pr.p;
    pr.Z = W.contiguous();  // (B, p, q) row-major = W^T column-major
    return pr;
  }
  pr.l = sh.l;
  at::Tensor Q = orth(at::matmul(W, omega_t.mT()));
  for (int64_t it = 0; it < n_iter; ++it) {
    const at::Tensor Qz = orth(at::matmul(W.mT(), Q));
    Q = orth(at::matmul(W, Qz));
  }
  pr.Z = at::matmul(Q.mT(), W).contiguous();  // (B, l, q): W^T Q column-major
  pr.Q = Q;
  return pr;
}

namespace {

// The generator's raw words and normals, for tests that compare with python/lsef_ref.
at::Tensor philox_words(int64_t blocks, int64_t seed) {
  at::Tensor out = at::empty({blocks, 4}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < blocks; ++b) {
    const philox::Words w =
        philox::philox4x32_10(static_cast<uint64_t>(b), static_cast<uint64_t>(seed));
    for (int t = 0; t < 4; ++t) o[b * 4 + t] = w.x[t];
  }
  return out;
}

at::Tensor philox_normal(int64_t count, int64_t seed) {
  at::Tensor out = at::empty({count}, at::kDouble);
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < count; ++i)
    o[i] = philox::normal(static_cast<uint64_t>(i), static_cast<uint64_t>(seed));
  return out;
}

}  // namespace
}  // namespace rsvd
}  // namespace lsef

// No tensor inputs: these run on the CPU whatever the caller's device.
TORCH_LIBRARY_IMPL(lsef, CompositeExplicitAutograd, m) {
  m.impl("_philox_words", &lsef::rsvd::philox_words);
  m.impl("_philox_normal", &lsef::rsvd::philox_normal);
}
