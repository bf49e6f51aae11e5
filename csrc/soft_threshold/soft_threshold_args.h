// soft_threshold: argument validation and lam's broadcast class, shared by every backend.
#pragma once

#include <optional>
#include <tuple>

#include "common/checks.h"

namespace lsef {
namespace soft_threshold {

// How lam is laid out against X flattened to rows of `channels` elements.
//   Scalar:  one value;  Channel: one value per channel (last dim);  Full: X's shape.
// Any other broadcastable shape is expanded to X's shape (Full) and its gradient is summed
// back to lam's shape afterwards.
enum class LamMode { Scalar, Channel, Full };

struct Args {
  Tensor X;    // contiguous
  Tensor L;    // contiguous, or undefined when absent
  Tensor lam;  // contiguous; X's shape in Full mode
  LamMode mode;
  int64_t channels;   // X.size(-1) (1 for a 0-d X)
  bool lam_expanded;  // lam was broadcast to X's shape here
};

inline bool broadcastable_to(const Tensor& t, IntArrayRef shape) {
  if (t.dim() > static_cast<int64_t>(shape.size())) return false;
  for (int64_t i = 1; i <= t.dim(); ++i) {
    const int64_t s = t.size(-i);
    if (s != 1 && s != shape[shape.size() - i]) return false;
  }
  return true;
}

inline LamMode classify(const Tensor& lam, const Tensor& X) {
  if (lam.numel() == 1) return LamMode::Scalar;
  if (lam.dim() >= 1 && X.dim() >= 1 && lam.size(-1) == X.size(-1) && lam.numel() == lam.size(-1)) {
    return LamMode::Channel;
  }
  return LamMode::Full;
}

inline Args prepare(const char* op, const Tensor& X, const std::optional<Tensor>& L,
                    const Tensor& lam) {
  check_floating(op, "X", X);
  if (L.has_value()) {
    check_same_dtype(op, "L", *L, "X", X);
    check_same_device(op, "L", *L, "X", X);
    LSEF_CHECK_VALUE(same_sizes(L->sizes(), X.sizes()), op, ": L must have the shape of X ",
                     shape(X), ", got ", shape(*L));
  }
  check_same_dtype(op, "lam", lam, "X", X);
  check_same_device(op, "lam", lam, "X", X);
  LSEF_CHECK_VALUE(broadcastable_to(lam, X.sizes()), op, ": lam of shape ", shape(lam),
                   " is not broadcastable to X of shape ", shape(X),
                   " (use a scalar, one value per channel of the last dim, or X's shape)");
  Args a;
  a.X = as_contiguous(X);
  a.L = L.has_value() ? as_contiguous(*L) : Tensor();
  a.mode = classify(lam, X);
  a.channels = X.dim() == 0 ? 1 : X.size(-1);
  a.lam_expanded = a.mode == LamMode::Full && !same_sizes(lam.sizes(), X.sizes());
  a.lam = as_contiguous(a.lam_expanded ? aten::expand(lam, X.sizes()) : lam);
  return a;
}

using OptionalTensor = std::optional<Tensor>;

// The backward's incoming gradient must match X.
inline void check_grad(const char* op, const Tensor& grad, const Tensor& X) {
  check_same_dtype(op, "grad", grad, "X", X);
  check_same_device(op, "grad", grad, "X", X);
  LSEF_CHECK_VALUE(same_sizes(grad.sizes(), X.sizes()), op, ": grad must have the shape of X ",
                   shape(X), ", got ", shape(grad));
}

// The backward's return value: lam's gradient summed back to lam's own shape, and None for
// every gradient not asked for.
inline std::tuple<OptionalTensor, OptionalTensor, OptionalTensor> pack_grads(
    const Args& a, const Tensor& lam, bool want_X, bool want_L, bool want_lam, const Tensor& dX,
    const Tensor& dL, Tensor dlam) {
  if (want_lam && a.lam_expanded) dlam = aten::sum_to_size(dlam, lam.sizes());
  if (want_lam) dlam = torch::stable::view(dlam, lam.sizes());
  auto maybe = [](bool want, const Tensor& t) { return want ? OptionalTensor(t) : std::nullopt; };
  return {maybe(want_X, dX), maybe(want_L, dL), maybe(want_lam, dlam)};
}

// lam must be non-negative. Scalar and per-channel lam are small and checked here; a full-shape
// lam is checked inside the kernels' pass over it, which then call this with the result.
inline void check_lam_nonnegative(const char* op, bool has_negative) {
  LSEF_CHECK_VALUE(!has_negative, op, ": lam must be non-negative, got a negative value");
}

}  // namespace soft_threshold
}  // namespace lsef
