// rsvd: CUDA kernels (float32, float64, and float16, bfloat16 computed in float32). The
// per-matrix algorithm is rsvd_block.cuh (the block-parallel form of the CPU kernel); this file
// launches it. docs/DESIGN.md §10.
//
// * Fused path (short side p <= 64, the video case T x D): ONE launch for the whole forward.
//   One thread block per matrix does the sketch and Gram matrix in one pass over W, the power
//   iterations on the p x p Gram matrix with Householder re-orthonormalisation, Z = W^T Q in a
//   second pass over W, the Householder QR and one-sided Jacobi SVD of Z, the sign convention,
//   and writes U, S, V once. Work arrays are in shared memory when they fit, else in a global
//   scratch slice per block (same code).
// * Large path (p > 64): the driver shared with the CPU (rsvd_host.h) runs the products
//   W Omega, W^T Q, W Q_z, Q^T W through torch's matmul (cuBLAS), each orthonormalisation one
//   launch for the whole batch (a block per matrix); then one launch for the tail (QR + Jacobi of
//   Z, signs, outputs).
#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "common/cuda_utils.cuh"
#include "rsvd/rsvd_args.h"
#include "rsvd/rsvd_block.cuh"
#include "rsvd/rsvd_host.h"

namespace lsef {
namespace rsvd {
namespace {

constexpr const char* kOp = "rsvd";
using block::kThreads;

struct CudaCtx {
  int tid, lane, warp;
  __device__ CudaCtx() : tid(threadIdx.x), lane(threadIdx.x & 31), warp(threadIdx.x >> 5) {}
  __device__ void sync() { __syncthreads(); }
  __device__ bool sync_or(bool v) { return __syncthreads_or(v) != 0; }
  __device__ void syncwarp() { __syncwarp(); }
  template <typename V>
  __device__ V shfl_xor(V v, int mask) {
    return __shfl_xor_sync(0xffffffffu, v, mask);
  }
};

// The block's arena: dynamic shared memory, or its slice of a global scratch buffer.
template <typename A>
__device__ __forceinline__ A* block_arena(A* scratch, int64_t elems) {
  extern __shared__ __align__(16) unsigned char lsef_rsvd_smem[];
  return scratch != nullptr ? scratch + blockIdx.x * elems : reinterpret_cast<A*>(lsef_rsvd_smem);
}

template <typename T, typename A>
struct FusedParams {
  const T* in;
  T *U, *S, *V;
  const A* omega_t;  // l x q row-major; null on the exact path
  A* scratch;        // null: the arena is in shared memory
  int64_t batch, m, n, q, arena;
  int p, l, k, n_iter;
  bool wide;
  block::FusedLayout F;
};

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) fused_kernel(FusedParams<T, A> P) {
  A* arena = block_arena(P.scratch, P.arena);
  CudaCtx ctx;
  for (int64_t b = blockIdx.x; b < P.batch; b += gridDim.x) {
    const block::Wide<T> W{P.in + b * P.m * P.n, P.wide ? P.n : 1, P.wide ? 1 : P.n, P.p, P.q};
    const auto out = block::Out<T>::at(P.U, P.S, P.V, b, P.m, P.n, P.k);
    block::fused_matrix<CudaCtx, T, A>(ctx, W, P.l, P.k, P.n_iter, P.omega_t, arena, P.F, out,
                                       P.wide);
    ctx.sync();  // the next matrix reuses the arena
  }
}

// Y (batch of rows x l, column-major) -> Q with orthonormal columns spanning range(Y).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    orth_kernel(A* Y, A* Q, int64_t batch, int64_t rows, int l, A* scratch, int64_t arena_elems) {
  A* arena = block_arena(scratch, arena_elems);
  CudaCtx ctx;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    block::orthonormalize(ctx, Y + b * rows * l, rows, l, Q + b * rows * l, arena, arena + l);
    ctx.sync();
  }
}

template <typename T, typename A>
struct TailParams {
  A* Z;                // batch of q x l, column-major (destroyed)
  const A* Q;          // batch of p x l, column-major; null on the exact path
  const bool* finite;  // per matrix
  const A* unscale;    // per matrix: 2^-shift of the input's scaling (rescale.h)
  T *U, *S, *V;
  A* scratch;
  int64_t batch, m, n, p, q, arena;
  int l, k;
  bool wide;
  block::TailLayout L;
};

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) tail_kernel(TailParams<T, A> P) {
  A* arena = block_arena(P.scratch, P.arena);
  CudaCtx ctx;
  for (int64_t b = blockIdx.x; b < P.batch; b += gridDim.x) {
    const auto out = block::Out<T>::at(P.U, P.S, P.V, b, P.m, P.n, P.k);
    if (!P.finite[b]) {
      block::write_nan<CudaCtx, T, A>(ctx, out, P.k);
    } else {
      const A* Q = P.Q == nullptr ? nullptr : P.Q + b * P.p * P.l;
      block::tail<CudaCtx, T, A>(ctx, P.Z + b * P.q * P.l, P.q, P.l, Q, P.p, P.k, arena, P.L, out,
                                 P.wide, P.unscale[b]);
    }
    ctx.sync();
  }
}

// Where a kernel's per-block arena of `elems` elements goes, and the grid: shared memory when
// it fits the device's opt-in limit (one block per matrix), else a global scratch slice per
// block, with a grid of a few blocks per multiprocessor looping over the batch.
template <typename A>
struct ArenaPlan {
  unsigned grid = 1;
  size_t shared_bytes = 0;
  Tensor scratch;
  A* scratch_ptr() const { return scratch.defined() ? ptr<A>(scratch) : nullptr; }
};

template <typename A, typename Kernel>
ArenaPlan<A> plan_arena(Kernel kernel, int64_t batch, int64_t elems, const Tensor& like) {
  const auto shared_optin =
      static_cast<size_t>(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  const size_t bytes = static_cast<size_t>(elems) * sizeof(A);
  ArenaPlan<A> plan;
  if (bytes <= shared_optin) {
    plan.shared_bytes = bytes;
    plan.grid = static_cast<unsigned>(std::min<int64_t>(batch, int64_t{1} << 30));
    if (bytes > 48 * 1024) {
      LSEF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes)));
    }
  } else {
    const int sms = current_device_attribute(cudaDevAttrMultiProcessorCount);
    plan.grid = static_cast<unsigned>(std::min<int64_t>(batch, 2 * sms));
    plan.scratch = empty_as(like, {int64_t{plan.grid} * elems}, dtype_of<A>());
  }
  return plan;
}

// Omega^T (l x q, row-major) on the device (rsvd_host.h's test_matrix_t, so both backends use
// the same bits), cached per (device, q, l, seed, dtype): after the
// first call with a shape and seed, the fused forward is a single launch. Entries are never
// evicted (a kernel on another stream may still read one); past kMaxCached, matrices are drawn
// per call instead. The map is leaked on purpose: no CUDA frees after the driver shuts down.
constexpr size_t kMaxCached = 64;

Tensor test_matrix(int64_t q, int64_t l, int64_t seed, ScalarType dtype,
                   const torch::stable::Device& device) {
  using Key = std::tuple<int, int64_t, int64_t, int64_t, int>;
  static std::mutex mutex;
  static auto* cache = new std::map<Key, Tensor>();
  const Key key{device.index(), q, l, seed, static_cast<int>(dtype)};
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  // Drawn on the host by the generator the CPU kernel uses; a blocking copy, so the entry is
  // complete before any stream reads it.
  Tensor dev = aten::to_device(test_matrix_t(q, l, seed, dtype), device);
  std::lock_guard<std::mutex> lock(mutex);
  if (cache->size() < kMaxCached) cache->emplace(key, dev);
  return dev;
}

// Matrices whose short side exceeds this take the large path. LSEF_RSVD_CUDA_FUSED_MAX_SIDE
// (clamped to [0, 64]) overrides it, to measure the crossover or to force the large path.
int64_t fused_max_side() {
  return std::clamp<int64_t>(env_int("LSEF_RSVD_CUDA_FUSED_MAX_SIDE", block::kFusedMaxSide), 0,
                             block::kFusedMaxSide);
}

struct Outputs {
  Tensor U, S, V;
};

template <typename T, typename A>
void fused(const Tensor& A_in, const Shape& sh, int64_t n_iter, const Tensor& omega, Outputs& o) {
  const int64_t p = std::min(sh.m, sh.n), q = std::max(sh.m, sh.n);
  FusedParams<T, A> P;
  P.in = cptr<T>(A_in);
  P.U = ptr<T>(o.U);
  P.S = ptr<T>(o.S);
  P.V = ptr<T>(o.V);
  P.omega_t = omega.defined() ? cptr<A>(omega) : nullptr;
  P.batch = sh.batch;
  P.m = sh.m;
  P.n = sh.n;
  P.q = q;
  P.p = static_cast<int>(p);
  P.l = static_cast<int>(sh.l);
  P.k = static_cast<int>(sh.k);
  P.n_iter = static_cast<int>(std::min<int64_t>(n_iter, 1 << 30));
  P.wide = sh.m <= sh.n;
  P.F = block::fused_layout(p, q, sh.l, sh.k, sh.exact());
  P.arena = P.F.total;
  const ArenaPlan<A> plan = plan_arena<A>(fused_kernel<T, A>, sh.batch, P.arena, A_in);
  P.scratch = plan.scratch_ptr();
  fused_kernel<T, A><<<plan.grid, kThreads, plan.shared_bytes, current_stream(A_in)>>>(P);
  LSEF_CUDA_CHECK(cudaGetLastError());
}

// Householder-orthonormalises every matrix of Y (B, rows, l); returns Q (B, rows, l), a view of
// a column-major buffer.
template <typename A>
Tensor orthonormalize(const Tensor& Y) {
  const int64_t batch = Y.size(0), rows = Y.size(1), l = Y.size(2);
  // (B, l, rows): column-major rows x l per matrix
  const Tensor Yc = as_contiguous(aten::mT(Y));
  const Tensor Q = empty_as(Yc, Yc.sizes());
  const ArenaPlan<A> plan = plan_arena<A>(orth_kernel<A>, batch, 2 * l, Yc);
  orth_kernel<A><<<plan.grid, kThreads, plan.shared_bytes, current_stream(Yc)>>>(
      ptr<A>(Yc), ptr<A>(Q), batch, rows, static_cast<int>(l), plan.scratch_ptr(), 2 * l);
  LSEF_CUDA_CHECK(cudaGetLastError());
  return aten::mT(Q);
}

// The large path: the shared driver (rsvd_host.h) with cuBLAS products and orth_kernel, then
// one launch of the tail for the whole batch.
template <typename T, typename A>
void large(const Tensor& A_in, const Shape& sh, int64_t n_iter, const Tensor& omega, Outputs& o) {
  const Projection pr = project(A_in, sh, n_iter, omega, dtype_of<A>(), orthonormalize<A>);
  const Tensor& Z = pr.Z;
  // (B, l, p): Q column-major (a no-op copy of orth's column-major buffer)
  const Tensor Q = pr.Q.defined() ? as_contiguous(aten::mT(pr.Q)) : Tensor();
  const int64_t p = pr.p, q = pr.q, l = pr.l;
  const bool wide = pr.wide;
  const Tensor& finite = pr.finite;
  TailParams<T, A> P;
  P.Z = ptr<A>(Z);
  P.Q = Q.defined() ? cptr<A>(Q) : nullptr;
  P.finite = cptr<bool>(finite);
  P.unscale = cptr<A>(pr.unscale);
  P.U = ptr<T>(o.U);
  P.S = ptr<T>(o.S);
  P.V = ptr<T>(o.V);
  P.batch = sh.batch;
  P.m = sh.m;
  P.n = sh.n;
  P.p = p;
  P.q = q;
  P.l = static_cast<int>(l);
  P.k = static_cast<int>(sh.k);
  P.wide = wide;
  P.L = block::tail_layout(p, q, l, sh.k, 0);
  P.arena = P.L.total;
  const ArenaPlan<A> plan = plan_arena<A>(tail_kernel<T, A>, sh.batch, P.arena, Z);
  P.scratch = plan.scratch_ptr();
  tail_kernel<T, A><<<plan.grid, kThreads, plan.shared_bytes, current_stream(Z)>>>(P);
  LSEF_CUDA_CHECK(cudaGetLastError());
}

std::tuple<Tensor, Tensor, Tensor> rsvd_cuda(const Tensor& A_in, int64_t k, int64_t oversample,
                                             int64_t n_iter, int64_t seed) {
  const Shape sh = check(kOp, A_in, k, oversample, n_iter);
  check_cuda_dtype(kOp, "A", A_in);
  const torch::stable::accelerator::DeviceGuard guard(A_in.get_device_index());
  const Tensor A = as_contiguous(A_in);
  Outputs o;
  std::tie(o.U, o.S, o.V) = empty_outputs(A, sh);
  if (sh.batch == 0) return {o.U, o.S, o.V};
  const int64_t p = std::min(sh.m, sh.n), q = std::max(sh.m, sh.n);
  dispatch_floating<true>(A.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = opmath_t<T>;
    const Tensor omega =
        sh.exact() ? Tensor() : test_matrix(q, sh.l, seed, dtype_of<Acc>(), A.device());
    if (p <= fused_max_side()) {
      fused<T, Acc>(A, sh, n_iter, omega, o);
    } else {
      large<T, Acc>(A, sh, n_iter, omega, o);
    }
  });
  return {o.U, o.S, o.V};
}

}  // namespace
}  // namespace rsvd
}  // namespace lsef

STABLE_TORCH_LIBRARY_IMPL(lsef, CUDA, m) { m.impl("rsvd", TORCH_BOX(&lsef::rsvd::rsvd_cuda)); }
