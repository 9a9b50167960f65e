"""Plain float64 PyTorch implementation of the fedrot_ext contract.

This is the ground truth the tests compare the fused extension against. It
follows docs/METHOD.md literally: one SVD per (layer, client), the determinant
fix on the smallest singular pair, the soft step through a second SVD, and
factor-wise weighted averaging. It is deliberately slow and obvious.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._types import ALIGN_MODES, DEFAULT_LAM_GRID, Aggregate

__all__ = ["procrustes_rotation_ref", "align_and_aggregate_ref", "merge_adapters_ref", "procrustes_rotation", "align_and_aggregate"]


def _polar_so(M: torch.Tensor, allow_reflection: bool) -> torch.Tensor:
    """Orthogonal polar factor U Vᵀ of M (r×r, float64), kept in SO(r) unless reflections are allowed."""
    U, _, Vh = torch.linalg.svd(M)
    R = U @ Vh
    if not allow_reflection and torch.linalg.det(R) < 0:
        U = U.clone()
        U[:, -1] = -U[:, -1]  # flip the pair with the smallest singular value
        R = U @ Vh
    return R


def procrustes_rotation_ref(M: torch.Tensor, lam: float = 0.5, allow_reflection: bool = False) -> torch.Tensor:
    """R = polar((1-λ) I + λ R*) with R* = argmax_{R} tr(Rᵀ M), for a batch (..., r, r)."""
    M = M.detach().to(torch.float64)
    r = M.shape[-1]
    flat = M.reshape(-1, r, r)
    eye = torch.eye(r, dtype=torch.float64, device=M.device)
    out = torch.empty_like(flat)
    for b in range(flat.shape[0]):
        m = flat[b]
        if lam == 0 or not bool(m.abs().max() > 0):
            out[b] = eye  # no alignment / degenerate reference: identity
            continue
        R = _polar_so(m, allow_reflection)
        if lam != 1:
            R = _polar_so((1.0 - lam) * eye + lam * R, allow_reflection)
        out[b] = R
    return out.reshape(M.shape)


def align_and_aggregate_ref(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    *,
    ref_A: Optional[Sequence[torch.Tensor]] = None,
    ref_B: Optional[Sequence[torch.Tensor]] = None,
    weights: Optional[torch.Tensor] = None,
    align="A",
    lam=0.5,
    lam_grid: Sequence[float] = DEFAULT_LAM_GRID,
    allow_reflection: bool = False,
    return_rotations: bool = False,
) -> Aggregate:
    """Float64 reference of :func:`fedrot_ext.align_and_aggregate` (outputs are float64);
    align and lam per layer or for all, lam="auto" by :func:`choose_lam_ref`."""
    L = len(A)
    aligns = [align] * L if isinstance(align, str) else list(align)
    for a in aligns:
        if a not in ALIGN_MODES:
            raise ValueError(f"align: expected one of {ALIGN_MODES}, got {a!r}")
    if lam == "auto":
        lam, _ = choose_lam_ref(A, B, ref_A=ref_A, ref_B=ref_B, weights=weights, align=aligns, grid=lam_grid,
                                allow_reflection=allow_reflection)
    lams = [float(lam)] * L if isinstance(lam, (int, float)) else [float(v) for v in lam]
    N = A[0].shape[0]
    if weights is None:
        w = torch.ones(N, dtype=torch.float64)
    elif isinstance(weights, torch.Tensor):
        w = weights.detach().double().cpu()
    else:
        w = torch.as_tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    outs_A, outs_B, rots = [], [], []
    for l, (a, b) in enumerate(zip(A, B)):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        r = a.shape[1]
        M = torch.zeros(N, r, r, dtype=torch.float64)
        if aligns[l] in ("A", "AB"):
            M += a @ ref_A[l].detach().double().cpu().T
        if aligns[l] in ("B", "AB"):
            M += b.transpose(1, 2) @ ref_B[l].detach().double().cpu()
        if aligns[l] == "none":
            R = torch.eye(r, dtype=torch.float64).expand(N, r, r).clone()
        else:
            R = procrustes_rotation_ref(M, lams[l], allow_reflection)
        a_rot = R.transpose(1, 2) @ a  # Ã_i = R_iᵀ A_i
        b_rot = b @ R  # B̃_i = B_i R_i
        outs_A.append(torch.einsum("i,ijk->jk", w, a_rot))
        outs_B.append(torch.einsum("i,ijk->jk", w, b_rot))
        rots.append(R)
    return Aggregate(outs_A, outs_B, rots if return_rotations else None, (), tuple(lams))


def choose_lam_ref(A, B, *, ref_A=None, ref_B=None, weights=None, align="A", grid=DEFAULT_LAM_GRID,
                   allow_reflection: bool = False):
    """Float64 reference of lam="auto": for each layer and candidate λ, aggregate with the
    reference op and measure ‖Σ w_i B_i A_i − B̄Ā‖_F / ‖Σ w_i B_i A_i‖_F on the dense product.
    Returns (chosen λ per layer, (L, K) relative errors)."""
    L = len(A)
    aligns = [align] * L if isinstance(align, str) else list(align)
    N = A[0].shape[0]
    w = torch.ones(N, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64).cpu()
    w = w / w.sum()
    chosen, errors = [], []
    for l in range(L):
        a, b = A[l].detach().double().cpu(), B[l].detach().double().cpu()
        Z = torch.einsum("i,ior,irc->oc", w, b, a)
        row = []
        for lam in grid:
            agg = align_and_aggregate_ref([a], [b], ref_A=None if ref_A is None else [ref_A[l]],
                                          ref_B=None if ref_B is None else [ref_B[l]], weights=w, align=aligns[l], lam=lam,
                                          allow_reflection=allow_reflection)
            err = torch.linalg.norm(Z - agg.B[0] @ agg.A[0])
            row.append(float(err / torch.linalg.norm(Z)) if torch.linalg.norm(Z) > 0 else 0.0)
        errors.append(row)
        chosen.append(float(grid[min(range(len(grid)), key=row.__getitem__)]))
    return chosen, torch.tensor(errors, dtype=torch.float64)


# The names of the ops they mirror: ``reference.align_and_aggregate`` is the float64 twin of
# ``fedrot_ext.align_and_aggregate``.
procrustes_rotation = procrustes_rotation_ref
align_and_aggregate = align_and_aggregate_ref


def merge_adapters_ref(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    *,
    ref_A: Sequence[torch.Tensor],
    ref_B: Sequence[torch.Tensor],
    weights: Optional[torch.Tensor] = None,
    align: str = "AB",
    iterations: int = 10,
    tol: float = 1e-6,
    allow_reflection: bool = False,
):
    """Float64 reference of :func:`fedrot_ext.merge_adapters` over stacked factors.

    Generalised Procrustes with hard rotations (λ = 1): align to ``ref_*``, average, then realign
    to the average until the relative Frobenius change of all factors is below ``tol``.
    Returns (A, B, passes) with float64 (r, in) / (out, r) factors per layer.
    """
    cur_A = [t.detach().double().cpu() for t in ref_A]
    cur_B = [t.detach().double().cpu() for t in ref_B]
    passes = 0
    for passes in range(1, iterations + 1):
        agg = align_and_aggregate_ref(A, B, ref_A=cur_A, ref_B=cur_B, weights=weights, align=align, lam=1.0,
                                      allow_reflection=allow_reflection)
        num = sum(float(torch.sum((n - o) ** 2)) for n, o in zip(agg.A + agg.B, cur_A + cur_B))
        den = sum(float(torch.sum(o ** 2)) for o in cur_A + cur_B)
        cur_A, cur_B = list(agg.A), list(agg.B)
        change = 0.0 if num == 0 else (float("inf") if den == 0 else (num / den) ** 0.5)
        if change < tol:
            break
    return cur_A, cur_B, passes
