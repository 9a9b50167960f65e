// Compile-time dispatch on the input dtype and the rank bucket, usable from
// .cpp and .cu files alike (no ATen/Dispatch.h needed in CUDA sources).
#pragma once

#include <cstdint>
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

// The rank buckets, defined here only: every kernel is compiled once per
// bucket R (compile-time loop bounds, runtime rank r <= R), ascending. Ranks
// above the last bucket take the ATen fallback (large_rank_fallback.h).
template <int... Rs>
struct RankBucketList {
  static constexpr int values[] = {Rs...};
  static constexpr int count = sizeof...(Rs);
};
using RankBuckets = RankBucketList<4, 8, 16, 32, 64>;
constexpr int kMaxFusedRank = RankBuckets::values[RankBuckets::count - 1];

// The smallest bucket holding rank n, or 0 when n > kMaxFusedRank.
inline int rank_bucket(int64_t n) {
  for (const int bucket : RankBuckets::values)
    if (n <= bucket) return bucket;
  return 0;
}

// Calls f(std::integral_constant<int, bucket>{}) for a bucket of the list.
template <typename F, int... Rs>
void dispatch_rank_bucket_in(RankBucketList<Rs...>, int bucket, F&& f) {
  const bool found = ((bucket == Rs ? (f(std::integral_constant<int, Rs>{}), true) : false) || ...);
  TORCH_CHECK(found, "fedrot_ext: no compiled rank bucket ", bucket);
}
template <typename F>
void dispatch_rank_bucket(int bucket, F&& f) {
  dispatch_rank_bucket_in(RankBuckets{}, bucket, f);
}

}  // namespace fedrot
