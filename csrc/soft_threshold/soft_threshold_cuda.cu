// soft_threshold: CUDA kernels (float32, float64, and float16, bfloat16 computed in float32).
// One fused pass over X, L (and lam) each way, as on the CPU; the per-element math is the shared
// soft_threshold.h, so a float16 result equals the float32 computation on the same inputs,
// rounded once.
#include <optional>
#include <tuple>
#include <vector>

#include "common/cuda_utils.cuh"
#include "soft_threshold/soft_threshold.h"
#include "soft_threshold/soft_threshold_args.h"

namespace lsef {
namespace soft_threshold {
namespace {

constexpr const char* kOp = "soft_threshold";
constexpr const char* kBackwardOp = "soft_threshold_backward";

// lam is read at lam[e] when it has X's shape (FullLam), else at lam[e % period]: period is the
// channel count for a per-channel lam and 1 for a scalar one.
template <typename T>
struct Inputs {
  const T* x;
  const T* l;  // null when L is absent
  const T* lam;
  int64_t period;
};

// Null where a gradient was not asked for. dlam is written elementwise only for a full-shape
// lam; a scalar or per-channel lam's gradient is a reduction, written by sum_partials_kernel.
template <typename T>
struct GradOutputs {
  T* dx;
  T* dl;
  T* dlam;
};

// Calls body(std::integral_constant<int, N>{}, e, c) for the N elements from e on, c being the
// channel of element e. Thread t takes packs t, t + stride, ...; the numel % VEC elements after
// the last whole pack go one each to the first threads.
template <int VEC, typename Body>
__device__ __forceinline__ void for_each_pack(int64_t numel, int64_t period, Body&& body) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t packs = numel / VEC;
  // The channel advances by the same step every iteration: no division inside the loop.
  const int64_t c_step = stride * VEC % period;
  int64_t c = first * VEC % period;
  for (int64_t p = first; p < packs; p += stride) {
    body(std::integral_constant<int, VEC>{}, p * VEC, c);
    c += c_step;
    if (c >= period) c -= period;
  }
  const int64_t e = packs * VEC + first;
  if (e < numel) body(std::integral_constant<int, 1>{}, e, e % period);
}

// Residuals r = x - l and thresholds of the N elements from e (channel c), in opmath precision.
template <bool HasL, bool FullLam, int N, typename T>
__device__ __forceinline__ void load_inputs(const Inputs<T>& in, int64_t e, int64_t c,
                                            opmath_t<T> (&r)[N], opmath_t<T> (&lam)[N]) {
  using A = opmath_t<T>;
  const Pack<T, N> x = load_pack<N>(in.x, e);
  Pack<T, N> l, lv;
  if constexpr (HasL) l = load_pack<N>(in.l, e);
  if constexpr (FullLam) lv = load_pack<N>(in.lam, e);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    r[k] = static_cast<A>(x.v[k]);
    if constexpr (HasL) r[k] -= static_cast<A>(l.v[k]);
    if constexpr (FullLam) {
      lam[k] = static_cast<A>(lv.v[k]);
    } else {
      lam[k] = static_cast<A>(in.lam[c]);
      c = c + 1 == in.period ? 0 : c + 1;
    }
  }
}

template <typename T, bool Hard, bool HasL, bool FullLam, int VEC>
__global__ void __launch_bounds__(kCudaThreads)
    forward_kernel(Inputs<T> in, T* __restrict__ s, int64_t numel) {
  using A = opmath_t<T>;
  for_each_pack<VEC>(numel, in.period, [&](auto n, int64_t e, int64_t c) {
    constexpr int N = decltype(n)::value;
    A r[N], lam[N];
    load_inputs<HasL, FullLam>(in, e, c, r, lam);
    Pack<T, N> out;
#pragma unroll
    for (int k = 0; k < N; ++k) out.v[k] = static_cast<T>(value<Hard>(r[k], lam[k]));
    store_pack(s, e, out);
  });
}

// Writes the requested elementwise gradients of the N elements from e, and adds each element's
// share of lam's gradient to dlam_sum (float64, as the CPU kernels sum).
template <bool Hard, bool HasL, bool FullLam, int N, typename T>
__device__ __forceinline__ void backward_pack(const Inputs<T>& in, const T* g,
                                              const GradOutputs<T>& out, int64_t e, int64_t c,
                                              double (&dlam_sum)[N]) {
  using A = opmath_t<T>;
  A r[N], lam[N];
  load_inputs<HasL, FullLam>(in, e, c, r, lam);
  const Pack<T, N> gp = load_pack<N>(g, e);
  Pack<T, N> dx, dl, dlam;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const A gv = static_cast<A>(gp.v[k]);
    const A gx = grad_input<Hard>(gv, r[k], lam[k]);
    const A gl = grad_lam<Hard>(gv, r[k], lam[k]);
    dx.v[k] = static_cast<T>(gx);
    dl.v[k] = static_cast<T>(-gx);
    dlam.v[k] = static_cast<T>(gl);
    dlam_sum[k] += gl;
  }
  if (out.dx != nullptr) store_pack(out.dx, e, dx);
  if constexpr (HasL) {
    if (out.dl != nullptr) store_pack(out.dl, e, dl);
  }
  if constexpr (FullLam) {
    if (out.dlam != nullptr) store_pack(out.dlam, e, dlam);
  }
}

// Sums v over the `rows` threads of each column of the block (thread (col, row)), adding in a
// fixed tree order so the bits depend on the launch shape only; row 0 ends with the sums.
// rows is a power of two, and every thread of the block must call this.
template <int N>
__device__ __forceinline__ void sum_block_rows(double (&v)[N], int col, int cols, int row,
                                               int rows) {
  __shared__ double slots[kCudaThreads * N];
  double* mine = slots + (row * cols + col) * N;
#pragma unroll
  for (int k = 0; k < N; ++k) mine[k] = v[k];
  __syncthreads();
  for (int half = rows / 2; half > 0; half /= 2) {
    if (row < half) {
#pragma unroll
      for (int k = 0; k < N; ++k) mine[k] += mine[half * cols * N + k];
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = mine[k];
}

// Elementwise backward over the flat X. With `partials` (a scalar lam's gradient is wanted),
// each block also writes the sum of its elements' shares of it to partials[blockIdx.x].
template <typename T, bool Hard, bool HasL, bool FullLam, int VEC>
__global__ void __launch_bounds__(kCudaThreads)
    backward_kernel(Inputs<T> in, const T* __restrict__ g, GradOutputs<T> out,
                    double* __restrict__ partials, int64_t numel) {
  double sum[1] = {0.0};
  for_each_pack<VEC>(numel, in.period, [&](auto n, int64_t e, int64_t c) {
    constexpr int N = decltype(n)::value;
    double shares[N] = {};
    backward_pack<Hard, HasL, FullLam, N>(in, g, out, e, c, shares);
#pragma unroll
    for (int k = 0; k < N; ++k) sum[0] += shares[k];
  });
  if (partials != nullptr) {
    sum_block_rows(sum, 0, 1, threadIdx.x, blockDim.x);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum[0];
  }
}

// Backward for a per-channel lam whose gradient is wanted, with X seen as rows x channels:
// thread (x, y) of block (bx, by) owns channels [c, c + VEC), c = (bx * blockDim.x + x) * VEC,
// and walks the rows by + y, by + y + gridDim.y * blockDim.y, ..., so its share of each channel's
// gradient stays in registers. Each block then writes one partial sum per channel, for row
// block by, to partials[by * channels + c].
template <typename T, bool HasL, int VEC>
__global__ void __launch_bounds__(kCudaThreads)
    channel_backward_kernel(Inputs<T> in, const T* __restrict__ g, GradOutputs<T> out,
                            double* __restrict__ partials, int64_t rows) {
  const int64_t channels = in.period;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  double acc[VEC] = {};
  if (c < channels) {
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < rows;
         row += row_stride) {
      backward_pack</*Hard=*/false, HasL, /*FullLam=*/false, VEC>(in, g, out, row * channels + c, c,
                                                                  acc);
    }
  }
  sum_block_rows(acc, threadIdx.x, blockDim.x, threadIdx.y, blockDim.y);
  if (threadIdx.y == 0 && c < channels) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) partials[blockIdx.y * channels + c + k] = acc[k];
  }
}

// dlam[j] = sum over b of partials[b * width + j], added in block order.
template <typename T>
__global__ void __launch_bounds__(kCudaThreads)
    sum_partials_kernel(const double* __restrict__ partials, int64_t count, int64_t width,
                        T* __restrict__ dlam) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < width;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t b = 0; b < count; ++b) s += partials[b * width + j];
    dlam[j] = static_cast<T>(static_cast<opmath_t<T>>(s));
  }
}

template <typename T>
T* data_or_null(const Tensor& t) {
  return t.defined() ? ptr<T>(t) : nullptr;
}

template <typename T>
Inputs<T> kernel_inputs(const Args& a) {
  return {cptr<T>(a.X), data_or_null<T>(a.L), cptr<T>(a.lam),
          a.mode == LamMode::Channel ? a.channels : 1};
}

// Elements per access: 16 bytes where every pointer allows it, else one. The width decides which
// elements each thread sums into a lam gradient, so the last bits of that gradient may differ
// between the same values at two alignments; for given tensors they are the same every run.
template <typename T, bool Vec>
constexpr int kAccessElems = Vec ? kPackElems<T> : 1;

template <typename T>
void forward_cuda(const Args& a, bool hard, const Tensor& S) {
  const Inputs<T> in = kernel_inputs<T>(a);
  const bool full = a.mode == LamMode::Full;
  const int64_t numel = a.X.numel();
  T* s = ptr<T>(S);
  const cudaStream_t stream = current_stream(a.X);
  dispatch_bool(hard, [&](auto Hard) {
    dispatch_bool(in.l != nullptr, [&](auto HasL) {
      dispatch_bool(full, [&](auto FullLam) {
        dispatch_bool(aligned16(in.x, in.l, full ? in.lam : nullptr, s), [&](auto Vec) {
          constexpr int V = kAccessElems<T, Vec>;
          forward_kernel<T, Hard, HasL, FullLam, V>
              <<<cuda_grid(numel / V, kCudaThreads), kCudaThreads, 0, stream>>>(in, s, numel);
          LSEF_CUDA_CHECK(cudaGetLastError());
        });
      });
    });
  });
}

// partials is (blocks, dlam.numel()).
template <typename T>
void sum_partials(const Tensor& partials, const Tensor& dlam, cudaStream_t stream) {
  const int64_t width = dlam.numel();
  sum_partials_kernel<T><<<cuda_grid(width, kCudaThreads), kCudaThreads, 0, stream>>>(
      cptr<double>(partials), partials.size(0), width, ptr<T>(dlam));
  LSEF_CUDA_CHECK(cudaGetLastError());
}

// A per-channel lam's gradient: channel_backward_kernel with a block of up to 32 channel packs
// by as many rows as fill 256 threads (fewer when X has few rows), and as many row blocks as
// keep about kMaxCudaBlocks blocks in the grid.
template <typename T>
void channel_backward_cuda(const Args& a, const Inputs<T>& in, const T* g,
                           const GradOutputs<T>& out, const Tensor& dlam, cudaStream_t stream) {
  const int64_t channels = a.channels;
  const int64_t rows = a.X.numel() / channels;
  const bool vec = aligned16(in.x, in.l, g, out.dx, out.dl) && channels % kPackElems<T> == 0;
  dispatch_bool(in.l != nullptr, [&](auto HasL) {
    dispatch_bool(vec, [&](auto Vec) {
      constexpr int V = kAccessElems<T, Vec>;
      const int64_t packs = channels / V;
      const int64_t bx = std::min<int64_t>(32, next_pow2(packs));
      const int64_t by = std::min<int64_t>(kCudaThreads / bx, next_pow2(rows));
      const int64_t gx = ceil_div(packs, bx);
      const int64_t gy = std::clamp<int64_t>(kMaxCudaBlocks / gx, 1, ceil_div(rows, by));
      const Tensor partials = empty_as(a.X, {gy, channels}, kDouble);
      channel_backward_kernel<T, HasL, V>
          <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
             dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by)), 0, stream>>>(
              in, g, out, ptr<double>(partials), rows);
      LSEF_CUDA_CHECK(cudaGetLastError());
      sum_partials<T>(partials, dlam, stream);
    });
  });
}

// dlam is defined when lam's gradient must be computed (soft thresholding, asked for).
template <typename T>
void backward_cuda(const Args& a, const Tensor& G, bool hard, const Tensor& dX, const Tensor& dL,
                   const Tensor& dlam) {
  const Inputs<T> in = kernel_inputs<T>(a);
  const T* g = cptr<T>(G);
  const bool full = a.mode == LamMode::Full;
  const GradOutputs<T> out{data_or_null<T>(dX), data_or_null<T>(dL),
                           full ? data_or_null<T>(dlam) : nullptr};
  const bool reduce = dlam.defined() && !full;
  const cudaStream_t stream = current_stream(a.X);
  if (reduce && a.mode == LamMode::Channel) {
    channel_backward_cuda<T>(a, in, g, out, dlam, stream);
    return;
  }
  const int64_t numel = a.X.numel();
  dispatch_bool(hard, [&](auto Hard) {
    dispatch_bool(in.l != nullptr, [&](auto HasL) {
      dispatch_bool(full, [&](auto FullLam) {
        const bool vec =
            aligned16(in.x, in.l, full ? in.lam : nullptr, g, out.dx, out.dl, out.dlam);
        dispatch_bool(vec, [&](auto Vec) {
          constexpr int V = kAccessElems<T, Vec>;
          const unsigned grid = cuda_grid(numel / V, kCudaThreads);
          Tensor partials;
          if (reduce) partials = empty_as(a.X, {static_cast<int64_t>(grid)}, kDouble);
          backward_kernel<T, Hard, HasL, FullLam, V><<<grid, kCudaThreads, 0, stream>>>(
              in, g, out, data_or_null<double>(partials), numel);
          LSEF_CUDA_CHECK(cudaGetLastError());
          if (reduce) sum_partials<T>(partials, dlam, stream);
        });
      });
    });
  });
}

// Beyond prepare(): the dtypes the kernels are built for, and lam >= 0. The CPU kernels test a
// full-shape lam during their own pass over it; here every lam is tested up front by one more
// read of it on the device and a synchronisation, which keeps the kernels free of error paths
// and raises before anything is written.
void check_cuda_inputs(const char* op, const Args& a, const Tensor& lam) {
  check_cuda_dtype(op, "X", a.X);
  check_lam_nonnegative(op, lam.numel() > 0 && aten::item_bool(aten::any(aten::lt(
                                                   lam, aten::scalar(0, lam.scalar_type())))));
}

Tensor soft_threshold_cuda(const Tensor& X, const std::optional<Tensor>& L, const Tensor& lam,
                           bool hard) {
  const Args a = prepare(kOp, X, L, lam);
  const torch::stable::accelerator::DeviceGuard guard(a.X.get_device_index());
  check_cuda_inputs(kOp, a, lam);
  Tensor S = empty_as(a.X, a.X.sizes());
  if (S.numel() == 0) return S;
  dispatch_floating<true>(a.X.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    forward_cuda<T>(a, hard, S);
  });
  return S;
}

// output_mask = (X, L, lam). Gradients not asked for come back as None.
std::tuple<OptionalTensor, OptionalTensor, OptionalTensor> soft_threshold_backward_cuda(
    const Tensor& grad, const Tensor& X, const std::optional<Tensor>& L, const Tensor& lam,
    bool hard, std::vector<bool> output_mask) {
  const Args a = prepare(kBackwardOp, X, L, lam);
  const torch::stable::accelerator::DeviceGuard guard(a.X.get_device_index());
  check_cuda_inputs(kBackwardOp, a, lam);
  check_grad(kBackwardOp, grad, X);
  const bool want_X = output_mask[0];
  const bool want_L = output_mask[1] && a.L.defined();
  const bool want_lam = output_mask[2];
  if (!want_X && !want_L && !want_lam) return {};
  const Tensor G = as_contiguous(grad);
  const int64_t numel = a.X.numel();
  Tensor dX, dL, dlam;
  if (want_X) dX = empty_as(a.X, a.X.sizes());
  if (want_L) dL = empty_as(a.X, a.X.sizes());
  // Hard thresholding has a zero lam gradient, and so does an empty X (a sum over nothing).
  const bool compute_lam = want_lam && !hard && numel > 0;
  if (want_lam) dlam = compute_lam ? empty_as(a.lam, a.lam.sizes()) : aten::zeros_like(a.lam);
  if (numel > 0) {
    const Tensor dlam_out = compute_lam ? dlam : Tensor();
    dispatch_floating<true>(a.X.scalar_type(), kBackwardOp, [&](auto tag) {
      using T = typename decltype(tag)::type;
      backward_cuda<T>(a, G, hard, dX, dL, dlam_out);
    });
  }
  return pack_grads(a, lam, want_X, want_L, want_lam, dX, dL, dlam);
}

}  // namespace
}  // namespace soft_threshold
}  // namespace lsef

STABLE_TORCH_LIBRARY_IMPL(lsef, CUDA, m) {
  m.impl("soft_threshold", TORCH_BOX(&lsef::soft_threshold::soft_threshold_cuda));
  m.impl("soft_threshold_backward", TORCH_BOX(&lsef::soft_threshold::soft_threshold_backward_cuda));
}
