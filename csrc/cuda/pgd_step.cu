// CUDA kernels: the fused PGD step and the random start, on the caller's stream.
// L-inf with epsilon/alpha constant per sample moves 16 bytes per load (coalesced, vectorised);
// per-pixel maps and masks are read through their broadcast strides; L2 reduces per-sample norms on the
// device with block sums and atomics (no host synchronisation).
#include "fastadv/cuda_common.cuh"
#include "fastadv/step_math.h"

namespace fastadv {
namespace {

template <typename T, int VEC>
__global__ void linf_packed_kernel(StepArgs a) {
  using A = acc_of<T>;
  using P = Pack<T, VEC>;
  const int64_t npack = a.layout.numel / VEC;
  const int64_t S = a.layout.sample_numel;
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  const P* d = static_cast<const P*>(a.delta);
  const P* g = static_cast<const P*>(a.grad);
  const P* x = static_cast<const P*>(a.x);
  P* out = static_cast<P*>(a.out);
  // The sample index costs a 64-bit division per element: only compute it when a value is per-sample.
  const bool per_sample = a.eps.kind == ValueKind::PerSample || a.alpha.kind == ValueKind::PerSample;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < npack;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const P dv = d[p], gv = g[p], xv = x[p];
    P ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t b = per_sample ? (p * VEC + k) / S : 0;
      ov.v[k] = from_acc<T>(linf_step<A>(to_acc(dv.v[k]), to_acc(gv.v[k]), to_acc(xv.v[k]),
                                         sample_value<A>(a.eps, b), sample_value<A>(a.alpha, b), lo, hi));
    }
    out[p] = ov;
  }
}

// Any epsilon/alpha form, one element per thread iteration, starting at `first`.
template <typename T>
__global__ void linf_general_kernel(StepArgs a, int64_t first) {
  using A = acc_of<T>;
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  const T* d = static_cast<const T*>(a.delta);
  const T* g = static_cast<const T*>(a.grad);
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  for (int64_t i = first + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < a.layout.numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const A eps = value_at<A>(a.eps, a.layout, i), alpha = value_at<A>(a.alpha, a.layout, i);
    out[i] = from_acc<T>(linf_step<A>(to_acc(d[i]), to_acc(g[i]), to_acc(x[i]), eps, alpha, lo, hi));
  }
}

// L2, pass 1: ws[b] += sum of grad^2 over this block's share of sample b.
template <typename T>
__global__ void l2_grad_sumsq_kernel(StepArgs a) {
  using A = acc_of<T>;
  const int64_t S = a.layout.sample_numel;
  A* ws = static_cast<A*>(a.workspace);
  for (int64_t b = blockIdx.y; b < a.layout.batch; b += gridDim.y) {
    const T* g = static_cast<const T*>(a.grad) + b * S;
    A s = A(0);
    for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < S;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const A gk = to_acc(g[k]);
      s += gk * gk;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) atomicAdd(ws + b, s);
    __syncthreads();
  }
}

template <typename A>
__device__ __forceinline__ A l2_step_size(const StepArgs& a, const A* ws, int64_t b) {
  A gnorm = sqrt(ws[b]);
  if (gnorm < A(1e-12)) gnorm = A(1e-12);
  return sample_value<A>(a.alpha, b) / gnorm;
}

// L2, pass 2: ws[B + b] += squared norm of the unprojected step delta + alpha * g / |g|.
template <typename T>
__global__ void l2_step_sumsq_kernel(StepArgs a) {
  using A = acc_of<T>;
  const int64_t S = a.layout.sample_numel;
  A* ws = static_cast<A*>(a.workspace);
  for (int64_t b = blockIdx.y; b < a.layout.batch; b += gridDim.y) {
    const T* d = static_cast<const T*>(a.delta) + b * S;
    const T* g = static_cast<const T*>(a.grad) + b * S;
    const A step = l2_step_size<A>(a, ws, b);
    A s = A(0);
    for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < S;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const A v = to_acc(d[k]) + step * to_acc(g[k]);
      s += v * v;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) atomicAdd(ws + a.layout.batch + b, s);
    __syncthreads();
  }
}

// L2, pass 3: scale back into the ball and clip to the box.
template <typename T>
__global__ void l2_write_kernel(StepArgs a) {
  using A = acc_of<T>;
  const int64_t S = a.layout.sample_numel;
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  const A* ws = static_cast<const A*>(a.workspace);
  for (int64_t b = blockIdx.y; b < a.layout.batch; b += gridDim.y) {
    const T* d = static_cast<const T*>(a.delta) + b * S;
    const T* g = static_cast<const T*>(a.grad) + b * S;
    const T* x = static_cast<const T*>(a.x) + b * S;
    T* out = static_cast<T*>(a.out) + b * S;
    const A step = l2_step_size<A>(a, ws, b);
    const A dnorm = sqrt(ws[a.layout.batch + b]);
    const A eps = sample_value<A>(a.eps, b);
    const A factor = dnorm > eps ? eps / dnorm : A(1);
    for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < S;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const A v = (to_acc(d[k]) + step * to_acc(g[k])) * factor;
      const A xk = to_acc(x[k]);
      out[k] = from_acc<T>(clamp_to(xk + v, lo, hi) - xk);
    }
  }
}

template <typename T>
__global__ void random_init_kernel(RandomInitArgs a) {
  using A = acc_of<T>;
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  const A scale = static_cast<A>(a.scale), shift = static_cast<A>(a.shift);
  const T* x = static_cast<const T*>(a.x);
  const A* noise = static_cast<const A*>(a.noise);
  T* out = static_cast<T*>(a.out);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < a.layout.numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const A xk = to_acc(x[i]);
    const A v = value_at<A>(a.v, a.layout, i);
    out[i] = from_acc<T>(clamp_to(xk + (noise[i] * scale + shift) * v, lo, hi) - xk);
  }
}

template <typename T>
void launch_linf(const StepArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool packed = is_sample_constant(a.eps) && is_sample_constant(a.alpha) && aligned16(a.out) &&
                      aligned16(a.delta) && aligned16(a.grad) && aligned16(a.x);
  int64_t first = 0;
  if (packed) {
    const int64_t npack = a.layout.numel / VEC;
    if (npack > 0) {
      linf_packed_kernel<T, VEC><<<grid_for(npack, kThreads), kThreads, 0, stream>>>(a);
      check_launch("pgd_step (linf, packed)");
    }
    first = npack * VEC;
  }
  if (first < a.layout.numel) {
    linf_general_kernel<T><<<grid_for(a.layout.numel - first, kThreads), kThreads, 0, stream>>>(a, first);
    check_launch("pgd_step (linf)");
  }
}

template <typename T>
void launch_l2(const StepArgs& a, cudaStream_t stream) {
  // Enough blocks per sample to fill the device when the batch is small; at most 65535 rows of the grid.
  const int64_t per_sample = grid_for(a.layout.sample_numel, kThreads * 8, 1024);
  const dim3 grid(static_cast<unsigned>(per_sample),
                  static_cast<unsigned>(a.layout.batch < 65535 ? a.layout.batch : 65535));
  l2_grad_sumsq_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  check_launch("pgd_step (l2, gradient norm)");
  l2_step_sumsq_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  check_launch("pgd_step (l2, step norm)");
  l2_write_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  check_launch("pgd_step (l2, write)");
}

}  // namespace

void pgd_step_cuda(const StepArgs& a, void* stream) {
  if (a.layout.numel == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype_cuda(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.l2) launch_l2<T>(a, s);
    else launch_linf<T>(a, s);
  });
}

void random_init_cuda(const RandomInitArgs& a, void* stream) {
  if (a.layout.numel == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype_cuda(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    random_init_kernel<T><<<grid_for(a.layout.numel, kThreads), kThreads, 0, s>>>(a);
    check_launch("random_init");
  });
}

}  // namespace fastadv
