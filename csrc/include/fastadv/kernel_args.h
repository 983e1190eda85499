// Plain argument structs shared by the ATen front end (csrc/frontend.cpp) and the device kernels.
// Deliberately free of torch headers: the CUDA translation units include only this and the CUDA runtime,
// which keeps nvcc compile times to seconds.
#pragma once

#include <cstdint>

namespace fastadv {

constexpr int kMaxDims = 6;
constexpr int kMaxNormChannels = 16;

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// How a per-element quantity (epsilon, step size, random-init scale) is given.
enum class ValueKind : int {
  Scalar = 0,     // `value` everywhere
  PerSample = 1,  // `ptr[b]` (accumulation type, contiguous, length B)
  Map = 2,        // `ptr` (accumulation type) read through `strides` (0 on broadcast dimensions)
  Mask = 3,       // `ptr` (uint8) through `strides`: `value` where set, `value_low` elsewhere
};

struct ValueArg {
  ValueKind kind = ValueKind::Scalar;
  double value = 0.0;
  double value_low = 0.0;
  const void* ptr = nullptr;
  int64_t strides[kMaxDims] = {0, 0, 0, 0, 0, 0};
};

// The iteration space: the output's dimensions in memory order, the output (and every full-size input)
// contiguous in that order, the batch dimension first.
struct Layout {
  int ndim = 0;
  int64_t sizes[kMaxDims] = {1, 1, 1, 1, 1, 1};
  int64_t numel = 0;
  int64_t batch = 0;
  int64_t sample_numel = 0;  // numel / batch
};

struct StepArgs {
  DType dtype = DType::Float32;
  Layout layout;
  void* out = nullptr;
  const void* delta = nullptr;
  const void* grad = nullptr;
  const void* x = nullptr;
  ValueArg eps;
  ValueArg alpha;
  bool l2 = false;
  double lo = 0.0;
  double hi = 1.0;
  void* workspace = nullptr;  // CUDA L2: 2 * batch zeroed accumulators (float, or double for Float64)
};

// random_init: out = clip(x + (noise * scale + shift) * v, lo, hi) - x, elementwise.
struct RandomInitArgs {
  DType dtype = DType::Float32;
  Layout layout;
  void* out = nullptr;
  const void* x = nullptr;
  const void* noise = nullptr;  // accumulation type, contiguous in the layout's order
  double scale = 1.0;
  double shift = 0.0;
  ValueArg v;
  double lo = 0.0;
  double hi = 1.0;
};

enum class Activation : int { None = 0, Sigmoid = 1, Tanh = 2 };
enum class NormalizeWhere : int { Off = 0, Canvas = 1, Image = 2 };

struct PromptPadArgs {
  DType dtype = DType::Float32;
  int64_t B = 0, C = 0, H = 0, W = 0;          // input image
  int64_t xs[4] = {0, 0, 0, 0};                 // input strides (elements), any layout
  int64_t OH = 0, OW = 0;                       // canvas
  int64_t IH = 0, IW = 0;                       // prompt hole (replace: where the resized image goes)
  int64_t top = 0, left = 0;                    // hole offset
  bool add_mode = false;                        // add: image fills the canvas, prompt added outside the hole
  Activation act = Activation::Sigmoid;
  NormalizeWhere norm = NormalizeWhere::Off;
  double mean[kMaxNormChannels] = {0};
  double stdev[kMaxNormChannels] = {0};
  const void* x = nullptr;
  const void* prompt = nullptr;                 // contiguous (C, OH, OW)
  void* out = nullptr;                          // forward: contiguous (B, C, OH, OW)
  // backward
  const void* grad_out = nullptr;               // contiguous (B, C, OH, OW)
  void* grad_x = nullptr;                       // contiguous (B, C, H, W), zeroed, accumulation type
  void* grad_prompt = nullptr;                  // contiguous (C, OH, OW), own dtype
};

// CPU kernels (csrc/cpu/*.cpp).
void pgd_step_cpu(const StepArgs& a);
void random_init_cpu(const RandomInitArgs& a);
void prompt_pad_forward_cpu(const PromptPadArgs& a);
void prompt_pad_backward_cpu(const PromptPadArgs& a);

// CUDA kernels (csrc/cuda/*.cu); `stream` is a cudaStream_t.
void pgd_step_cuda(const StepArgs& a, void* stream);
void random_init_cuda(const RandomInitArgs& a, void* stream);
void prompt_pad_forward_cuda(const PromptPadArgs& a, void* stream);
void prompt_pad_backward_cuda(const PromptPadArgs& a, void* stream);

}  // namespace fastadv
