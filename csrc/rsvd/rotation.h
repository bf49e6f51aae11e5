// The Jacobi rotation of the one-sided SVD, one definition for the CPU kernel (dense.h) and the
// CUDA block code (block_primitives.cuh), so both rotate by the same numbers.
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

}  // namespace rsvd
}  // namespace lsef
