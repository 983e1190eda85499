// CUDA kernels for batched visual-prompt padding. Forward: one thread per canvas element, writes
// coalesced along the row. Backward: the prompt gradient sums over the batch per prompt element
// (coalesced, no atomics); the image gradient scatters the bilinear weights with atomics into a float32
// (float64 for double) buffer.
#include "fastadv/cuda_common.cuh"
#include "fastadv/step_math.h"

namespace fastadv {
namespace {

struct Box {
  int64_t h, w, top, left;
};

__host__ __device__ inline Box image_box(const PromptPadArgs& a) {
  return a.add_mode ? Box{a.OH, a.OW, 0, 0} : Box{a.IH, a.IW, a.top, a.left};
}

template <typename T>
__global__ void forward_kernel(PromptPadArgs a) {
  using A = acc_of<T>;
  const Box box = image_box(a);
  const T* x = static_cast<const T*>(a.x);
  const T* prompt = static_cast<const T*>(a.prompt);
  T* out = static_cast<T*>(a.out);
  const int64_t n = a.B * a.C * a.OH * a.OW;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % a.OW, i = (idx / a.OW) % a.OH, c = (idx / (a.OW * a.OH)) % a.C;
    const int64_t b = idx / (a.OW * a.OH * a.C);
    const bool hole = in_hole(a, i, j);
    const A mean = a.norm == NormalizeWhere::Off ? A(0) : static_cast<A>(a.mean[c]);
    const A sd = a.norm == NormalizeWhere::Off ? A(1) : static_cast<A>(a.stdev[c]);
    A v = A(0);
    if (a.add_mode || hole) {
      const BilinearTap<A> yt = bilinear_tap<A>(i - box.top, a.H, box.h);
      const BilinearTap<A> xt = bilinear_tap<A>(j - box.left, a.W, box.w);
      const T* p = x + b * a.xs[0] + c * a.xs[1];
      const T* r0 = p + yt.i0 * a.xs[2];
      const T* r1 = p + yt.i1 * a.xs[2];
      v = yt.w0 * (xt.w0 * to_acc(r0[xt.i0 * a.xs[3]]) + xt.w1 * to_acc(r0[xt.i1 * a.xs[3]])) +
          yt.w1 * (xt.w0 * to_acc(r1[xt.i0 * a.xs[3]]) + xt.w1 * to_acc(r1[xt.i1 * a.xs[3]]));
      if (a.norm == NormalizeWhere::Image) v = (v - mean) / sd;
    }
    if (!hole) v += activate<A>(a.act, to_acc(prompt[(c * a.OH + i) * a.OW + j]));
    if (a.norm == NormalizeWhere::Canvas) v = (v - mean) / sd;
    out[idx] = from_acc<T>(v);
  }
}

template <typename T>
__global__ void prompt_grad_kernel(PromptPadArgs a) {
  using A = acc_of<T>;
  const T* gout = static_cast<const T*>(a.grad_out);
  const T* prompt = static_cast<const T*>(a.prompt);
  T* gp = static_cast<T*>(a.grad_prompt);
  const int64_t plane = a.OH * a.OW, n = a.C * plane;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % a.OW, i = (idx / a.OW) % a.OH, c = idx / plane;
    A acc = A(0);
    if (!in_hole(a, i, j)) {
      for (int64_t b = 0; b < a.B; ++b) acc += to_acc(gout[(b * a.C + c) * plane + i * a.OW + j]);
      if (a.norm == NormalizeWhere::Canvas) acc /= static_cast<A>(a.stdev[c]);
      acc *= activate_grad<A>(a.act, to_acc(prompt[idx]));
    }
    gp[idx] = from_acc<T>(acc);
  }
}

template <typename T>
__global__ void image_grad_kernel(PromptPadArgs a) {
  using A = acc_of<T>;
  const Box box = image_box(a);
  const T* gout = static_cast<const T*>(a.grad_out);
  A* gx = static_cast<A*>(a.grad_x);
  const int64_t n = a.B * a.C * box.h * box.w;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t oj = idx % box.w, oi = (idx / box.w) % box.h, p = idx / (box.w * box.h);
    const int64_t c = p % a.C;
    A g = to_acc(gout[(p * a.OH + box.top + oi) * a.OW + box.left + oj]);
    if (a.norm != NormalizeWhere::Off) g /= static_cast<A>(a.stdev[c]);
    const BilinearTap<A> yt = bilinear_tap<A>(oi, a.H, box.h);
    const BilinearTap<A> xt = bilinear_tap<A>(oj, a.W, box.w);
    A* plane = gx + p * a.H * a.W;
    atomicAdd(plane + yt.i0 * a.W + xt.i0, yt.w0 * xt.w0 * g);
    atomicAdd(plane + yt.i0 * a.W + xt.i1, yt.w0 * xt.w1 * g);
    atomicAdd(plane + yt.i1 * a.W + xt.i0, yt.w1 * xt.w0 * g);
    atomicAdd(plane + yt.i1 * a.W + xt.i1, yt.w1 * xt.w1 * g);
  }
}

}  // namespace

void prompt_pad_forward_cuda(const PromptPadArgs& a, void* stream) {
  const int64_t n = a.B * a.C * a.OH * a.OW;
  if (n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype_cuda(a.dtype, [&](auto tag) {
    forward_kernel<decltype(tag)><<<grid_for(n, kThreads), kThreads, 0, s>>>(a);
    check_launch("prompt_pad");
  });
}

void prompt_pad_backward_cuda(const PromptPadArgs& a, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype_cuda(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.grad_prompt != nullptr && a.C * a.OH * a.OW > 0) {
      prompt_grad_kernel<T><<<grid_for(a.C * a.OH * a.OW, kThreads), kThreads, 0, s>>>(a);
      check_launch("prompt_pad_backward (prompt)");
    }
    const Box box = image_box(a);
    const int64_t n = a.B * a.C * box.h * box.w;
    if (a.grad_x != nullptr && n > 0) {
      image_grad_kernel<T><<<grid_for(n, kThreads), kThreads, 0, s>>>(a);
      check_launch("prompt_pad_backward (image)");
    }
  });
}

}  // namespace fastadv
