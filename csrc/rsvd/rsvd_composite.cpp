// rsvd_backward, lowrank and lowrank_backward: written once with ATen matrix products (boxed
// calls through the stable ABI), so they run on every backend that has an rsvd kernel
// (CompositeExplicitAutograd). Math: docs/DESIGN.md §6-7.
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "rsvd/rsvd_args.h"
#include "rsvd/rsvd_host.h"

namespace lsef {
namespace rsvd {
namespace {

// lsef::rsvd through the dispatcher: its CPU or CUDA kernel, by A's device.
std::tuple<Tensor, Tensor, Tensor> rsvd_dispatch(const Tensor& A, int64_t k, int64_t oversample,
                                                 int64_t n_iter, int64_t seed) {
  const auto out = aten::call_n<3>("lsef::rsvd", "", A, k, oversample, n_iter, seed);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> lowrank(const Tensor& A, int64_t k, int64_t oversample,
                                           int64_t n_iter, int64_t seed) {
  check("lowrank", A, k, oversample, n_iter);  // errors name the op the user called
  auto [U, S, V] = rsvd_dispatch(A, k, oversample, n_iter, seed);
  const Tensor US = aten::mul(U, torch::stable::unsqueeze(S, -2));
  return {torch::stable::matmul(US, aten::mT(V)), U, V};
}

// The regularisation scale of a batch of spectra: sqrt(machine epsilon) times the largest
// singular value of each matrix (never exactly 0).
Tensor regularisation_scale(const Tensor& S) {
  const bool f64 = S.scalar_type() == kDouble;
  const double eps =
      f64 ? std::numeric_limits<double>::epsilon() : std::numeric_limits<float>::epsilon();
  const double tiny = f64 ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  return aten::clamp(aten::mul(aten::max_keepdim(S, -1), std::sqrt(eps)), aten::scalar(tiny),
                     std::nullopt);
}

// Townsend (2016), "Differentiating the Singular Value Decomposition", for A ~ U diag(S) V^T
// with the discarded singular values taken as zero:
//   dA = U [ (F o skew(U^T gU)) S + S (F o skew(V^T gV)) + diag(gS) ] V^T
//        + (I - U U^T) gU S^-1 V^T + U S^-1 gV^T (I - V V^T),
// skew(X) = X - X^T, F_ij = 1 / (s_j^2 - s_i^2) off the diagonal. Regularised (DESIGN.md §6):
// F_ij = E / (E^2 + tau^2) with E = s_j^2 - s_i^2, 1/s = s / (s^2 + tau_s^2), tau_s = sqrt(eps)
// s_max, tau = tau_s^2: finite for repeated and zero singular values, unchanged to O(eps)
// relative error where gaps are O(s_max^2).
// Scale: every term but diag(gS) is homogeneous of degree -1 in S, so it is computed from
// S w (w the power of two that brings s_max into [1, 2): exact) and multiplied by w; squares
// of S itself would overflow from s ~ 1e19 in float32 and underflow below 1e-19.
Tensor rsvd_backward(const std::optional<Tensor>& gU, const std::optional<Tensor>& gS,
                     const std::optional<Tensor>& gV, const Tensor& U, const Tensor& S_in,
                     const Tensor& V) {
  using aten::add;
  using aten::mT;
  using aten::mul;
  using aten::sub;
  using torch::stable::matmul;
  using torch::stable::unsqueeze;
  const Tensor w = unsqueeze(unit_scale(aten::max_keepdim(S_in, -1)), -1);  // (*, 1, 1)
  const Tensor S = mul(S_in, torch::stable::squeeze(w, -1));
  const Tensor tau_s = regularisation_scale(S);  // (*, 1)
  const Tensor s2 = mul(S, S);
  const Tensor E = sub(unsqueeze(s2, -2), unsqueeze(s2, -1));  // E[i, j] = s_j^2 - s_i^2
  const Tensor tau2 = unsqueeze(mul(tau_s, tau_s), -1);
  // `where` keeps 0/0 out where a gap or a singular value is exactly zero and tau underflows.
  const Tensor zero = aten::scalar(0, S.scalar_type());
  const Tensor F = aten::where(aten::ne(E, zero), aten::div(E, add(mul(E, E), mul(tau2, tau2))),
                               zero);  // 0 on the diagonal
  const Tensor S_inv =
      aten::where(aten::gt(S, zero), aten::div(S, add(s2, mul(tau_s, tau_s))), zero);

  Tensor inner = aten::zeros_like(E);
  Tensor outer;  // terms outside span(U) x span(V)
  if (gU.has_value()) {
    const Tensor UtgU = matmul(mT(U), *gU);
    inner = add(inner, mul(mul(F, sub(UtgU, mT(UtgU))), unsqueeze(S, -2)));
    const Tensor gU_perp = sub(*gU, matmul(U, UtgU));
    outer = matmul(mul(gU_perp, unsqueeze(S_inv, -2)), mT(V));
  }
  if (gV.has_value()) {
    const Tensor VtgV = matmul(mT(V), *gV);
    inner = add(inner, mul(unsqueeze(S, -1), mul(F, sub(VtgV, mT(VtgV)))));
    const Tensor gV_perp = sub(*gV, matmul(V, VtgV));
    const Tensor term = matmul(mul(U, unsqueeze(S_inv, -2)), mT(gV_perp));
    outer = outer.defined() ? add(outer, term) : term;
  }
  inner = mul(inner, w);
  if (gS.has_value()) inner = add(inner, aten::diag_embed(*gS));
  const Tensor dA = matmul(matmul(U, inner), mT(V));
  return outer.defined() ? add(dA, mul(outer, w)) : dA;
}

}  // namespace

Tensor lowrank_backward(const Tensor& grad, const Tensor& U, const Tensor& V) {
  using torch::stable::matmul;
  const Tensor UtG = matmul(aten::mT(U), grad);  // (*, k, n)
  const Tensor GV = matmul(grad, V);             // (*, m, k)
  return aten::add(matmul(U, UtG), matmul(aten::sub(GV, matmul(U, matmul(UtG, V))), aten::mT(V)));
}

}  // namespace rsvd
}  // namespace lsef

STABLE_TORCH_LIBRARY_IMPL(lsef, CompositeExplicitAutograd, m) {
  m.impl("rsvd_backward", TORCH_BOX(&lsef::rsvd::rsvd_backward));
  m.impl("lowrank", TORCH_BOX(&lsef::rsvd::lowrank));
  m.impl("lowrank_backward", TORCH_BOX(&lsef::rsvd::lowrank_backward));  // the CPU has its own
}
