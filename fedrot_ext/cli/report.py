"""The JSON report: per-module aggregation error, the λ used, rotation angles, dropped clients."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from .._ops import procrustes_rotation
from .._types import align_uses, module_align
from ..methods import get_method
from ..peft.error import state_dict_aggregation_error
from ..peft.keys import parse_lora_keys


def _rotation_angles(clients, reference, align: str, lam: Dict[str, float]) -> List[float]:
    """Per (module, client): the largest rotation angle (degrees) of the client's rotation onto the reference,
    the eigen-angles of R_i solved as the op does (M_i = A_i Āᵀ and/or B_iᵀ B̄, mirrored for embeddings, with
    the module's λ). Modules whose client rank differs from the reference's are left out (their rotation
    acts on the zero-padded factors), as are modules without a λ."""
    modules, _ = parse_lora_keys(reference.keys(), owner="reference")
    angles = []
    for m in modules:
        if m.name not in lam:
            continue
        use_A, use_B = align_uses(module_align(align, m.embedding))
        ref_A, ref_B = reference[m.key_A].double(), reference[m.key_B].double()
        same = [c for c in clients if c[m.key_A].shape == ref_A.shape and c[m.key_B].shape == ref_B.shape]
        if not same:
            continue
        M = torch.zeros(len(same), ref_A.shape[0], ref_A.shape[0], dtype=torch.float64)
        if use_A:
            M += torch.stack([c[m.key_A].double() @ ref_A.T for c in same])
        if use_B:
            M += torch.stack([c[m.key_B].double().T @ ref_B for c in same])
        R = procrustes_rotation(M, lam[m.name])
        eig = torch.linalg.eigvals(R).angle().abs().amax(dim=-1)
        angles.extend(math.degrees(a) for a in eig.tolist())
    return angles


def _summary(values: Sequence[float]) -> Optional[Dict[str, float]]:
    if not values:
        return None
    s = sorted(values)
    return {"count": len(s), "mean": sum(s) / len(s), "median": s[len(s) // 2], "max": s[-1]}


def build_report(*, method: str, align: Optional[str], lam, lam_used: Dict[str, float], clients, kept, weights, reference,
                 aggregated, dirs, lora_config=None) -> dict:
    """`lam`: the setting (a float or "auto"); `lam_used`: {module: λ} as applied; `kept`: indices of
    the clients that were aggregated (all minus the dropped ones)."""
    kept_states = [clients[i] for i in kept]
    kept_weights = None if weights is None else [weights[i] for i in kept]
    errors = {}
    if (method == "merge" or get_method(method).factor_error) and kept_states:  # a merge outputs factors
        errors = {name: {"absolute": a, "relative": r} for name, (a, r) in
                  state_dict_aggregation_error(kept_states, aggregated, weights=kept_weights, lora_config=lora_config).items()}
    angles = None
    if align not in (None, "none") and reference is not None:
        angles = _summary(_rotation_angles(kept_states, reference, align, lam_used or {}))
    relative = [e["relative"] for e in errors.values()]
    return {
        "method": method,
        "clients": [str(d) for d in dirs],
        "align": align,
        "lam": lam,
        "lam_per_module": dict(lam_used),
        "aggregation_error": errors,
        "aggregation_error_relative_mean": sum(relative) / len(relative) if relative else None,
        "rotation_angles_deg": angles,
        "dropped": [{"client": i, "dir": str(dirs[i]), "reason": reason} for i, reason in getattr(aggregated, "dropped", ())],
    }
