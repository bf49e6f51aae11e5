// rank_scale: CPU kernel (float32, float64).
// The op is separable by columns: G'[:, c] needs only G[:, c] and C[:, c] = U^T G[:, c]. So every
// task takes one matrix and a block of columns small enough to stay in cache, computes its slice
// of C, then writes its slice of G'. G is read from memory once and G' written once.
#include <algorithm>
#include <vector>

#include "common/cpu_utils.h"
#include "rank_scale/rank_scale_args.h"

namespace lsef {
namespace rank_scale {
namespace {

constexpr const char* kOp = "rank_scale";
constexpr int64_t kTileBytes = 64 * 1024;  // one tile of G: well inside a core's L2

// This kernel is compute-bound at SSE2 width (2r multiply-adds per element), so it is also
// compiled for x86-64-v3 (AVX2 + FMA) and the loader picks the best clone for the CPU at hand.
template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default"))) void scale_tile(
    const T* __restrict__ G, const T* __restrict__ U, T* __restrict__ out, T* __restrict__ C,
    int64_t m, int64_t n, int64_t r, int64_t c0, int64_t width, T alpha, T beta) {
  std::fill(C, C + r * width, T(0));
  for (int64_t i = 0; i < m; ++i) {
    const T* g = G + i * n + c0;
    for (int64_t k = 0; k < r; ++k) {
      const T u = U[i * r + k];
      T* c = C + k * width;
      for (int64_t j = 0; j < width; ++j) c[j] += u * g[j];
    }
  }
  const T delta = alpha - beta;
  for (int64_t i = 0; i < m; ++i) {
    const T* g = G + i * n + c0;
    T* o = out + i * n + c0;
    for (int64_t j = 0; j < width; ++j) o[j] = beta * g[j];
    for (int64_t k = 0; k < r; ++k) {
      const T w = delta * U[i * r + k];
      const T* c = C + k * width;
      for (int64_t j = 0; j < width; ++j) o[j] += w * c[j];
    }
  }
}

template <typename T>
void rank_scale_kernel(const Args& a, Tensor& out) {
  const int64_t m = a.m, n = a.n, r = a.r;
  const int64_t width = std::min(
      n, std::max<int64_t>(16, kTileBytes / std::max<int64_t>(1, m * sizeof(T)) / 16 * 16));
  const int64_t tiles_per_matrix = ceil_div(n, width);
  const T* G = cptr<T>(a.G);
  const T* U = cptr<T>(a.U);
  const T* alpha = cptr<T>(a.alpha);
  const T* beta = cptr<T>(a.beta);
  const int64_t alpha_step = a.alpha.numel() == 1 ? 0 : 1;
  const int64_t beta_step = a.beta.numel() == 1 ? 0 : 1;
  const int64_t U_step = a.shared_U ? 0 : m * r;
  T* O = ptr<T>(out);
  parallel_for(0, a.batch * tiles_per_matrix, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> C(r * width);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tiles_per_matrix;
      const int64_t c0 = (t % tiles_per_matrix) * width;
      scale_tile<T>(G + b * m * n, U + b * U_step, O + b * m * n, C.data(), m, n, r, c0,
                    std::min(width, n - c0), alpha[b * alpha_step], beta[b * beta_step]);
    }
  });
}

Tensor rank_scale_cpu(const Tensor& G, const Tensor& U, const Tensor& alpha, const Tensor& beta) {
  check_cpu_dtype(kOp, "G", G);
  const Args a = prepare(kOp, G, U, alpha, beta);
  Tensor out = empty_output(a.G);
  if (out.numel() == 0) return out;
  dispatch_floating(a.G.scalar_type(), kOp,
                    [&](auto tag) { rank_scale_kernel<typename decltype(tag)::type>(a, out); });
  return out;
}

}  // namespace
}  // namespace rank_scale
}  // namespace lsef

STABLE_TORCH_LIBRARY_IMPL(lsef, CPU, m) {
  m.impl("rank_scale", TORCH_BOX(&lsef::rank_scale::rank_scale_cpu));
}
