"""Merge LoRA adapters that were trained from independent initialisations.

``method="procrustes"`` (the default) is described here; the core-space merges ("svd", "cat",
"ties", "tsv") in :mod:`fedrot_ext.peft.core_merge`.

Clients that never shared a starting adapter hold factors in unrelated latent bases
(B_i A_i = (B_i R)(Rᵀ A_i) for every orthogonal R), so averaging their factors
cancels most of the update. :func:`merge_adapters` aligns every client to a common
reference by hard Procrustes (λ = 1), averages, and realigns to that average until
it stops moving: the generalised Procrustes iteration. Each pass is one fused op call
over all modules (``fedrot_ext.peft.aggregate.fused_average``).

Convergence: after pass k the change is the relative Frobenius change of all
aggregated factors together, ``sqrt(Σ_m ‖Ā_m^k − Ā_m^{k−1}‖² + ‖B̄_m^k − B̄_m^{k−1}‖²)
/ sqrt(Σ_m ‖Ā_m^{k−1}‖² + ‖B̄_m^{k−1}‖²)`` (pass 0 is the reference); the loop stops
when it falls below ``tol`` or after ``iterations`` passes.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .._checks import normalized_weights, overflow_error
from .._stacking import nonfinite_index, pad_rank
from .._types import module_align
from ..metrics import error_of_factors
from .aggregate import AggregatedState, average_others, check_overflow, fused_average
from .batch import FactorSet, collect_clients, collect_reference, rescale_padded, stack_factors, stack_others
from .core_merge import CORE_METHODS, core_ranks, merge_module
from .model import rank_rescale
from .policy import invalid_client_error

__all__ = ["MergedState", "merge_adapters"]

MERGE_ALIGN_MODES = ("A", "B", "AB")
MERGE_METHODS = ("procrustes",) + CORE_METHODS
PROCRUSTES_DEFAULTS = dict(align="AB", reference=None, iterations=10, tol=1e-6, allow_reflection=False)


class MergedState(AggregatedState):
    """:class:`AggregatedState` of a merge, with its diagnostics.

    Attributes:
        errors: {module name: (absolute, relative)} aggregation error ‖Σ w_i B_i A_i − B̄ Ā‖_F
            of the merged factors (as :func:`fedrot_ext.state_dict_aggregation_error`).
        iterations: number of align-and-average passes run (1 ≤ iterations ≤ the limit).
        changes: the relative change after each pass (see the module docstring).
        converged: True when the last change fell below ``tol``.
    """

    def __init__(self, tensors=(), errors=None, iterations: int = 0, changes=(), converged: bool = False):
        super().__init__(tensors)
        self.errors = dict(errors or {})
        self.iterations = int(iterations)
        self.changes = tuple(changes)
        self.converged = bool(converged)


def _check_options(align, iterations, tol) -> None:
    if align not in MERGE_ALIGN_MODES:
        raise ValueError(f"align: expected one of {MERGE_ALIGN_MODES} (a merge must align), got {align!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations: expected an int >= 1, got {iterations!r}")
    if isinstance(tol, (str, bytes, bool)):
        raise TypeError(f"tol: expected a non-negative float, got {type(tol).__name__} {tol!r}")
    try:
        tol_f = float(tol)
    except (TypeError, ValueError):
        raise TypeError(f"tol: expected a non-negative float, got {type(tol).__name__}") from None
    if not tol_f >= 0.0 or tol_f == float("inf"):  # also rejects NaN
        raise ValueError(f"tol: expected a finite value >= 0, got {tol_f}")


def _relative_change(new_A, new_B, old_A, old_B) -> torch.Tensor:
    """Relative Frobenius change of all factors together, as a 0-d float64 tensor (no host sync)."""
    diff = sum((n.double() - o.double()).square().sum() for n, o in zip(new_A + new_B, old_A + old_B))
    base = sum(o.double().square().sum() for o in old_A + old_B)
    return torch.where(base > 0, diff.sqrt() / base.clamp_min(1e-300).sqrt(), torch.where(diff > 0, torch.inf, 0.0))


def merge_adapters(
    client_states: Sequence[Mapping[str, torch.Tensor]],
    *,
    weights=None,
    method: str = "procrustes",
    rank: Optional[int] = None,
    density: Optional[float] = None,
    align: Optional[str] = None,
    reference: Optional[Mapping[str, torch.Tensor]] = None,
    iterations: Optional[int] = None,
    tol: Optional[float] = None,
    allow_reflection: Optional[bool] = None,
    lora_config=None,
) -> MergedState:
    """Merge N independently trained peft adapters into one.

    Args:
        client_states: N adapter state dicts with the same keys (as :func:`fedrot_ext.aggregate_state_dicts`);
            ranks of one module may differ.
        weights: (N,) non-negative client weights (e.g. sample counts), normalised; None: uniform.
        method: "procrustes" (default): generalised Procrustes, the factors aligned and averaged at the
            largest rank (see the module docstring). In core space (:mod:`fedrot_ext.peft.core_merge`, never
            an out × in matrix): "svd" (the truncated SVD of Σ w_i s_i B_i A_i, as peft's svd merge), "cat"
            (exact, at rank Σ r_i, as peft's cat), "ties" and "tsv" (interference-aware merges).
        rank: the output rank of "svd", "ties" and "tsv" (default: the largest client rank of each module).
        density: the fraction of each client's core entries "ties" keeps (default 0.2).
        align, reference, iterations, tol, allow_reflection: "procrustes" only (defaults "AB", the heaviest
            client, 10, 1e-6, False): the factors the rotation matches ("AB", "A" or "B"); the adapter the
            first pass aligns to; the most align-and-average passes; the relative change to stop below;
            rotations over O(r) instead of SO(r).
        lora_config: the adapters' LoraConfig; required when a client's rank differs from the output's
            (each client keeps its own LoRA scaling, s_i = alpha / r_i, and the result loads at the output
            rank's: with "cat", always, unless there is one client).

    Returns:
        :class:`MergedState`: the merged adapter (keys, key order and dtypes of the clients;
        non-LoRA tensors weighted-averaged, non-floating ones copied when equal), loadable with
        ``set_peft_model_state_dict`` into a model whose LoraConfig has the output ranks, plus
        ``errors``, ``iterations``, ``changes``, ``converged``.

    Raises:
        ValueError/TypeError naming the argument (or the client and key), as
        :func:`fedrot_ext.aggregate_state_dicts` does: an unknown method, an option the method does not
        take, a bad rank, density, align, iterations or tol, or NaN/Inf in a client. Inputs are never modified.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"method: expected one of {MERGE_METHODS}, got {method!r}")
    procrustes = {k: v for k, v in dict(align=align, reference=reference, iterations=iterations, tol=tol,
                                         allow_reflection=allow_reflection).items() if v is not None}
    if method == "procrustes":
        for name, value in (("rank", rank), ("density", density)):
            if value is not None:
                raise ValueError(f"{name}: not an option of method 'procrustes' (it keeps the largest rank; "
                                 "pass method='svd', 'ties' or 'tsv' for another rank)")
        return _procrustes_merge(client_states, weights, lora_config, **{**PROCRUSTES_DEFAULTS, **procrustes})
    if procrustes:
        raise ValueError(f"{', '.join(sorted(procrustes))}: options of method 'procrustes', not of {method!r}")
    return _core_merge(client_states, weights, method, _check_rank(method, rank), _check_density(method, density), lora_config)


def _check_rank(method: str, rank):
    if rank is None:
        return None
    if method == "cat":
        raise ValueError("rank: method 'cat' is exact at rank Σ r_i; pass method='svd' for another rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
    return rank


def _check_density(method: str, density) -> float:
    if density is None:
        return 0.2
    if method != "ties":
        raise ValueError(f"density: an option of method 'ties', not of {method!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density: expected a number in (0, 1], got {density!r}")
    return float(density)


def _core_merge(client_states, weights, method: str, rank, density: float, lora_config) -> MergedState:
    batch = collect_clients(client_states)
    w = normalized_weights(weights, len(batch.states), torch.device("cpu"), torch.float64)
    for m in batch.modules:  # a NaN would spread through the QR into every merged value: name it first
        for state, label in zip(batch.states, batch.labels):
            for key in (m.key_A, m.key_B):
                if not bool(torch.isfinite(state[key]).all()):
                    raise invalid_client_error(f"{label}[{key!r}]", hint=False)
    merged = dict(average_others(batch, stack_others(batch), w))
    errors: Dict[str, tuple] = {}
    for m, ranks in zip(batch.modules, batch.ranks):
        out_rank = core_ranks(method, ranks, rank)
        ratios = [rank_rescale(lora_config, r, out_rank, f"{label}[{m.key_A!r}]") ** 2 for r, label in zip(ranks, batch.labels)]
        A = [s[m.key_A] for s in batch.states]
        B = [s[m.key_B] for s in batch.states]
        new_A, new_B, error = merge_module(method, A, B, w.tolist(), ratios, out_rank, density)
        merged[m.key_A], merged[m.key_B] = new_A.to(A[0].dtype), new_B.to(B[0].dtype)
        errors[m.name] = error
    if nonfinite_index([merged[k] for m in batch.modules for k in (m.key_A, m.key_B)]) is not None:
        raise overflow_error("client_states", {merged[m.key_A].dtype for m in batch.modules})
    tensors = ((k, merged[k]) for k in batch.states[0] if k in merged)
    return MergedState(tensors, errors, 1, (), True)


def _procrustes_merge(client_states, weights, lora_config, *, align, reference, iterations, tol, allow_reflection) -> MergedState:
    _check_options(align, iterations, tol)
    batch = collect_clients(client_states)
    w = normalized_weights(weights, len(batch.states), torch.device("cpu"), torch.float64)
    if reference is None:
        ranks = [max(rs) for rs in batch.ranks]
        A, B = stack_factors(batch, ranks)
        rescale_padded(batch, A, B, lora_config)
        heaviest = int(torch.argmax(w))
        refs = FactorSet([a[heaviest] for a in A], [b[heaviest] for b in B], ranks)
    else:
        refs = collect_reference(reference, batch, "AB")
        ranks = [max(rs + [r]) for rs, r in zip(batch.ranks, refs.rank)]
        A, B = stack_factors(batch, ranks)
        rescale_padded(batch, A, B, lora_config)
    others = average_others(batch, stack_others(batch), w)

    aligns = [module_align(align, m.embedding) for m in batch.modules]
    cur_A, cur_B = refs.A, refs.B
    changes: List[float] = []
    statuses = []
    for _ in range(iterations):
        new_A, new_B, status, _ = fused_average(A, B, FactorSet(cur_A, cur_B, ranks), w, aligns, 1.0, allow_reflection)
        statuses += status
        old_A = [pad_rank(o, r, 0) for o, r in zip(cur_A, ranks)]  # a smaller reference rank, zero-padded
        old_B = [pad_rank(o, r, 1) for o, r in zip(cur_B, ranks)]
        change = _relative_change(new_A, new_B, old_A, old_B)
        cur_A, cur_B = new_A, new_B
        changes.append(float(change))  # one host read per pass decides whether to go on
        if changes[-1] < tol:
            break
    check_overflow(statuses, A)

    as64 = lambda ts: [t.double() for t in ts]  # noqa: E731
    err = error_of_factors(as64(A), as64(B), as64(cur_A), as64(cur_B), w.to(batch.device))
    values = torch.stack([err.absolute, err.relative], dim=1).tolist()
    errors: Dict[str, tuple] = {m.name: (v[0], v[1]) for m, v in zip(batch.modules, values)}

    merged = dict(others)
    for m, a, b in zip(batch.modules, cur_A, cur_B):
        merged[m.key_A], merged[m.key_B] = a, b
    tensors = ((k, merged[k]) for k in batch.states[0] if k in merged)
    return MergedState(tensors, errors, len(changes), changes, changes[-1] < tol)
