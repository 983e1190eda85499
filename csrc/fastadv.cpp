// Every fastadv operator schema, declared once. Kernels are added per backend with TORCH_LIBRARY_IMPL
// (csrc/frontend.cpp for CPU, csrc/cuda/register.cpp for CUDA); fake kernels and autograd are registered
// from Python (fastadv/ops/_meta.py, fastadv/ops/_autograd.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastadv, m) {
  // `eps_tensor` / `alpha_tensor`, when given, replace the float `eps` / `alpha`: a per-sample (B,) tensor,
  // or (linf only) a tensor broadcastable to `x`.
  m.def("pgd_step(Tensor delta, Tensor grad, Tensor x, float eps, float alpha, Tensor? eps_tensor=None, "
        "Tensor? alpha_tensor=None, str norm='linf', float lo=0.0, float hi=1.0) -> Tensor");
  m.def("pgd_step_(Tensor(a!) delta, Tensor grad, Tensor x, float eps, float alpha, Tensor? eps_tensor=None, "
        "Tensor? alpha_tensor=None, str norm='linf', float lo=0.0, float hi=1.0) -> ()");
  m.def("masked_pgd_step_(Tensor(a!) delta, Tensor grad, Tensor x, Tensor mask, float eps_high, float eps_low, "
        "float alpha, Tensor? alpha_tensor=None, float lo=0.0, float hi=1.0) -> ()");
  m.def("random_init(Tensor x, float eps, Tensor? eps_tensor=None, str norm='linf', float lo=0.0, "
        "float hi=1.0, Generator? generator=None) -> Tensor");
  m.def("prompt_pad(Tensor x, Tensor prompt, int[2] out_size, int[2] inner_size, str activation='sigmoid', "
        "str mode='replace', float[]? mean=None, float[]? std=None, str normalize='canvas') -> Tensor");
  m.def("prompt_pad_backward(Tensor grad_out, Tensor x, Tensor prompt, int[2] out_size, int[2] inner_size, "
        "str activation, str mode, float[]? mean, float[]? std, str normalize, bool need_x, "
        "bool need_prompt) -> (Tensor, Tensor)");
}

// Importing fastadv._C loads this library and with it the registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
