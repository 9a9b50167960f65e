"""Tensor plumbing shared by the baselines and the metrics.

Zero-padding the rank (HetLoRA-style: a zero row of A with a zero column of B adds
nothing to B A), batching layers of equal shape, and writing the aggregation error
as a weighted sum of factor products.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch


def pad_rank(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad dimension `dim` of `t` up to `rank` (returns `t` itself when already there)."""
    have = t.shape[dim]
    if have == rank:
        return t
    if have > rank:
        raise ValueError(f"cannot pad rank {have} down to {rank}")
    shape = list(t.shape)
    shape[dim] = rank - have
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def shape_groups(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]) -> List[List[int]]:
    """Indices of layers that share A/B shapes, dtype and device (so they batch), in order."""
    groups: Dict[Tuple, List[int]] = {}
    for l, (a, b) in enumerate(zip(A, B)):
        groups.setdefault((tuple(a.shape), tuple(b.shape), a.dtype, a.device), []).append(l)
    return list(groups.values())


def check_aggregate(agg_A, agg_B, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]) -> None:
    """Validate aggregated factors against client stacks A[l] (N, r, in), B[l] (N, out, r).

    The aggregate may have its own rank r' (e.g. a FlexLoRA re-factorisation).

    Raises:
        ValueError/TypeError naming ``agg_A[l]`` / ``agg_B[l]``: wrong count, shape,
        dtype or device, or non-finite values.
    """
    for name, agg in (("agg_A", agg_A), ("agg_B", agg_B)):
        if isinstance(agg, torch.Tensor) or not isinstance(agg, (list, tuple)):
            raise TypeError(f"{name}: expected a list of tensors (one per layer), got {type(agg).__name__}")
        if len(agg) != len(A):
            raise ValueError(f"{name}: expected {len(A)} layer tensors to match A, got {len(agg)}")
    for l, (ga, gb) in enumerate(zip(agg_A, agg_B)):
        for name, t in ((f"agg_A[{l}]", ga), (f"agg_B[{l}]", gb)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.device != A[l].device:
                raise ValueError(f"{name}: expected device {A[l].device} (as A[{l}]), got {t.device}")
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        d_in, d_out = A[l].shape[2], B[l].shape[1]
        if ga.dim() != 2 or ga.shape[1] != d_in or ga.shape[0] == 0:
            raise ValueError(f"agg_A[{l}]: expected shape (r, {d_in}), got {tuple(ga.shape)}")
        if tuple(gb.shape) != (d_out, ga.shape[0]):
            raise ValueError(f"agg_B[{l}]: expected shape ({d_out}, {ga.shape[0]}) to match agg_A[{l}], got {tuple(gb.shape)}")
    bad = nonfinite_index([t for pair in zip(agg_A, agg_B) for t in pair])
    if bad is not None:
        raise ValueError(f"agg_{'AB'[bad % 2]}[{bad // 2}]: expected finite values, found NaN or Inf")


def nonfinite_index(tensors: Sequence[torch.Tensor]) -> Optional[int]:
    """Index of the first tensor holding NaN/Inf, or None; one host synchronisation when all are finite."""
    if not tensors:
        return None
    device = tensors[0].device
    flags = torch.stack([torch.isfinite(t).all().to(device) for t in tensors])
    if bool(flags.all()):
        return None
    return int((~flags).nonzero()[0, 0])


def centered_terms(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    agg_A: Sequence[torch.Tensor],
    agg_B: Sequence[torch.Tensor],
    dtype: torch.dtype,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Per layer, 2N+1 factor pairs whose weighted products give E = Σ_i w_i B_i A_i − B̄ Ā.

    With ΔA_i = A_i − Ā and ΔB_i = B_i − B̄ (and Σ_i w_i = 1),
    E = Σ_i w_i (ΔB_i A_i + B̄ ΔA_i): terms of the size of the error itself, so that
    little cancels when clients are close to the aggregate. The last pair is (B̄, Ā).
    Coefficients (w, w, 0) give E, (w, w, 1) give Σ_i w_i B_i A_i.

    Returns A_ext[l] (2N+1, r*, in) and B_ext[l] (2N+1, out, r*) in `dtype`, with
    r* = max(r, r') and zero-padding.
    """
    A_ext, B_ext = [], []
    for a, b, ga, gb in zip(A, B, agg_A, agg_B):
        rank = max(a.shape[1], ga.shape[0])
        a, b = pad_rank(a.to(dtype), rank, 1), pad_rank(b.to(dtype), rank, 2)
        ga, gb = pad_rank(ga.to(dtype), rank, 0)[None], pad_rank(gb.to(dtype), rank, 1)[None]
        A_ext.append(torch.cat([a, a - ga, ga]))
        B_ext.append(torch.cat([b - gb, gb.expand_as(b), gb]))
    return A_ext, B_ext


def term_coefficients(w: torch.Tensor, last: float) -> torch.Tensor:
    """(w, w, last): the coefficients of :func:`centered_terms`' 2N+1 pairs."""
    return torch.cat([w, w, w.new_full((1,), last)])


def stack_layers(tensors: Sequence[torch.Tensor], idx: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Stack the layers `idx` of a list into one batch tensor of `dtype`."""
    return torch.stack([tensors[l] for l in idx]).to(dtype)


def flat_B(B_g: torch.Tensor) -> torch.Tensor:
    """(G, K, out, r) -> (G, out, K r): the K factors side by side, [B_1 ... B_K]."""
    G, K, d_out, r = B_g.shape
    return B_g.permute(0, 2, 1, 3).reshape(G, d_out, K * r)


def flat_A(A_g: torch.Tensor) -> torch.Tensor:
    """(G, K, r, in) -> (G, K r, in): the K factors stacked, [A_1; ...; A_K]."""
    G, K, r, d_in = A_g.shape
    return A_g.reshape(G, K * r, d_in)
