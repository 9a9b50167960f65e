"""Robustness helpers of the core op: invalid-client detection, norm clipping from
r×r Grams, and Gaussian noise on the aggregate.

What they guarantee, and what they do not:
- ``clip_norm`` bounds each client's whole update ‖ΔW_i‖_F = (Σ_l ‖B_il A_il‖_F²)^½
  by scaling both of its factors by √s_i, s_i = min(1, clip_norm / ‖ΔW_i‖_F), so
  that s_i ΔW_i = (√s_i B_i)(√s_i A_i). Rotations are unaffected (they are
  scale-invariant). It limits the influence of one diverged or hostile client on
  the product; it does not bound the norm of the individual factors.
- ``noise_multiplier`` adds N(0, σ²) with σ = noise_multiplier · clip_norm · max_i w_i
  to every entry of the aggregated factors, from a seeded generator. This is the
  Gaussian mechanism calibrated to the clipped *product* of one client. Since the
  released objects are the factors, whose per-client sensitivity is not bounded by
  the product clip, this is NOT a formal (ε, δ)-differential-privacy guarantee;
  use it as noise injection (e.g. with secure aggregation) and do the privacy
  accounting on a mechanism whose sensitivity you have bounded.

:func:`fedrot_ext.aggregate_state_dicts` applies the same policy to every method through
:mod:`fedrot_ext.peft.policy`, which (with :mod:`fedrot_ext.methods`) says how each method splits the clip over its factors
and which released tensors it noises.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._checks import normalized_weights, raw_weights


def client_update_norms(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    """‖ΔW_i‖_F over all layers, (N,), from r×r Grams: ‖B A‖² = ⟨BᵀB, A Aᵀ⟩ (no d_out×d_in product)."""
    total = torch.zeros(A[0].shape[0], dtype=acc, device=A[0].device)
    for a, b in zip(A, B):  # opt-in path: r×r work per layer
        a, b = a.to(acc), b.to(acc)
        gram_A = torch.bmm(a, a.transpose(1, 2))
        gram_B = torch.bmm(b.transpose(1, 2), b)
        total += (gram_A * gram_B).sum(dim=(1, 2))
    return total.clamp_min(0).sqrt()


def clip_scales(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """s_i = min(1, clip_norm / ‖ΔW_i‖); 1 for zero or non-finite norms (those are caught elsewhere)."""
    scale = (clip_norm / norms).clamp(max=1.0)
    return torch.where(torch.isfinite(scale) & (norms > 0), scale, torch.ones_like(scale))


def nonfinite_rows(stacks: Sequence[torch.Tensor]) -> Dict[int, int]:
    """Row i of dim 0 (a client) -> index of the first (N, ...) stack holding NaN/Inf in that row.

    Slow path (one host synchronisation per stack): call it only after a cheap check failed.
    """
    first: Dict[int, int] = {}
    for k, t in enumerate(stacks):
        if t.numel() == 0:
            continue
        rows = (~torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)).nonzero().flatten().tolist()
        for i in rows:
            first.setdefault(i, k)
    return first


def invalid_clients(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]) -> Dict[int, str]:
    """Client index -> the first tensor holding NaN/Inf for it (slow path, only after a failed check)."""
    names = [("A", l) for l in range(len(A))] + [("B", l) for l in range(len(B))]
    return {
        i: f"{names[k][0]}[{names[k][1]}][{i}] (layer {names[k][1]}, client {i}) holds NaN or Inf"
        for i, k in nonfinite_rows(list(A) + list(B)).items()
    }


class AllClientsInvalid(ValueError):
    """on_invalid="skip" dropped every client: nothing is left to aggregate."""


def surviving_weights(weights, N: int, bad, device, acc: torch.dtype, what: str) -> Tuple[List[int], torch.Tensor]:
    """The clients left after dropping `bad`, and their weights renormalised exactly as a call
    without the dropped clients would normalise them.

    Args:
        weights: the caller's weights (None, sequence or tensor), already validated for all N.
        N: number of clients before dropping.
        bad: indices of the clients to drop.
        device, acc: device and dtype of the returned weights.
        what: how error messages name the client factors (e.g. "A/B", "client_states").

    Returns:
        (kept indices in increasing order, (len(kept),) weights summing to 1).

    Raises:
        ValueError: every client is dropped, or every kept client has weight 0.
    """
    kept = [i for i in range(N) if i not in bad]
    if not kept:
        raise AllClientsInvalid(f"{what}: all {N} clients hold NaN or Inf; nothing left to aggregate")
    raw = raw_weights(weights, N).to("cpu", torch.float64)
    if not bool(raw[kept].sum() > 0):
        raise ValueError("weights: every valid client has weight 0; nothing left to aggregate")
    return kept, normalized_weights(raw[kept], len(kept), device, acc)


def noise_std(noise_multiplier: float, clip_norm: float, w: torch.Tensor) -> float:
    """σ = noise_multiplier · clip_norm · max_i w_i: the Gaussian mechanism's scale for a weighted
    sum whose client i contributes at most w_i · clip_norm (w: the normalised weights actually used)."""
    return noise_multiplier * clip_norm * float(w.max())


def add_gaussian_noise(tensors: List[torch.Tensor], std: float, generator: Optional[torch.Generator]) -> List[torch.Tensor]:
    """Returns tensors + N(0, std²) noise drawn in float32/64 from `generator`, in the tensors' dtype."""
    out = []
    for t in tensors:
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        noise = torch.randn(t.shape, dtype=acc, device=t.device, generator=generator)
        out.append((t.to(acc) + std * noise).to(t.dtype))
    return out
