// Registers the shared front end (csrc/frontend.cpp) for CUDA tensors with the CUDA kernel table.
// Compiled by the host compiler; only this file needs the c10 CUDA headers.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fastadv/frontend.h"

namespace fastadv {
namespace {

const Backend kCudaBackend = {
    &pgd_step_cuda,
    &random_init_cuda,
    &prompt_pad_forward_cuda,
    &prompt_pad_backward_cuda,
    []() -> void* { return c10::cuda::getCurrentCUDAStream().stream(); },
};

struct InstallCudaBackend {
  InstallCudaBackend() { set_cuda_backend(&kCudaBackend); }
} install_cuda_backend;

}  // namespace

TORCH_LIBRARY_IMPL(fastadv, CUDA, m) {
  m.impl("pgd_step", &pgd_step_op);
  m.impl("pgd_step_", &pgd_step_inplace_op);
  m.impl("masked_pgd_step_", &masked_pgd_step_inplace_op);
  m.impl("random_init", &random_init_op);
  m.impl("prompt_pad", &prompt_pad_op);
  m.impl("prompt_pad_backward", &prompt_pad_backward_op);
}

}  // namespace fastadv
