// Ranks above kMaxFusedRank (64) are rare in LoRA; for them the op falls back
// to ATen (batched linalg_svd over the N clients of a layer, one layer at a
// time) with the same contract. Documented in README.md.
#pragma once

#include <ATen/core/Tensor.h>

namespace fedrot {

// Batched soft Procrustes (..., n, n) -> (..., n, n), same rules as common/polar.h.
at::Tensor soft_procrustes_aten(const at::Tensor& M, const at::Tensor& lam, bool allow_reflection);

// One layer: fills out_A (n, in), out_B (out, n), rotations (N, n, n); ORs
// kStatusAggregateNonfinite (align_aggregate.h) into status (the front checks the
// references). ref_A / ref_B are undefined when not aligned.
void align_aggregate_layer_aten(const at::Tensor& A, const at::Tensor& B, const at::Tensor& ref_A,
                                const at::Tensor& ref_B, const at::Tensor& weights, bool identity,
                                const at::Tensor& lam, bool allow_reflection, at::Tensor& out_A, at::Tensor& out_B,
                                at::Tensor& rotations, at::Tensor& status);

}  // namespace fedrot
