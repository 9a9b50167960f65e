// Compile-time dispatch on the input dtype and the rank bucket, usable from
// .cpp and .cu files alike (no ATen/Dispatch.h needed in CUDA sources).
#pragma once

#include <type_traits>

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace fedrot {

template <typename T> struct TypeTag { using type = T; };
template <typename T> using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename F>
void dispatch_float_types(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float: return f(TypeTag<float>{});
    case c10::ScalarType::Double: return f(TypeTag<double>{});
    case c10::ScalarType::Half: return f(TypeTag<c10::Half>{});
    case c10::ScalarType::BFloat16: return f(TypeTag<c10::BFloat16>{});
    default: TORCH_CHECK_TYPE(false, "fedrot_ext: expected float32, float64, float16 or bfloat16, got ", dtype);
  }
}

// Accumulate types only (rotation math runs in float or double).
template <typename F>
void dispatch_acc_types(c10::ScalarType dtype, F&& f) {
  if (dtype == c10::ScalarType::Double) return f(TypeTag<double>{});
  TORCH_CHECK_TYPE(dtype == c10::ScalarType::Float, "fedrot_ext: expected float32 or float64, got ", dtype);
  return f(TypeTag<float>{});
}

template <typename F>
void dispatch_rank_bucket(int bucket, F&& f) {
  switch (bucket) {
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    default: TORCH_CHECK(false, "fedrot_ext: no compiled rank bucket ", bucket);
  }
}

}  // namespace fedrot
