#include "large_rank_fallback.h"

#include "align_aggregate.h"

#include <ATen/ATen.h>

namespace fedrot {
namespace {

// U Vᵀ of each matrix, flipping the smallest singular pair where det < 0.
at::Tensor polar_aten(const at::Tensor& M, bool allow_reflection) {
  auto [U, S, Vh] = at::linalg_svd(M, /*full_matrices=*/false);
  if (!allow_reflection) {
    const at::Tensor negative = at::linalg_det(at::matmul(U, Vh)) < 0;
    const at::Tensor flip = at::where(negative, -1.0, 1.0).to(U.scalar_type());
    U = U.clone();
    U.select(-1, -1).mul_(flip.unsqueeze(-1));
  }
  return at::matmul(U, Vh);
}

}  // namespace

at::Tensor soft_procrustes_aten(const at::Tensor& M, const at::Tensor& lam, bool allow_reflection) {
  const int64_t n = M.size(-1);
  const at::Tensor eye = at::eye(n, M.options()).expand_as(M);
  const at::Tensor scale = M.abs().amax({-2, -1}, /*keepdim=*/true);
  // λ = 0 and a zero or non-finite M give I exactly; λ = 1 the hard solution (as common/polar.h).
  const at::Tensor identity = (scale == 0).logical_or(scale.isfinite().logical_not()).logical_or(lam == 0);
  const at::Tensor Ms = at::where(identity, eye, M / at::where(identity, at::ones_like(scale), scale));
  const at::Tensor hard = polar_aten(Ms, allow_reflection);
  const at::Tensor soft = polar_aten(eye * (1 - lam) + hard * lam, allow_reflection);
  return at::where(identity, eye, at::where(lam == 1, hard, soft));
}

void align_aggregate_layer_aten(const at::Tensor& A, const at::Tensor& B, const at::Tensor& ref_A,
                                const at::Tensor& ref_B, const at::Tensor& weights, bool identity,
                                const at::Tensor& lam, bool allow_reflection, at::Tensor& out_A, at::Tensor& out_B,
                                at::Tensor& rotations, at::Tensor& status) {
  const auto acc = rotations.scalar_type();
  const at::Tensor a = A.to(acc), b = B.to(acc);
  const int64_t N = A.size(0), n = A.size(1);
  at::Tensor R;
  if (identity) {
    R = at::eye(n, rotations.options()).expand({N, n, n});
  } else {
    at::Tensor M = at::zeros({N, n, n}, rotations.options());
    if (ref_A.defined()) M = M + at::matmul(a, ref_A.to(acc).t());
    if (ref_B.defined()) M = M + at::matmul(b.transpose(1, 2), ref_B.to(acc));
    R = soft_procrustes_aten(M, lam, allow_reflection);
  }
  rotations.copy_(R);
  const at::Tensor wR = R * weights.view({N, 1, 1});
  out_A.copy_(at::einsum("ikj,ikc->jc", {wR, a}));  // Σ_i w_i R_iᵀ A_i
  out_B.copy_(at::einsum("iok,ikj->oj", {b, wR}));  // Σ_i w_i B_i R_i
  const at::Tensor bad = out_A.isfinite().all().logical_and(out_B.isfinite().all()).logical_not();
  status.bitwise_or_(bad.to(at::kInt) * kStatusAggregateNonfinite);
}

}  // namespace fedrot
