"""Python front of the fused C++/CUDA ops (torch.ops.fedrot_ext.*).

The heavy lifting (cross-covariances, batched polar factors, rotated weighted
averages over every layer and client) happens in csrc/ in a fixed number of
passes. This file validates arguments, normalises weights, registers the
fake (meta) kernels used by torch.compile / opcheck and a backward that
refuses clearly, and turns the op's status flag into a clear Python
exception. Callers that validated their inputs already (the peft layer)
use :func:`fused_align_aggregate`, which checks nothing and never syncs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _C  # noqa: F401  (loads the library that registers torch.ops.fedrot_ext)
from ._checks import (
    check_factors, check_lam, check_lam_grid, check_robustness, layer_aligns, layer_lams,
    nonfinite_reference_error, normalized_weights, overflow_error,
)
from ._runtime import check_device
from ._shape_only import shape_only, shape_only_weights
from ._robust import add_gaussian_noise, clip_scales, client_update_norms, invalid_clients, noise_std, surviving_weights
from ._types import ALIGN_CODES, DEFAULT_LAM_GRID, STATUS_AGGREGATE_NONFINITE, STATUS_REFERENCE_NONFINITE, Aggregate, align_uses

__all__ = ["align_and_aggregate", "procrustes_rotation", "accumulate_dtype", "fused_align_aggregate", "DEFAULT_LAM_GRID"]

# The candidates of lam="auto"; 0 (FedIT) among them makes the result never worse than plain averaging.


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; fp32, bf16 and fp16 accumulate (and return rotations) in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fedrot_ext::align_and_aggregate")
def _align_and_aggregate_fake(A, B, ref_A, ref_B, weights, align, lam, allow_reflection):
    acc = accumulate_dtype(A[0].dtype)
    out_A = [a.new_empty((a.shape[1], a.shape[2])) for a in A]
    out_B = [b.new_empty((b.shape[1], b.shape[2])) for b in B]
    rots = [a.new_empty((a.shape[0], a.shape[1], a.shape[1]), dtype=acc) for a in A]
    status = A[0].new_empty((1,), dtype=torch.int32)
    return out_A, out_B, rots, status


@torch.library.register_fake("fedrot_ext::align_and_aggregate_clients")
def _align_and_aggregate_clients_fake(A, B, ref_A, ref_B, weights, align, lam, allow_reflection):
    N, acc = weights.shape[0], accumulate_dtype(A[0].dtype)
    out_A = [A[l * N].new_empty(A[l * N].shape) for l in range(len(align))]
    out_B = [B[l * N].new_empty(B[l * N].shape) for l in range(len(align))]
    rots = [A[l * N].new_empty((N, A[l * N].shape[0], A[l * N].shape[0]), dtype=acc) for l in range(len(align))]
    status = A[0].new_empty((1,), dtype=torch.int32)
    return out_A, out_B, rots, status


@torch.library.register_fake("fedrot_ext::procrustes_rotation")
def _procrustes_rotation_fake(M, lam, allow_reflection):
    return torch.empty_like(M, memory_format=torch.contiguous_format)


def _no_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"fedrot_ext::{op} has no backward: aggregation is not differentiable here (the rotations come "
            "from an SVD-based polar factor). Call it under torch.no_grad(), or pass detached tensors "
            "(t.detach()), when the result does not need gradients."
        )

    return backward


# Without a registered backward, autograd would silently drop the graph (A.grad stays None).
torch.library.register_autograd("fedrot_ext::align_and_aggregate", _no_backward("align_and_aggregate"))
torch.library.register_autograd("fedrot_ext::align_and_aggregate_clients", _no_backward("align_and_aggregate_clients"))
torch.library.register_autograd("fedrot_ext::procrustes_rotation", _no_backward("procrustes_rotation"))


def procrustes_rotation(M: torch.Tensor, lam: float = 0.5, allow_reflection: bool = False) -> torch.Tensor:
    """Batched soft orthogonal Procrustes: R = polar((1-λ) I + λ R*), R* = argmax_R tr(Rᵀ M).

    M: (..., r, r) float32 or float64 cross-covariances (e.g. A_i Āᵀ). Returns R of
    the same shape and dtype, with det R = +1 unless `allow_reflection`. A zero M
    gives the identity. Runs the same header-only Jacobi SVD as the fused op.
    ``lam`` defaults to 0.5, as everywhere in the API; pass 1.0 for the hard Procrustes solution.
    """
    if not isinstance(M, torch.Tensor) or M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        shape = tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__
        raise ValueError(f"M: expected a tensor of shape (..., r, r), got {shape}")
    if M.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"M: expected dtype float32 or float64, got {M.dtype}")
    if M.shape[-1] == 0:
        raise ValueError("M: expected r >= 1, got r = 0")
    lam = check_lam(lam)
    check_device(M.device)
    if not shape_only(M) and not bool(torch.isfinite(M).all()):
        raise ValueError("M: expected finite values, found NaN or Inf")
    return torch.ops.fedrot_ext.procrustes_rotation(M, lam, bool(allow_reflection))


def _layer_refs(refs, aligns, factor: int) -> list:
    """The op's `Tensor?[]`: layer l's reference where its mode reads it, else None (empty if none is read)."""
    used = [align_uses(a)[factor] for a in aligns]
    return [refs[l] if u else None for l, u in enumerate(used)] if any(used) else []


def fused_align_aggregate(A, B, ref_A, ref_B, w: torch.Tensor, aligns, lams, allow_reflection: bool,
                          lam_grid=DEFAULT_LAM_GRID):
    """The unchecked entry of the fused op, for callers that validated everything already.

    A, B as in :func:`align_and_aggregate`, or per client: ``A[l]`` a sequence of N (r_l, in_l)
    tensors and ``B[l]`` of N (out_l, r_l) tensors, which the op reads in place (nothing is
    stacked); ref_A, ref_B as in :func:`align_and_aggregate` (refs None, or None entries, where
    not read); w the normalised (N,) weights in the accumulate dtype on the factors' device;
    aligns one mode per layer (:func:`layer_aligns`); lams one float per layer or "auto"
    (:func:`layer_lams`; "auto" chooses from `lam_grid` by the choose_lam op, on stacked copies
    of per-client factors). Returns (out_A, out_B, rotations, status, lam) without
    synchronising: status is a (1,) int32 tensor of bits, STATUS_AGGREGATE_NONFINITE (an
    aggregate came out NaN/Inf: some client factor holds NaN/Inf, or a half-precision sum
    overflowed) and STATUS_REFERENCE_NONFINITE (a reference an aligned layer reads holds
    NaN/Inf); lam the (L,) λ used.
    """
    per_client = not isinstance(A[0], torch.Tensor)
    first = A[0][0] if per_client else A[0]
    check_device(first.device)
    codes = [ALIGN_CODES[a] for a in aligns]
    refs_A, refs_B = _layer_refs(ref_A, aligns, 0), _layer_refs(ref_B, aligns, 1)
    if lams == "auto":
        sA, sB = ([torch.stack(list(c)) for c in A], [torch.stack(list(c)) for c in B]) if per_client else (A, B)
        lam_t, _ = torch.ops.fedrot_ext.choose_lam(sA, sB, refs_A, refs_B, w, codes, list(lam_grid), bool(allow_reflection))
        del sA, sB
    else:
        lam_t = torch.tensor(lams, dtype=w.dtype).to(w.device)
    if per_client:
        flat_A = [t for clients in A for t in clients]
        flat_B = [t for clients in B for t in clients]
        out_A, out_B, rots, status = torch.ops.fedrot_ext.align_and_aggregate_clients(
            flat_A, flat_B, refs_A, refs_B, w, codes, lam_t, bool(allow_reflection)
        )
    else:
        out_A, out_B, rots, status = torch.ops.fedrot_ext.align_and_aggregate(
            A, B, refs_A, refs_B, w, codes, lam_t, bool(allow_reflection)
        )
    return list(out_A), list(out_B), list(rots), status, lam_t


def _fused(A, B, ref_A, ref_B, w, aligns, lam, lam_grid, allow_reflection: bool, clip_norm):
    """One op call plus the one host synchronisation:
    (outputs..., aggregate failed, references finite, λ used per layer)."""
    if clip_norm is not None:
        # Norms in float64: finite factors of ~1e19 would overflow a float32 norm and escape the clip.
        w = w * clip_scales(client_update_norms(A, B, torch.float64), clip_norm).sqrt().to(w.dtype)
    out_A, out_B, rots, status, lam_t = fused_align_aggregate(A, B, ref_A, ref_B, w, aligns, lam, allow_reflection, lam_grid)
    chosen = [lam_t.to(torch.float64)] if lam == "auto" else []
    values = torch.cat([status.to(torch.float64), *chosen]).tolist()  # the one host sync
    bits = int(values[0])
    return (out_A, out_B, rots, bool(bits & STATUS_AGGREGATE_NONFINITE), not bits & STATUS_REFERENCE_NONFINITE,
            tuple(values[1:]) if chosen else tuple(lam))


def align_and_aggregate(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    *,
    ref_A: Optional[Sequence[torch.Tensor]] = None,
    ref_B: Optional[Sequence[torch.Tensor]] = None,
    weights=None,
    align="A",
    lam=0.5,
    lam_grid: Sequence[float] = DEFAULT_LAM_GRID,
    allow_reflection: bool = False,
    return_rotations: bool = False,
    on_invalid: str = "raise",
    clip_norm: Optional[float] = None,
    noise_multiplier: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Aggregate:
    """Rotate every client's LoRA factors onto the previous global ones, then average.

    For each layer l and client i, R_i = polar((1-λ) I + λ R*_i) where R*_i solves the
    orthogonal Procrustes problem against the reference (``align="A"``: M_i = A_i Āᵀ;
    ``"B"``: M_i = B_iᵀ B̄; ``"AB"``: their sum; ``"none"``: R_i = I, plain FedIT).
    Then Ã_i = R_iᵀ A_i, B̃_i = B_i R_i (so B̃_i Ã_i = B_i A_i) and the result is
    Σ_i w_i Ã_i, Σ_i w_i B̃_i. All layers and clients are processed by one fused op.

    Args:
        A: L tensors, ``A[l]`` of shape (N, r_l, in_l): layer l's A factor of all N clients.
        B: L tensors, ``B[l]`` of shape (N, out_l, r_l).
        ref_A: L tensors (r_l, in_l), the previous global A; required when align uses A.
        ref_B: L tensors (out_l, r_l), the previous global B; required when align uses B.
        weights: (N,) non-negative client weights (e.g. sample counts), normalised
            inside; None means uniform.
        align: "A", "B", "AB" or "none", or a sequence of L of them (one per layer).
        lam: soft-rotation strength in [0, 1] (0 is FedIT, 1 is hard Procrustes), a sequence of
            L of them, or "auto": per layer, the candidate of `lam_grid` whose aggregate has the
            smallest aggregation error ‖Σ w_i B_i A_i − B̄Ā‖_F, scored exactly from (N·r)² Grams
            (never a dense out × in matrix). Since 0 is a candidate, no layer ends up worse than
            FedIT (up to rounding of the Grams: about u·‖Σ w_i B_i A_i‖² on the squared error).
        lam_grid: the candidates of lam="auto" (must contain 0).
        allow_reflection: solve over O(r) instead of SO(r) (off: det R_i = +1).
        return_rotations: also return the (N, r_l, r_l) rotations per layer.
        on_invalid: "raise" (default) raises naming the client and tensor holding NaN/Inf;
            "skip" drops such clients, renormalises the weights over the others and lists
            them in ``Aggregate.dropped`` (their rotations are reported as identity).
        clip_norm: if set, each client's whole update ‖ΔW_i‖_F (all layers, computed from
            r×r Grams) is clipped to this value by scaling both factors by √s_i.
        noise_multiplier: if > 0 (needs clip_norm), adds Gaussian noise of std
            noise_multiplier · clip_norm · max_i w_i to the aggregated factors. Not a formal
            DP guarantee on its own: see fedrot_ext/_robust.py.
        generator: torch.Generator (on the inputs' device) for the noise, for reproducibility.

    Returns:
        :class:`Aggregate` with ``A[l]`` (r_l, in_l) and ``B[l]`` (out_l, r_l) in the
        input dtype, ``rotations`` (float32, float64 for float64 input) or None,
        ``dropped``, and ``lam``: the λ each layer used (the chosen one with "auto").

    Raises:
        ValueError / TypeError naming the offending argument for bad shapes, ranks,
        dtypes, devices, weights, λ, align mode, missing references, and (unless
        on_invalid="skip") NaN/Inf in a client factor. Inputs are never modified.
    """
    aligns = layer_aligns(align, len(A) if isinstance(A, (list, tuple)) else 1)  # A itself is checked below
    lam = layer_lams(lam, len(aligns))
    lam_grid = check_lam_grid(lam_grid)
    check_robustness(on_invalid, clip_norm, noise_multiplier)
    A, B, ref_A, ref_B, N, dtype, device = check_factors(A, B, ref_A, ref_B, aligns)
    if shape_only(A[0]):  # meta/fake: outputs of the right shapes, nothing value-dependent (no clip, noise, skip)
        w = shape_only_weights(weights, N, device, accumulate_dtype(dtype))
        out_A, out_B, rots, _, _ = fused_align_aggregate(A, B, ref_A, ref_B, w, aligns, lam, allow_reflection, lam_grid)
        return Aggregate(out_A, out_B, rots if return_rotations else None, ())
    w = normalized_weights(weights, N, device, accumulate_dtype(dtype))
    fuse = lambda A, B, w: _fused(A, B, ref_A, ref_B, w, aligns, lam, lam_grid, allow_reflection, clip_norm)  # noqa: E731
    out_A, out_B, rots, failed, refs_finite, lam_used = fuse(A, B, w)
    if not refs_finite:
        raise nonfinite_reference_error(ref_A, ref_B, aligns)
    dropped = ()
    if failed:
        bad = invalid_clients(A, B)
        if not bad:
            raise overflow_error("A/B", [dtype])
        if on_invalid == "raise":
            raise ValueError(f"{bad[min(bad)]}: expected finite client factors (pass on_invalid='skip' to drop it)")
        # Renormalised exactly as a call without the dropped clients would be.
        kept, w = surviving_weights(weights, N, bad, device, accumulate_dtype(dtype), "A/B")
        keep = torch.tensor(kept, dtype=torch.long, device=device)
        A = [a.index_select(0, keep) for a in A]
        B = [b.index_select(0, keep) for b in B]
        out_A, out_B, kept_rots, failed, _, lam_used = fuse(A, B, w)
        if failed:
            raise overflow_error("A/B", [dtype])
        rots = [torch.eye(R.shape[-1], dtype=R.dtype, device=device).repeat(N, 1, 1).index_copy_(0, keep, R)
                for R in kept_rots]
        dropped = tuple((i, bad[i]) for i in sorted(bad))
    if noise_multiplier > 0:
        std = noise_std(noise_multiplier, clip_norm, w)
        out_A = add_gaussian_noise(out_A, std, generator)
        out_B = add_gaussian_noise(out_B, std, generator)
    return Aggregate(out_A, out_B, rots if return_rotations else None, dropped, lam_used)
