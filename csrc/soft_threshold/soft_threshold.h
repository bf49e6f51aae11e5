// soft_threshold: the per-element math every backend shares (__host__ __device__), so CPU and
// CUDA compute the same bits. The argument checks and lam's broadcast classification live in
// soft_threshold_args.h.
// R = X - L;  soft: S = sign(R) max(|R| - lam, 0);  hard: S = R 1[|R| > lam].
#pragma once

#include <math.h>

#include "common/macros.h"

namespace lsef {
namespace soft_threshold {

LSEF_HOST_DEVICE float abs_(float v) { return fabsf(v); }
LSEF_HOST_DEVICE double abs_(double v) { return fabs(v); }
LSEF_HOST_DEVICE float copysign_(float m, float s) { return copysignf(m, s); }
LSEF_HOST_DEVICE double copysign_(double m, double s) { return copysign(m, s); }

// Forward value for a residual r = x - l. NaN in r or lam gives NaN (as the reference does);
// soft thresholding with lam = +inf of r = +-inf gives NaN (inf - inf), also as the reference.
template <bool Hard, typename T>
LSEF_HOST_DEVICE T value(T r, T lam) {
  if constexpr (Hard) {
    return r * static_cast<T>(abs_(r) > lam);
  } else {
    T mag = abs_(r) - lam;
    mag = mag < T(0) ? T(0) : mag;  // not fmax: NaN must propagate
    return copysign_(mag, r);
  }
}

// Backward for one element: with M = 1[|r| > lam],
//   dX = g M,   dL = -g M,   dlam contribution = -g sign(r) M  (soft), 0 (hard).
// Written as the product G * M of the definition (so a non-finite upstream gradient stays
// non-finite everywhere), and without selects: GCC turns selects into branches in some of the
// CPU loops, which then neither vectorise nor predict well on random data.
template <bool Hard, typename T>
LSEF_HOST_DEVICE T grad_input(T g, T r, T lam) {
  return g * static_cast<T>(abs_(r) > lam);
}

template <bool Hard, typename T>
LSEF_HOST_DEVICE T grad_lam(T g, T r, T lam) {
  if constexpr (Hard) {
    return T(0);
  } else {
    // M = 1 implies r != 0 because lam >= 0, so sign(r) = copysign(1, r) wherever M = 1.
    return -copysign_(T(1), r) * grad_input<Hard>(g, r, lam);
  }
}

}  // namespace soft_threshold
}  // namespace lsef
