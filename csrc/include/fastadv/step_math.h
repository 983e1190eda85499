// The per-element formulas of the ops, shared by the CPU and CUDA kernels so that the two twins
// cannot drift apart. `A` is the accumulation type (float for float/half/bfloat16, double for double).
#pragma once

#include <cmath>

#include "fastadv/kernel_args.h"

#if defined(__CUDACC__)
#define FASTADV_HD __host__ __device__ __forceinline__
#else
#define FASTADV_HD inline
#endif

// Single-precision math stays single precision on both sides (the host needs the std:: overloads).
#if defined(__CUDA_ARCH__)
#define FASTADV_EXP(v) exp(v)
#define FASTADV_TANH(v) tanh(v)
#else
#define FASTADV_EXP(v) std::exp(v)
#define FASTADV_TANH(v) std::tanh(v)
#endif

namespace fastadv {

template <typename A>
FASTADV_HD A clamp_to(A v, A lo, A hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

template <typename A>
FASTADV_HD A sign_of(A g) {
  return static_cast<A>((A(0) < g) - (g < A(0)));
}

// L-infinity step for one element: ascend, project onto [-eps, eps], then keep x + d inside [lo, hi].
template <typename A>
FASTADV_HD A linf_step(A d, A g, A x, A eps, A alpha, A lo, A hi) {
  d = clamp_to(d + alpha * sign_of(g), -eps, eps);
  return clamp_to(x + d, lo, hi) - x;
}

// Offset of linear index `i` (in the layout's memory order) into a strided operand.
FASTADV_HD int64_t strided_offset(const Layout& L, const int64_t* strides, int64_t i) {
  int64_t off = 0;
  for (int k = L.ndim - 1; k >= 0; --k) {
    const int64_t s = L.sizes[k];
    off += (i % s) * strides[k];
    i /= s;
  }
  return off;
}

template <typename A>
FASTADV_HD A value_at(const ValueArg& v, const Layout& L, int64_t i) {
  switch (v.kind) {
    case ValueKind::Scalar:
      return static_cast<A>(v.value);
    case ValueKind::PerSample:
      return static_cast<const A*>(v.ptr)[i / L.sample_numel];
    case ValueKind::Map:
      return static_cast<const A*>(v.ptr)[strided_offset(L, v.strides, i)];
    case ValueKind::Mask:
    default:
      return static_cast<const uint8_t*>(v.ptr)[strided_offset(L, v.strides, i)]
                 ? static_cast<A>(v.value)
                 : static_cast<A>(v.value_low);
  }
}

// A value that is constant within one sample (Scalar or PerSample): the fast paths use this.
template <typename A>
FASTADV_HD A sample_value(const ValueArg& v, int64_t b) {
  return v.kind == ValueKind::PerSample ? static_cast<const A*>(v.ptr)[b] : static_cast<A>(v.value);
}

FASTADV_HD bool is_sample_constant(const ValueArg& v) {
  return v.kind == ValueKind::Scalar || v.kind == ValueKind::PerSample;
}

template <typename A>
FASTADV_HD A activate(Activation act, A p) {
  switch (act) {
    case Activation::Sigmoid:
      return A(1) / (A(1) + FASTADV_EXP(-p));
    case Activation::Tanh:
      return FASTADV_TANH(p);
    case Activation::None:
    default:
      return p;
  }
}

// d act(p) / d p, written in terms of p.
template <typename A>
FASTADV_HD A activate_grad(Activation act, A p) {
  switch (act) {
    case Activation::Sigmoid: {
      const A s = A(1) / (A(1) + FASTADV_EXP(-p));
      return s * (A(1) - s);
    }
    case Activation::Tanh: {
      const A t = FASTADV_TANH(p);
      return A(1) - t * t;
    }
    case Activation::None:
    default:
      return A(1);
  }
}

// Bilinear source coordinate of PyTorch's interpolate(mode="bilinear", align_corners=False).
template <typename A>
struct BilinearTap {
  int64_t i0, i1;
  A w0, w1;
};

template <typename A>
FASTADV_HD BilinearTap<A> bilinear_tap(int64_t dst, int64_t in_size, int64_t out_size) {
  const A scale = static_cast<A>(in_size) / static_cast<A>(out_size);
  A src = scale * (static_cast<A>(dst) + A(0.5)) - A(0.5);
  if (src < A(0)) src = A(0);
  BilinearTap<A> t;
  t.i0 = static_cast<int64_t>(src);
  if (t.i0 > in_size - 1) t.i0 = in_size - 1;
  t.i1 = t.i0 < in_size - 1 ? t.i0 + 1 : t.i0;
  t.w1 = src - static_cast<A>(t.i0);
  t.w0 = A(1) - t.w1;
  return t;
}

FASTADV_HD bool in_hole(const PromptPadArgs& a, int64_t i, int64_t j) {
  return i >= a.top && i < a.top + a.IH && j >= a.left && j < a.left + a.IW;
}

}  // namespace fastadv
