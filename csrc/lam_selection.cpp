// λ = "auto": for each layer, the candidate λ of a grid whose aggregate has the
// smallest aggregation error ‖Σ_i w_i B_i A_i − B̄Ā‖_F, scored exactly from
// Grams (never a dense out × in matrix). Device-generic ATen plus the
// procrustes_rotation op, registered as a composite (so it also runs on meta
// and fake tensors); the caller passes the chosen λ (a device tensor, no host
// synchronisation) to align_and_aggregate.
//
// Notation (one layer): T = the clients' A_i stacked (N·r × in), S = their B_i
// side by side (out × N·r), W = diag(w ⊗ 1_r), G_T = T Tᵀ, G_S = Sᵀ S, and for a
// candidate V = W R (N·r × r, rows (i, a), R the clients' rotations stacked).
// Then Ā = Vᵀ T, B̄ = S V, Z = Σ w_i B_i A_i = S W T, and
//   ‖Z − B̄Ā‖² = tr(W G_S W G_T) − 2 ⟨G_T V, W G_S V⟩ + ⟨Vᵀ G_S V, Vᵀ G_T V⟩.
// Cost per layer: the two Grams, (N r)² (in + out) FMAs, once for all candidates.
#include <tuple>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "align_aggregate.h"

namespace fedrot {
namespace {

using at::Tensor;

Tensor procrustes(const Tensor& M, double lam, bool allow_reflection) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fedrot_ext::procrustes_rotation", "")
                             .typed<Tensor(const Tensor&, double, bool)>();
  return op.call(M, lam, allow_reflection);
}

// (K, N, r, r): R(λ_k) = polar((1 − λ_k) I + λ_k R*) with R* the hard solution,
// the same soft step as common/polar.h: λ = 0 gives I and λ = 1 gives R* without
// a polar factor, so only the interior candidates (`soft`, their grid indices) cost one.
Tensor candidate_rotations(const Tensor& M, at::ArrayRef<double> grid, const Tensor& soft, bool allow_reflection) {
  const Tensor hard = procrustes(M, 1.0, allow_reflection);
  const Tensor eye = at::eye(M.size(-1), M.options());
  Tensor solved;
  if (soft.numel() > 0) {
    const Tensor g = at::tensor(std::vector<double>(grid.begin(), grid.end()), at::kDouble)
                         .to(M.device(), M.scalar_type()).index_select(0, soft).view({-1, 1, 1, 1});
    solved = procrustes((1 - g) * eye + g * hard.unsqueeze(0), 1.0, allow_reflection);
  }
  std::vector<Tensor> out;
  for (size_t k = 0, next = 0; k < grid.size(); ++k) {
    if (grid[k] == 0.0) out.push_back(eye.expand_as(hard));
    else if (grid[k] == 1.0) out.push_back(hard);
    else out.push_back(solved[int64_t(next++)]);
  }
  return at::stack(out);
}

// Squared aggregation errors (K,) of one layer's candidates and ‖Z‖², in float64.
std::tuple<Tensor, Tensor> candidate_errors(const Tensor& T, const Tensor& S, const Tensor& rotations,
                                            const Tensor& weights) {
  const int64_t K = rotations.size(0), N = rotations.size(1), r = rotations.size(2);
  const Tensor GT = at::mm(T, T.t()), GS = at::mm(S.t(), S);
  const Tensor wv = weights.repeat_interleave(r);  // (N·r,)
  const Tensor V = (rotations * weights.view({1, N, 1, 1})).reshape({K, N * r, r});
  const Tensor GTV = at::matmul(GT, V), GSV = at::matmul(GS, V);
  const Tensor zz = (GS * GT * at::outer(wv, wv)).sum(at::kDouble);
  const Tensor cross = (GTV * GSV * wv.view({1, -1, 1})).sum({1, 2}, false, at::kDouble);
  const Tensor Vt = V.transpose(1, 2);
  const Tensor quad = (at::matmul(Vt, GSV) * at::matmul(Vt, GTV)).sum({1, 2}, false, at::kDouble);
  return {(zz - 2 * cross + quad).clamp_min(0), zz};
}

std::tuple<Tensor, Tensor> choose_lam(at::TensorList A, at::TensorList B, const RefList& ref_A, const RefList& ref_B,
                                      const Tensor& weights, at::IntArrayRef align, at::ArrayRef<double> grid,
                                      bool allow_reflection) {
  check_align_aggregate_inputs(A, B, ref_A, ref_B, weights, align);
  TORCH_CHECK_VALUE(!grid.empty(), "grid: expected at least one candidate λ, got none");
  for (size_t k = 0; k < grid.size(); ++k)
    TORCH_CHECK_VALUE(grid[k] >= 0.0 && grid[k] <= 1.0, "grid[", k, "]: expected a value in [0, 1], got ", grid[k]);
  const auto acc = weights.scalar_type();
  const Tensor grid_t = at::tensor(std::vector<double>(grid.begin(), grid.end()), at::kDouble)
                            .to(weights.device(), acc);
  const int64_t K = int64_t(grid.size());
  std::vector<int64_t> interior;
  for (size_t k = 0; k < grid.size(); ++k)
    if (grid[k] != 0.0 && grid[k] != 1.0) interior.push_back(int64_t(k));
  const Tensor soft = at::tensor(interior, at::kLong).to(weights.device());
  std::vector<Tensor> lam, errors;
  for (size_t l = 0; l < A.size(); ++l) {
    const int64_t N = A[l].size(0), r = A[l].size(1);
    const Tensor a = A[l].to(acc), b = B[l].to(acc);  // one layer at a time: a transient copy only for bf16/fp16
    Tensor R;
    if (align[l] == kAlignNone) {
      R = at::eye(r, weights.options()).expand({K, N, r, r});
    } else {
      Tensor M = at::zeros({N, r, r}, weights.options());
      const Tensor rA = ref_of(ref_A, l, uses_A(align[l])), rB = ref_of(ref_B, l, uses_B(align[l]));
      if (rA.defined()) M = M + at::matmul(a, rA.to(acc).t());                  // A_i Āᵀ
      if (rB.defined()) M = M + at::matmul(b.transpose(1, 2), rB.to(acc));      // B_iᵀ B̄
      R = candidate_rotations(M, grid, soft, allow_reflection);
    }
    const Tensor T = a.reshape({N * r, a.size(2)});
    const Tensor S = b.permute({1, 0, 2}).reshape({b.size(1), N * r});
    auto [err2, zz] = candidate_errors(T, S, R, weights);
    // First minimum: ties (e.g. a degenerate M, where every candidate is I) keep the grid's order.
    lam.push_back(grid_t.index_select(0, err2.argmin().view({1})));
    errors.push_back(at::where(zz > 0, (err2 / zz).sqrt(), at::zeros_like(err2)).to(acc));
  }
  return {at::cat(lam), at::stack(errors)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fedrot_ext, CompositeImplicitAutograd, m) { m.impl("choose_lam", &choose_lam); }

}  // namespace fedrot
