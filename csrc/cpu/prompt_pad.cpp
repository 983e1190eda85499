// CPU kernels for batched visual-prompt padding: one pass that resizes the image bilinearly, places it in
// the canvas, fills (or adds) the activated prompt on the border and normalises; and its backward.
#include <vector>

#include "fastadv/cpu_common.h"
#include "fastadv/step_math.h"

namespace fastadv {
namespace {

// Geometry of the resized image inside the canvas: the hole in replace mode, the whole canvas in add mode.
struct ImageBox {
  int64_t h, w, top, left;
};

ImageBox image_box(const PromptPadArgs& a) {
  return a.add_mode ? ImageBox{a.OH, a.OW, 0, 0} : ImageBox{a.IH, a.IW, a.top, a.left};
}

template <typename A>
std::vector<BilinearTap<A>> column_taps(const PromptPadArgs& a, const ImageBox& box) {
  std::vector<BilinearTap<A>> taps(box.w);
  for (int64_t j = 0; j < box.w; ++j) taps[j] = bilinear_tap<A>(j, a.W, box.w);
  return taps;
}

template <typename T>
void forward(const PromptPadArgs& a) {
  using A = acc_t<T>;
  const ImageBox box = image_box(a);
  const auto xt = column_taps<A>(a, box);
  const T* x = static_cast<const T*>(a.x);
  const T* prompt = static_cast<const T*>(a.prompt);
  T* out = static_cast<T*>(a.out);
  const int64_t rows = a.B * a.C * a.OH;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, a.OW));

  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % a.OH, c = (r / a.OH) % a.C, b = r / (a.OH * a.C);
      const A mean = static_cast<A>(a.mean[a.norm == NormalizeWhere::Off ? 0 : c]);
      const A sd = a.norm == NormalizeWhere::Off ? A(1) : static_cast<A>(a.stdev[c]);
      const T* prow = prompt + (c * a.OH + i) * a.OW;
      T* orow = out + r * a.OW;
      const bool image_row = i >= box.top && i < box.top + box.h;
      BilinearTap<A> yt{0, 0, A(0), A(0)};
      if (image_row) yt = bilinear_tap<A>(i - box.top, a.H, box.h);
      const T* x0 = x + b * a.xs[0] + c * a.xs[1] + yt.i0 * a.xs[2];
      const T* x1 = x + b * a.xs[0] + c * a.xs[1] + yt.i1 * a.xs[2];
      for (int64_t j = 0; j < a.OW; ++j) {
        const bool hole = in_hole(a, i, j);
        A v = A(0);
        if (image_row && j >= box.left && j < box.left + box.w && (a.add_mode || hole)) {
          const BilinearTap<A>& t = xt[j - box.left];
          v = yt.w0 * (t.w0 * static_cast<A>(x0[t.i0 * a.xs[3]]) + t.w1 * static_cast<A>(x0[t.i1 * a.xs[3]])) +
              yt.w1 * (t.w0 * static_cast<A>(x1[t.i0 * a.xs[3]]) + t.w1 * static_cast<A>(x1[t.i1 * a.xs[3]]));
          if (a.norm == NormalizeWhere::Image) v = (v - mean) / sd;
        }
        if (!hole) v += activate<A>(a.act, static_cast<A>(prow[j]));
        if (a.norm == NormalizeWhere::Canvas) v = (v - mean) / sd;
        orow[j] = static_cast<T>(v);
      }
    }
  });
}

template <typename T>
void backward(const PromptPadArgs& a) {
  using A = acc_t<T>;
  const T* gout = static_cast<const T*>(a.grad_out);
  const T* prompt = static_cast<const T*>(a.prompt);
  auto inv_sd = [&](int64_t c) {
    return a.norm == NormalizeWhere::Off ? A(1) : A(1) / static_cast<A>(a.stdev[c]);
  };

  if (a.grad_prompt != nullptr) {
    // Each prompt element sums its gradient over the batch: no two threads write the same element.
    T* gp = static_cast<T*>(a.grad_prompt);
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, a.OW * a.B));
    at::parallel_for(0, a.C * a.OH, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = r % a.OH, c = r / a.OH;
        const A scale = a.norm == NormalizeWhere::Canvas ? inv_sd(c) : A(1);
        for (int64_t j = 0; j < a.OW; ++j) {
          A acc = A(0);
          if (!in_hole(a, i, j)) {
            for (int64_t b = 0; b < a.B; ++b) acc += static_cast<A>(gout[((b * a.C + c) * a.OH + i) * a.OW + j]);
            acc *= scale * activate_grad<A>(a.act, static_cast<A>(prompt[r * a.OW + j]));
          }
          gp[r * a.OW + j] = static_cast<T>(acc);
        }
      }
    });
  }

  if (a.grad_x != nullptr) {
    // Each (sample, channel) plane is scattered by one thread into its own accumulation plane.
    const ImageBox box = image_box(a);
    const auto xt = column_taps<A>(a, box);
    A* gx = static_cast<A*>(a.grad_x);
    at::parallel_for(0, a.B * a.C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % a.C;
        const A scale = inv_sd(c);  // canvas or image normalisation both divide the image by std
        A* plane = gx + p * a.H * a.W;
        for (int64_t oi = 0; oi < box.h; ++oi) {
          const BilinearTap<A> yt = bilinear_tap<A>(oi, a.H, box.h);
          const T* grow = gout + (p * a.OH + box.top + oi) * a.OW + box.left;
          A* r0 = plane + yt.i0 * a.W;
          A* r1 = plane + yt.i1 * a.W;
          for (int64_t oj = 0; oj < box.w; ++oj) {
            const A g = static_cast<A>(grow[oj]) * scale;
            const BilinearTap<A>& t = xt[oj];
            r0[t.i0] += yt.w0 * t.w0 * g;
            r0[t.i1] += yt.w0 * t.w1 * g;
            r1[t.i0] += yt.w1 * t.w0 * g;
            r1[t.i1] += yt.w1 * t.w1 * g;
          }
        }
      }
    });
  }
}

}  // namespace

void prompt_pad_forward_cpu(const PromptPadArgs& a) {
  if (a.B * a.C * a.OH * a.OW == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) { forward<decltype(tag)>(a); });
}

void prompt_pad_backward_cpu(const PromptPadArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) { backward<decltype(tag)>(a); });
}

}  // namespace fastadv
