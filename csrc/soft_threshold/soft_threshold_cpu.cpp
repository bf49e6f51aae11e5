// soft_threshold: CPU kernels (float32, float64). One fused pass over X, L (and lam) each way.
#include <algorithm>
#include <atomic>
#include <vector>

#include "common/cpu_utils.h"
#include "soft_threshold/soft_threshold.h"
#include "soft_threshold/soft_threshold_args.h"

namespace lsef {
namespace soft_threshold {
namespace {

constexpr const char* kOp = "soft_threshold";
constexpr const char* kBackwardOp = "soft_threshold_backward";

// Blocks hold whole rows when lam is per channel, so a segment never wraps around a row.
struct BlockGrid {
  int64_t count;
  int64_t elems;
};

BlockGrid make_grid(int64_t numel, int64_t channels, LamMode mode) {
  if (numel == 0) return {0, 1};
  int64_t per = kCpuBlockElems;
  if (mode == LamMode::Channel) per = std::max<int64_t>(1, kCpuBlockElems / channels) * channels;
  return {ceil_div(numel, per), per};
}

// Calls seg(offset, length, lam_offset) over the contiguous segments of block b: one segment
// per row in Channel mode (lam indexed by channel), the whole block otherwise.
template <typename Seg>
void for_each_segment(const BlockGrid& grid, int64_t b, int64_t numel, int64_t channels,
                      LamMode mode, Seg&& seg) {
  const int64_t begin = b * grid.elems;
  const int64_t end = std::min(numel, begin + grid.elems);
  if (mode == LamMode::Channel) {
    for (int64_t e = begin; e < end; e += channels) seg(e, channels, int64_t{0});
  } else {
    seg(begin, end - begin, mode == LamMode::Full ? begin : int64_t{0});
  }
}

template <typename T>
bool any_negative(const T* lam, int64_t n) {
  bool neg = false;
  for (int64_t j = 0; j < n; ++j) neg |= lam[j] < T(0);
  return neg;
}

template <typename T, bool Hard, bool HasL, bool ScalarLam>
void forward_segment(const T* __restrict__ x, const T* __restrict__ l, const T* __restrict__ lam,
                     T* __restrict__ s, int64_t n) {
  const T lam0 = lam[0];
  for (int64_t j = 0; j < n; ++j) {
    const T r = HasL ? x[j] - l[j] : x[j];
    s[j] = value<Hard>(r, ScalarLam ? lam0 : lam[j]);
  }
}

template <typename T>
void forward_kernel(const Args& a, bool hard, Tensor& S) {
  const int64_t numel = a.X.numel();
  const int64_t C = a.channels;
  const BlockGrid grid = make_grid(numel, C, a.mode);
  const T* x = cptr<T>(a.X);
  const T* l = a.L.defined() ? cptr<T>(a.L) : nullptr;
  const T* lam = cptr<T>(a.lam);
  T* s = ptr<T>(S);
  std::atomic<bool> negative{false};
  dispatch_bool(hard, [&](auto Hard) {
    dispatch_bool(l != nullptr, [&](auto HasL) {
      dispatch_bool(a.mode == LamMode::Scalar, [&](auto ScalarLam) {
        parallel_for(0, grid.count, 1, [&](int64_t b0, int64_t b1) {
          bool neg = false;
          for (int64_t b = b0; b < b1; ++b) {
            for_each_segment(grid, b, numel, C, a.mode, [&](int64_t off, int64_t n, int64_t lo) {
              forward_segment<T, Hard, HasL, ScalarLam>(x + off, HasL ? l + off : nullptr, lam + lo,
                                                        s + off, n);
              if (a.mode == LamMode::Full) neg |= any_negative(lam + lo, n);
            });
          }
          if (neg) negative = true;
        });
      });
    });
  });
  check_lam_nonnegative(kOp, negative);
}

// What the backward writes: dX always (it is also the source of dL), dL = -dX when asked, and
// lam's gradient either reduced (Scalar/Channel, into per-block partials) or elementwise (Full).
enum class LamGrad { None, Reduce, Full };

// Scalar lam's gradient is summed over a whole segment; kLanes independent partial sums let
// that loop vectorise without reassociating a single running sum.
constexpr int64_t kLanes = 16;

// One element of the backward; returns its contribution to lam's gradient.
template <typename T, bool Hard, bool HasL, LamGrad LG>
inline T backward_element(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ l,
                          T lv, T* __restrict__ dx, T* __restrict__ dlam, int64_t j) {
  const T r = HasL ? x[j] - l[j] : x[j];
  dx[j] = grad_input<Hard>(g[j], r, lv);
  if constexpr (LG == LamGrad::None) {
    return T(0);
  } else {
    const T d = grad_lam<Hard>(g[j], r, lv);
    if constexpr (LG == LamGrad::Full) dlam[j] = d;
    return d;
  }
}

// Per segment: Channel mode adds lam's gradient into acc[j] (one running sum per channel, in
// T, over the rows of one block); Scalar mode adds the segment's total into acc[0]. dL = -dX
// is written by a second loop over the segment while it is still in cache: folded into the
// first loop, it makes GCC emit a branchy scalar loop.
template <typename T, bool Hard, bool HasL, bool ScalarLam, bool WriteL, LamGrad LG>
void backward_segment(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ l,
                      const T* __restrict__ lam, T* __restrict__ dx, T* __restrict__ dl,
                      T* __restrict__ dlam, T* __restrict__ acc, int64_t n) {
  // backward_element is called directly, not through a capturing lambda: pointers read from a
  // closure are reloaded after every store, which stops GCC from vectorising the loop.
  constexpr auto element = backward_element<T, Hard, HasL, LG>;
  if constexpr (!ScalarLam) {
    for (int64_t j = 0; j < n; ++j) {
      const T d = element(g, x, l, lam[j], dx, dlam, j);
      if constexpr (LG == LamGrad::Reduce) acc[j] += d;
    }
  } else {
    const T lv = lam[0];
    T lanes[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) lanes[k] += element(g, x, l, lv, dx, dlam, j + k);
    }
    for (; j < n; ++j) lanes[0] += element(g, x, l, lv, dx, dlam, j);
    if constexpr (LG == LamGrad::Reduce) {
      for (int64_t k = 0; k < kLanes; ++k) acc[0] += lanes[k];
    }
  }
  if constexpr (WriteL) {
    for (int64_t j = 0; j < n; ++j) dl[j] = -dx[j];
  }
}

struct Grads {
  Tensor dX, dL, dlam;
};

template <typename T>
void backward_kernel(const Args& a, const Tensor& G, bool hard, bool want_L, bool want_lam,
                     Grads& out) {
  const int64_t numel = a.X.numel();
  const int64_t C = a.channels;
  const BlockGrid grid = make_grid(numel, C, a.mode);
  const int64_t lam_width = a.mode == LamMode::Channel ? C : 1;
  const LamGrad lam_grad = !want_lam || hard         ? LamGrad::None
                           : a.mode == LamMode::Full ? LamGrad::Full
                                                     : LamGrad::Reduce;
  // Per-block partial sums of lam's gradient (in T within a block, at most kCpuBlockElems
  // terms), combined in float64 in block order below.
  std::vector<T> partials(lam_grad == LamGrad::Reduce ? grid.count * lam_width : 0, T(0));
  const T* g = cptr<T>(G);
  const T* x = cptr<T>(a.X);
  const T* l = a.L.defined() ? cptr<T>(a.L) : nullptr;
  const T* lam = cptr<T>(a.lam);
  T* dx = ptr<T>(out.dX);
  T* dl = want_L ? ptr<T>(out.dL) : nullptr;
  T* dlam = lam_grad == LamGrad::Full ? ptr<T>(out.dlam) : nullptr;

  auto run = [&](auto Hard, auto HasL, auto ScalarLam, auto WriteL, auto LG) {
    parallel_for(0, grid.count, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* acc = partials.empty() ? nullptr : partials.data() + b * lam_width;
        for_each_segment(grid, b, numel, C, a.mode, [&](int64_t off, int64_t n, int64_t lo) {
          backward_segment<T, Hard, HasL, ScalarLam, WriteL, LG>(
              g + off, x + off, HasL ? l + off : nullptr, lam + lo, dx + off,
              WriteL ? dl + off : nullptr, LG == LamGrad::Full ? dlam + off : nullptr, acc, n);
        });
      }
    });
  };
  auto with_lam_grad = [&](auto... flags) {
    switch (lam_grad) {
      case LamGrad::None:
        return run(flags..., std::integral_constant<LamGrad, LamGrad::None>{});
      case LamGrad::Reduce:
        return run(flags..., std::integral_constant<LamGrad, LamGrad::Reduce>{});
      case LamGrad::Full:
        return run(flags..., std::integral_constant<LamGrad, LamGrad::Full>{});
    }
  };
  dispatch_bool(hard, [&](auto Hard) {
    dispatch_bool(l != nullptr, [&](auto HasL) {
      dispatch_bool(a.mode == LamMode::Scalar, [&](auto ScalarLam) {
        if constexpr (HasL) {
          dispatch_bool(want_L, [&](auto WriteL) { with_lam_grad(Hard, HasL, ScalarLam, WriteL); });
        } else {
          with_lam_grad(Hard, HasL, ScalarLam, std::false_type{});
        }
      });
    });
  });

  if (lam_grad == LamGrad::Reduce) {
    std::vector<double> total(lam_width, 0.0);
    for (int64_t b = 0; b < grid.count; ++b)
      for (int64_t j = 0; j < lam_width; ++j)
        total[j] += static_cast<double>(partials[b * lam_width + j]);
    T* d = ptr<T>(out.dlam);
    for (int64_t j = 0; j < lam_width; ++j) d[j] = static_cast<T>(total[j]);
  }
}

void check_cpu_inputs(const char* op, const Args& a) {
  check_cpu_dtype(op, "X", a.X);
  if (a.mode != LamMode::Full) {
    // Scalar or per-channel lam: a few values, read here.
    bool negative = false;
    dispatch_floating(a.lam.scalar_type(), op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      negative = any_negative(cptr<T>(a.lam), a.lam.numel());
    });
    check_lam_nonnegative(op, negative);
  }
}

Tensor soft_threshold_cpu(const Tensor& X, const std::optional<Tensor>& L, const Tensor& lam,
                          bool hard) {
  const Args a = prepare(kOp, X, L, lam);
  check_cpu_inputs(kOp, a);
  Tensor S = empty_output(a.X);
  dispatch_floating(a.X.scalar_type(), kOp,
                    [&](auto tag) { forward_kernel<typename decltype(tag)::type>(a, hard, S); });
  return S;
}

// output_mask = (X, L, lam). Gradients not asked for come back as None.
std::tuple<OptionalTensor, OptionalTensor, OptionalTensor> soft_threshold_backward_cpu(
    const Tensor& grad, const Tensor& X, const std::optional<Tensor>& L, const Tensor& lam,
    bool hard, std::vector<bool> output_mask) {
  const Args a = prepare(kBackwardOp, X, L, lam);
  check_cpu_inputs(kBackwardOp, a);
  check_grad(kBackwardOp, grad, X);
  const bool want_X = output_mask[0];
  const bool want_L = output_mask[1] && a.L.defined();
  const bool want_lam = output_mask[2];
  Grads out;
  if (!want_X && !want_L && !want_lam) return {};
  const Tensor G = as_contiguous(grad);
  out.dX = empty_output(a.X);
  if (want_L) out.dL = empty_output(a.X);
  if (want_lam) {
    out.dlam = hard ? aten::zeros_like(a.lam) : empty_output(a.lam);
  }
  dispatch_floating(a.X.scalar_type(), kBackwardOp, [&](auto tag) {
    backward_kernel<typename decltype(tag)::type>(a, G, hard, want_L, want_lam, out);
  });
  return pack_grads(a, lam, want_X, want_L, want_lam, out.dX, out.dL, out.dlam);
}

}  // namespace
}  // namespace soft_threshold
}  // namespace lsef

STABLE_TORCH_LIBRARY_IMPL(lsef, CPU, m) {
  m.impl("soft_threshold", TORCH_BOX(&lsef::soft_threshold::soft_threshold_cpu));
  m.impl("soft_threshold_backward", TORCH_BOX(&lsef::soft_threshold::soft_threshold_backward_cpu));
}
