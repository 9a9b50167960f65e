"""Aggregation error of factor-wise averaging, from r×r Gram matrices.

E_l = Σ_i w_i B_i A_i − B̄ Ā for layer l. Written as Σ_k c_k B_k A_k over K factor
pairs, ‖E‖_F² = Σ_kl c_k c_l ⟨B_kᵀ B_l, A_k A_lᵀ⟩: all the r×r Grams of a layer come
from one (K r × K r) product per factor, and no (out × in) matrix is ever formed.
The pairs are centred on the aggregate (E = Σ_i w_i ((B_i − B̄) A_i + B̄ (A_i − Ā)),
see ``_stacking.centered_terms``), so the quadratic form does not subtract two
numbers of size ‖Σ w_i B_i A_i‖² when the error is small; everything runs in float64.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch

from ._checks import check_factors, normalized_weights
from ._ops import align_and_aggregate
from ._stacking import centered_terms, check_aggregate, flat_A, flat_B, shape_groups, stack_layers, term_coefficients

__all__ = ["AggregationError", "aggregation_error", "error_of_factors"]


class AggregationError(NamedTuple):
    """Per-layer aggregation error: ``absolute`` ‖E_l‖_F and ``relative`` ‖E_l‖_F / ‖Σ_i w_i B_i A_i‖_F
    (0 where both are 0, inf where only the ideal update is 0), float64 tensors of shape (L,)."""

    absolute: torch.Tensor
    relative: torch.Tensor


def _quadratic_forms(A_ext, B_ext, coeff_sets: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """For each coefficient vector c: (L,) values of ‖Σ_k c_k B_k A_k‖_F² via Gram matrices."""
    L = len(A_ext)
    out = [torch.empty(L, dtype=torch.float64, device=A_ext[0].device) for _ in coeff_sets]
    for idx in shape_groups(A_ext, B_ext):
        FA = flat_A(stack_layers(A_ext, idx, torch.float64))  # (G, K r, in)
        FB = flat_B(stack_layers(B_ext, idx, torch.float64))  # (G, out, K r)
        H = (FA @ FA.mT) * (FB.mT @ FB)  # block (k, l): A_k A_lᵀ ∘ B_kᵀ B_l
        rank = A_ext[idx[0]].shape[1]
        for values, c in zip(out, coeff_sets):
            c_exp = c.repeat_interleave(rank)
            values[idx] = torch.einsum("i,gij,j->g", c_exp, H, c_exp)
    return out


def aggregation_error(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    *,
    agg_A: Optional[Sequence[torch.Tensor]] = None,
    agg_B: Optional[Sequence[torch.Tensor]] = None,
    weights=None,
) -> AggregationError:
    """Per-layer error of an aggregate against the ideal update Σ_i w_i B_i A_i.

    Args:
        A: L tensors (N, r_l, in_l): the clients' factors (unrotated or rotated: B_i A_i is the same).
        B: L tensors (N, out_l, r_l).
        agg_A, agg_B: the aggregated factors (r', in_l), (out_l, r'), any rank r'; None means
            FedIT's weighted factor average. Pass FedRot's output to measure what alignment saves.
        weights: (N,) non-negative client weights, normalised inside; None means uniform.

    Returns:
        :class:`AggregationError` of (L,) float64 tensors on the factors' device.

    Raises:
        ValueError/TypeError naming the argument for bad shapes, dtypes, weights or aggregate.
    """
    A, B, _, _, N, dtype, device = check_factors(A, B, None, None, "none")
    w = normalized_weights(weights, N, device, torch.float64)
    if (agg_A is None) != (agg_B is None):
        raise ValueError("agg_A/agg_B: pass both aggregated factors or neither (None means FedIT's average)")
    if agg_A is None:
        agg = align_and_aggregate(A, B, weights=w, align="none")
        agg_A, agg_B = agg.A, agg.B
    else:
        check_aggregate(agg_A, agg_B, A, B)
    return error_of_factors(A, B, agg_A, agg_B, w)


CHUNK_BYTES = 64 << 20  # float64 centred terms formed at a time: the metric's extra memory stays O(this + one layer)


def _layer_chunks(A, B, agg_A) -> List[List[int]]:
    """Consecutive layers whose float64 centred terms (2N+1 factor pairs each) fit in CHUNK_BYTES together."""
    chunks, size = [[]], 0
    for l, (a, b, ga) in enumerate(zip(A, B, agg_A)):
        n, rank = a.shape[0], max(a.shape[1], ga.shape[0])
        layer = (2 * n + 1) * rank * (a.shape[2] + b.shape[1]) * 8
        if chunks[-1] and size + layer > CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(l)
        size += layer
    return chunks


def error_of_factors(A, B, agg_A, agg_B, w: torch.Tensor) -> AggregationError:
    """:func:`aggregation_error` of validated factors (any dtypes) and aggregate (w normalised, float64)."""
    coeffs = [term_coefficients(w, 0.0), term_coefficients(w, 1.0)]
    parts = []
    for idx in _layer_chunks(A, B, agg_A):
        A_ext, B_ext = centered_terms(*([t[l] for l in idx] for t in (A, B, agg_A, agg_B)), torch.float64)
        parts.append(_quadratic_forms(A_ext, B_ext, coeffs))
    error_sq, ideal_sq = (torch.cat([p[j] for p in parts]) for j in range(2))
    absolute = error_sq.clamp_min(0).sqrt()
    ideal = ideal_sq.clamp_min(0).sqrt()
    relative = torch.where(absolute == 0, torch.zeros_like(absolute), absolute / ideal)  # x/0 = inf
    return AggregationError(absolute, relative)
