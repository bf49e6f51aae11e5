// rank_scale: CUDA kernels (float32, float64, and float16, bfloat16 summed in float32).
// G'[:, j] needs only G[:, j] and C[:, j] = U^T G[:, j], so the op is taken column by column.
//  * Narrow path (r <= kNarrowMaxRank, the optimiser's case): one thread per column. It sums
//    the column's r coefficients in registers over the m rows, then writes the column of G'.
//    Consecutive threads take consecutive columns, so every row access of a warp is coalesced;
//    no shared memory and no barriers. G is read from memory once; the second read of the
//    same column by the same thread finds it in cache.
//  * Wide path (any r): a block takes one matrix and a tile of W <= 32 adjacent columns,
//    computes the tile's C into shared memory in rounds of rows, then writes the tile of G'.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_utils.cuh"
#include "rank_scale/rank_scale_args.h"

namespace lsef {
namespace rank_scale {
namespace {

constexpr const char* kOp = "rank_scale";
constexpr int kMaxTileWidth = 32;
// Each of the kernel's two shared-memory arrays takes this much, whatever the dtype.
constexpr int kSharedArrayBytes = 16 * 1024;

template <typename T>
struct Problem {
  const T* G;  // (batch, m, n)
  const T* U;  // (batch, m, r), or (m, r) with U_step = 0
  const T* alpha;
  const T* beta;
  T* out;
  int64_t m, n, r;
  int64_t U_step, alpha_step, beta_step;  // 0 for operands shared by the batch
  int64_t tiles_per_matrix;
  int64_t tiles;
};

// Block shape (W, 256 / W): thread (x, y) handles column x of the tile and rows y, y + H, ...
// with H = blockDim.y. C's rows are produced kRound at a time (the shared-memory array Ct holds
// them), each round in passes of kPass rows kept in registers while the tile is read.
template <typename T>
__global__ void __launch_bounds__(kCudaThreads) rank_scale_kernel(Problem<T> p) {
  using A = at::opmath_type<T>;
  constexpr int kPass = kSharedArrayBytes / (kCudaThreads * sizeof(A));
  constexpr int kRound = kSharedArrayBytes / (kMaxTileWidth * sizeof(A));
  __shared__ A partial[kCudaThreads * kPass];  // [y][k][x]: each row group's share of C
  __shared__ A Ct[kRound * kMaxTileWidth];     // [k][x]: C's rows of this round
  const int W = blockDim.x, H = blockDim.y, x = threadIdx.x, y = threadIdx.y;
  const int64_t rounds = p.r == 0 ? 1 : (p.r + kRound - 1) / kRound;  // r = 0: G' = beta G
  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const int64_t b = tile / p.tiles_per_matrix;
    const int64_t col = tile % p.tiles_per_matrix * W + x;
    const bool active = col < p.n;
    const T* g = p.G + b * p.m * p.n + col;
    T* o = p.out + b * p.m * p.n + col;
    const T* u = p.U + b * p.U_step;
    const A beta = static_cast<A>(p.beta[b * p.beta_step]);
    const A delta = static_cast<A>(p.alpha[b * p.alpha_step]) - beta;
    for (int64_t round = 0; round < rounds; ++round) {
      const int64_t k0 = round * kRound;
      const int kn = static_cast<int>(std::min<int64_t>(kRound, p.r - k0));
      for (int k1 = 0; k1 < kn; k1 += kPass) {
        A acc[kPass] = {};
        if (active) {
          for (int64_t i = y; i < p.m; i += H) {
            const A gv = static_cast<A>(g[i * p.n]);
            const T* ui = u + i * p.r + k0 + k1;
#pragma unroll
            for (int k = 0; k < kPass; ++k) {
              if (k1 + k < kn) acc[k] += static_cast<A>(ui[k]) * gv;
            }
          }
        }
#pragma unroll
        for (int k = 0; k < kPass; ++k) partial[(y * kPass + k) * W + x] = acc[k];
        __syncthreads();
        // Each (k, column) pair adds the row groups' shares in order.
        for (int t = y * W + x; t < kPass * W; t += kCudaThreads) {
          const int k = t / W, cx = t % W;
          if (k1 + k < kn) {
            A s = 0;
            for (int yy = 0; yy < H; ++yy) s += partial[(yy * kPass + k) * W + cx];
            Ct[(k1 + k) * W + cx] = s;
          }
        }
        __syncthreads();
      }
      if (active) {
        for (int64_t i = y; i < p.m; i += H) {
          const T* ui = u + i * p.r + k0;
          A v = 0;
          for (int k = 0; k < kn; ++k) v += static_cast<A>(ui[k]) * Ct[k * W + x];
          // Later rounds add to what the earlier ones wrote (this thread's own element).
          const A base =
              round == 0 ? beta * static_cast<A>(g[i * p.n]) : static_cast<A>(o[i * p.n]);
          o[i * p.n] = static_cast<T>(base + delta * v);
        }
      }
      __syncthreads();  // partial and Ct are rewritten by the next round or tile
    }
  }
}

// Ranks up to this take the narrow path (R = 4, 8 or 16 coefficients in registers).
constexpr int64_t kNarrowMaxRank = 16;

// Thread t takes column t % n of matrix t / n (grid-stride over batch * n columns).
template <typename T, int R>
__global__ void __launch_bounds__(kCudaThreads) rank_scale_narrow_kernel(Problem<T> p,
                                                                         int64_t columns) {
  using A = at::opmath_type<T>;
  const int r = static_cast<int>(p.r);  // <= R
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < columns;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / p.n;
    const T* g = p.G + b * p.m * p.n + t % p.n;
    T* o = p.out + b * p.m * p.n + t % p.n;
    const T* u = p.U + b * p.U_step;
    A c[R];
#pragma unroll
    for (int k = 0; k < R; ++k) c[k] = 0;
#pragma unroll 4
    for (int64_t i = 0; i < p.m; ++i) {
      const A gv = static_cast<A>(g[i * p.n]);
      const T* ui = u + i * p.r;
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (k < r) c[k] += static_cast<A>(ui[k]) * gv;
      }
    }
    const A beta = static_cast<A>(p.beta[b * p.beta_step]);
    const A delta = static_cast<A>(p.alpha[b * p.alpha_step]) - beta;
#pragma unroll 4
    for (int64_t i = 0; i < p.m; ++i) {
      const T* ui = u + i * p.r;
      A v = 0;
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (k < r) v += static_cast<A>(ui[k]) * c[k];
      }
      o[i * p.n] = static_cast<T>(beta * static_cast<A>(g[i * p.n]) + delta * v);
    }
  }
}

template <typename T>
void rank_scale_cuda_kernel(const Args& a, at::Tensor& out) {
  const int64_t W = std::min<int64_t>(kMaxTileWidth, next_pow2(a.n));
  Problem<T> p;
  p.G = a.G.data_ptr<T>();
  p.U = a.U.data_ptr<T>();
  p.alpha = a.alpha.data_ptr<T>();
  p.beta = a.beta.data_ptr<T>();
  p.out = out.data_ptr<T>();
  p.m = a.m;
  p.n = a.n;
  p.r = a.r;
  p.U_step = a.shared_U ? 0 : a.m * a.r;
  p.alpha_step = a.alpha.numel() == 1 ? 0 : 1;
  p.beta_step = a.beta.numel() == 1 ? 0 : 1;
  p.tiles_per_matrix = ceil_div(a.n, W);
  p.tiles = a.batch * p.tiles_per_matrix;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (a.r <= kNarrowMaxRank) {
    const int64_t columns = a.batch * a.n;
    const unsigned grid = cuda_grid(columns, kCudaThreads);
    if (a.r <= 4) {
      rank_scale_narrow_kernel<T, 4><<<grid, kCudaThreads, 0, stream>>>(p, columns);
    } else if (a.r <= 8) {
      rank_scale_narrow_kernel<T, 8><<<grid, kCudaThreads, 0, stream>>>(p, columns);
    } else {
      rank_scale_narrow_kernel<T, 16><<<grid, kCudaThreads, 0, stream>>>(p, columns);
    }
  } else {
    const dim3 block(static_cast<unsigned>(W), static_cast<unsigned>(kCudaThreads / W));
    rank_scale_kernel<T><<<cuda_grid(p.tiles, 1), block, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rank_scale_cuda(const at::Tensor& G, const at::Tensor& U, const at::Tensor& alpha,
                           const at::Tensor& beta) {
  check_cuda_dtype(kOp, "G", G);
  const Args a = prepare(kOp, G, U, alpha, beta);
  const c10::cuda::CUDAGuard guard(a.G.device());
  at::Tensor out = at::empty_like(a.G, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.G.scalar_type(), kOp,
                                  [&] { rank_scale_cuda_kernel<scalar_t>(a, out); });
  return out;
}

}  // namespace
}  // namespace rank_scale
}  // namespace lsef

TORCH_LIBRARY_IMPL(lsef, CUDA, m) { m.impl("rank_scale", &lsef::rank_scale::rank_scale_cuda); }
