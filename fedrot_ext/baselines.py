"""Baselines over stacked client factors, in the layout of :func:`fedrot_ext.align_and_aggregate`.

A[l] is (N, r_l, in_l) and B[l] is (N, out_l, r_l): layer l's factors of all N
clients. FedIT is ``align_and_aggregate(..., align="none")``; the methods here are
the ones that are not factor-wise averages:

- FlexLoRA: the rank-r truncated SVD of Σ_i w_i B_i A_i, without forming it.
- FedEx-LoRA: the residual Σ_i w_i B_i A_i − B̄ Ā that FedIT's factor average misses.
- FLoRA: Σ_i w_i B_i A_i itself (the stacked factors' product), to merge into the base weight.

Dense results are (out_l, in_l) in the B A layout and unscaled; :mod:`fedrot_ext.peft.model`
applies the LoRA scaling and the base weight's layout (Conv1D, embeddings).
Layers of equal shape are batched into one QR / SVD / matmul call.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ._checks import check_factors, normalized_weights
from ._ops import accumulate_dtype, align_and_aggregate
from ._stacking import centered_terms, check_aggregate, flat_A, flat_B, pad_rank, shape_groups, stack_layers, term_coefficients
from ._types import Aggregate

__all__ = ["flexlora_aggregate", "fedex_residual", "weighted_product_sum", "flexlora_factors", "fedex_terms", "product_sums"]


def _validated(A, B, weights):
    A, B, _, _, N, dtype, device = check_factors(A, B, None, None, "none")
    acc = accumulate_dtype(dtype)
    return A, B, normalized_weights(weights, N, device, acc), dtype, acc


def _check_rank(rank) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank: expected a positive int or None (each layer's client rank), got {rank!r}")


def flexlora_aggregate(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], *, weights=None, rank: Optional[int] = None) -> Aggregate:
    """FlexLoRA: re-factorise Σ_i w_i B_i A_i to rank r by truncated SVD, never forming it.

    With [√w_i B_i] = Q_B R_B (out × N r) and [√w_i A_iᵀ] = Q_A R_A (in × N r), the sum is
    Q_B (R_B R_Aᵀ) Q_Aᵀ; the SVD U S Vᵀ of the small core gives B̄ = Q_B U_r S_r and
    Ā = V_rᵀ Q_Aᵀ. The singular values go into B so that Ā keeps orthonormal rows: a
    direction with σ = 0 (e.g. B = 0 in round 0) then restarts like peft's initialisation
    (B column zero, A row non-zero) instead of dying with both zero. Truncating the result
    to its first k ranks is the best rank-k approximation, so clients with a smaller rank
    (HetLoRA-style) can keep the leading rows/columns.

    Args:
        A: L tensors (N, r_l, in_l).
        B: L tensors (N, out_l, r_l).
        weights: (N,) non-negative client weights, normalised inside; None means uniform.
        rank: output rank of every layer; None keeps each layer's r_l.

    Returns:
        :class:`Aggregate` with A[l] (rank, in_l) and B[l] (out_l, rank) in the input dtype
        (computed in float32, float64 for float64 input); rotations None. Ranks beyond what
        the data supports (N r_l or a feature size smaller than rank) are zero-padded.
        Bitwise reproducible at a fixed CPU thread count; across thread counts only to
        rounding, since LAPACK's QR/SVD blocking depends on it.

    Raises:
        ValueError/TypeError naming the argument for bad shapes, dtypes, weights or rank.
    """
    A, B, w, dtype, acc = _validated(A, B, weights)
    _check_rank(rank)
    out_A, out_B = flexlora_factors(A, B, w, rank)
    return Aggregate(out_A, out_B, None)


def flexlora_factors(A, B, w: torch.Tensor, rank: Optional[int] = None):
    """:func:`flexlora_aggregate` without checks: validated stacks, w normalised on their device.
    Returns (A list, B list) in the input dtype."""
    dtype, acc = A[0].dtype, accumulate_dtype(A[0].dtype)
    root_w = w.to(acc).sqrt().view(1, -1, 1, 1)
    out_A: List[torch.Tensor] = [None] * len(A)
    out_B: List[torch.Tensor] = [None] * len(A)
    for idx in shape_groups(A, B):
        A_g = stack_layers(A, idx, acc) * root_w
        B_g = stack_layers(B, idx, acc) * root_w
        r_out = A_g.shape[2] if rank is None else rank
        Q_B, R_B = torch.linalg.qr(flat_B(B_g))
        Q_A, R_A = torch.linalg.qr(flat_A(A_g).mT)
        U, S, Vh = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)
        k = min(r_out, S.shape[-1])
        new_B = (Q_B @ U[..., :k]) * S[:, None, :k]
        new_A = Vh[:, :k] @ Q_A.mT
        for j, l in enumerate(idx):
            out_A[l] = pad_rank(new_A[j], r_out, 0).to(dtype)
            out_B[l] = pad_rank(new_B[j], r_out, 1).to(dtype)
    return out_A, out_B


def product_sums(A_ext, B_ext, coeffs: torch.Tensor) -> List[torch.Tensor]:
    """Σ_k c_k B_k A_k per layer (no checks), one batched matmul per shape group, in the
    accumulate dtype of the factors (FLoRA's merge when c = w)."""
    acc = accumulate_dtype(A_ext[0].dtype)
    out: List[torch.Tensor] = [None] * len(A_ext)
    c = coeffs.to(acc).view(1, -1, 1, 1)
    for idx in shape_groups(A_ext, B_ext):
        prod = flat_B(stack_layers(B_ext, idx, acc) * c) @ flat_A(stack_layers(A_ext, idx, acc))
        for j, l in enumerate(idx):
            out[l] = prod[j]
    return out


def weighted_product_sum(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], *, weights=None) -> List[torch.Tensor]:
    """FLoRA's merged update: Σ_i w_i B_i A_i per layer (the product of the stacked factors).

    Args:
        A: L tensors (N, r_l, in_l).
        B: L tensors (N, out_l, r_l).
        weights: (N,) non-negative client weights, normalised inside; None means uniform.

    Returns:
        L tensors (out_l, in_l), unscaled, in float32 (float64 for float64 input).

    Raises:
        ValueError/TypeError naming the argument for bad shapes, dtypes or weights.
    """
    A, B, w, dtype, acc = _validated(A, B, weights)
    return product_sums(A, B, w)


def fedex_residual(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    *,
    agg_A: Optional[Sequence[torch.Tensor]] = None,
    agg_B: Optional[Sequence[torch.Tensor]] = None,
    weights=None,
) -> List[torch.Tensor]:
    """FedEx-LoRA's residual Σ_i w_i B_i A_i − B̄ Ā per layer, to fold into the frozen weight.

    Computed as one product of stacked factors, Σ_i w_i ((B_i − B̄) A_i + B̄ (A_i − Ā)), whose
    terms are as small as the residual itself; it is exact for the aggregate actually sent
    (pass the rounded factors you send).

    Args:
        A: L tensors (N, r_l, in_l).
        B: L tensors (N, out_l, r_l).
        agg_A, agg_B: the aggregated factors (r', in_l), (out_l, r'); None means FedIT's
            weighted factor average (``align_and_aggregate(..., align="none")``).
        weights: (N,) non-negative client weights, normalised inside; None means uniform.

    Returns:
        L tensors (out_l, in_l), unscaled and in the B A layout, in float32 (float64 for
        float64 input).

    Raises:
        ValueError/TypeError naming the argument for bad shapes, dtypes, weights or aggregate.
    """
    A, B, w, dtype, acc = _validated(A, B, weights)
    if (agg_A is None) != (agg_B is None):
        raise ValueError("agg_A/agg_B: pass both aggregated factors or neither (None means FedIT's average)")
    if agg_A is None:
        agg = align_and_aggregate(A, B, weights=w, align="none")  # also rejects NaN/Inf clients
        agg_A, agg_B = agg.A, agg.B
    else:
        check_aggregate(agg_A, agg_B, A, B)
    return fedex_terms(A, B, agg_A, agg_B, w)


def fedex_terms(A, B, agg_A, agg_B, w: torch.Tensor) -> List[torch.Tensor]:
    """:func:`fedex_residual` without checks (validated stacks and aggregate, w normalised)."""
    A_ext, B_ext = centered_terms(A, B, agg_A, agg_B, accumulate_dtype(A[0].dtype))
    return product_sums(A_ext, B_ext, term_coefficients(w, 0.0))
