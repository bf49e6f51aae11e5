// rsvd: the host code both backends share (docs/DESIGN.md §6, §10): the test matrix Omega, the
// path switches read from the environment, and the large path's driver up to its tail (masking
// of non-finite matrices, the randomized range finder with ATen products (boxed calls), the
// projection). Each backend supplies its batched orthonormalisation (CPU: a task per matrix; CUDA:
// a block per matrix) and its own tail (exact SVD of the projection, signs, outputs).
#pragma once

#include <cstdint>
#include <functional>

#include "rsvd/rsvd_args.h"

namespace lsef {
namespace rsvd {

// Omega^T (l x q, row-major) on the CPU in `dtype`: element (c, j) is Omega[j, c] of the q x l
// test matrix, the standard normal of Philox stream index j * l + c for `seed`, drawn in double
// and rounded once to `dtype`. Both backends draw it here, so they use the same bits.
Tensor test_matrix_t(int64_t q, int64_t l, int64_t seed, ScalarType dtype);

// The integer in environment variable `name`, or `fallback` when it is unset. Read at every
// call (one getenv, far below the cost of any rsvd call), so a test or a measurement can switch
// paths inside one process.
int64_t env_int(const char* name, int64_t fallback);

// The power of two w, elementwise, with amax * w in [1, 2) (1 where amax is zero or not finite;
// w and 1 / w normal numbers of amax's dtype): exact scaling for scale-equivariant formulas.
Tensor unit_scale(const Tensor& amax);

// Householder-orthonormalises every matrix of Y (B, p, l); returns Q (B, p, l).
using Orthonormalize = std::function<Tensor(const Tensor&)>;

// What the large path hands to a backend's tail, for the wide orientation W (p x q, p <= q) of
// each matrix (A itself when m <= n, else A^T).
struct Projection {
  Tensor finite;    // (B,) bool: the matrix was all finite (the others went through as zeros)
  Tensor unscale;   // (B,) acc: 2^-shift, the factor S gets back (W below is 2^shift A)
  Tensor Q;         // (B, p, l): orthonormal basis of W's sketched range; undefined when exact
  Tensor Z;         // (B, l, q) contiguous: W^T Q column-major (q x l); W^T itself when exact
  int64_t p, q, l;  // l = p when exact
  bool wide;        // m <= n
};

// The large path up to the tail, in the accumulation dtype `acc`, on each matrix scaled by the
// power of two 2^shift of rescale.h (1 for most inputs): Q spans
// (W W^T)^n_iter W Omega, orthonormalised after every product (`orth`); Z = W^T Q. omega_t is
// test_matrix_t's tensor on A's device in `acc` (undefined when the shape is exact).
// `screen`: the backend's (finite (B,) bool, amax (B,) acc) of A's matrices, computed in one pass
// where it can (the CPU); undefined tensors: ATen computes them (three passes over A).
struct Screen {
  Tensor finite, amax;
};
Projection project(const Tensor& A, const Shape& sh, int64_t n_iter, const Tensor& omega_t,
                   ScalarType acc, const Orthonormalize& orth, const Screen& screen = {});

// lowrank's backward with ATen products, for any backend and any broadcastable shapes
// (rsvd_composite.cpp; the CPU kernel takes matching float32/float64 batches itself):
// U (U^T G) + (G V - U (U^T G V)) V^T.
Tensor lowrank_backward(const Tensor& grad, const Tensor& U, const Tensor& V);

}  // namespace rsvd
}  // namespace lsef
