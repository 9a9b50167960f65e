// CPU backend of the rotation-only op: one task per matrix, in parallel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/polar.h"
#include "procrustes_rotation.h"

namespace fedrot {
namespace {

void rotate_batch_cpu(const at::Tensor& M, at::Tensor& out, double lam, bool allow_reflection, int bucket) {
  const int n = int(M.size(-1));
  dispatch_acc_types(M.scalar_type(), [&](auto acc_tag) {
    using T = typename decltype(acc_tag)::type;
    dispatch_rank_bucket(bucket, [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      const T* src = M.data_ptr<T>();
      T* dst = out.data_ptr<T>();
      at::parallel_for(0, M.size(0), 1, [&](int64_t begin, int64_t end) {
        PolarScratch<T, R> scratch;
        T Mr[R * R], Rot[R * R];
        for (int64_t b = begin; b < end; ++b) {
          for (int a = 0; a < n; ++a)
            for (int c = 0; c < n; ++c) Mr[a * R + c] = src[(b * n + a) * n + c];
          soft_procrustes<T, R>(Mr, Rot, n, T(lam), allow_reflection, scratch);
          for (int a = 0; a < n; ++a)
            for (int c = 0; c < n; ++c) dst[(b * n + a) * n + c] = Rot[a * R + c];
        }
      });
    });
  });
}

at::Tensor procrustes_rotation_cpu(const at::Tensor& M, double lam, bool allow_reflection) {
  return procrustes_rotation_impl(M, lam, allow_reflection, &rotate_batch_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fedrot_ext, CPU, m) { m.impl("procrustes_rotation", &procrustes_rotation_cpu); }

}  // namespace fedrot
