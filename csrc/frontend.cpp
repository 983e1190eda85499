// Argument checks, layout handling and kernel dispatch shared by the CPU and CUDA registrations.
//
// Layout: the kernels want the output and every full-size input contiguous in one memory order with the
// batch dimension outermost. The output takes the memory order of `delta` (empty_like keeps channels_last
// and other dense layouts), inputs already in that order are used in place, and only mismatching inputs
// are copied. Broadcast operands (per-pixel epsilon, masks) are never materialised: the kernels read them
// through their strides.
#include "fastadv/frontend.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <numeric>
#include <string>
#include <vector>

namespace fastadv {
namespace {

const Backend kCpuBackend = {
    [](const StepArgs& a, void*) { pgd_step_cpu(a); },
    [](const RandomInitArgs& a, void*) { random_init_cpu(a); },
    [](const PromptPadArgs& a, void*) { prompt_pad_forward_cpu(a); },
    [](const PromptPadArgs& a, void*) { prompt_pad_backward_cpu(a); },
    []() -> void* { return nullptr; },
};

const Backend* g_cuda_backend = nullptr;

const Backend& backend_for(const char* op, const at::Tensor& t) {
  if (t.device().is_cpu()) return kCpuBackend;
  TORCH_CHECK(t.device().is_cuda() && g_cuda_backend != nullptr, "fastadv.", op,
              ": no fastadv kernel for device ", t.device());
  return *g_cuda_backend;
}

DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    default: return DType::BFloat16;
  }
}

at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

bool is_supported_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

void check_image(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), "fastadv.", op, ": `", name, "` must be a tensor");
  TORCH_CHECK_VALUE(is_supported_float(t.scalar_type()), "fastadv.", op, ": `", name,
                    "` must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.dim() <= kMaxDims, "fastadv.", op, ": `", name,
                    "` must have between 1 and ", kMaxDims, " dimensions (batch first), got ", t.dim());
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "fastadv.", op, ": `", name, "` must be a dense (strided) tensor");
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.defined(), "fastadv.", op, ": `", name, "` must be a tensor");
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "fastadv.", op, ": `", name, "` must have the shape of `", ref_name,
                    "` ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), "fastadv.", op, ": `", name, "` must have the dtype of `",
                    ref_name, "` (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "fastadv.", op, ": `", name, "` must be on the device of `",
                    ref_name, "` (", ref.device(), "), got ", t.device());
}

void check_box(const char* op, double lo, double hi) {
  TORCH_CHECK_VALUE(std::isfinite(lo) && std::isfinite(hi) && lo <= hi, "fastadv.", op,
                    ": need finite `lo` <= `hi`, got lo=", lo, ", hi=", hi);
}

bool parse_norm(const char* op, std::string_view norm) {
  TORCH_CHECK_VALUE(norm == "linf" || norm == "l2", "fastadv.", op, ": unknown `norm` '", std::string(norm),
                    "'; expected 'linf' or 'l2'");
  return norm == "l2";
}

// --- layout -------------------------------------------------------------------------------------------

// Dimensions ordered from outermost to innermost in memory; size-1 dimensions first (their stride is
// meaningless), ties broken by dimension index.
std::vector<int64_t> memory_order(const at::Tensor& t) {
  std::vector<int64_t> perm(t.dim());
  std::iota(perm.begin(), perm.end(), 0);
  auto key = [&](int64_t d) { return t.size(d) == 1 ? INT64_MAX : t.stride(d); };
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return key(a) > key(b); });
  return perm;
}

// Contiguous in `perm` order with the batch dimension outermost (dimensions of size 1 may come first).
bool is_canonical(const at::Tensor& t, const std::vector<int64_t>& perm) {
  int64_t expected = 1;
  for (int64_t k = t.dim() - 1; k >= 0; --k) {
    const int64_t d = perm[k];
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  for (int64_t k = 0; k < t.dim() && perm[k] != 0; ++k) {
    if (t.size(perm[k]) != 1) return false;
  }
  return true;
}

bool same_strides(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// `t`, or a copy of it laid out like `like` (which is canonical).
at::Tensor laid_out_like(const at::Tensor& t, const at::Tensor& like) {
  if (same_strides(t, like)) return t;
  return at::empty_like(like).copy_(t);
}

struct Canonical {
  at::Tensor work;  // where the kernel writes
  std::vector<int64_t> perm;
  Layout layout;
};

// The kernel's output buffer: `target` itself when it is canonical, otherwise a fresh contiguous tensor
// that the caller copies back.
Canonical canonical_output(const at::Tensor& target) {
  Canonical c;
  c.perm = memory_order(target);
  c.work = target;
  if (!is_canonical(target, c.perm)) {
    c.work = at::empty(target.sizes(), target.options());
    c.perm.resize(target.dim());
    std::iota(c.perm.begin(), c.perm.end(), 0);
  }
  Layout& L = c.layout;
  L.ndim = static_cast<int>(target.dim());
  for (int k = 0; k < L.ndim; ++k) L.sizes[k] = target.size(c.perm[k]);
  L.numel = target.numel();
  L.batch = target.size(0);
  L.sample_numel = L.batch > 0 ? L.numel / L.batch : 0;
  return c;
}

// Merges adjacent memory dimensions that every strided operand also walks contiguously (or broadcasts
// along both), so that kernels see long rows: a (B, 1, H, W) budget over NCHW images becomes rows of H*W.
void coalesce(Layout& L, std::initializer_list<ValueArg*> values) {
  std::vector<ValueArg*> strided;
  for (ValueArg* v : values) {
    if (v->kind == ValueKind::Map || v->kind == ValueKind::Mask) strided.push_back(v);
  }
  if (L.ndim <= 1) return;
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims][kMaxDims];  // [operand][dim], innermost group first
  int n = 0;
  sizes[0] = L.sizes[L.ndim - 1];
  for (size_t o = 0; o < strided.size(); ++o) strides[o][0] = strided[o]->strides[L.ndim - 1];
  for (int k = L.ndim - 2; k >= 0; --k) {
    bool merge = true;
    for (size_t o = 0; o < strided.size() && merge; ++o) {
      merge = L.sizes[k] == 1 || strided[o]->strides[k] == strides[o][n] * sizes[n];
    }
    if (merge) {
      sizes[n] *= L.sizes[k];
    } else {
      ++n;
      sizes[n] = L.sizes[k];
      for (size_t o = 0; o < strided.size(); ++o) strides[o][n] = strided[o]->strides[k];
    }
  }
  L.ndim = n + 1;
  for (int k = 0; k <= n; ++k) {
    L.sizes[k] = sizes[n - k];
    for (size_t o = 0; o < strided.size(); ++o) strided[o]->strides[k] = strides[o][n - k];
  }
  for (int k = L.ndim; k < kMaxDims; ++k) L.sizes[k] = 1;
}

// --- epsilon / alpha arguments --------------------------------------------------------------------------

struct Value {
  ValueArg arg;
  at::Tensor keep;  // keeps a converted operand alive during the launch
};

void check_values_cpu(const char* op, const char* name, const at::Tensor& t) {
  if (!t.device().is_cpu()) return;  // on CUDA a value check would synchronise every step
  const at::Tensor c = t.contiguous();
  auto check = [&](auto* p) {
    for (int64_t i = 0; i < c.numel(); ++i) {
      TORCH_CHECK_VALUE(!(p[i] < 0) && !std::isnan(static_cast<double>(p[i])), "fastadv.", op, ": `", name,
                        "` must be non-negative and not NaN, found ", static_cast<double>(p[i]));
    }
  };
  if (c.scalar_type() == at::kDouble) check(c.const_data_ptr<double>());
  else check(c.const_data_ptr<float>());
}

void fill_strides(ValueArg& v, const at::Tensor& expanded, const std::vector<int64_t>& perm) {
  for (size_t k = 0; k < perm.size(); ++k) v.strides[k] = expanded.stride(perm[k]);
}

bool broadcastable(const at::Tensor& t, const at::Tensor& x) {
  if (t.dim() > x.dim()) return false;
  for (int64_t i = 1; i <= t.dim(); ++i) {
    const int64_t a = t.size(-i), b = x.size(-i);
    if (a != 1 && a != b) return false;
  }
  return true;
}

// `scalar` when `tensor` is absent; otherwise a per-sample `(B,)` tensor or (when `allow_map`) a tensor
// broadcastable to `x`. Under L2 a broadcastable tensor that only varies along the batch is per-sample.
Value make_value(const char* op, const char* name, double scalar, const std::optional<at::Tensor>& tensor,
                 const at::Tensor& x, const std::vector<int64_t>& perm, bool allow_map, bool allow_inf) {
  Value v;
  if (!tensor.has_value() || !tensor->defined()) {
    TORCH_CHECK_VALUE(!std::isnan(scalar) && scalar >= 0 && (allow_inf || std::isfinite(scalar)), "fastadv.", op,
                      ": `", name, "` must be a non-negative ", allow_inf ? "number" : "finite number", ", got ",
                      scalar);
    v.arg.kind = ValueKind::Scalar;
    v.arg.value = scalar;
    return v;
  }
  const at::Tensor& t = *tensor;
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "fastadv.", op, ": `", name,
                    "` tensor must be floating point, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "fastadv.", op, ": `", name, "` must be on the device of `x` (",
                    x.device(), "), got ", t.device());
  const at::ScalarType acc = acc_type(x.scalar_type());
  const int64_t B = x.size(0);
  if (t.dim() == 1 && t.size(0) == B && !(x.dim() == 1)) {
    v.keep = t.to(acc).contiguous();
    v.arg.kind = ValueKind::PerSample;
  } else {
    TORCH_CHECK_VALUE(broadcastable(t, x), "fastadv.", op, ": `", name, "` of shape ", t.sizes(),
                      " is neither per-sample (", B, ",) nor broadcastable to `x` ", x.sizes());
    bool batch_only = t.dim() < x.dim() ? t.numel() == 1 : true;
    for (int64_t d = 1; d < t.dim() && batch_only; ++d) batch_only = t.size(d) == 1;
    if (!allow_map) {
      TORCH_CHECK_VALUE(batch_only, "fastadv.", op, ": a per-pixel `", name,
                        "` is only supported for norm='linf'; give a float or a per-sample (B,) tensor");
      v.keep = t.to(acc).reshape({-1}).expand({B}).contiguous();
      v.arg.kind = ValueKind::PerSample;
    } else {
      v.keep = t.to(acc);
      v.arg.kind = ValueKind::Map;
      fill_strides(v.arg, v.keep.expand(x.sizes()), perm);
    }
  }
  check_values_cpu(op, name, v.keep);
  v.arg.ptr = v.keep.const_data_ptr();
  return v;
}

void run_step(const char* op, const at::Tensor& target, const at::Tensor& delta, const at::Tensor& grad,
              const at::Tensor& x, const std::optional<at::Tensor>& eps_t, double eps,
              const std::optional<at::Tensor>& alpha_t, double alpha, const std::optional<at::Tensor>& mask,
              double eps_low, bool l2, double lo, double hi) {
  c10::OptionalDeviceGuard guard(x.device());
  const Backend& be = backend_for(op, x);
  Canonical c = canonical_output(target);

  Value e;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_VALUE(m.scalar_type() == at::kBool || m.scalar_type() == at::kByte, "fastadv.", op,
                      ": `mask` must be bool or uint8, got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.device() == x.device(), "fastadv.", op, ": `mask` must be on the device of `x` (",
                      x.device(), "), got ", m.device());
    TORCH_CHECK_VALUE(broadcastable(m, x), "fastadv.", op, ": `mask` of shape ", m.sizes(),
                      " is not broadcastable to `x` ", x.sizes());
    TORCH_CHECK_VALUE(!std::isnan(eps) && eps >= 0 && !std::isnan(eps_low) && eps_low >= 0, "fastadv.", op,
                      ": `eps_high` and `eps_low` must be non-negative, got ", eps, " and ", eps_low);
    e.keep = m;
    e.arg.kind = ValueKind::Mask;
    e.arg.value = eps;
    e.arg.value_low = eps_low;
    e.arg.ptr = m.const_data_ptr();
    fill_strides(e.arg, m.expand(x.sizes()), c.perm);
  } else {
    e = make_value(op, "eps", eps, eps_t, x, c.perm, !l2, /*allow_inf=*/true);
  }
  Value a = make_value(op, "alpha", alpha, alpha_t, x, c.perm, !l2, /*allow_inf=*/false);

  const at::Tensor d = laid_out_like(delta, c.work);
  const at::Tensor g = laid_out_like(grad, c.work);
  const at::Tensor xx = laid_out_like(x, c.work);

  StepArgs args;
  args.dtype = to_dtype(x.scalar_type());
  args.layout = c.layout;
  args.out = c.work.data_ptr();
  args.delta = d.const_data_ptr();
  args.grad = g.const_data_ptr();
  args.x = xx.const_data_ptr();
  args.eps = e.arg;
  args.alpha = a.arg;
  args.l2 = l2;
  args.lo = lo;
  args.hi = hi;
  coalesce(args.layout, {&args.eps, &args.alpha});
  at::Tensor workspace;
  if (l2 && !x.device().is_cpu() && x.numel() > 0) {
    workspace = at::zeros({2 * x.size(0)}, x.options().dtype(acc_type(x.scalar_type())));
    args.workspace = workspace.data_ptr();
  }
  be.pgd_step(args, be.current_stream());
  if (!c.work.is_same(target)) target.copy_(c.work);
}

void check_step_inputs(const char* op, const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x,
                       double lo, double hi) {
  check_image(op, "x", x);
  check_like(op, "delta", delta, x, "x");
  check_like(op, "grad", grad, x, "x");
  check_box(op, lo, hi);
}

// --- prompt padding ---------------------------------------------------------------------------------------

PromptPadArgs prompt_args(const char* op, const at::Tensor& x, const at::Tensor& prompt, at::IntArrayRef out_size,
                          at::IntArrayRef inner_size, std::string_view activation, std::string_view mode,
                          std::optional<at::ArrayRef<double>> mean, std::optional<at::ArrayRef<double>> std,
                          std::string_view normalize) {
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 4, "fastadv.", op, ": `x` must be a (B, C, H, W) tensor, got ",
                    x.defined() ? x.dim() : 0, " dimensions");
  TORCH_CHECK_VALUE(is_supported_float(x.scalar_type()), "fastadv.", op,
                    ": `x` must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(prompt.defined(), "fastadv.", op, ": `prompt` must be a tensor");
  TORCH_CHECK_VALUE(prompt.scalar_type() == x.scalar_type(), "fastadv.", op,
                    ": `prompt` must have the dtype of `x` (", x.scalar_type(), "), got ", prompt.scalar_type());
  TORCH_CHECK_VALUE(prompt.device() == x.device(), "fastadv.", op, ": `prompt` must be on the device of `x` (",
                    x.device(), "), got ", prompt.device());
  TORCH_CHECK_VALUE(out_size.size() == 2 && inner_size.size() == 2, "fastadv.", op,
                    ": `out_size` and `inner_size` must be (height, width) pairs");
  PromptPadArgs a;
  a.dtype = to_dtype(x.scalar_type());
  a.B = x.size(0);
  a.C = x.size(1);
  a.H = x.size(2);
  a.W = x.size(3);
  for (int k = 0; k < 4; ++k) a.xs[k] = x.stride(k);
  a.OH = out_size[0];
  a.OW = out_size[1];
  a.IH = inner_size[0];
  a.IW = inner_size[1];
  TORCH_CHECK_VALUE(a.OH > 0 && a.OW > 0, "fastadv.", op, ": `out_size` must be positive, got ", out_size);
  TORCH_CHECK_VALUE(a.IH > 0 && a.IW > 0, "fastadv.", op, ": `inner_size` must be positive, got ", inner_size);
  TORCH_CHECK_VALUE(a.IH <= a.OH && a.IW <= a.OW, "fastadv.", op, ": `inner_size` ", inner_size,
                    " is larger than the canvas `out_size` ", out_size);
  TORCH_CHECK_VALUE(a.B == 0 || (a.H > 0 && a.W > 0), "fastadv.", op, ": `x` has an empty image, shape ", x.sizes());
  const bool prompt_ok = (prompt.dim() == 3 && prompt.sizes() == at::IntArrayRef({a.C, a.OH, a.OW})) ||
                         (prompt.dim() == 4 && prompt.sizes() == at::IntArrayRef({1, a.C, a.OH, a.OW}));
  TORCH_CHECK_VALUE(prompt_ok, "fastadv.", op, ": `prompt` must have shape (C, H_out, W_out) = (", a.C, ", ", a.OH,
                    ", ", a.OW, ") or (1, C, H_out, W_out), got ", prompt.sizes());
  a.top = (a.OH - a.IH + 1) / 2;
  a.left = (a.OW - a.IW + 1) / 2;

  if (activation == "sigmoid") a.act = Activation::Sigmoid;
  else if (activation == "tanh") a.act = Activation::Tanh;
  else if (activation == "none") a.act = Activation::None;
  else TORCH_CHECK_VALUE(false, "fastadv.", op, ": unknown `activation` '", std::string(activation),
                         "'; expected 'sigmoid', 'tanh' or 'none'");
  TORCH_CHECK_VALUE(mode == "replace" || mode == "add", "fastadv.", op, ": unknown `mode` '", std::string(mode),
                    "'; expected 'replace' or 'add'");
  a.add_mode = mode == "add";
  TORCH_CHECK_VALUE(normalize == "canvas" || normalize == "image", "fastadv.", op, ": unknown `normalize` '",
                    std::string(normalize), "'; expected 'canvas' or 'image'");
  TORCH_CHECK_VALUE(mean.has_value() == std.has_value(), "fastadv.", op, ": give both `mean` and `std` or neither");
  if (mean.has_value()) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(mean->size()) == a.C && static_cast<int64_t>(std->size()) == a.C,
                      "fastadv.", op, ": `mean` and `std` need one value per channel (", a.C, "), got ", mean->size(),
                      " and ", std->size());
    TORCH_CHECK_VALUE(a.C <= kMaxNormChannels, "fastadv.", op, ": normalisation supports at most ",
                      kMaxNormChannels, " channels, got ", a.C);
    for (int64_t c = 0; c < a.C; ++c) {
      TORCH_CHECK_VALUE(std::isfinite((*mean)[c]), "fastadv.", op, ": `mean` must be finite, got ", (*mean)[c]);
      TORCH_CHECK_VALUE(std::isfinite((*std)[c]) && (*std)[c] > 0, "fastadv.", op,
                        ": `std` must be positive and finite, got ", (*std)[c]);
      a.mean[c] = (*mean)[c];
      a.stdev[c] = (*std)[c];
    }
    a.norm = normalize == "canvas" ? NormalizeWhere::Canvas : NormalizeWhere::Image;
  }
  return a;
}

}  // namespace

void set_cuda_backend(const Backend* backend) { g_cuda_backend = backend; }

at::Tensor pgd_step_op(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x, double eps,
                       double alpha, const std::optional<at::Tensor>& eps_tensor,
                       const std::optional<at::Tensor>& alpha_tensor, std::string_view norm, double lo,
                       double hi) {
  const char* op = "pgd_step";
  check_step_inputs(op, delta, grad, x, lo, hi);
  const bool l2 = parse_norm(op, norm);
  at::Tensor out = at::empty_like(delta);
  run_step(op, out, delta, grad, x, eps_tensor, eps, alpha_tensor, alpha, std::nullopt, 0.0, l2, lo, hi);
  return out;
}

void pgd_step_inplace_op(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x, double eps,
                         double alpha, const std::optional<at::Tensor>& eps_tensor,
                         const std::optional<at::Tensor>& alpha_tensor, std::string_view norm, double lo,
                         double hi) {
  const char* op = "pgd_step_";
  check_step_inputs(op, delta, grad, x, lo, hi);
  const bool l2 = parse_norm(op, norm);
  run_step(op, delta, delta, grad, x, eps_tensor, eps, alpha_tensor, alpha, std::nullopt, 0.0, l2, lo, hi);
}

void masked_pgd_step_inplace_op(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x,
                                const at::Tensor& mask, double eps_high, double eps_low, double alpha,
                                const std::optional<at::Tensor>& alpha_tensor, double lo, double hi) {
  const char* op = "masked_pgd_step_";
  check_step_inputs(op, delta, grad, x, lo, hi);
  TORCH_CHECK_VALUE(mask.defined(), "fastadv.", op, ": `mask` must be a tensor");
  run_step(op, delta, delta, grad, x, std::nullopt, eps_high, alpha_tensor, alpha, mask, eps_low, false, lo, hi);
}

at::Tensor random_init_op(const at::Tensor& x, double eps, const std::optional<at::Tensor>& eps_tensor,
                          std::string_view norm, double lo, double hi,
                          std::optional<at::Generator> generator) {
  const char* op = "random_init";
  check_image(op, "x", x);
  check_box(op, lo, hi);
  const bool l2 = parse_norm(op, norm);
  c10::OptionalDeviceGuard guard(x.device());
  const Backend& be = backend_for(op, x);
  const at::TensorOptions acc = x.options().dtype(acc_type(x.scalar_type()));

  at::Tensor out = at::empty_like(x);
  Canonical c = canonical_output(out);
  Value v = make_value(op, "eps", eps, eps_tensor, x, c.perm, !l2, /*allow_inf=*/false);
  RandomInitArgs args;
  at::Tensor noise;
  if (!l2) {
    // delta = (2u - 1) * eps with u ~ U[0, 1)
    noise = at::rand(x.sizes(), generator, acc);
    args.scale = 2.0;
    args.shift = -1.0;
    args.v = v.arg;
  } else {
    // delta = n / |n| * eps * r^(1/D): uniform in the ball (Gaussian direction, radius by inverse CDF).
    noise = at::randn(x.sizes(), generator, acc);
    const at::Tensor r = at::rand({x.size(0)}, generator, acc);
    if (x.numel() > 0) {
      const int64_t B = x.size(0);
      const double D = static_cast<double>(x.numel() / B);
      at::Tensor scale = r.pow(1.0 / D).div_(noise.reshape({B, -1}).norm(2, {1}).clamp_min_(1e-12));
      scale = v.arg.kind == ValueKind::Scalar ? scale.mul_(eps) : scale.mul_(v.keep);
      v.keep = scale.contiguous();
      v.arg.kind = ValueKind::PerSample;
      v.arg.ptr = v.keep.const_data_ptr();
    }
    args.v = v.arg;
  }
  noise = laid_out_like(noise, c.work);
  const at::Tensor xx = laid_out_like(x, c.work);
  args.dtype = to_dtype(x.scalar_type());
  args.layout = c.layout;
  args.out = c.work.data_ptr();
  args.x = xx.const_data_ptr();
  args.noise = noise.const_data_ptr();
  args.lo = lo;
  args.hi = hi;
  coalesce(args.layout, {&args.v});
  be.random_init(args, be.current_stream());
  if (!c.work.is_same(out)) out.copy_(c.work);
  return out;
}

at::Tensor prompt_pad_op(const at::Tensor& x, const at::Tensor& prompt, at::IntArrayRef out_size,
                         at::IntArrayRef inner_size, std::string_view activation, std::string_view mode,
                         std::optional<at::ArrayRef<double>> mean, std::optional<at::ArrayRef<double>> std,
                         std::string_view normalize) {
  const char* op = "prompt_pad";
  PromptPadArgs a = prompt_args(op, x, prompt, out_size, inner_size, activation, mode, mean, std, normalize);
  c10::OptionalDeviceGuard guard(x.device());
  const Backend& be = backend_for(op, x);
  const at::Tensor p = prompt.contiguous();
  at::Tensor out = at::empty({a.B, a.C, a.OH, a.OW}, x.options());
  a.x = x.const_data_ptr();
  a.prompt = p.const_data_ptr();
  a.out = out.data_ptr();
  be.prompt_pad_forward(a, be.current_stream());
  return out;
}

std::tuple<at::Tensor, at::Tensor> prompt_pad_backward_op(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& prompt, at::IntArrayRef out_size,
    at::IntArrayRef inner_size, std::string_view activation, std::string_view mode,
    std::optional<at::ArrayRef<double>> mean, std::optional<at::ArrayRef<double>> std,
    std::string_view normalize, bool need_x, bool need_prompt) {
  const char* op = "prompt_pad_backward";
  PromptPadArgs a = prompt_args(op, x, prompt, out_size, inner_size, activation, mode, mean, std, normalize);
  TORCH_CHECK_VALUE(grad_out.defined() && grad_out.sizes() == at::IntArrayRef({a.B, a.C, a.OH, a.OW}), "fastadv.", op,
                    ": `grad_out` must have the canvas shape (", a.B, ", ", a.C, ", ", a.OH, ", ", a.OW, ")");
  TORCH_CHECK_VALUE(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(), "fastadv.", op,
                    ": `grad_out` must have the dtype and device of `x`");
  c10::OptionalDeviceGuard guard(x.device());
  const Backend& be = backend_for(op, x);
  const at::Tensor go = grad_out.contiguous();
  const at::Tensor p = prompt.contiguous();
  at::Tensor gx_acc = need_x ? at::zeros({a.B, a.C, a.H, a.W}, x.options().dtype(acc_type(x.scalar_type())))
                             : at::empty({0}, x.options());
  at::Tensor gp = need_prompt ? at::empty(prompt.sizes(), prompt.options()) : at::empty({0}, prompt.options());
  a.x = x.const_data_ptr();
  a.prompt = p.const_data_ptr();
  a.grad_out = go.const_data_ptr();
  a.grad_x = need_x ? gx_acc.data_ptr() : nullptr;
  a.grad_prompt = need_prompt ? gp.data_ptr() : nullptr;
  if (a.B * a.C * a.OH * a.OW > 0 || need_prompt) be.prompt_pad_backward(a, be.current_stream());
  at::Tensor gx = need_x ? gx_acc.to(x.scalar_type()) : gx_acc;
  return {gx, gp};
}

void register_kernels(torch::Library& m) {
  m.impl("pgd_step", &pgd_step_op);
  m.impl("pgd_step_", &pgd_step_inplace_op);
  m.impl("masked_pgd_step_", &masked_pgd_step_inplace_op);
  m.impl("random_init", &random_init_op);
  m.impl("prompt_pad", &prompt_pad_op);
  m.impl("prompt_pad_backward", &prompt_pad_backward_op);
}

TORCH_LIBRARY_IMPL(fastadv, CPU, m) { register_kernels(m); }

}  // namespace fastadv
