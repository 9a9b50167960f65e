"""Robustness options of :func:`fedrot_ext.aggregate_state_dicts`: invalid clients, clipping, noise.

The same policy as the core op (:func:`fedrot_ext.align_and_aggregate`), over whole adapter
state dicts and for every method. The building blocks (invalid-row detection, weight
renormalisation, Gram-based update norms, clip scales, noise calibration) are those of
:mod:`fedrot_ext._robust`, whose docstring states what clipping and noise guarantee and,
as importantly, what they do not.

- ``on_invalid``: a client is invalid when any of its floating tensors, LoRA factor or not
  (classifier head, bias, modules_to_save), holds NaN/Inf. "raise" names the client and key;
  "skip" drops the client and renormalises the weights over the others, so that the result
  equals aggregating without it; ``AggregatedState.dropped`` says who and why.
- ``clip_norm``: client i's whole update ‖ΔW_i‖_F = (Σ_m ‖B_im A_im‖_F²)^½ over all LoRA modules,
  in factor units (without peft's lora_alpha / r), from r×r Grams in float64 (a hostile
  client's huge but finite factors cannot overflow it), gives s_i = min(1, clip_norm / ‖ΔW_i‖_F).
  The scale is applied to fresh stacked copies of the factors before the method runs, split
  so that the client's update becomes s_i ΔW_i (:meth:`fedrot_ext.methods.Method.clip_exponents`):
  both factors by √s_i for fedrot, fedit, flexlora, fedex and flora (rotations are
  scale-invariant, so fedrot's equal those without clipping); the trained factor by s_i and
  the frozen one untouched for ffa and rolora; A by s_i for fedsa (B stays personal).
  Non-LoRA tensors are neither clipped nor noised.
- ``noise_multiplier``: N(0, σ²) with σ = noise_multiplier · clip_norm · max_i w_i on every
  released factor that is an average of client factors (:meth:`~fedrot_ext.methods.Method.noised_factors`: not the frozen
  copies of ffa/rolora, not flora's zero B); fedex's residual is then computed against the
  noisy factors, and each ``base_deltas`` entry (fedex, flora) gets σ · s_m (its LoRA scaling)
  on top. Draws come from ``generator`` in a fixed order (all noised A, all noised B, then the
  base deltas, each in module order), so a seeded generator reproduces them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .._checks import check_robustness
from .._robust import add_gaussian_noise, clip_scales, client_update_norms, noise_std, nonfinite_rows, surviving_weights
from .._stacking import nonfinite_index
from .batch import ClientBatch, factor_keys, stack_factors, stack_others

Dropped = Tuple[Tuple[int, str], ...]


@dataclass(frozen=True)
class Policy:
    """The robustness arguments of one aggregation, validated on construction.

    Attributes:
        on_invalid: "raise" or "skip".
        clip_norm: bound on each client's whole update ‖ΔW_i‖_F, or None.
        noise_multiplier: Gaussian noise scale in units of clip_norm · max_i w_i (0: none).
        generator: torch.Generator for the noise (on the clients' device), or None.

    Raises:
        ValueError naming the argument (via ``_checks.check_robustness``).
    """

    on_invalid: str = "raise"
    clip_norm: Optional[float] = None
    noise_multiplier: float = 0.0
    generator: Optional[torch.Generator] = None

    def __post_init__(self):
        check_robustness(self.on_invalid, self.clip_norm, self.noise_multiplier)


def screen_clients(
    batch: ClientBatch,
    weights,
    w: torch.Tensor,
    on_invalid: str,
    ranks_of: Callable[[ClientBatch], List[int]],
):
    """Stack every client's tensors and apply the invalid-client policy.

    One host synchronisation when everything is finite; otherwise the slow path finds,
    per client, the first key holding NaN/Inf (A keys, then B keys, then other keys).

    Args:
        batch: the validated clients.
        weights: the caller's weights (validated), for renormalising over the kept clients.
        w: the normalised float64 weights of all clients.
        on_invalid: "raise" or "skip".
        ranks_of: the rank to pad each module to, for a batch.

    Returns:
        (batch, A, B, other stacks, w, dropped): the kept clients and their fresh stacks
        (as ``stack_factors`` / ``stack_others`` give them), their renormalised weights,
        and ``(client index, reason)`` per dropped client.

    Raises:
        ValueError naming the client and key (on_invalid="raise"); with "skip", when every
        client is invalid or every valid client has weight 0.
    """
    A, B = stack_factors(batch, ranks_of(batch), check=False)
    others = stack_others(batch, check=False)
    floating = [(key, t) for key, t in zip(batch.other_keys, others) if t.is_floating_point()]
    stacks = A + B + [t for _, t in floating]
    if nonfinite_index(stacks) is None:
        return batch, A, B, others, w, ()
    keys = factor_keys(batch) + [key for key, _ in floating]
    bad = {i: f"{batch.labels[i]}[{keys[k]!r}]" for i, k in nonfinite_rows(stacks).items()}
    if on_invalid == "raise":
        raise invalid_client_error(bad[min(bad)], hint=len(batch.states) > 1)
    del A, B, others, floating, stacks  # re-stacked below: the kept clients may need a smaller rank
    kept, w = surviving_weights(weights, len(batch.states), bad, torch.device("cpu"), torch.float64, "client_states")
    dropped = tuple((i, dropped_reason(bad[i])) for i in sorted(bad))
    batch = batch.subset(kept)
    A, B = stack_factors(batch, ranks_of(batch))
    return batch, A, B, stack_others(batch), w, dropped


def invalid_client_error(where: str, hint: bool = True) -> ValueError:
    """on_invalid="raise": `where` (``client_states[i]['key']``) holds NaN/Inf."""
    tail = " (pass on_invalid='skip' to drop this client)" if hint else ""
    return ValueError(f"{where}: expected finite values, found NaN or Inf{tail}")


def dropped_reason(where: str) -> str:
    """on_invalid="skip": the reason recorded in ``dropped`` for a client whose `where` holds NaN/Inf."""
    return f"{where} holds NaN or Inf"


def clip_clients(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], clip_norm: float, exponents: Tuple[float, float]) -> None:
    """Scale the stacked factors in place so that each client's whole update has norm <= clip_norm.

    Args:
        A, B: fresh (N, r, in) / (N, out, r) stacks of the kept clients (modified in place).
        clip_norm: the bound.
        exponents: (e_A, e_B) from :meth:`fedrot_ext.methods.Method.clip_exponents`.

    Returns:
        None; the stacks are scaled (each once, computed in float32/64 and rounded to their dtype).
    """
    scales = clip_scales(client_update_norms(A, B, torch.float64), clip_norm)
    for stacks, exponent in zip((A, B), exponents):
        if exponent == 0:
            continue
        factor = scales.pow(exponent)
        for t in stacks:
            acc = torch.float64 if t.dtype == torch.float64 else torch.float32
            t.mul_(factor.to(device=t.device, dtype=acc).view(-1, 1, 1))


def add_factor_noise(new_A, new_B, which: str, policy: Policy, w: torch.Tensor):
    """Gaussian noise on the aggregated factors named by `which`.

    Args:
        new_A, new_B: per-module aggregated factors.
        which: "A", "B" or "AB" (:meth:`fedrot_ext.methods.Method.noised_factors`).
        policy: the robustness policy (noise_multiplier > 0, clip_norm set).
        w: the normalised weights of the kept clients.

    Returns:
        (new_A, new_B) with fresh noisy tensors in place of the noised ones.
    """
    std = noise_std(policy.noise_multiplier, policy.clip_norm, w)
    if "A" in which:
        new_A = add_gaussian_noise(list(new_A), std, policy.generator)
    if "B" in which:
        new_B = add_gaussian_noise(list(new_B), std, policy.generator)
    return new_A, new_B


def add_delta_noise(base_deltas: Dict[str, torch.Tensor], scalings: Sequence[float], policy: Policy, w: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Gaussian noise on each dense base-weight update, σ times the module's LoRA scaling.

    Args:
        base_deltas: {module path: scaled ΔW}, in module order.
        scalings: each module's LoRA scaling s_m, in the same order.
        policy: the robustness policy.
        w: the normalised weights of the kept clients.

    Returns:
        A new dict with noisy tensors.
    """
    std = noise_std(policy.noise_multiplier, policy.clip_norm, w)
    return {path: add_gaussian_noise([d], std * s, policy.generator)[0] for (path, d), s in zip(base_deltas.items(), scalings)}
