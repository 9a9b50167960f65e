"""Pure-PyTorch baselines the fused op is benchmarked against.

Both functions take the arguments of :func:`fedrot_ext.align_and_aggregate`
(same shapes, same keyword options) and return the same :class:`Aggregate`:
outputs in the input dtype, rotations in the accumulate dtype (float32, or
float64 for float64 input). Only the work differs:

(b) ``authors_loop``: one layer at a time, one client at a time, as the
    authors' code does it: a matmul per factor for M, an SVD, a determinant
    check with a host-side branch, a second SVD for the soft step (λ < 1),
    two matmuls to rotate, then the weighted sum.
(c) ``torch_batched``: the fastest plain-PyTorch formulation found here.
    One GEMM per layer for all clients' M, one batched SVD (plus one for the
    soft step) per group of layers sharing a rank, a vectorised det fix, and
    the rotated weighted average of each factor as a single GEMM whose inner
    dimension runs over (client, rank), so Σ_i w_i R_iᵀ A_i never
    materialises the rotated factors. No host synchronisation.
(c') ``torch_batched_native``: (c) with every GEMM in the storage dtype, as
    ten lines that never upcast would run it. For bf16/fp16 on a CPU that is
    a low-precision GEMM with a low-precision result (CPU ``torch.mm`` has no
    fp32 output for bf16 inputs), so the M_i and the coefficients w_i R_i
    round to bf16 before use: faster where the CPU has bf16 dot products, far
    less accurate. A point of comparison, not a baseline: the rotations and
    weights it uses are not those of the other implementations.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from fedrot_ext._types import ALIGN_MODES, Aggregate

__all__ = ["authors_loop", "torch_batched", "torch_batched_native"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weights(weights, N: int, device, acc: torch.dtype) -> torch.Tensor:
    if weights is None:
        return torch.full((N,), 1.0 / N, dtype=acc, device=device)
    w = torch.as_tensor(weights).detach().to(device=device, dtype=acc)
    return w / w.sum()


def _setup(A: Sequence[torch.Tensor], weights, align: str, lam: float):
    """Checks the options; returns (use_A, use_B, N, dtype, device, acc, normalised weights)."""
    if align not in ALIGN_MODES:
        raise ValueError(f"align: expected one of {ALIGN_MODES}, got {align!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: expected a value in [0, 1], got {lam}")
    N, dtype, device = A[0].shape[0], A[0].dtype, A[0].device
    acc = _acc_dtype(dtype)
    return align in ("A", "AB"), align in ("B", "AB"), N, dtype, device, acc, _weights(weights, N, device, acc)


# ----------------------------------------------------------------------------
# (b) per-layer, per-client loop
# ----------------------------------------------------------------------------

def _polar_one(M: torch.Tensor, allow_reflection: bool) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(M)
    R = U @ Vh
    if not allow_reflection and torch.linalg.det(R) < 0:  # host sync, as in the authors' code
        U[:, -1] = -U[:, -1]
        R = U @ Vh
    return R


def authors_loop(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    *,
    ref_A: Optional[Sequence[torch.Tensor]] = None,
    ref_B: Optional[Sequence[torch.Tensor]] = None,
    weights=None,
    align: str = "A",
    lam: float = 0.5,
    allow_reflection: bool = False,
    return_rotations: bool = False,
) -> Aggregate:
    """Baseline (b): Python loop over layers and clients (the authors' style)."""
    use_A, use_B, N, dtype, device, acc, w = _setup(A, weights, align, lam)
    out_A, out_B, rots = [], [], []
    for l in range(len(A)):
        r = A[l].shape[1]
        eye = torch.eye(r, dtype=acc, device=device)
        ra = ref_A[l].to(acc) if use_A else None
        rb = ref_B[l].to(acc) if use_B else None
        agg_A = torch.zeros(A[l].shape[1:], dtype=acc, device=device)
        agg_B = torch.zeros(B[l].shape[1:], dtype=acc, device=device)
        layer_rots = []
        for i in range(N):
            a, b = A[l][i].to(acc), B[l][i].to(acc)
            M = torch.zeros(r, r, dtype=acc, device=device)
            if use_A:
                M = M + a @ ra.T
            if use_B:
                M = M + b.T @ rb
            if align == "none" or lam == 0.0 or not bool(M.abs().max() > 0):
                R = eye  # no alignment, or degenerate reference
            else:
                R = _polar_one(M, allow_reflection)
                if lam < 1.0:
                    R = _polar_one((1.0 - lam) * eye + lam * R, allow_reflection)
            agg_A += w[i] * (R.T @ a)
            agg_B += w[i] * (b @ R)
            layer_rots.append(R)
        out_A.append(agg_A.to(dtype))
        out_B.append(agg_B.to(dtype))
        rots.append(torch.stack(layer_rots))
    return Aggregate(out_A, out_B, rots if return_rotations else None)


# ----------------------------------------------------------------------------
# (c) batched PyTorch
# ----------------------------------------------------------------------------

def _mm(x: torch.Tensor, y: torch.Tensor, acc: torch.dtype, native: bool = False) -> torch.Tensor:
    """x @ y accumulated and returned in `acc` whatever the storage dtype.

    CUDA: native low-precision GEMM with an fp32 output (out_dtype). CPU:
    upcast first; skinny bf16/fp16 GEMMs run 10-40x slower than fp32 on CPUs
    without native bf16 units (measured here on AVX2), and the upcast is one
    cheap pass. native (c'): one GEMM in the storage dtype, its result in it.
    """
    if x.dtype == acc and y.dtype == acc:
        return x @ y
    low = x.dtype if x.dtype != acc else y.dtype  # the big operand's storage dtype
    if native:
        return (x.to(low) @ y.to(low)).to(acc)
    if x.is_cuda:
        x, y = x.to(low), y.to(low)
        try:
            return torch.mm(x, y, out_dtype=acc)
        except (TypeError, RuntimeError):  # older torch: no out_dtype
            return (x @ y).to(acc)
    return x.to(acc) @ y.to(acc)


def _polar_batched(M: torch.Tensor, allow_reflection: bool) -> torch.Tensor:
    """Orthogonal polar factors of a batch (K, r, r), det +1 unless reflections are allowed."""
    U, _, Vh = torch.linalg.svd(M)
    R = U @ Vh
    if not allow_reflection:
        # Flipping the smallest singular pair: U' Vh = U Vh - 2 u_r v_rᵀ.
        neg = (torch.linalg.det(R) < 0).to(R.dtype)
        R = R - (2.0 * neg)[:, None, None] * (U[:, :, -1:] @ Vh[:, -1:, :])
    return R


def _rotations(M: torch.Tensor, lam: float, allow_reflection: bool) -> torch.Tensor:
    K, r, _ = M.shape
    eye = torch.eye(r, dtype=M.dtype, device=M.device).expand(K, r, r)
    if lam == 0.0:
        return eye.clone()
    R = _polar_batched(M, allow_reflection)
    if lam < 1.0:
        R = _polar_batched((1.0 - lam) * eye + lam * R, allow_reflection)
    degenerate = M.abs().amax(dim=(1, 2)) == 0
    return torch.where(degenerate[:, None, None], eye, R)


def _aggregate_B(b: torch.Tensor, wR: torch.Tensor, acc: torch.dtype, native: bool = False) -> torch.Tensor:
    """Σ_i b_i (w_i R_i) for b (N, out, r), wR (N, r, r), in `acc` (native: see _mm)."""
    N, out, r = b.shape
    if b.is_cuda or (native and b.dtype != acc):
        # One transpose copy of B, then one GEMM with inner dimension N·r.
        return _mm(b.permute(1, 0, 2).reshape(out, N * r), wR.reshape(N * r, r), acc, native)
    # CPU: in-place GEMM accumulation per client reads B once with no copy
    # (fastest of bmm+sum, permute+mm, einsum and this loop on this machine).
    agg = torch.zeros(out, r, dtype=acc, device=b.device)
    for i in range(N):
        agg.addmm_(b[i].to(acc), wR[i])
    return agg


def torch_batched(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    *,
    ref_A: Optional[Sequence[torch.Tensor]] = None,
    ref_B: Optional[Sequence[torch.Tensor]] = None,
    weights=None,
    align: str = "A",
    lam: float = 0.5,
    allow_reflection: bool = False,
    return_rotations: bool = False,
    native: bool = False,
) -> Aggregate:
    """Baseline (c): batched PyTorch, one SVD call (two for λ < 1) per rank group (native: (c'))."""
    use_A, use_B, N, dtype, device, acc, w = _setup(A, weights, align, lam)
    L = len(A)

    # 1. Cross-covariances, one GEMM per layer over all clients: (N·r, d) @ (d, r).
    rots: List[Optional[torch.Tensor]] = [None] * L
    groups: Dict[int, List[int]] = {}
    for l in range(L):
        groups.setdefault(A[l].shape[1], []).append(l)
    for r, layers in groups.items():
        if align == "none":
            for l in layers:
                rots[l] = torch.eye(r, dtype=acc, device=device).expand(N, r, r)
            continue
        Ms = []
        for l in layers:
            M = torch.zeros(N * r, r, dtype=acc, device=device)
            if use_A:
                M = M + _mm(A[l].reshape(N * r, -1), ref_A[l].T, acc, native)
            if use_B:  # M_i = B_iᵀ B̄ = (B̄ᵀ B_i)ᵀ
                M = M + _mm(B[l].transpose(1, 2).reshape(N * r, -1), ref_B[l], acc, native)
            Ms.append(M.reshape(N, r, r))
        # 2. One batched polar decomposition per rank group.
        R = _rotations(torch.cat(Ms), lam, allow_reflection).reshape(len(layers), N, r, r)
        for k, l in enumerate(layers):
            rots[l] = R[k]

    # 3. Weighted rotated averages, one GEMM per factor and layer:
    #    Σ_i w_i R_iᵀ A_i = [w_1 R_1ᵀ | ... | w_N R_Nᵀ] @ [A_1; ...; A_N].
    out_A, out_B = [], []
    for l in range(L):
        r = A[l].shape[1]
        wR = w[:, None, None] * rots[l]  # (N, r, r)
        left = wR.permute(2, 0, 1).reshape(r, N * r)  # [k, (i, j)] = w_i R_i[j, k]
        out_A.append(_mm(left, A[l].reshape(N * r, -1), acc, native).to(dtype))
        out_B.append(_aggregate_B(B[l], wR, acc, native).to(dtype))
    return Aggregate(out_A, out_B, [R.contiguous() for R in rots] if return_rotations else None)


def torch_batched_native(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], **kwargs) -> Aggregate:
    """(c'): torch_batched with every GEMM in the storage dtype (the module docstring says why)."""
    return torch_batched(A, B, **kwargs, native=True)
