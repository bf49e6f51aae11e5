// The Jacobi rotation of the one-sided SVD and the order of its pairs, one definition for the
// CPU kernel (dense.h, one matrix and a group in vector lanes) and the CUDA block code
// (block_primitives.cuh), so they visit the same pairs and rotate by the same numbers.
#pragma once

#include <math.h>

#include "common/macros.h"

namespace lsef {
namespace rsvd {

// The tangent t of the rotation that makes columns x_i, x_j orthogonal, for a = x_i . x_i,
// b = x_j . x_j, g = x_i . x_j != 0: t = sign(zeta) / (|zeta| + sqrt(1 + zeta^2)), the smaller
// root, with zeta = (b - a) / 2g (Golub & Van Loan, Algorithm 8.6.2; Demmel & Veselic 1992).
// Where zeta^2 is past 1 / eps, sqrt(1 + zeta^2) rounds to |zeta|, so that is taken (it also
// keeps zeta^2 from overflowing): a square root instead of hypot's library call.
template <typename A>
LSEF_BLOCK_HD A rotation_tangent(A a, A b, A g, A inv_sqrt_eps) {
  const A zeta = (b - a) / (A(2) * g);
  const A az = zeta < A(0) ? -zeta : zeta;
  const A root = az > inv_sqrt_eps ? az : sqrt(A(1) + az * az);
  return (zeta >= A(0) ? A(1) : A(-1)) / (az + root);
}

// The rotation of a pair with a = x_i . x_i, b = x_j . x_j, g = x_i . x_j: cs, sn for
// x_i' = cs x_i - sn x_j, x_j' = sn x_i + cs x_j, and whether to rotate at all. A pair already
// orthogonal to working precision (|g| <= eps sqrt(a) sqrt(b), or g = 0) is left alone: false,
// with cs = 1, sn = 0 (an exact identity, so a caller may also apply it). Branch-free in its
// arithmetic, so a loop over independent pairs vectorises.
// The test takes two square roots, not sqrt(a b): a and b are sums of squares of the entries, so
// a b is a fourth power of them. It overflowed in float32 once the input's largest magnitude
// passed about 2^30 (inside rescale.h's band), every pair then looked orthogonal, and the sweeps
// stopped at once with S off by 10 % (DESIGN.md §6, "Scale").
template <typename A>
LSEF_BLOCK_HD bool jacobi_rotation(A a, A b, A g, A eps, A inv_sqrt_eps, A& cs, A& sn) {
  const bool skip = (g < A(0) ? -g : g) <= eps * sqrt(a) * sqrt(b) || g == A(0);
  const A t = skip ? A(0) : rotation_tangent(a, b, skip ? A(1) : g, inv_sqrt_eps);
  cs = A(1) / sqrt(A(1) + t * t);
  sn = cs * t;
  return !skip;
}

// Pair `slot` of round `round` in the round-robin order of a sweep over c columns: c - 1 rounds
// (c for odd c, with a dummy column c) of c / 2 (rounded up) disjoint pairs, every pair once a
// sweep. Sets i < j; false where the pair has the dummy column.
template <typename I>
LSEF_BLOCK_HD bool round_robin_pair(I round, I slot, I c, I& i, I& j) {
  const I players = c + (c & 1);
  I u = round, w = players - 1;
  if (slot > 0) {
    u = (round + slot) % (players - 1);
    w = (round - slot + players - 1) % (players - 1);
  }
  i = u < w ? u : w;
  j = u < w ? w : u;
  return j < c;
}

}  // namespace rsvd
}  // namespace lsef
