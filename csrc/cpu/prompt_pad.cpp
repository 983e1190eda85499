// CPU kernels for batched visual-prompt padding: one pass that resizes the image bilinearly, places it in
// the canvas, fills (or adds) the activated prompt on the border and normalises; and its backward.
#include <algorithm>
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

// The transpose of the column taps as a gather: for every input column, the canvas columns that read it and
// their weights (CSR), so that the backward sums without read-modify-write chains.
template <typename A>
struct ColumnGather {
  std::vector<int64_t> start, index;
  std::vector<A> weight;
};

template <typename A>
ColumnGather<A> column_gather(const PromptPadArgs& a, const ImageBox& box) {
  const auto taps = column_taps<A>(a, box);
  std::vector<std::vector<std::pair<int64_t, A>>> per_col(a.W);
  for (int64_t j = 0; j < box.w; ++j) {
    per_col[taps[j].i0].push_back({j, taps[j].w0});
    per_col[taps[j].i1].push_back({j, taps[j].w1});
  }
  ColumnGather<A> g;
  g.start.push_back(0);
  for (const auto& entries : per_col) {
    for (const auto& [j, w] : entries) {
      g.index.push_back(j);
      g.weight.push_back(w);
    }
    g.start.push_back(static_cast<int64_t>(g.index.size()));
  }
  return g;
}

// act(prompt) once per call, not once per sample.
template <typename T>
std::vector<acc_t<T>> activated_prompt(const PromptPadArgs& a) {
  using A = acc_t<T>;
  const T* prompt = static_cast<const T*>(a.prompt);
  std::vector<A> act(a.C * a.OH * a.OW);
  for (size_t k = 0; k < act.size(); ++k) act[k] = activate<A>(a.act, static_cast<A>(prompt[k]));
  return act;
}

// Forward, one (sample, channel) plane at a time and separably: each input row is resampled horizontally once
// (H x box.w), then every canvas row mixes two of those rows. Same arithmetic order as a direct 4-tap sum.
template <typename T>
void forward(const PromptPadArgs& a) {
  using A = acc_t<T>;
  const ImageBox box = image_box(a);
  const auto xt = column_taps<A>(a, box);
  const std::vector<A> act = activated_prompt<T>(a);
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);

  at::parallel_for(0, a.B * a.C, 1, [&](int64_t p0, int64_t p1) {
    std::vector<A> hbuf(a.H * box.w);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % a.C, b = p / a.C;
      const T* xp = x + b * a.xs[0] + c * a.xs[1];
      for (int64_t r = 0; r < a.H; ++r) {
        const T* xr = xp + r * a.xs[2];
        A* h = hbuf.data() + r * box.w;
        for (int64_t j = 0; j < box.w; ++j) {
          const BilinearTap<A>& t = xt[j];
          h[j] = t.w0 * static_cast<A>(xr[t.i0 * a.xs[3]]) + t.w1 * static_cast<A>(xr[t.i1 * a.xs[3]]);
        }
      }
      const bool norm = a.norm != NormalizeWhere::Off;
      const A mean = norm ? static_cast<A>(a.mean[c]) : A(0), sd = norm ? static_cast<A>(a.stdev[c]) : A(1);
      const A img_mean = a.norm == NormalizeWhere::Image ? mean : A(0);
      const A img_sd = a.norm == NormalizeWhere::Image ? sd : A(1);
      const A out_mean = a.norm == NormalizeWhere::Canvas ? mean : A(0);
      const A out_sd = a.norm == NormalizeWhere::Canvas ? sd : A(1);
      for (int64_t i = 0; i < a.OH; ++i) {
        T* orow = out + (p * a.OH + i) * a.OW;
        const A* arow = act.data() + (c * a.OH + i) * a.OW;
        // Branch-free segments of the row: prompt only, image only, image plus prompt.
        auto prompt_only = [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) orow[j] = static_cast<T>((arow[j] - out_mean) / out_sd);
        };
        if (i < box.top || i >= box.top + box.h) {  // replace mode, rows above or below the image
          prompt_only(0, a.OW);
          continue;
        }
        const BilinearTap<A> yt = bilinear_tap<A>(i - box.top, a.H, box.h);
        const A* h0 = hbuf.data() + yt.i0 * box.w - box.left;
        const A* h1 = hbuf.data() + yt.i1 * box.w - box.left;
        auto image = [&](int64_t j0, int64_t j1, bool plus_prompt) {
          if (plus_prompt) {
            for (int64_t j = j0; j < j1; ++j) {
              const A v = ((yt.w0 * h0[j] + yt.w1 * h1[j]) - img_mean) / img_sd + arow[j];
              orow[j] = static_cast<T>((v - out_mean) / out_sd);
            }
          } else {
            for (int64_t j = j0; j < j1; ++j) {
              const A v = ((yt.w0 * h0[j] + yt.w1 * h1[j]) - img_mean) / img_sd;
              orow[j] = static_cast<T>((v - out_mean) / out_sd);
            }
          }
        };
        const bool hole_row = i >= a.top && i < a.top + a.IH;
        if (!a.add_mode) {
          prompt_only(0, a.left);
          image(a.left, a.left + a.IW, false);
          prompt_only(a.left + a.IW, a.OW);
        } else if (hole_row) {
          image(0, a.left, true);
          image(a.left, a.left + a.IW, false);
          image(a.left + a.IW, a.OW, true);
        } else {
          image(0, a.OW, true);
        }
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
  const int64_t plane = a.OH * a.OW;

  if (a.grad_prompt != nullptr) {
    // Per prompt row, sum the batch's rows (contiguous reads), then apply the activation's derivative.
    T* gp = static_cast<T*>(a.grad_prompt);
    at::parallel_for(0, a.C * a.OH, 1, [&](int64_t r0, int64_t r1) {
      std::vector<A> acc(a.OW);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = r % a.OH, c = r / a.OH;
        std::fill(acc.begin(), acc.end(), A(0));
        // Only the prompt's part of the row: the hole's gradient belongs to the image.
        const bool hole_row = i >= a.top && i < a.top + a.IH;
        const int64_t skip0 = hole_row ? a.left : a.OW, skip1 = hole_row ? a.left + a.IW : a.OW;
        for (int64_t b = 0; b < a.B; ++b) {
          const T* grow = gout + (b * a.C + c) * plane + i * a.OW;
          for (int64_t j = 0; j < skip0; ++j) acc[j] += static_cast<A>(grow[j]);
          for (int64_t j = skip1; j < a.OW; ++j) acc[j] += static_cast<A>(grow[j]);
        }
        const A scale = a.norm == NormalizeWhere::Canvas ? inv_sd(c) : A(1);
        for (int64_t j = 0; j < a.OW; ++j) {
          const A g = in_hole(a, i, j) ? A(0) : acc[j] * scale * activate_grad<A>(a.act, static_cast<A>(prompt[r * a.OW + j]));
          gp[r * a.OW + j] = static_cast<T>(g);
        }
      }
    });
  }

  if (a.grad_x != nullptr) {
    // Separable transpose of the forward: scatter each canvas row into a (box.h x W) buffer along the
    // columns, then scatter those rows into the input rows.
    const ImageBox box = image_box(a);
    const ColumnGather<A> gather = column_gather<A>(a, box);
    A* gx = static_cast<A*>(a.grad_x);
    at::parallel_for(0, a.B * a.C, 1, [&](int64_t p0, int64_t p1) {
      std::vector<A> tmp(box.h * a.W);
      for (int64_t p = p0; p < p1; ++p) {
        const A scale = inv_sd(p % a.C);  // canvas or image normalisation both divide the image by std
        for (int64_t oi = 0; oi < box.h; ++oi) {
          const T* grow = gout + (p * a.OH + box.top + oi) * a.OW + box.left;
          A* t = tmp.data() + oi * a.W;
          for (int64_t col = 0; col < a.W; ++col) {
            A sum = A(0);
            for (int64_t k = gather.start[col]; k < gather.start[col + 1]; ++k) {
              sum += gather.weight[k] * static_cast<A>(grow[gather.index[k]]);
            }
            t[col] = sum * scale;
          }
        }
        A* planep = gx + p * a.H * a.W;
        for (int64_t oi = 0; oi < box.h; ++oi) {
          const BilinearTap<A> yt = bilinear_tap<A>(oi, a.H, box.h);
          const A* t = tmp.data() + oi * a.W;
          A* r0 = planep + yt.i0 * a.W;
          A* r1 = planep + yt.i1 * a.W;
          for (int64_t col = 0; col < a.W; ++col) {
            r0[col] += yt.w0 * t[col];
            r1[col] += yt.w1 * t[col];
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
