"""Merges computed in core space: never an out × in matrix.

Every client update of a module, ΔW_i = s_i B_i A_i, lies in the column space of the stacked
B = [B_1 … B_N] (out × K) and the row space of the stacked A = [A_1; …; A_N] (K × in),
K = Σ r_i. With the thin QR factorisations B = Q_B R_B and Aᵀ = Q_A R_A,

    ΔW_i = Q_B (s_i R_B[:, i] R_A[:, i]ᵀ) Q_Aᵀ = Q_B M_i Q_Aᵀ,

where R_B[:, i] are the columns of client i's block: each update is a K × K core M_i, exactly.
Because Q_B and Q_A have orthonormal columns, Frobenius norms, singular values and any
entrywise rule applied to the M_i are those of a merge in the K-dimensional core space
(Panariello et al., NeurIPS 2025; the same identity is behind FlexLoRA). A merge is a K × K
matrix M, and the merged factors are B̄ = Q_B U_k S_k, Ā = V_kᵀ Q_Aᵀ from the SVD of M, divided
by the output's LoRA scaling s_out. Cost: two QRs of out × K and in × K, and K × K work;
peft's svd merge forms ΔW and runs a full out × in SVD.

Methods (w_i the normalised weights, τ_i = w_i ΔW_i as cores):

- ``svd``: the rank-k truncated SVD of Σ τ_i (peft's ``combination_type="svd"``).
- ``cat``: exact, at rank K: the factors stacked, each client's scaled by √(w_i s_i / s_out)
  (peft's ``"cat"``); no core needed.
- ``ties`` (Yadav et al., NeurIPS 2023) on the cores: keep each τ_i's largest-magnitude
  fraction ``density`` of entries, elect each entry's sign from the sum of the kept values, and
  average, weighted, the kept values that agree with it; then rank k.
- ``tsv`` (TSV-Merge, Gargiulo et al., CVPR 2025) on the cores: each τ_i's top ⌊k / N⌋ singular
  triplets, the left and the right singular vectors of all clients each replaced by their
  nearest orthonormal set (the polar factor), and Σ_i U_i S_i V_iᵀ rebuilt from them.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

CORE_METHODS = ("svd", "cat", "ties", "tsv")


def core_bases(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]):
    """(Q_B, Q_A, cores): orthonormal bases of the stacked factors' spaces and each client's K × K core
    B_i A_i = Q_B core_i Q_Aᵀ, in float64."""
    Bc = torch.cat([b.double() for b in B], dim=1)
    Ac = torch.cat([a.double() for a in A], dim=0)
    Q_B, R_B = torch.linalg.qr(Bc)
    Q_A, R_A = torch.linalg.qr(Ac.mT)
    cores, start = [], 0
    for a in A:
        stop = start + a.shape[0]
        cores.append(R_B[:, start:stop] @ R_A[:, start:stop].mT)
        start = stop
    return Q_B, Q_A, cores


def _truncate(M: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(U_k S_k, V_kᵀ) of M's rank-`rank` truncated SVD, zero-padded when M has fewer dimensions."""
    U, S, Vh = torch.linalg.svd(M)
    k = min(rank, S.shape[0])
    left, right = U[:, :k] * S[:k], Vh[:k]
    if k < rank:
        left = torch.cat([left, left.new_zeros(left.shape[0], rank - k)], dim=1)
        right = torch.cat([right, right.new_zeros(rank - k, right.shape[1])], dim=0)
    return left, right


def ties_core(tasks: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES on the task cores `tasks` (already weighted): trim, elect signs, weighted disjoint mean."""
    kept = []
    for t in tasks:
        k = max(1, int(round(density * t.numel())))
        threshold = t.abs().flatten().kthvalue(t.numel() - k + 1).values
        kept.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
    stack = torch.stack(kept)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    w = torch.tensor(list(weights), dtype=stack.dtype, device=stack.device).view(-1, 1, 1)
    # The tasks are w_i-weighted already: their sum over the agreeing ones, divided by the agreeing weight.
    total = torch.where(agree, stack, torch.zeros_like(stack)).sum(0)
    weight = torch.where(agree, w.expand_as(stack), torch.zeros_like(stack)).sum(0)
    return torch.where(weight > 0, total / weight.clamp_min(1e-300), torch.zeros_like(total))


def _polar(X: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to X (its polar factor)."""
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def tsv_core(tasks: Sequence[torch.Tensor], per_task: int) -> torch.Tensor:
    """TSV-Merge on the task cores: each task's top `per_task` singular triplets, decorrelated."""
    Us, Ss, Vs = [], [], []
    for t in tasks:
        U, S, Vh = torch.linalg.svd(t)
        k = min(per_task, S.shape[0])  # a core is min(out, K) × min(in, K): maybe fewer triplets
        Us.append(U[:, :k])
        Ss.append(S[:k])
        Vs.append(Vh[:k].mT)
    U, V, S = _polar(torch.cat(Us, dim=1)), _polar(torch.cat(Vs, dim=1)), torch.cat(Ss)
    return (U * S) @ V.mT


def merge_module(method: str, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], weights: Sequence[float],
                 ratios: Sequence[float], rank: int, density: float) -> Tuple[torch.Tensor, torch.Tensor, Tuple[float, float]]:
    """One module's merged (Ā, B̄) in float64 and the (absolute, relative) Frobenius error of B̄ Ā against
    Σ c_i B_i A_i (the exact merge, in the output's factor units; zero for "cat").

    Args:
        A, B: each client's (r_i, in) and (out, r_i) factors.
        weights: the normalised client weights w_i.
        ratios: s_i / s_out, each client's LoRA scaling over the output's; c_i = w_i s_i / s_out.
        rank: the output rank.
        density: the fraction of core entries TIES keeps per client.
    """
    coefficients = [w * q for w, q in zip(weights, ratios)]
    if method == "cat":
        roots = [c ** 0.5 for c in coefficients]
        return (torch.cat([a.double() * r for a, r in zip(A, roots)], dim=0),
                torch.cat([b.double() * r for b, r in zip(B, roots)], dim=1), (0.0, 0.0))
    Q_B, Q_A, cores = core_bases(A, B)
    tasks = [c * core for c, core in zip(coefficients, cores)]
    target = torch.stack(tasks).sum(0)
    if method == "svd":
        M = target
    elif method == "ties":
        M = ties_core(tasks, weights, density)
    else:
        M = tsv_core(tasks, max(1, rank // len(tasks)))
    left, right = _truncate(M, rank)
    norm, gap = float(target.norm()), float((target - left @ right).norm())
    return right @ Q_A.mT, Q_B @ left, (gap, gap / norm if norm > 0 else 0.0)


def core_ranks(method: str, ranks: Sequence[int], rank) -> int:
    """The output rank of a module: ``rank`` (default the largest client rank), or Σ r_i for cat."""
    if method == "cat":
        return sum(ranks)
    return max(ranks) if rank is None else rank

