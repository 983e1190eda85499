// The device-independent half of every op: argument checks, layout handling and the call into the
// device kernels. csrc/frontend.cpp registers these functions for CPU; csrc/cuda/register.cpp registers the
// same functions for CUDA after installing the CUDA kernel table with set_cuda_backend().
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "fastadv/kernel_args.h"

namespace torch {
class Library;
}

namespace fastadv {

struct Backend {
  void (*pgd_step)(const StepArgs&, void* stream);
  void (*random_init)(const RandomInitArgs&, void* stream);
  void (*prompt_pad_forward)(const PromptPadArgs&, void* stream);
  void (*prompt_pad_backward)(const PromptPadArgs&, void* stream);
  void* (*current_stream)();
};

void set_cuda_backend(const Backend* backend);

// Registers every op's front end with `m` (a TORCH_LIBRARY_IMPL block for one dispatch key).
void register_kernels(torch::Library& m);

at::Tensor pgd_step_op(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x, double eps,
                       double alpha, const std::optional<at::Tensor>& eps_tensor,
                       const std::optional<at::Tensor>& alpha_tensor, std::string_view norm, double lo,
                       double hi);

void pgd_step_inplace_op(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x, double eps,
                         double alpha, const std::optional<at::Tensor>& eps_tensor,
                         const std::optional<at::Tensor>& alpha_tensor, std::string_view norm, double lo,
                         double hi);

void masked_pgd_step_inplace_op(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x,
                                const at::Tensor& mask, double eps_high, double eps_low, double alpha,
                                const std::optional<at::Tensor>& alpha_tensor, double lo, double hi);

at::Tensor random_init_op(const at::Tensor& x, double eps, const std::optional<at::Tensor>& eps_tensor,
                          std::string_view norm, double lo, double hi,
                          std::optional<at::Generator> generator);

at::Tensor prompt_pad_op(const at::Tensor& x, const at::Tensor& prompt, at::IntArrayRef out_size,
                         at::IntArrayRef inner_size, std::string_view activation, std::string_view mode,
                         std::optional<at::ArrayRef<double>> mean, std::optional<at::ArrayRef<double>> std,
                         std::string_view normalize);

std::tuple<at::Tensor, at::Tensor> prompt_pad_backward_op(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& prompt, at::IntArrayRef out_size,
    at::IntArrayRef inner_size, std::string_view activation, std::string_view mode,
    std::optional<at::ArrayRef<double>> mean, std::optional<at::ArrayRef<double>> std,
    std::string_view normalize, bool need_x, bool need_prompt);

}  // namespace fastadv
