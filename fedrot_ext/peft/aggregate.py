"""Aggregation over peft adapter state dicts: FedRot-LoRA and every baseline behind one call.

Server-side placement: :func:`aggregate_state_dicts` aligns and averages all clients'
factors of all modules in one fused op call. Client-side placement:
:func:`align_state_dict` rotates one client's factors before upload, and the server
runs plain FedAvg (``method="fedit"``); both give the same result to rounding.

Heterogeneous ranks (one module with different ranks on different clients, or a
reference of another rank) are zero-padded to the largest rank, HetLoRA-style, for
fedrot, fedit and fedex's factor average (a zero row of A with a zero column of B adds
nothing to B A); flexlora, flora and fedex's residual are exact for them. The result
has the largest rank r_out. peft scales a rank-r client's update by s_r = alpha / r
(alpha / √r with rsLoRA), and the result loads at s_out, so a padded client's factors
are both multiplied by √(s_r / s_out): its update keeps its own scaling. That needs the
clients' ``lora_config`` (an error names it otherwise). Rotations are unchanged by it
(a polar factor ignores positive scalings). ffa, rolora and fedsa need equal ranks and
raise otherwise.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .._checks import check_lam_or_auto, layer_lams, normalized_weights, overflow_error
from .._ops import accumulate_dtype, fused_align_aggregate
from .._stacking import nonfinite_index, pad_rank
from .._types import align_uses, module_align
from ..baselines import fedex_terms, flexlora_factors, product_sums
from ..methods import METHODS, Method, check_initial, get_method
from ..schedule import alignment_for_round
from .batch import (
    ClientBatch, FactorSet, collect_clients, collect_reference, padded_factors, require_equal_ranks, rescale_padded, stack_others,
)
from .model import module_scaling, to_base_layout
from .policy import Policy, add_delta_noise, add_factor_noise, clip_clients, screen_clients

__all__ = ["METHODS", "AggregatedState", "aggregate_state_dicts", "align_state_dict"]


class AggregatedState(dict):
    """The aggregated adapter state dict, loadable with ``set_peft_model_state_dict``.

    Attributes:
        base_deltas: {module path: ΔW} to add to each module's frozen base weight, in
            that weight's layout and already scaled (``fedex``, ``flora``; empty otherwise).
            Apply with :func:`fedrot_ext.fold_into_base`.
        dropped: ``(client index, reason)`` of every client left out with ``on_invalid="skip"``
            (the index into ``client_states``; the reason names the key holding NaN/Inf).
        lam: {module: λ} the soft-rotation strength each module used in an aligned round
            (the chosen one with ``lam="auto"``); empty when nothing was aligned.
    """

    def __init__(self, tensors=(), base_deltas: Optional[Dict[str, torch.Tensor]] = None, dropped: Tuple[Tuple[int, str], ...] = (),
                 lam: Optional[Dict[str, float]] = None):
        super().__init__(tensors)
        self.base_deltas = dict(base_deltas or {})
        self.dropped = tuple(dropped)
        self.lam = dict(lam or {})


def _lead(a) -> torch.Tensor:
    """A module's factor stack (N, ...) itself, or the first of its per-client tensors."""
    return a if isinstance(a, torch.Tensor) else a[0]


def _per_dtype(A: Sequence, compute) -> list:
    """Call ``compute(idx)`` once per group of modules sharing a dtype (usually one group: the
    fused op needs one dtype per call) and put its per-module results back in module order.
    A[m]: a (N, ...) stack, or a sequence of N per-client tensors."""
    groups: Dict[torch.dtype, List[int]] = {}
    for m, a in enumerate(A):
        groups.setdefault(_lead(a).dtype, []).append(m)
    out = [None] * len(A)
    for idx in groups.values():
        for m, result in zip(idx, compute(idx)):
            out[m] = result
    return out


def _pick(tensors, idx):
    return [tensors[m] for m in idx]


def _on(w: torch.Tensor, like) -> torch.Tensor:
    """The normalised float64 weights in the accumulate dtype and on the device of `like` (a
    tensor, or a module's per-client tensors)."""
    like = _lead(like)
    return w.to(device=like.device, dtype=accumulate_dtype(like.dtype))


def fused_average(A, B, refs: Optional[FactorSet], w, aligns: Sequence[str], lam, allow_reflection: bool):
    """Rotate (each module on its own mode in `aligns`) and weighted-average every module: one
    unchecked fused op call per dtype (usually one; the clients and the reference were validated
    once, by collect_clients / collect_reference). A[m] / B[m]: (N, ...) stacks, or per-client
    tensors that the op reads in place. `lam`: a float or "auto".

    Returns (new_A, new_B, statuses, lams): the op's status flags and the (1,) λ used per
    module, as device tensors read once by the caller."""
    statuses = []

    def compute(idx):
        modes = [aligns[m] for m in idx]
        ref = lambda m, f: pad_rank((refs.A, refs.B)[f][m], _lead(A[m]).shape[-2], f) if align_uses(aligns[m])[f] else None  # noqa: E731
        out_A, out_B, _, status, lam_t = fused_align_aggregate(
            _pick(A, idx), _pick(B, idx), [ref(m, 0) for m in idx], [ref(m, 1) for m in idx], _on(w, A[idx[0]]),
            modes, layer_lams(lam, len(idx)), allow_reflection,
        )
        statuses.append(status)
        return zip(out_A, out_B, lam_t.split(1))

    new_A, new_B, lams = (list(t) for t in zip(*_per_dtype(A, compute)))
    return new_A, new_B, statuses, lams


def check_overflow(statuses, A, lams=()) -> list:
    """One host read of the op's status flags and of `lams` (device tensors); returns the λ values.

    The clients are finite (screened), so a set status flag means a half-precision overflow."""
    parts = [*statuses, *lams]
    if not parts:
        return []
    values = torch.cat([t.to(parts[0].device, torch.float64) for t in parts]).tolist()
    if any(values[:len(statuses)]):
        raise overflow_error("client_states", {a.dtype for a in A})
    return values[len(statuses):]


def _flexlora(A, B, w):
    pairs = _per_dtype(A, lambda idx: zip(*flexlora_factors(_pick(A, idx), _pick(B, idx), _on(w, A[idx[0]]))))
    return [list(t) for t in zip(*pairs)]


def _identical_on_clients(batch: ClientBatch, stacks, keys, why: str) -> List[torch.Tensor]:
    """Copy of each (N, ...) stack's first row, after checking all rows are equal (one sync)."""
    if stacks:
        flags = torch.stack([(s == s[:1]).all() for s in stacks])
        if not bool(flags.all()):
            bad = int((~flags).nonzero()[0, 0])
            s = stacks[bad]
            client = next(i for i in range(1, s.shape[0]) if not torch.equal(s[i], s[0]))
            raise differs_error(batch.labels[client], keys[bad], batch.labels[0], why)
    return [s[0].clone() for s in stacks]


def differs_error(label: str, key: str, first_label: str, why: str) -> ValueError:
    """A tensor that must be identical on every client differs from the first client's."""
    return ValueError(f"{label}[{key!r}]: differs from {first_label}'s, but {why}")


NOT_AVERAGED = "a non-floating tensor cannot be averaged"


def average_others(batch: ClientBatch, stacks, w: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Weighted average of every floating non-factor tensor; others must agree across clients."""
    out = {}
    fixed = [(key, s) for key, s in zip(batch.other_keys, stacks) if not s.is_floating_point()]
    for key, s in zip(batch.other_keys, stacks):
        if s.is_floating_point():
            acc = accumulate_dtype(s.dtype)
            out[key] = torch.tensordot(w.to(s.device, acc), s.to(acc), dims=1).to(s.dtype)
    copies = _identical_on_clients(batch, [s for _, s in fixed], [k for k, _ in fixed], NOT_AVERAGED)
    out.update((key, t) for (key, _), t in zip(fixed, copies))
    return out


def _dense_updates(spec: Method, batch, A, B, new_A, new_B, w, lora_config, scalings) -> Dict[str, torch.Tensor]:
    """FedEx residuals or FLoRA merges, scaled and in each base weight's layout."""

    def compute(idx):
        w_dev = _on(w, A[idx[0]])
        if spec.output == "residual":
            return fedex_terms(_pick(A, idx), _pick(B, idx), _pick(new_A, idx), _pick(new_B, idx), w_dev)
        return product_sums(_pick(A, idx), _pick(B, idx), w_dev)

    deltas: Dict[str, torch.Tensor] = {}
    for module, dense, s in zip(batch.modules, _per_dtype(A, compute), scalings):
        put_base_delta(deltas, spec, module, dense * s, lora_config)
    return deltas


def check_finite_deltas(deltas: Dict[str, torch.Tensor]) -> None:
    """The clients are finite (screened), so a NaN/Inf base delta is an overflow of Σ w_i B_i A_i: refuse it."""
    if deltas and nonfinite_index(list(deltas.values())) is not None:
        raise overflow_error("client_states", {t.dtype for t in deltas.values()})


def put_base_delta(deltas: Dict[str, torch.Tensor], spec: Method, module, scaled: torch.Tensor, lora_config) -> None:
    """Store one module's scaled (out, in) update in its base weight's layout; one update per base weight."""
    if module.path in deltas:
        raise ValueError(f"client_states: {module.key_A!r} shares its base weight with another adapter; aggregate one adapter at a time for {spec.name!r}")
    deltas[module.path] = to_base_layout(scaled, module, lora_config)


def _frozen_copies(spec: Method, batch, A, B, round, frozen: str):
    """ffa / rolora: the factor that did not train, checked equal on all clients and copied."""
    stacks, keys = (A, [m.key_A for m in batch.modules]) if frozen == "A" else (B, [m.key_B for m in batch.modules])
    return _identical_on_clients(batch, stacks, keys, frozen_reason(spec, round, frozen))


def frozen_reason(spec: Method, round, frozen: str) -> str:
    """Why a frozen factor must be identical on every client (the tail of :func:`differs_error`)."""
    when = f" in round {round}" if spec.frozen == "alternate" else ""
    return f"method {spec.name!r} keeps lora_{frozen} frozen{when} (see set_trainable_factor)"


def require_lora_config(spec: Method, lora_config) -> None:
    if spec.dense and lora_config is None:
        raise ValueError(f"lora_config: required for method {spec.name!r} (r, lora_alpha and fan_in_fan_out decide the base-weight update)")


def require_reference(reference, align: str, round) -> None:
    if align != "none" and reference is None:
        raise ValueError(f"reference: required to align on {align} in round {round} (the previous global adapter), got None")


def reads_in_place(spec: Method, frozen: Optional[str], policy: Policy) -> bool:
    """Whether every client factor goes into the fused op as it is (no clip scaling, no frozen copy,
    no dense term): then the op reads the clients where they lie and screens them as it reads."""
    return spec.output == "factors" and not frozen and policy.clip_norm is None


def _aggregate_in_place(batch: ClientBatch, refs: Optional[FactorSet], w, aligns, lam, allow_reflection: bool, ranks, lora_config):
    """The factor methods at default settings: one fused op call over the clients' own tensors (no
    stack, no NaN/Inf pre-scan) plus the average of the non-factor tensors.

    A NaN/Inf in any client value or reference makes an aggregate NaN/Inf (every value is multiplied
    into the sums, by a zero weight too), which the op's status and the averages' check report.
    Returns (new_A, new_B, others, λ per module), or None when something was flagged: the caller
    then screens the clients, which names the client and key (or the overflow)."""
    A = [padded_factors(batch, m, r, 0, lora_config) for m, r in zip(batch.modules, ranks)]
    B = [padded_factors(batch, m, r, 1, lora_config) for m, r in zip(batch.modules, ranks)]
    others = average_others(batch, stack_others(batch, check=False), w)
    new_A, new_B, statuses, lams = fused_average(A, B, refs, w, aligns, lam, allow_reflection)
    flags = [s.to("cpu", torch.float64) for s in statuses]
    flags += [torch.isfinite(t).all().logical_not().to("cpu", torch.float64).view(1) for t in others.values() if t.is_floating_point()]
    chosen = [t.to("cpu", torch.float64) for t in lams] if lam == "auto" else []
    values = torch.cat(flags + chosen).tolist()  # the one host synchronisation
    if any(values[:len(flags)]):
        return None
    chosen = values[len(flags):] if lam == "auto" else [lam] * len(lams)
    return new_A, new_B, others, chosen


def _pads(batch: ClientBatch, ranks) -> bool:
    """Whether some client's rank is below its module's aggregate rank (it is then zero-padded)."""
    return any(r != rank for rs, rank in zip(batch.ranks, ranks) for r in rs)


def _aggregate(client_states, reference, weights, method, round, lam, schedule, initial, allow_reflection, lora_config,
               labels=None, policy: Policy = Policy()) -> AggregatedState:
    spec = get_method(method)
    lam = check_lam_or_auto(lam)
    initial = check_initial(initial)
    align = alignment_for_round(round, schedule, initial) if spec.aligns else "none"
    frozen = spec.frozen_factor(round, initial)
    require_lora_config(spec, lora_config)
    batch = collect_clients(client_states, labels)
    if spec.equal_ranks:
        require_equal_ranks(batch, method)
    w = normalized_weights(weights, len(batch.states), torch.device("cpu"), torch.float64)
    refs = None
    aligns = [module_align(align, m.embedding) for m in batch.modules]
    in_place = reads_in_place(spec, frozen, policy)
    if align != "none":
        require_reference(reference, align, round)
        refs = collect_reference(reference, batch, aligns, check_finite=not in_place)
    ranks_of = lambda b: [max(rs + ([refs.rank[m]] if refs else [])) for m, rs in enumerate(b.ranks)]  # noqa: E731
    if in_place:
        padded = lora_config is None and _pads(batch, ranks_of(batch))  # screened first: a dropped client may be the one padded
        done = None if padded else _aggregate_in_place(batch, refs, w, aligns, lam, allow_reflection, ranks_of(batch), lora_config)
        if done is not None:
            new_A, new_B, others, chosen = done
            lam_used = dict(zip((m.name for m in batch.modules), chosen)) if align != "none" else {}
            return _assemble(batch, others, new_A, [None] * len(new_A) if spec.personal == "B" else new_B, {}, (), lam_used)
        if refs is not None:  # flagged or unscaled: the screening path below names the NaN/Inf reference key or client
            refs = collect_reference(reference, batch, aligns)
    batch, A, B, other_stacks, w, dropped = screen_clients(batch, weights, w, policy.on_invalid, ranks_of)
    scalings = [module_scaling(lora_config, m, rs, method) for m, rs in zip(batch.modules, batch.ranks)] if spec.dense else None
    others = average_others(batch, other_stacks, w)
    if policy.clip_norm is not None:  # each client in its own factor units, before it is rescaled to the padded rank
        clip_clients(A, B, policy.clip_norm, spec.clip_exponents(frozen))
    rescale_padded(batch, A, B, lora_config)

    statuses, lams = [], []
    if spec.output == "refactor":
        new_A, new_B = _flexlora(A, B, w)
    else:
        new_A, new_B, statuses, lams = fused_average(A, B, refs, w, aligns, lam, allow_reflection)
    if frozen:
        copies = _frozen_copies(spec, batch, A, B, round, frozen)
        new_A, new_B = (copies, new_B) if frozen == "A" else (new_A, copies)
    chosen = check_overflow(statuses, A, lams if lam == "auto" else ())
    lam_used = {}
    if align != "none" and lams:
        lam_used = dict(zip((m.name for m in batch.modules), chosen if lam == "auto" else [lam] * len(lams)))
    if policy.noise_multiplier > 0:  # before fedex's residual, which is exact for the factors sent
        new_A, new_B = add_factor_noise(new_A, new_B, spec.noised_factors(frozen), policy, w)
    base_deltas = _dense_updates(spec, batch, A, B, new_A, new_B, w, lora_config, scalings) if spec.dense else {}
    if base_deltas and policy.noise_multiplier > 0:
        base_deltas = add_delta_noise(base_deltas, scalings, policy, w)
    check_finite_deltas(base_deltas)
    if spec.output == "merge":
        new_B = [torch.zeros_like(b) for b in new_B]  # the update now lives in the base weight
    if spec.personal == "B":
        new_B = [None] * len(A)  # each client keeps its own B

    return _assemble(batch, others, new_A, new_B, base_deltas, dropped, lam_used)


def _assemble(batch: ClientBatch, others, new_A, new_B, base_deltas, dropped, lam_used) -> AggregatedState:
    """The result in the first client's key order (a None B: left out, each client keeps its own)."""
    values = dict(others)
    for m, a, b in zip(batch.modules, new_A, new_B):
        values[m.key_A] = a
        if b is not None:
            values[m.key_B] = b
    return AggregatedState(((k, values[k]) for k in batch.states[0] if k in values), base_deltas, dropped, lam_used)


def aggregate_state_dicts(
    client_states: Sequence[Mapping[str, torch.Tensor]],
    *,
    reference: Optional[Mapping[str, torch.Tensor]] = None,
    weights=None,
    method: str = "fedrot",
    round: Optional[int] = None,
    lam=0.5,
    schedule: str = "alternate",
    initial: Optional[str] = None,
    allow_reflection: bool = False,
    lora_config=None,
    on_invalid: str = "raise",
    clip_norm: Optional[float] = None,
    noise_multiplier: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> AggregatedState:
    """Aggregate N clients' peft adapter state dicts with FedRot-LoRA or a baseline.

    LoRA factors are paired per module by key structure (saved ``...lora_A.weight`` or
    live ``...lora_A.<adapter>.weight``, ``lora_embedding_A/B``); every other tensor
    (classifier head, modules_to_save, biases) is weighted-averaged, never rotated
    (non-floating tensors must agree and are copied). Keys, key order and dtypes are kept.

    Methods (each one's rules: :data:`fedrot_ext.methods.METHOD_TABLE`; definitions: docs/METHOD.md):
        ``fedrot``: rotate each client onto ``reference`` (mode from the round schedule:
            round 0 none, then alternate from ``initial``, default "A"), then average.
        ``fedit``: plain factor-wise average (also the FedAvg step after :func:`align_state_dict`).
        ``ffa``: B averaged, A copied; A must be identical on all clients (frozen at the
            shared init, see :func:`fedrot_ext.set_trainable_factor`).
        ``rolora``: the factor trained this round (:func:`fedrot_ext.rolora_trained_factor`,
            ``initial`` default "B") averaged, the frozen one copied (must be identical).
        ``fedsa``: A averaged; lora_B keys are left out, so loading the result keeps each
            client's personal B.
        ``flexlora``: truncated SVD of Σ w_i B_i A_i (:func:`fedrot_ext.flexlora_aggregate`).
        ``fedex``: FedIT factors plus ``base_deltas`` = s (Σ w_i B_i A_i − B̄ Ā).
        ``flora``: ``base_deltas`` = s Σ w_i B_i A_i; the adapter returns with B = 0 and A
            the average (re-initialise A if you want FLoRA's fresh adapter).

    Args:
        client_states: N state dicts with the same keys (``get_peft_model_state_dict`` output,
            :func:`fedrot_ext.load_adapter` output, or a live model's ``state_dict()``).
        reference: the previous global adapter (same keys); needed by ``fedrot`` when the
            round aligns, cast to the clients' dtype/device.
        weights: (N,) non-negative client weights (e.g. sample counts), normalised; None: uniform.
        method: one of :data:`METHODS`.
        round: 0-based round index. Required (ValueError when omitted) by ``fedrot`` with
            ``schedule="alternate"`` and by ``rolora``; with a fixed schedule, None aligns
            every call, as round >= 1 would.
        lam: soft-rotation strength in [0, 1] (``fedrot``), or "auto": per module and round, the
            λ of (0, 0.25, 0.5, 0.75, 1) whose aggregate has the smallest aggregation error,
            scored exactly from r×r Grams (see :func:`fedrot_ext.align_and_aggregate`); never
            worse than FedIT on any module. The λ used is in ``AggregatedState.lam``.
        schedule: "alternate", "A", "B", "AB" or "none" (``fedrot``).
        initial: first factor of the schedule; None means "A" for fedrot, "B" for rolora.
        allow_reflection: rotate over O(r) instead of SO(r) (``fedrot``).
        lora_config: the clients' peft LoraConfig (or adapter_config.json dict); required by
            ``fedex`` and ``flora`` for the scaling and the base layout (``fan_in_fan_out``), and
            by every method when ranks differ (each client keeps its own scaling, see above).
        on_invalid: "raise" (default) raises naming the client and key of a NaN/Inf in any of
            its floating tensors; "skip" drops such clients, renormalises the weights over the
            others (the result equals aggregating without them) and lists them in ``dropped``.
        clip_norm: if set, each client's whole update ‖ΔW_i‖_F over all LoRA modules (factor
            units, from r×r Grams) is clipped to it by scaling its factors before the method
            runs: √s_i on both for fedrot/fedit/flexlora/fedex/flora, s_i on the trained factor
            for ffa/rolora, s_i on A for fedsa (details: :mod:`fedrot_ext.peft.policy`). A client
            of a smaller rank is clipped in its own factor units, before it is rescaled (see above).
        noise_multiplier: if > 0 (needs clip_norm), Gaussian noise of std
            noise_multiplier · clip_norm · max_i w_i on the aggregated (not copied) factors, and
            times each module's scaling on ``base_deltas``. Noise injection, NOT a formal
            differential-privacy guarantee (the factors' sensitivity is not bounded by the
            product clip; heads are neither clipped nor noised): see :mod:`fedrot_ext._robust`.
        generator: torch.Generator on the clients' device for the noise, for reproducibility.

    Returns:
        :class:`AggregatedState`: the aggregated state dict, plus ``base_deltas`` and ``dropped``.
        Bitwise identical across calls and CPU thread counts, except ``flexlora``: its QR/SVD
        run in LAPACK, whose blocking follows the thread count, so it is bitwise reproducible
        at a fixed thread count and equal to rounding across thread counts.

    Raises:
        ValueError/TypeError naming the client and key: unknown method, unpaired A/B keys,
        a client missing a module, shape/dtype disagreements, NaN/Inf (unless skipped), a
        reference missing a key, unequal ranks for ffa/rolora/fedsa, a changed frozen factor;
        naming the argument for a bad on_invalid, clip_norm or noise_multiplier; with "skip",
        when no client is left or every kept client has weight 0. Inputs are never modified.
    """
    policy = Policy(on_invalid, clip_norm, noise_multiplier, generator)
    return _aggregate(client_states, reference, weights, method, round, lam, schedule, initial, allow_reflection, lora_config,
                      policy=policy)


def align_state_dict(
    client_state: Mapping[str, torch.Tensor],
    *,
    reference: Optional[Mapping[str, torch.Tensor]] = None,
    round: Optional[int] = None,
    lam: float = 0.5,
    schedule: str = "alternate",
    initial: Optional[str] = None,
    allow_reflection: bool = False,
) -> Dict[str, torch.Tensor]:
    """Client-side FedRot-LoRA: rotate one client's adapter onto the global one before upload.

    The server then runs plain FedAvg (``aggregate_state_dicts(..., method="fedit")``), which
    equals server-side ``method="fedrot"`` to rounding and allows secure aggregation.

    Args:
        client_state: this client's adapter state dict after local training.
        reference: the global adapter the client started from (None only when the round
            does not align).
        round, lam, schedule, initial, allow_reflection: as in :func:`aggregate_state_dicts`.

    Returns:
        A new state dict with the same keys and dtypes: rotated factors (B_i R, Rᵀ A_i; zero-
        padded to the reference's rank if larger), every other tensor copied.

    Raises:
        ValueError/TypeError naming ``client_state`` / ``reference`` and the key, as in
        :func:`aggregate_state_dicts`.
    """
    if isinstance(lam, str):
        raise ValueError(f"lam: expected a float in [0, 1] for client-side alignment, got {lam!r} (lam='auto' needs every "
                         "client at once: aggregate on the server with aggregate_state_dicts(..., lam='auto'))")
    aligned = _aggregate(
        [client_state], reference, None, "fedrot", round, lam, schedule, initial, allow_reflection, None, labels=["client_state"]
    )
    return dict(aligned)
