// Helpers shared by the CPU kernels: dtype dispatch and the accumulation type.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "fastadv/kernel_args.h"

namespace fastadv {

// Elements per parallel chunk: large enough that thread start-up is amortised on small images.
constexpr int64_t kGrain = 1 << 14;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename F>
void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::Float32: f(float{}); break;
    case DType::Float64: f(double{}); break;
    case DType::Float16: f(c10::Half{}); break;
    case DType::BFloat16: f(c10::BFloat16{}); break;
  }
}

}  // namespace fastadv
