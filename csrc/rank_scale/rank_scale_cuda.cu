// rank_scale: CUDA kernels (float32, float64, and float16, bfloat16 summed in float32).
// G'[:, j] needs only G[:, j] and C[:, j] = U^T G[:, j], so the op is taken column by column.
//  * Narrow path (r <= kNarrowMaxRank, the optimiser's case): a thread per group of V adjacent
//    columns (one 16-byte access where n and the pointers allow, else V = 1). It sums the
//    columns' r coefficients in registers over the m rows, then writes the columns of G'.
//    Consecutive threads take consecutive groups, so every row access of a warp is coalesced;
//    no shared memory and no barriers. G is read from memory once; the second read of the
//    same columns by the same thread finds them in cache.
//  * Wide path (any r): a block takes one matrix and a tile of W <= 32 adjacent columns,
//    computes the tile's C into shared memory in rounds of rows, then writes the tile of G'.
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
  using A = opmath_t<T>;
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

// Columns per thread on the narrow path: V adjacent columns are read and written as one access
// of V * sizeof(T) <= 16 bytes, with R * V <= 32 accumulators per thread (2 for R = 16).
template <typename T, int R>
constexpr int kNarrowVec = std::min(kPackElems<T>, std::max(2, 32 / R));

// Thread t takes columns V t, ..., V t + V - 1 of the flattened (batch * n) columns; n % V == 0,
// so the V columns lie in one matrix. One thread per column group, no grid-stride loop: the
// grid is as large as the work (the narrow path has no cross-block sums whose order could
// depend on the grid).
// Explicitly rounded multiply and fused multiply-add: the compiler may not contract or
// reorder them, so every instantiation (V = 1 or a group of columns) does the same arithmetic
// on each element and the two launches agree to the bit (measured on an H200 to differ in the
// last bit while the expressions were left to the compiler's contraction).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

template <typename T, int R, int V>
__global__ void __launch_bounds__(kCudaThreads)
    rank_scale_narrow_kernel(Problem<T> p, int64_t groups) {
  using A = opmath_t<T>;
  const int r = static_cast<int>(p.r);  // <= R
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= groups) return;
  const int64_t col0 = t * V;  // flattened column index
  const int64_t b = col0 / p.n;
  const int64_t off = b * p.m * p.n + col0 % p.n;
  const T* g = p.G + off;
  T* o = p.out + off;
  const T* u = p.U + b * p.U_step;
  A c[R][V];
#pragma unroll
  for (int k = 0; k < R; ++k) {
#pragma unroll
    for (int v = 0; v < V; ++v) c[k][v] = 0;
  }
#pragma unroll 4
  for (int64_t i = 0; i < p.m; ++i) {
    const Pack<T, V> gv = load_pack<V>(g, i * p.n);
    const T* ui = u + i * p.r;
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (k < r) {
        const A uk = static_cast<A>(ui[k]);
#pragma unroll
        for (int v = 0; v < V; ++v) c[k][v] = fma_rn(uk, static_cast<A>(gv.v[v]), c[k][v]);
      }
    }
  }
  const A beta = static_cast<A>(p.beta[b * p.beta_step]);
  const A delta = static_cast<A>(p.alpha[b * p.alpha_step]) - beta;
#pragma unroll 4
  for (int64_t i = 0; i < p.m; ++i) {
    const T* ui = u + i * p.r;
    A s[V];
#pragma unroll
    for (int v = 0; v < V; ++v) s[v] = 0;
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (k < r) {
        const A uk = static_cast<A>(ui[k]);
#pragma unroll
        for (int v = 0; v < V; ++v) s[v] = fma_rn(uk, c[k][v], s[v]);
      }
    }
    const Pack<T, V> gv = load_pack<V>(g, i * p.n);
    Pack<T, V> ov;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      ov.v[v] = static_cast<T>(fma_rn(delta, s[v], mul_rn(beta, static_cast<A>(gv.v[v]))));
    }
    store_pack<V>(o, i * p.n, ov);
  }
}

template <typename T, int R>
void launch_narrow(const Problem<T>& p, int64_t batch, cudaStream_t stream) {
  constexpr int V = kNarrowVec<T, R>;
  const int64_t columns = batch * p.n;
  const auto bytes = static_cast<uintptr_t>(sizeof(T) * V);
  const bool vec = p.n % V == 0 && reinterpret_cast<uintptr_t>(p.G) % bytes == 0 &&
                   reinterpret_cast<uintptr_t>(p.out) % bytes == 0;
  if (vec) {
    const int64_t groups = columns / V;
    rank_scale_narrow_kernel<T, R, V>
        <<<static_cast<unsigned>(ceil_div(groups, kCudaThreads)), kCudaThreads, 0, stream>>>(
            p, groups);
  } else {
    rank_scale_narrow_kernel<T, R, 1>
        <<<static_cast<unsigned>(ceil_div(columns, kCudaThreads)), kCudaThreads, 0, stream>>>(
            p, columns);
  }
}

template <typename T>
void rank_scale_cuda_kernel(const Args& a, const Tensor& out) {
  const int64_t W = std::min<int64_t>(kMaxTileWidth, next_pow2(a.n));
  Problem<T> p;
  p.G = cptr<T>(a.G);
  p.U = cptr<T>(a.U);
  p.alpha = cptr<T>(a.alpha);
  p.beta = cptr<T>(a.beta);
  p.out = ptr<T>(out);
  p.m = a.m;
  p.n = a.n;
  p.r = a.r;
  p.U_step = a.shared_U ? 0 : a.m * a.r;
  p.alpha_step = a.alpha.numel() == 1 ? 0 : 1;
  p.beta_step = a.beta.numel() == 1 ? 0 : 1;
  p.tiles_per_matrix = ceil_div(a.n, W);
  p.tiles = a.batch * p.tiles_per_matrix;
  const cudaStream_t stream = current_stream(a.G);
  if (a.r <= kNarrowMaxRank) {
    if (a.r <= 4) {
      launch_narrow<T, 4>(p, a.batch, stream);
    } else if (a.r <= 8) {
      launch_narrow<T, 8>(p, a.batch, stream);
    } else {
      launch_narrow<T, 16>(p, a.batch, stream);
    }
  } else {
    const dim3 block(static_cast<unsigned>(W), static_cast<unsigned>(kCudaThreads / W));
    rank_scale_kernel<T><<<cuda_grid(p.tiles, 1), block, 0, stream>>>(p);
  }
  LSEF_CUDA_CHECK(cudaGetLastError());
}

Tensor rank_scale_cuda(const Tensor& G, const Tensor& U, const Tensor& alpha, const Tensor& beta) {
  check_cuda_dtype(kOp, "G", G);
  const Args a = prepare(kOp, G, U, alpha, beta);
  const torch::stable::accelerator::DeviceGuard guard(a.G.get_device_index());
  Tensor out = empty_as(a.G, a.G.sizes());
  if (out.numel() == 0) return out;
  dispatch_floating<true>(a.G.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    rank_scale_cuda_kernel<T>(a, out);
  });
  return out;
}

}  // namespace
}  // namespace rank_scale
}  // namespace lsef

STABLE_TORCH_LIBRARY_IMPL(lsef, CUDA, m) {
  m.impl("rank_scale", TORCH_BOX(&lsef::rank_scale::rank_scale_cuda));
}
