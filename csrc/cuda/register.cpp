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

TORCH_LIBRARY_IMPL(fastadv, CUDA, m) { register_kernels(m); }

}  // namespace fastadv
