// rsvd's input scaling, one definition for the CPU kernel, the CUDA block code and the shared
// host driver (docs/DESIGN.md §6, "Scale"). A matrix whose largest magnitude lies inside a band
// around 1 is factored as it is; any other is first multiplied by a power of two 2^shift that
// brings its largest magnitude into [1, 2), and S is multiplied back by 2^-shift. Powers of two
// scale exactly (only entries below 2^-120 of the largest can round), so rsvd(c A) = c rsvd(A) to
// working precision for every finite c, and no square or sum of squares in the algorithm under-
// or overflows: inside the band, entries' squares and their sums over any row stay far inside
// the dtype's range (float32: |x| in [2^-32, 2^32], squares in [2^-64, 2^64]; float64: 2^+-256).
#pragma once

#include <math.h>

#include "common/macros.h"

namespace lsef {
namespace rsvd {

template <typename A>
struct ScaleBand;
template <>
struct ScaleBand<float> {
  static constexpr float lo = 0x1p-32f, hi = 0x1p32f;
  static constexpr int max_shift = 126;  // 2^+-126 are normal floats
};
template <>
struct ScaleBand<double> {
  static constexpr double lo = 0x1p-256, hi = 0x1p256;
  static constexpr int max_shift = 1022;
};

LSEF_BLOCK_HD int binary_exponent(float x) {
  int e;
  frexpf(x, &e);
  return e;
}
LSEF_BLOCK_HD int binary_exponent(double x) {
  int e;
  frexp(x, &e);
  return e;
}
LSEF_BLOCK_HD float pow2(int s, float) { return ldexpf(1.0f, s); }
LSEF_BLOCK_HD double pow2(int s, double) { return ldexp(1.0, s); }

// The shift for a matrix whose largest magnitude is amax: 0 inside the band (and for a zero or
// non-finite amax), else 1 - e for amax = f 2^e, f in [0.5, 1), clamped so that 2^shift and
// 2^-shift are normal numbers (a subnormal amax then lands at 2^-23 or above: inside the band).
template <typename A>
LSEF_BLOCK_HD int rescale_shift(A amax) {
  if (!(amax > A(0)) || amax - amax != A(0)) return 0;
  if (amax >= ScaleBand<A>::lo && amax <= ScaleBand<A>::hi) return 0;
  const int s = 1 - binary_exponent(amax), lim = ScaleBand<A>::max_shift;
  return s < -lim ? -lim : (s > lim ? lim : s);
}

}  // namespace rsvd
}  // namespace lsef
