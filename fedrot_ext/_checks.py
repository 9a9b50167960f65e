"""Argument checks for the public API.

Every failure raises a ValueError/TypeError that names the argument and says
what was expected, so a user sees "B[3]: expected shape (10, 1024, 8) ..."
rather than a crash inside a kernel.
"""
from __future__ import annotations

import math

import torch

from ._types import ALIGN_MODES, align_uses

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _as_tensor_list(name: str, value, allow_none: bool = False) -> list:
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list or tuple of tensors (one per LoRA layer), got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name}: expected a non-empty list of layer tensors, got an empty list")
    for l, t in enumerate(value):
        if not isinstance(t, torch.Tensor) and not (allow_none and t is None):
            raise TypeError(f"{name}[{l}]: expected a torch.Tensor, got {type(t).__name__}")
    return list(value)


def check_align(align: str) -> None:
    if align not in ALIGN_MODES:
        raise ValueError(f"align: expected one of {ALIGN_MODES}, got {align!r}")


def layer_aligns(align, L: int) -> list:
    """One align mode per layer, from a mode or a sequence of L modes."""
    if isinstance(align, str):
        check_align(align)
        return [align] * L
    if not isinstance(align, (list, tuple)):
        raise TypeError(f"align: expected one of {ALIGN_MODES} or a sequence of {L} of them, got {type(align).__name__}")
    if len(align) != L:
        raise ValueError(f"align: expected {L} modes (one per layer), got {len(align)}")
    for l, a in enumerate(align):
        if a not in ALIGN_MODES:
            raise ValueError(f"align[{l}]: expected one of {ALIGN_MODES}, got {a!r}")
    return list(align)


def check_lam(lam, name: str = "lam") -> float:
    if isinstance(lam, bool):
        raise TypeError(f"{name}: expected a float in [0, 1], got bool")
    try:
        lam_f = float(lam)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float in [0, 1], got {type(lam).__name__}") from None
    if not (0.0 <= lam_f <= 1.0):  # also rejects NaN
        raise ValueError(f"{name}: expected a value in [0, 1], got {lam_f}")
    return lam_f


def check_lam_or_auto(lam):
    """A float in [0, 1], or "auto" (λ chosen per layer from a grid)."""
    if isinstance(lam, str):
        if lam != "auto":
            raise TypeError(f"lam: expected a float in [0, 1] or 'auto', got {lam!r}")
        return lam
    return check_lam(lam)


def layer_lams(lam, L: int):
    """"auto", or one λ per layer from a float or a sequence of L floats."""
    if isinstance(lam, (list, tuple)):
        if len(lam) != L:
            raise ValueError(f"lam: expected {L} values (one per layer), got {len(lam)}")
        return [check_lam(v, f"lam[{l}]") for l, v in enumerate(lam)]
    lam = check_lam_or_auto(lam)
    return lam if lam == "auto" else [lam] * L


def check_lam_grid(grid) -> tuple:
    """The candidates of lam="auto": a non-empty sequence in [0, 1] that contains 0 (FedIT), which is what
    guarantees that the chosen aggregate is never worse than plain averaging."""
    if isinstance(grid, (str, torch.Tensor)) or not isinstance(grid, (list, tuple)) or not grid:
        raise ValueError(f"lam_grid: expected a non-empty sequence of floats in [0, 1], got {grid!r}")
    values = tuple(check_lam(v, f"lam_grid[{k}]") for k, v in enumerate(grid))
    if 0.0 not in values:
        raise ValueError(f"lam_grid: expected 0.0 among the candidates (it guarantees the result is never worse "
                         f"than FedIT), got {values}")
    return values


def check_factors(A, B, ref_A, ref_B, align):
    """Validate shapes, dtypes and devices (align: a mode or one per layer, already checked);
    return (A, B, ref_A, ref_B, N, dtype, device). A reference list may hold None for the
    layers whose mode does not read it."""
    A = _as_tensor_list("A", A)
    B = _as_tensor_list("B", B)
    aligns = [align] * len(A) if isinstance(align, str) else list(align)
    uses = {a: align_uses(a) for a in set(aligns)}
    needed = [[uses[a][f] for a in aligns] for f in (0, 1)]
    refs = [ref_A, ref_B]
    dtype, device = A[0].dtype, A[0].device
    N = A[0].shape[0] if A[0].dim() == 3 else None
    if not _all_valid(A, B, refs, needed, N, dtype, device):
        _raise_first_invalid(A, B, refs, needed, aligns, N, dtype, device)
    refs = [None if ref is None else list(ref) for ref in refs]
    return A, B, refs[0], refs[1], N, dtype, device


def _all_valid(A, B, refs, needed, N, dtype, device) -> bool:
    """Every check of _raise_first_invalid in one tight pass, for the common valid call (a per-check
    loop with messages costs ~5 µs a layer). Never laxer than it: False sends a call there."""
    if len(A) != len(B) or dtype not in SUPPORTED_DTYPES or not N:
        return False
    shapes = []
    for a, b in zip(A, B):
        sa, sb = a.shape, b.shape
        if not (len(sa) == 3 and len(sb) == 3 and sa[0] == N and sb[0] == N and sb[2] == sa[1] and sa[1] > 0
                and sa[2] > 0 and sb[1] > 0 and a.dtype == dtype and b.dtype == dtype and a.device == device
                and b.device == device):
            return False
        shapes.append(((sa[1], sa[2]), (sb[1], sb[2])))
    for f, ref in enumerate(refs):
        if ref is None:
            if any(needed[f]):
                return False
            continue
        if not isinstance(ref, (list, tuple)) or len(ref) != len(A):
            return False
        for t, need, want in zip(ref, needed[f], shapes):
            if t is None:
                if need:
                    return False
            elif not isinstance(t, torch.Tensor) or t.shape != want[f] or t.dtype != dtype or t.device != device:
                return False
    return True


def _raise_first_invalid(A, B, refs, needed, aligns, N, dtype, device) -> None:
    """Raise the error naming the first argument that fails a check (the slow path of check_factors)."""
    if len(A) != len(B):
        raise ValueError(f"B: expected {len(A)} layer tensors to match A, got {len(B)}")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"A[0]: expected dtype in {SUPPORTED_DTYPES}, got {dtype}")
    for l, (a, b) in enumerate(zip(A, B)):
        if a.dim() != 3:
            raise ValueError(f"A[{l}]: expected a 3-D tensor (N, r, in_features), got shape {tuple(a.shape)}")
        if b.dim() != 3:
            raise ValueError(f"B[{l}]: expected a 3-D tensor (N, out_features, r), got shape {tuple(b.shape)}")
        if a.shape[0] != N:
            raise ValueError(f"A[{l}]: expected {N} clients in dim 0 (as A[0]), got shape {tuple(a.shape)}")
        if N == 0:
            raise ValueError("A: expected at least one client (dim 0 of every layer), got an empty client list (N = 0)")
        n_clients, r, d_in = a.shape
        if b.shape[0] != N or b.shape[2] != r:
            raise ValueError(f"B[{l}]: expected shape ({N}, out_features, {r}) to match A[{l}] {tuple(a.shape)}, got {tuple(b.shape)}")
        if r == 0 or d_in == 0 or b.shape[1] == 0:
            raise ValueError(f"A[{l}]/B[{l}]: expected non-zero rank and feature sizes, got A {tuple(a.shape)}, B {tuple(b.shape)}")
        for name, t in ((f"A[{l}]", a), (f"B[{l}]", b)):
            if t.dtype != dtype:
                raise TypeError(f"{name}: expected dtype {dtype} (as A[0]), got {t.dtype}")
            if t.device != device:
                raise ValueError(f"{name}: expected device {device} (as A[0]), got {t.device}")
    for f, (name, ref) in enumerate(zip(("ref_A", "ref_B"), refs)):
        if ref is None:
            if any(needed[f]):
                shown = aligns[0] if len(set(aligns)) == 1 else aligns
                raise ValueError(f"{name}: required when align={shown!r} (the previous global factors), got None")
            continue
        ref = _as_tensor_list(name, ref, allow_none=True)
        if len(ref) != len(A):
            raise ValueError(f"{name}: expected {len(A)} layer tensors to match A, got {len(ref)}")
        for l, t in enumerate(ref):
            if t is None:
                if needed[f][l]:
                    raise ValueError(f"{name}[{l}]: required when align[{l}]={aligns[l]!r}, got None")
                continue
            r, d_in = A[l].shape[1], A[l].shape[2]
            want = (r, d_in) if name == "ref_A" else (B[l].shape[1], r)
            if tuple(t.shape) != want:
                raise ValueError(f"{name}[{l}]: expected shape {want}, got {tuple(t.shape)}")
            if t.dtype != dtype:
                raise TypeError(f"{name}[{l}]: expected dtype {dtype} (as A[0]), got {t.dtype}")
            if t.device != device:
                raise ValueError(f"{name}[{l}]: expected device {device} (as A[0]), got {t.device}")


def used_refs(ref_A, ref_B, aligns):
    """(name, layer, tensor) of every reference some layer's mode reads."""
    out = []
    for f, (name, refs) in enumerate((("ref_A", ref_A), ("ref_B", ref_B))):
        out += [(name, l, refs[l]) for l, a in enumerate(aligns) if align_uses(a)[f]]
    return out


def nonfinite_reference_error(ref_A, ref_B, aligns) -> ValueError:
    """The error naming the first reference layer holding NaN/Inf (slow path, after the op flagged one)."""
    for name, l, t in used_refs(ref_A, ref_B, aligns):
        if not bool(torch.isfinite(t).all()):
            return ValueError(f"{name}[{l}]: expected finite values, found NaN or Inf")
    return ValueError("ref_A/ref_B: expected finite values, found NaN or Inf")


def overflow_error(what: str, dtypes) -> ValueError:
    """A set status flag with finite clients: a half-precision aggregate overflowed."""
    return ValueError(f"{what}: the aggregate overflowed {', '.join(sorted(map(str, dtypes)))} although every client "
                      "factor is finite; aggregate in float32 or set clip_norm")


def raw_weights(weights, N: int) -> torch.Tensor:
    """Client weights as given (uniform when None), as a float64 tensor; Python numbers keep full precision."""
    if weights is None:
        return torch.ones(N, dtype=torch.float64)
    if isinstance(weights, torch.Tensor):
        return weights.detach()
    return torch.as_tensor(weights, dtype=torch.float64)


def normalized_weights(weights, N: int, device, acc_dtype: torch.dtype) -> torch.Tensor:
    """Validate client weights and return them normalised to sum 1, on `device`."""
    if weights is None:
        return torch.full((N,), 1.0 / N, dtype=acc_dtype, device=device)
    w = raw_weights(weights, N)
    check_weights_shape(w.shape, N)
    if w.device.type != "cpu" and w.device != device:
        raise ValueError(f"weights: expected device {device} or cpu (as A[0]), got {w.device}")
    w64 = w.to("cpu", torch.float64)  # N scalars: one small copy, checked on the host in one read
    return (w64 / weights_total(w64.tolist())).to(device=device, dtype=acc_dtype)


def check_weights_shape(shape, N: int) -> None:
    if len(shape) != 1 or shape[0] != N:
        raise ValueError(f"weights: expected shape ({N},) (one per client), got {tuple(shape)}")


def weights_total(values) -> float:
    """Validate client weights given as Python floats and return their exact (fsum) total."""
    if not all(math.isfinite(v) for v in values):
        raise ValueError("weights: expected finite values, found NaN or Inf")
    if min(values) < 0:
        raise ValueError(f"weights: expected non-negative values, got min {min(values)}")
    try:
        total = math.fsum(values)
    except OverflowError:
        total = math.inf
    if total == math.inf:
        raise ValueError(f"weights: expected a finite sum, got values that overflow float64 when added "
                         f"(max {max(values)}); scale them down (only their ratios matter)")
    if not total > 0:
        raise ValueError("weights: expected a positive sum, got all zeros")
    return total


def check_robustness(on_invalid: str, clip_norm, noise_multiplier) -> None:
    if on_invalid not in ("raise", "skip"):
        raise ValueError(f"on_invalid: expected 'raise' or 'skip', got {on_invalid!r}")
    if clip_norm is not None and not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm: expected a positive finite number or None, got {clip_norm!r}")
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier: expected a finite number >= 0, got {noise_multiplier!r}")
    if noise_multiplier > 0 and clip_norm is None:
        raise ValueError("noise_multiplier: requires clip_norm (the noise is calibrated to the clipped norm)")
