// CPU kernels: the fused PGD step (L-inf, L2, per-pixel and masked epsilon) and the random start.
// Work is split with at::parallel_for; the inner loops are plain contiguous loops the compiler vectorises.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "fastadv/cpu_common.h"
#include "fastadv/step_math.h"

namespace fastadv {
namespace {

// L-inf step where epsilon and/or alpha vary per element (per-pixel map or mask). Walks rows of the innermost
// (coalesced) memory dimension, splitting at sample boundaries, so operand offsets are computed once per row
// and the inner loop is specialised on the operand kinds.
template <typename T, ValueKind EK, bool AlphaMap>
void linf_rows(const StepArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  T* out = static_cast<T*>(a.out);
  const T* d = static_cast<const T*>(a.delta);
  const T* g = static_cast<const T*>(a.grad);
  const T* x = static_cast<const T*>(a.x);
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  const Layout& L = a.layout;
  const int64_t row = L.sizes[L.ndim - 1];
  const int64_t es = a.eps.strides[L.ndim - 1], as = a.alpha.strides[L.ndim - 1];
  const A eps_high = static_cast<A>(a.eps.value), eps_low = static_cast<A>(a.eps.value_low);
  int64_t i = begin;
  while (i < end) {
    const int64_t b = i / L.sample_numel;
    const int64_t seg_end = std::min({end, (i / row + 1) * row, (b + 1) * L.sample_numel});
    const int64_t n = seg_end - i;
    const A eps_b = sample_value<A>(a.eps, b), alpha_b = sample_value<A>(a.alpha, b);
    const A* emap = nullptr;
    const uint8_t* emask = nullptr;
    if constexpr (EK == ValueKind::Map) emap = static_cast<const A*>(a.eps.ptr) + strided_offset(L, a.eps.strides, i);
    if constexpr (EK == ValueKind::Mask)
      emask = static_cast<const uint8_t*>(a.eps.ptr) + strided_offset(L, a.eps.strides, i);
    const A* amap = nullptr;
    if constexpr (AlphaMap) amap = static_cast<const A*>(a.alpha.ptr) + strided_offset(L, a.alpha.strides, i);
    T* o = out + i;
    const T *dd = d + i, *gg = g + i, *xx = x + i;
    // Unit-stride operands (the usual per-pixel map) get a loop the compiler can vectorise.
    auto body = [&](auto e_step, auto a_step) {
      for (int64_t j = 0; j < n; ++j) {
        A eps = eps_b;
        if constexpr (EK == ValueKind::Map) eps = emap[j * e_step];
        if constexpr (EK == ValueKind::Mask) eps = emask[j * e_step] ? eps_high : eps_low;
        A alpha = alpha_b;
        if constexpr (AlphaMap) alpha = amap[j * a_step];
        o[j] = static_cast<T>(linf_step<A>(static_cast<A>(dd[j]), static_cast<A>(gg[j]), static_cast<A>(xx[j]),
                                           eps, alpha, lo, hi));
      }
    };
    using One = std::integral_constant<int64_t, 1>;
    if (es == 1 && (!AlphaMap || as == 1)) body(One{}, One{});
    else body(es, as);
    i = seg_end;
  }
}

// L-inf step over [begin, end) of the flat index space.
template <typename T>
void linf_range(const StepArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  T* out = static_cast<T*>(a.out);
  const T* d = static_cast<const T*>(a.delta);
  const T* g = static_cast<const T*>(a.grad);
  const T* x = static_cast<const T*>(a.x);
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  const Layout& L = a.layout;

  if (is_sample_constant(a.eps) && is_sample_constant(a.alpha)) {
    // Fast path: epsilon and alpha are constant within a sample, so each sample's slice is one flat loop.
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / L.sample_numel;
      const int64_t seg_end = std::min(end, (b + 1) * L.sample_numel);
      const A eps = sample_value<A>(a.eps, b), alpha = sample_value<A>(a.alpha, b);
      for (int64_t k = i; k < seg_end; ++k) {
        out[k] = static_cast<T>(linf_step<A>(static_cast<A>(d[k]), static_cast<A>(g[k]),
                                             static_cast<A>(x[k]), eps, alpha, lo, hi));
      }
      i = seg_end;
    }
    return;
  }
  if (a.eps.kind == ValueKind::Map) {
    a.alpha.kind == ValueKind::Map ? linf_rows<T, ValueKind::Map, true>(a, begin, end)
                                   : linf_rows<T, ValueKind::Map, false>(a, begin, end);
  } else if (a.eps.kind == ValueKind::Mask) {
    a.alpha.kind == ValueKind::Map ? linf_rows<T, ValueKind::Mask, true>(a, begin, end)
                                   : linf_rows<T, ValueKind::Mask, false>(a, begin, end);
  } else {
    linf_rows<T, ValueKind::PerSample, true>(a, begin, end);
  }
}

// L2 step for samples [b0, b1): three passes over each sample (gradient norm, norm of the unprojected
// step, write), accumulating in double so that large images keep full precision.
template <typename T>
void l2_samples(const StepArgs& a, int64_t b0, int64_t b1) {
  using A = acc_t<T>;
  const int64_t S = a.layout.sample_numel;
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  for (int64_t b = b0; b < b1; ++b) {
    T* out = static_cast<T*>(a.out) + b * S;
    const T* d = static_cast<const T*>(a.delta) + b * S;
    const T* g = static_cast<const T*>(a.grad) + b * S;
    const T* x = static_cast<const T*>(a.x) + b * S;
    const A eps = sample_value<A>(a.eps, b), alpha = sample_value<A>(a.alpha, b);

    double gsq = 0.0;
#pragma omp simd reduction(+ : gsq)
    for (int64_t k = 0; k < S; ++k) {
      const double gk = static_cast<double>(static_cast<A>(g[k]));
      gsq += gk * gk;
    }
    A gnorm = static_cast<A>(std::sqrt(gsq));
    if (gnorm < A(1e-12)) gnorm = A(1e-12);
    const A step = alpha / gnorm;

    double dsq = 0.0;
#pragma omp simd reduction(+ : dsq)
    for (int64_t k = 0; k < S; ++k) {
      const double v = static_cast<double>(static_cast<A>(d[k]) + step * static_cast<A>(g[k]));
      dsq += v * v;
    }
    const A dnorm = static_cast<A>(std::sqrt(dsq));
    const A factor = dnorm > eps ? eps / dnorm : A(1);

    for (int64_t k = 0; k < S; ++k) {
      const A v = (static_cast<A>(d[k]) + step * static_cast<A>(g[k])) * factor;
      const A xk = static_cast<A>(x[k]);
      out[k] = static_cast<T>(clamp_to(xk + v, lo, hi) - xk);
    }
  }
}

template <typename T>
void random_init_range(const RandomInitArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  T* out = static_cast<T*>(a.out);
  const T* x = static_cast<const T*>(a.x);
  const A* noise = static_cast<const A*>(a.noise);
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  const A scale = static_cast<A>(a.scale), shift = static_cast<A>(a.shift);
  for (int64_t k = begin; k < end; ++k) {
    const A v = value_at<A>(a.v, a.layout, k);
    const A xk = static_cast<A>(x[k]);
    out[k] = static_cast<T>(clamp_to(xk + (noise[k] * scale + shift) * v, lo, hi) - xk);
  }
}

}  // namespace

void pgd_step_cpu(const StepArgs& a) {
  if (a.layout.numel == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.l2) {
      const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, a.layout.sample_numel));
      at::parallel_for(0, a.layout.batch, grain, [&](int64_t b0, int64_t b1) { l2_samples<T>(a, b0, b1); });
    } else {
      at::parallel_for(0, a.layout.numel, kGrain, [&](int64_t s, int64_t e) { linf_range<T>(a, s, e); });
    }
  });
}

void random_init_cpu(const RandomInitArgs& a) {
  if (a.layout.numel == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, a.layout.numel, kGrain, [&](int64_t s, int64_t e) { random_init_range<T>(a, s, e); });
  });
}

}  // namespace fastadv
