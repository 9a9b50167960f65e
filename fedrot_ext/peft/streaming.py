"""Streaming aggregation: add clients one at a time into running sums, never stack them.

:func:`fedrot_ext.aggregate_state_dicts` stacks all N clients per module, (N, r, in), which
caps N by memory. Every method whose aggregate is a weighted sum of per-client terms can
instead rotate each client on arrival (one fused op call over all its modules, N = 1) and
add w_i · (its rotated factors) into float32 accumulators (float64 for float64 input):
peak extra memory is one client plus the accumulators plus O(L·r²), whatever N is.
The rules (validation, clipping, noise, dropping, frozen and personal factors, rank
padding) are those of aggregate_state_dicts, taken from the same helpers.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .._checks import check_lam, overflow_error
from .._ops import accumulate_dtype
from .._robust import surviving_weights
from .._stacking import nonfinite_index, pad_rank
from ..baselines import product_sums
from ..methods import Method, check_initial, get_method
from ..schedule import alignment_for_round
from .._types import module_align
from .aggregate import (
    NOT_AVERAGED, AggregatedState, fused_average, reads_in_place, check_finite_deltas, differs_error, frozen_reason, put_base_delta,
    require_lora_config, require_reference,
)
from .batch import (
    ClientBatch, FactorSet, collect_clients, collect_reference, factor_keys, padded_factors, require_equal_ranks, rescale_padded,
)
from .model import module_scaling, rank_rescale
from .running_sum import RunningSum
from .policy import Policy, add_delta_noise, add_factor_noise, clip_clients, dropped_reason, invalid_client_error

__all__ = ["StreamingAggregator", "SUMMATIONS", "streaming_supported"]

SUMMATIONS = ("plain", "kahan")


def streaming_supported(spec: Method) -> bool:
    """The method's aggregate is a weighted sum of per-client terms (not FlexLoRA's SVD of all clients)."""
    return spec.output != "refactor"


class StreamingAggregator:
    """Aggregate clients one at a time; the result equals :func:`fedrot_ext.aggregate_state_dicts`
    on the same clients to rounding.

    Usage::

        agg = StreamingAggregator(reference=global_state, method="fedrot", round=3)
        for state, n in clients:        # e.g. loaded from disk one by one
            agg.add(state, weight=n)    # the state may be freed right after
        new_global = agg.result()

    Methods (a weighted sum of per-client terms): fedrot, fedit, ffa, rolora, fedsa, and fedex /
    flora, which accumulate their dense per-module Σ w_i B_i A_i (out × in per module: their
    output anyway): flora's ``base_deltas`` is s Σ w_i B_i A_i, fedex's residual
    s (Σ w_i B_i A_i − B̄ Ā) is formed in result() (as a difference, so its absolute error is
    ~u ‖Σ w_i B_i A_i‖, not ~u ‖residual‖ as in aggregate_state_dicts). flexlora needs all
    clients at once (a truncated SVD): use aggregate_state_dicts.

    Memory: the client in flight (plus its float32 copy for bf16/fp16 input, and a copy when
    clipping), the op's output for it, the float32 sums of one adapter (twice with Kahan), for
    fedex/flora one out × in sum per module, and O(L·r²) for the rotations; never N clients.
    Measured (bench/streaming_bench.py): 76 MB of peak extra RSS for 200 clients of 16.8 MB.

    Speed: one client per op call writes an output as large as the client and adds it into the
    sums, about 6 passes over its bytes where the op on all N clients at once makes about one.
    ``group=k`` (fedrot, fedit, fedsa without clip_norm) holds up to k added clients (references to
    the caller's tensors, no copies) and aggregates them with one op call that reads them in place:
    (k + 5) / k passes a client, for k clients' memory. A NaN/Inf client is then found when its group
    is aggregated: at the add() that fills the group, or in result().

    Heterogeneous ranks: without alignment (fedit, fedrot's round 0, fedex, flora) the
    accumulators zero-pad to the largest rank seen so far, as aggregate_state_dicts pads; a
    rotation depends on the padded size, so when aligning every client is padded to the
    reference's rank and a larger client rank raises. Each padded client keeps its own LoRA
    scaling as in aggregate_state_dicts (lora_config is then required); when a larger rank
    arrives, the sums so far are multiplied by the same ratio. ffa, rolora and fedsa need equal ranks.

    Restarts and shards: :meth:`state_dict` holds everything taken in so far; an aggregator built
    with the same arguments resumes from it with :meth:`load_state_dict` (bitwise the uninterrupted
    run, for group=1). :meth:`merge` adds the sums of another aggregator of a disjoint set of clients
    (for example one per machine or Ray task): the same result up to one rounding per entry.

    Summation and arrival order: the result depends on the order only through the rounding
    of the sums. A plain running sum of N terms has error ≲ N·u·Σ|w_i x_i| per entry
    (u = 2⁻²⁴ in float32), so two orders agree to about that; ``summation="kahan"`` carries the
    compensation: error ≲ 2u·Σ|w_i x_i| (+ O(N u²)), independent of N, so two orders agree to
    ~1 ulp of every entry that does not cancel (Σ|w_i x_i| ≈ |Σ w_i x_i|) before the final cast
    to the input dtype. Measured (tests/peft/test_streaming.py's 400 clients, forward vs reversed):
    plain 9e-7, kahan 8e-8 of the largest entry. Kahan costs twice the accumulator memory and
    ~4× the additions. The same order always gives the same bits.

    Args:
        reference, method, round, lam, schedule, initial, allow_reflection, lora_config,
            on_invalid, clip_norm, noise_multiplier, generator: as in aggregate_state_dicts.
            clip_norm is applied per client on arrival; noise is drawn once, in result(), with
            σ = noise_multiplier · clip_norm · max_i w_i over the normalised kept weights.
        device: where to aggregate (each client is moved there on arrival); None: the first client's.
        summation: "plain" or "kahan" (compensated sums in the accumulators).
        group: clients aggregated per op call (see Speed); 1 keeps the one-client memory bound.

    Attributes:
        count: clients accepted so far.
        dropped: ``(client index, reason)`` of clients dropped with on_invalid="skip"; the index
            counts every add() call from 0.

    Raises:
        ValueError naming the argument: a method that needs all clients (flexlora), a missing
        reference or lora_config, a bad lam, initial, summation, on_invalid, clip_norm or noise_multiplier.
    """

    def __init__(self, reference: Optional[Mapping[str, torch.Tensor]] = None, *, method: str = "fedrot", round: Optional[int] = None,
                 lam: float = 0.5, schedule: str = "alternate", initial: Optional[str] = None, allow_reflection: bool = False,
                 on_invalid: str = "raise", clip_norm: Optional[float] = None, noise_multiplier: float = 0.0,
                 generator: Optional[torch.Generator] = None, lora_config=None, device=None, summation: str = "plain",
                 group: int = 1):
        self.spec = get_method(method)
        if not streaming_supported(self.spec):
            raise ValueError(f"method: {method!r} needs all clients at once (a truncated SVD of Σ w_i B_i A_i); "
                             "use fedrot_ext.aggregate_state_dicts for it")
        if summation not in SUMMATIONS:
            raise ValueError(f"summation: expected one of {SUMMATIONS}, got {summation!r}")
        if isinstance(lam, str) and lam == "auto":
            raise ValueError("lam: 'auto' needs every client at once (it scores each λ on all of them); use "
                             "aggregate_state_dicts(..., lam='auto') instead of streaming")
        self._lam = check_lam(lam)
        initial = check_initial(initial)
        self._round = round
        self._align = alignment_for_round(round, schedule, initial) if self.spec.aligns else "none"
        self._frozen = self.spec.frozen_factor(round, initial)
        require_lora_config(self.spec, lora_config)
        require_reference(reference, self._align, round)
        self._policy = Policy(on_invalid, clip_norm, noise_multiplier, generator)
        self._in_place = reads_in_place(self.spec, self._frozen, self._policy)
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"group: expected an int >= 1 (clients aggregated per op call), got {group!r}")
        if group > 1 and not self._in_place:
            raise ValueError(f"group: {group} needs a factor method without clip_norm (fedrot, fedit, fedsa); "
                             f"method {method!r} with these options aggregates one client at a time (group=1)")
        self._group = group
        self._pending: list = []  # (call index, batch, state, weight, label) of clients not yet aggregated
        self._reference = reference
        self._allow_reflection = bool(allow_reflection)
        self._lora_config = lora_config
        self._device = None if device is None else torch.device(device)
        self._kahan = summation == "kahan"
        self._template: Optional[Dict[str, torch.Tensor]] = None  # first client's metadata, zero-strided (no memory)
        self._refs: Optional[FactorSet] = None  # in the accumulate dtype, when aligning
        self._modules: list = []  # the first client's LoRA modules and their align modes
        self._aligns: List[str] = []
        self._calls = 0  # add() calls so far, refused ones too: client i is the i-th call
        self._weights: List[float] = []  # the weights of the accepted and the dropped clients, in arrival order
        self._bad: Dict[int, Tuple[int, str]] = {}  # position in _weights -> (call index, where the NaN/Inf is)
        self._first_kept: Optional[str] = None
        self._copies: Dict[str, torch.Tensor] = {}  # non-floating tensors and frozen factors of the first kept client
        self._sums: Dict[str, RunningSum] = {}  # by state key; base deltas by module path
        self._ranks: List[set] = []  # ranks of the kept clients per module (for the LoRA scaling)
        self._out_ranks: List[int] = []  # the rank of each module's sums (0 before the first kept client)

    @property
    def count(self) -> int:
        return len(self._weights) - len(self._bad) + len(self._pending)

    @property
    def dropped(self) -> Tuple[Tuple[int, str], ...]:
        return tuple((index, dropped_reason(where)) for _, (index, where) in sorted(self._bad.items()))

    # ------------------------------------------------------------------ add
    def add(self, client_state: Mapping[str, torch.Tensor], weight: float = 1.0) -> bool:
        """Validate, screen, clip, rotate and accumulate one client.

        Args:
            client_state: one client's adapter state dict (read only; may be freed afterwards).
            weight: its non-negative weight (e.g. its sample count); normalised in result().

        Returns:
            True if accepted, False if dropped (on_invalid="skip").

        Raises:
            ValueError/TypeError naming ``client_states[i]`` (i: the number of earlier add() calls,
            refused ones included) and the key, as aggregate_state_dicts would; naming ``weight``
            for a bad weight. A refused client leaves the sums as they were.
        """
        index, self._calls = self._calls, self._calls + 1
        label = f"client_states[{index}]"
        weight = _check_weight(weight)
        if self._device is not None and isinstance(client_state, Mapping):
            client_state = {k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in client_state.items()}
        batch = self._validate(client_state, label)
        if self._in_place:
            # The factors go into the fused op as they are, which flags a NaN/Inf as it reads them: no pre-scan.
            self._check_identical(batch, client_state, label)
            self._first_kept = self._first_kept or label  # later clients are compared with this one
            self._pending.append((index, batch, client_state, weight, label))
            return self._flush() if len(self._pending) >= self._group else True
        where = _nonfinite_at(batch, client_state, label)
        if where is None and self._accumulate(batch, client_state, weight, label):  # touches no sum unless it succeeds
            self._weights.append(weight)
            return True
        if where is None:
            raise _overflow(batch, client_state)
        return self._refuse(index, weight, where)

    def _refuse(self, index: int, weight: float, where: str) -> bool:
        """A client holding NaN/Inf at `where`: raise, or record it as dropped (False). Until a client is
        kept, the next one sets the template again (a refused client's keys and shapes bind nothing)."""
        if not self._sums and not self._pending:
            self._template = self._first_kept = None
        if self._policy.on_invalid == "raise":
            raise invalid_client_error(where)
        self._bad[len(self._weights)] = (index, where)
        self._weights.append(weight)
        return False

    def _flush(self) -> bool:
        """Aggregate the pending clients with one op call; returns whether the last of them was kept.

        When the op flags a non-finite aggregate (rare), each pending client is scanned: the ones
        holding NaN/Inf are refused (the first raises with on_invalid="raise", after the others are
        added), the rest aggregated again without them."""
        items, self._pending = self._pending, []
        if not items:
            return True
        if self._accumulate_clients(items):
            self._weights.extend(item[3] for item in items)
            return True
        wheres = {index: _nonfinite_at(batch, state, label) for index, batch, state, _, label in items}
        wheres = {index: where for index, where in wheres.items() if where is not None}
        if not wheres:
            raise _overflow(items[0][1], items[0][2])
        good = [item for item in items if item[0] not in wheres]
        if good and not self._accumulate_clients(good):
            raise _overflow(good[0][1], good[0][2])
        first_error, kept = None, True
        for index, _, _, weight, _ in items:  # in arrival order, as one at a time would record them
            if index not in wheres:
                self._weights.append(weight)
                kept = True
                continue
            try:
                kept = self._refuse(index, weight, wheres[index])
            except ValueError as err:
                first_error = first_error or err
        if first_error is not None:
            raise first_error
        return kept

    def _validate(self, state, label: str) -> ClientBatch:
        """The batch [first client's template, state] (or [state] for the first), checked as one
        aggregate_state_dicts call checks them; the reference is collected with the first."""
        if self._template is None:
            batch = self._bind(state, label)
        else:
            batch = collect_clients([self._template, state], [self._first_label, label])
        if self.spec.equal_ranks:
            require_equal_ranks(batch, self.spec.name)
        batch = batch.subset([len(batch.states) - 1])
        if self._refs is not None:
            for m, ref_rank, (r,) in zip(batch.modules, self._refs.rank, batch.ranks):
                if r > ref_rank:
                    raise ValueError(f"{label}[{m.key_A!r}]: rank {r} exceeds the reference's {ref_rank}; StreamingAggregator pads "
                                     "every client to the reference's rank when aligning (aggregate_state_dicts pads to the largest)")
        for m, (module, (r,)) in enumerate(zip(batch.modules, batch.ranks)):  # a padding needs lora_config: say so now
            others = [self._out_ranks[m]] + [item[1].ranks[m][0] for item in self._pending]
            rank_rescale(self._lora_config, r, max([r] + others) if self._refs is None else self._refs.rank[m], f"{label}[{module.key_A!r}]")
            for other in others:
                if other:
                    rank_rescale(self._lora_config, other, max(other, r), f"{label}[{module.key_A!r}]")
        return batch

    def _bind(self, state, label: str) -> ClientBatch:
        """Take `state`'s keys, shapes and dtypes as the template every later client must match, and collect
        the reference against them; returns the batch [state]."""
        batch = collect_clients([state], [label])
        aligns = [module_align(self._align, m.embedding) for m in batch.modules]
        if self._align != "none":
            refs = collect_reference(self._reference, batch, aligns)
            acc = [accumulate_dtype(state[m.key_A].dtype) for m in batch.modules]
            # Rounded to the clients' dtype first, as aggregate_state_dicts does, then in the op's compute dtype.
            self._refs = FactorSet([None if a is None else a.to(d) for a, d in zip(refs.A, acc)],
                                   [None if b is None else b.to(d) for b, d in zip(refs.B, acc)], refs.rank)
        self._aligns, self._modules = aligns, batch.modules
        self._template = {k: v.new_zeros(()).expand(v.shape) for k, v in state.items()}
        self._first_label = label
        self._ranks = [set() for _ in batch.modules]
        self._out_ranks = [0] * len(batch.modules)
        return batch

    def _target_ranks(self, items) -> List[int]:
        """Per module, the rank the clients of `items` are padded to: the reference's when aligning, else
        the largest of theirs and of the sums so far."""
        if self._refs is not None:
            return list(self._refs.rank)
        return [max([self._out_ranks[m]] + [batch.ranks[m][0] for batch in items]) for m in range(len(self._out_ranks))]

    def _grow_sums(self, modules, ranks: List[int]) -> None:
        """Move each module's sums to rank `ranks[m]` (zero-padded, rescaled to that rank's LoRA scaling)."""
        for m, (module, rank) in enumerate(zip(modules, ranks)):
            have = self._out_ranks[m]
            if have and rank != have:
                c = rank_rescale(self._lora_config, have, rank, module.key_A)
                for key, dim in ((module.key_A, 0), (module.key_B, 1)):
                    if key in self._sums:
                        self._sums[key].grow(rank, dim, c)
                if module.path in self._sums:
                    self._sums[module.path].scale(c * c)
            self._out_ranks[m] = rank

    def _accumulate(self, batch: ClientBatch, state, weight: float, label: str) -> bool:
        """Rotate and add one client; False (no sum touched) when the op flagged a non-finite aggregate."""
        spec, frozen = self.spec, self._frozen
        self._check_identical(batch, state, label)
        ranks = self._target_ranks([batch])
        clip = self._policy.clip_norm is not None
        A = [pad_rank(state[m.key_A], r, 0).clone()[None] if clip else pad_rank(state[m.key_A], r, 0)[None]
             for m, r in zip(batch.modules, ranks)]
        B = [pad_rank(state[m.key_B], r, 1).clone()[None] if clip else pad_rank(state[m.key_B], r, 1)[None]
             for m, r in zip(batch.modules, ranks)]
        if clip:  # in the clients' dtype, rounded as aggregate_state_dicts rounds its clipped stacks
            clip_clients(A, B, self._policy.clip_norm, spec.clip_exponents(frozen))
        rescale_padded(batch, A, B, self._lora_config)  # padded tensors are fresh: rescaled in place
        # Into the op in the accumulate dtype: its output is then w_i · (rotated factors), unrounded.
        A = [a.to(accumulate_dtype(a.dtype)) for a in A]
        B = [b.to(accumulate_dtype(b.dtype)) for b in B]
        w = torch.tensor([weight], dtype=torch.float64)
        new_A, new_B, statuses, _ = fused_average(A, B, self._refs, w, self._aligns, self._lam, self._allow_reflection)
        if any(torch.cat(statuses).tolist()):  # a NaN/Inf factor or an overflow: the caller finds which
            return False
        dense = product_sums(A, B, w) if spec.dense else [None] * len(A)
        del A, B
        self._grow_sums(batch.modules, ranks)
        for m, module in enumerate(batch.modules):
            self._ranks[m].add(batch.ranks[m][0])
            if frozen != "A":
                self._sum(module.key_A, new_A[m]).add(new_A[m], rank_dim=0)
            if frozen != "B" and spec.personal != "B":
                self._sum(module.key_B, new_B[m]).add(new_B[m], rank_dim=1)
            if dense[m] is not None:
                self._sum(module.path, dense[m]).add(dense[m])
        for key in batch.other_keys:
            t = state[key]
            if t.is_floating_point():
                term = t.to(accumulate_dtype(t.dtype)) * weight  # a fresh tensor
                self._sum(key, term).add(term)
        if self._first_kept is None:
            self._first_kept = label
        return True

    def _accumulate_clients(self, items) -> bool:
        """The factor methods: rotate and add the clients of `items` with one op call that reads them in
        place (rank-padded where smaller); False (no sum touched) when the op flagged a non-finite aggregate."""
        modules = items[0][1].modules
        ranks = self._target_ranks([item[1] for item in items])
        # Into the op in the accumulate dtype: its output is then Σ w_i · (rotated factors), unrounded.
        A, B = ([[padded_factors(item[1], mod, r, dim, self._lora_config)[0] for item in items] for mod, r in zip(modules, ranks)]
                for dim in (0, 1))
        A, B = ([[t.to(accumulate_dtype(t.dtype)) for t in ts] for ts in X] for X in (A, B))
        w = torch.tensor([item[3] for item in items], dtype=torch.float64)
        new_A, new_B, statuses, _ = fused_average(A, B, self._refs, w, self._aligns, self._lam, self._allow_reflection)
        del A, B
        others = {}
        for key in items[0][1].other_keys:
            if items[0][2][key].is_floating_point():
                terms = [item[2][key].to(accumulate_dtype(item[2][key].dtype)) * item[3] for item in items]  # fresh
                others[key] = terms[0] if len(terms) == 1 else torch.stack(terms).sum(0)
        flags = torch.cat([*statuses, *(t.isfinite().all().logical_not().view(1) for t in others.values())])
        if bool(flags.any()):
            return False
        self._grow_sums(modules, ranks)
        for m, module in enumerate(modules):
            self._ranks[m].update(item[1].ranks[m][0] for item in items)
            self._sum(module.key_A, new_A[m]).add(new_A[m], rank_dim=0)
            if self.spec.personal != "B":
                self._sum(module.key_B, new_B[m]).add(new_B[m], rank_dim=1)
        for key, term in others.items():
            self._sum(key, term).add(term)
        if self._first_kept is None:
            self._first_kept = items[0][4]
        return True

    def _check_identical(self, batch: ClientBatch, state, label: str) -> None:
        """Non-floating tensors and frozen factors must equal the first kept client's (copied then)."""
        frozen_keys = [m.key_A if self._frozen == "A" else m.key_B for m in batch.modules] if self._frozen else []
        fixed = [(k, NOT_AVERAGED) for k in batch.other_keys if not state[k].is_floating_point()]
        fixed += [(k, frozen_reason(self.spec, self._round, self._frozen)) for k in frozen_keys]
        if self._first_kept is None:
            self._copies.update((k, state[k].clone()) for k, _ in fixed)
            return
        for key, why in fixed:
            if not torch.equal(state[key], self._copies[key]):
                raise differs_error(label, key, self._first_kept, why)

    def _sum(self, key: str, like: torch.Tensor) -> RunningSum:
        if key not in self._sums:
            self._sums[key] = RunningSum(like, self._kahan)
        return self._sums[key]

    # ------------------------------------------------------------------ result
    def result(self) -> AggregatedState:
        """The aggregate of the clients accepted so far (add() may go on afterwards).

        Returns:
            :class:`AggregatedState`, with keys in the first client's order and its dtypes,
            ``base_deltas`` (fedex, flora) and ``dropped``.

        Raises:
            ValueError: no client added, every client dropped, every kept weight 0, or an
            average that overflows the input dtype (fp16/bf16).
        """
        if self._template is None:
            raise ValueError("StreamingAggregator.result: no client was added (call add() first)")
        self._flush()
        kept, w = surviving_weights(self._weights, len(self._weights), self._bad, torch.device("cpu"), torch.float64, "client_states")
        total = math.fsum(self._weights[i] for i in kept)
        spec, template = self.spec, self._template
        modules = self._modules
        mean = lambda key: (self._sums[key].total / total).to(template[key].dtype)  # noqa: E731
        new_A = [self._copies[m.key_A].clone() if self._frozen == "A" else mean(m.key_A) for m in modules]
        new_B = [None if spec.personal == "B" else self._copies[m.key_B].clone() if self._frozen == "B" else mean(m.key_B)
                 for m in modules]
        if nonfinite_index([t for t in new_A + new_B if t is not None]) is not None:
            raise overflow_error("client_states", {t.dtype for t in new_A})
        if self._policy.noise_multiplier > 0:
            new_A, new_B = add_factor_noise(new_A, new_B, spec.noised_factors(self._frozen), self._policy, w)
        base_deltas = self._base_deltas(modules, new_A, new_B, total, w) if spec.dense else {}
        if spec.output == "merge":
            new_B = [torch.zeros_like(b) for b in new_B]  # the update now lives in the base weight
        values = {k: mean(k) for k in template if k in self._sums}
        values.update((k, t.clone()) for k, t in self._copies.items())  # the result is the caller's to modify
        for m, a, b in zip(modules, new_A, new_B):
            values[m.key_A] = a
            if b is not None:
                values[m.key_B] = b
        return AggregatedState(((k, values[k]) for k in template if k in values), base_deltas, self.dropped)

    def _base_deltas(self, modules, new_A, new_B, total: float, w: torch.Tensor) -> Dict[str, torch.Tensor]:
        scalings = [module_scaling(self._lora_config, m, sorted(rs), self.spec.name) for m, rs in zip(modules, self._ranks)]
        deltas: Dict[str, torch.Tensor] = {}
        for m, a, b, s in zip(modules, new_A, new_B, scalings):
            dense = self._sums[m.path].total / total
            if self.spec.output == "residual":  # against the factors actually sent (rounded, noised)
                acc = dense.dtype
                dense = dense - b.to(acc) @ a.to(acc)
            put_base_delta(deltas, self.spec, m, dense * s, self._lora_config)
        if self._policy.noise_multiplier > 0:
            deltas = add_delta_noise(deltas, scalings, self._policy, w)
        check_finite_deltas(deltas)
        return deltas


    # ------------------------------------------------------------------ state and merge
    def _options(self) -> dict:
        """What the sums mean: a state loads into, and an aggregator merges with, only one built with the same."""
        p = self._policy
        return {"method": self.spec.name, "round": self._round, "align": self._align, "frozen": self._frozen, "lam": self._lam,
                "allow_reflection": self._allow_reflection, "on_invalid": p.on_invalid, "clip_norm": p.clip_norm,
                "noise_multiplier": p.noise_multiplier, "summation": "kahan" if self._kahan else "plain"}

    def state_dict(self) -> dict:
        """Everything taken in so far, to resume after a restart with :meth:`load_state_dict`.

        Clients held for a group are aggregated first. The values are tensors (copies), strings, numbers,
        lists and dicts, so ``torch.save`` writes it and ``torch.load(..., weights_only=True)`` reads it
        back. Its size is about the result's (twice with Kahan) plus the reference's aligned factors.
        """
        self._flush()
        bound = self._template is not None
        return {
            "format": STATE_FORMAT, "options": self._options(),
            "template": {k: [list(v.shape), str(v.dtype).removeprefix("torch."), str(v.device)] for k, v in self._template.items()}
            if bound else None,
            "first_label": self._first_label if bound else None,
            "refs": None if self._refs is None else {"A": [_copy(t) for t in self._refs.A], "B": [_copy(t) for t in self._refs.B]},
            "calls": self._calls, "weights": list(self._weights),
            "bad": [[pos, index, where] for pos, (index, where) in sorted(self._bad.items())],
            "first_kept": self._first_kept, "copies": {k: t.clone() for k, t in self._copies.items()},
            "sums": {k: total.state() for k, total in self._sums.items()},
            "ranks": [sorted(r) for r in self._ranks], "out_ranks": list(self._out_ranks),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict` output, into an aggregator that has taken no client yet and was built
        with the same method, options and reference; add() then goes on where the saved one stopped.

        Raises:
            ValueError naming ``state``: not a state of this format, other options, another reference, or
            this aggregator has taken clients already. This aggregator is unchanged then.
        """
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"state: expected the output of StreamingAggregator.state_dict() (format {STATE_FORMAT})")
        if self._calls or self._pending:
            raise ValueError("state: this aggregator has taken clients already; load into a new one")
        if state["options"] != self._options():
            diff = {k: v for k, v in state["options"].items() if self._options().get(k) != v}
            raise ValueError(f"state: saved by an aggregator built with {diff}, this one has "
                             f"{ {k: self._options().get(k) for k in diff} }")
        if state["template"] is not None:
            device = self._device
            template = {k: torch.zeros((), dtype=getattr(torch, dtype), device=device or dev).expand(shape)
                        for k, (shape, dtype, dev) in state["template"].items()}
            try:
                self._bind(template, state["first_label"])
                self._check_same_refs(state["refs"], "state")
            except Exception:
                self._template, self._refs = None, None
                raise
            move = lambda t: t.to(device) if device is not None else t  # noqa: E731
            self._copies = {k: move(t).clone() for k, t in state["copies"].items()}
            self._sums = {k: RunningSum.from_state({n: move(t) for n, t in v.items()}, self._kahan) for k, v in state["sums"].items()}
            self._ranks = [set(r) for r in state["ranks"]]
            self._out_ranks = [int(r) for r in state["out_ranks"]]
        self._calls, self._weights = int(state["calls"]), [float(w) for w in state["weights"]]
        self._bad = {int(pos): (int(index), str(where)) for pos, index, where in state["bad"]}
        self._first_kept = state["first_kept"]

    def merge(self, other: "StreamingAggregator") -> None:
        """Take in the clients of `other`, an aggregator of a disjoint shard of the same round (same method,
        options and reference), as if they had been added here after this one's clients: its client i
        becomes client ``count_of_add_calls_here + i`` in ``dropped`` and in messages.

        The sums add exactly as the clients' terms would, up to the rounding of one more addition per entry.
        `other` keeps its sums (its held group, if any, is aggregated first) and may be merged or used on.

        Raises:
            TypeError: `other` is not a StreamingAggregator. ValueError naming ``other``: itself, other options,
            another reference, another key layout, or frozen / non-floating tensors that differ.
        """
        if not isinstance(other, StreamingAggregator):
            raise TypeError(f"other: expected a StreamingAggregator, got {type(other).__name__}")
        if other is self:
            raise ValueError("other: cannot merge an aggregator with itself")
        if other._options() != self._options():
            raise ValueError(f"other: built with options {other._options()}, this aggregator has {self._options()}")
        self._flush()
        other._flush()
        shift = lambda text: _shift_labels(text, self._calls)  # noqa: E731
        if other._template is not None:
            if self._template is None:
                self._bind(other._template, shift(other._first_label))
            else:
                batch = collect_clients([self._template, other._template], [self._first_label, shift(other._first_label)])
                if self.spec.equal_ranks:
                    require_equal_ranks(batch, self.spec.name)
            self._check_same_refs(None if other._refs is None else {"A": other._refs.A, "B": other._refs.B}, "other")
            self._merge_sums(other, shift)
        self._bad.update({pos + len(self._weights): (index + self._calls, shift(where)) for pos, (index, where) in other._bad.items()})
        self._weights.extend(other._weights)
        self._calls += other._calls

    def _merge_sums(self, other: "StreamingAggregator", shift) -> None:
        if other._first_kept is not None:
            if self._first_kept is None:
                self._copies = {k: t.clone() for k, t in other._copies.items()}
                self._first_kept = shift(other._first_kept)
            else:
                frozen_keys = {m.key_A if self._frozen == "A" else m.key_B for m in self._modules} if self._frozen else set()
                for key, t in other._copies.items():
                    if not torch.equal(t, self._copies[key]):
                        why = frozen_reason(self.spec, self._round, self._frozen) if key in frozen_keys else NOT_AVERAGED
                        raise differs_error(shift(other._first_kept), key, self._first_kept, why)
        ranks = [max(a, b) for a, b in zip(self._out_ranks, other._out_ranks)]
        self._grow_sums(self._modules, ranks)
        where = {m.key_A: (i, 0) for i, m in enumerate(self._modules)} | {m.key_B: (i, 1) for i, m in enumerate(self._modules)}
        where |= {m.path: (i, None) for i, m in enumerate(self._modules)}
        for key, theirs in other._sums.items():
            term = theirs.value()
            if key in where:  # a factor (or fedex/flora dense) sum: at this aggregator's rank and LoRA scaling
                m, dim = where[key]
                have = other._out_ranks[m]
                c = rank_rescale(self._lora_config, have, ranks[m], key) if have else 1.0
                if c != 1.0:
                    term.mul_(c if dim is not None else c * c)
                self._sum(key, term).add(term, rank_dim=dim)
            else:
                self._sum(key, term).add(term)
        for mine, theirs in zip(self._ranks, other._ranks):
            mine.update(theirs)

    def _check_same_refs(self, refs: Optional[dict], name: str) -> None:
        """The reference factors the sums were aligned to must be this aggregator's, bit for bit."""
        mine = None if self._refs is None else {"A": self._refs.A, "B": self._refs.B}
        same = (refs is None) == (mine is None) and (mine is None or all(
            (a is None) == (b is None) and (a is None or (a.shape == b.shape and torch.equal(a.to(b.device), b)))
            for f in ("A", "B") for a, b in zip(refs[f], mine[f])))
        if not same:
            raise ValueError(f"{name}: its clients were aligned to another reference than this aggregator's")


STATE_FORMAT = 1


def _copy(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.clone()


def _shift_labels(text: Optional[str], offset: int) -> Optional[str]:
    """``client_states[i]`` in `text` renumbered to ``client_states[i + offset]`` (a merged shard's clients come after)."""
    if text is None or offset == 0:
        return text
    return re.sub(r"client_states\[(\d+)\]", lambda m: f"client_states[{int(m.group(1)) + offset}]", text)


def _nonfinite_at(batch: ClientBatch, state, label: str) -> Optional[str]:
    """``label[key]`` of the first floating tensor of a client holding NaN/Inf (factors first), or None."""
    keys = factor_keys(batch) + [k for k in batch.other_keys if state[k].is_floating_point()]
    bad = nonfinite_index([state[k] for k in keys])
    return None if bad is None else f"{label}[{keys[bad]!r}]"


def _overflow(batch: ClientBatch, state) -> ValueError:
    """A set status with finite clients: a half-precision sum overflowed."""
    return overflow_error("client_states", {state[m.key_A].dtype for m in batch.modules})


def _check_weight(weight) -> float:
    if isinstance(weight, torch.Tensor) and weight.numel() == 1:
        weight = weight.item()
    if isinstance(weight, numbers.Real) and not isinstance(weight, (bool, int, float)):  # NumPy scalars, Fractions
        weight = float(weight)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight: expected a finite number >= 0 (e.g. the client's sample count), got {weight!r}")
    return float(weight)
