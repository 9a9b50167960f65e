// Front of the rotation-only op: soft orthogonal Procrustes on a batch of r×r
// matrices with the same header math as the fused op. Exposed so that users
// (client-side alignment) and tests can call the per-matrix solver directly.
#include <ATen/ATen.h>

#include "common/dispatch.h"
#include "large_rank_fallback.h"
#include "procrustes_rotation.h"

namespace fedrot {

at::Tensor procrustes_rotation_impl(const at::Tensor& M, double lam, bool allow_reflection,
                                    BatchRotationRunner run_batch) {
  TORCH_CHECK_VALUE(M.dim() >= 2 && M.size(-1) == M.size(-2) && M.size(-1) > 0,
                    "M: expected shape (..., r, r) with r >= 1, got ", M.sizes());
  TORCH_CHECK_TYPE(M.scalar_type() == at::kFloat || M.scalar_type() == at::kDouble,
                   "M: expected dtype float32 or float64, got ", M.scalar_type());
  TORCH_CHECK_VALUE(lam >= 0.0 && lam <= 1.0, "lam: expected a value in [0, 1], got ", lam);
  const int64_t n = M.size(-1);
  const at::Tensor batch = M.contiguous().reshape({-1, n, n});
  const int bucket = rank_bucket(n);
  if (bucket == 0)
    return soft_procrustes_aten(batch, at::scalar_tensor(lam, batch.options()), allow_reflection).reshape(M.sizes());
  at::Tensor out = at::empty_like(batch);
  if (batch.size(0) > 0) run_batch(batch, out, lam, allow_reflection, bucket);
  return out.reshape(M.sizes());
}

}  // namespace fedrot
