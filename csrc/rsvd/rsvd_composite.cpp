// rsvd_backward, lowrank and lowrank_backward: written once with ATen matrix products, so they
// run on every backend that has an rsvd kernel (CompositeExplicitAutograd). Math: docs/DESIGN.md
// §6-7.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/diag_embed.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "rsvd/rsvd_args.h"
#include "rsvd/rsvd_host.h"

namespace lsef {
namespace rsvd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_dispatch(const at::Tensor& A, int64_t k,
                                                             int64_t oversample, int64_t n_iter,
                                                             int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lsef::rsvd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, int64_t, int64_t, int64_t, int64_t)>();
  return op.call(A, k, oversample, n_iter, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank(const at::Tensor& A, int64_t k,
                                                       int64_t oversample, int64_t n_iter,
                                                       int64_t seed) {
  check("lowrank", A, k, oversample, n_iter);  // errors name the op the user called
  auto [U, S, V] = rsvd_dispatch(A, k, oversample, n_iter, seed);
  return {at::matmul(U * S.unsqueeze(-2), V.mT()), U, V};
}

// The regularisation scale of a batch of spectra: sqrt(machine epsilon) times the largest
// singular value of each matrix (never exactly 0).
at::Tensor regularisation_scale(const at::Tensor& S) {
  const double eps = S.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                    : std::numeric_limits<float>::epsilon();
  const double tiny = S.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                                     : std::numeric_limits<float>::min();
  return (std::sqrt(eps) * std::get<0>(S.max(-1, true))).clamp_min(tiny);
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
at::Tensor rsvd_backward(const std::optional<at::Tensor>& gU, const std::optional<at::Tensor>& gS,
                         const std::optional<at::Tensor>& gV, const at::Tensor& U,
                         const at::Tensor& S_in, const at::Tensor& V) {
  const at::Tensor w = unit_scale(std::get<0>(S_in.max(-1, true))).unsqueeze(-1);  // (*, 1, 1)
  const at::Tensor S = S_in * w.squeeze(-1);
  const at::Tensor tau_s = regularisation_scale(S);  // (*, 1)
  const at::Tensor s2 = S * S;
  const at::Tensor E = s2.unsqueeze(-2) - s2.unsqueeze(-1);  // E[i, j] = s_j^2 - s_i^2
  const at::Tensor tau2 = (tau_s * tau_s).unsqueeze(-1);
  // `where` keeps 0/0 out where a gap or a singular value is exactly zero and tau underflows.
  const at::Tensor zero = at::zeros({}, S.options());
  const at::Tensor F = at::where(E != 0, E / (E * E + tau2 * tau2), zero);  // 0 on the diagonal
  const at::Tensor S_inv = at::where(S > 0, S / (s2 + tau_s * tau_s), zero);

  at::Tensor inner = at::zeros_like(E);
  at::Tensor outer;  // terms outside span(U) x span(V)
  if (gU.has_value()) {
    const at::Tensor UtgU = at::matmul(U.mT(), *gU);
    inner = inner + (F * (UtgU - UtgU.mT())) * S.unsqueeze(-2);
    const at::Tensor gU_perp = *gU - at::matmul(U, UtgU);
    outer = at::matmul(gU_perp * S_inv.unsqueeze(-2), V.mT());
  }
  if (gV.has_value()) {
    const at::Tensor VtgV = at::matmul(V.mT(), *gV);
    inner = inner + S.unsqueeze(-1) * (F * (VtgV - VtgV.mT()));
    const at::Tensor gV_perp = *gV - at::matmul(V, VtgV);
    const at::Tensor term = at::matmul(U * S_inv.unsqueeze(-2), gV_perp.mT());
    outer = outer.defined() ? outer + term : term;
  }
  inner = inner * w;
  if (gS.has_value()) inner = inner + at::diag_embed(*gS);
  at::Tensor dA = at::matmul(at::matmul(U, inner), V.mT());
  return outer.defined() ? dA + outer * w : dA;
}

}  // namespace

at::Tensor lowrank_backward(const at::Tensor& grad, const at::Tensor& U, const at::Tensor& V) {
  const at::Tensor UtG = at::matmul(U.mT(), grad);  // (*, k, n)
  const at::Tensor GV = at::matmul(grad, V);        // (*, m, k)
  return at::matmul(U, UtG) + at::matmul(GV - at::matmul(U, at::matmul(UtG, V)), V.mT());
}

}  // namespace rsvd
}  // namespace lsef

TORCH_LIBRARY_IMPL(lsef, CompositeExplicitAutograd, m) {
  m.impl("rsvd_backward", &lsef::rsvd::rsvd_backward);
  m.impl("lowrank", &lsef::rsvd::lowrank);
  m.impl("lowrank_backward", &lsef::rsvd::lowrank_backward);  // the CPU has its own kernel
}
