"""``FedRotLoRA``: a Flower ``FedAvg`` strategy whose aggregation is fedrot_ext's.

Per round the strategy remembers the global adapter it sent (the reference that
FedRot-LoRA aligns on), screens each reply on its own (keys, shapes and dtypes equal
to the global adapter's, finite values, a positive ``num-examples``; a frozen factor
unchanged for ``ffa``/``rolora``), drops a bad reply with a WARNING log line that names
the node and the reason, and aggregates the rest weighted by ``num-examples``: by default
streaming (:class:`fedrot_ext.StreamingAggregator`: each reply is screened, decoded, added and
released in turn, so server memory does not grow with the number of replies), else with one
:func:`fedrot_ext.aggregate_state_dicts` call over all of them. Non-LoRA tensors (classifier
head, modules_to_save) are weighted-averaged too.

Wire format: by default (``wire_format="numpy"``) every array is NumPy-readable, so
Flower's privacy wrappers (``DifferentialPrivacyServerSide*Clipping``,
``DifferentialPrivacyClientSide*Clipping``) can wrap the strategy; they hand back plain
float32 arrays, which the strategy casts back to the adapter's dtypes (remembered from the
first global adapter it sends). A server-side wrapper measures each update from its own
float32 copy of the noised global, which differs from the bf16 global the clients trained
from by at most half a bf16 ulp per value. ``wire_format="compact"`` (raw bf16) refuses to
be wrapped.
"""
from __future__ import annotations

import numbers
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from logging import INFO, WARNING
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy

from .._checks import check_lam_or_auto
from ..methods import check_initial, get_method
from .._robust import AllClientsInvalid
from ..peft.aggregate import AggregatedState, aggregate_state_dicts
from ..peft.error import state_dict_aggregation_error
from ..peft.keys import parse_lora_keys
from ..peft.streaming import StreamingAggregator, streaming_supported
from ..schedule import SCHEDULES
from ..server_opt import ServerOptimizer
from . import _protocol as P
from .checkpoint import Checkpoint, latest_checkpoint, read_checkpoint, write_checkpoint
from ._screen import screen_reply
from .codec import RAW_STYPE, arrayrecord_to_state_dict, check_wire_format, state_dict_to_arrayrecord

__all__ = ["FedRotLoRA", "RoundSummary", "BASE_DELTAS_KEY"]

BASE_DELTAS_KEY = P.BASE_DELTAS_KEY
_STRATEGY_ARGUMENTS = ("client_states", "reference", "weights", "method", "round", "lam", "schedule", "initial",
                       "allow_reflection", "lora_config")


@dataclass
class RoundSummary:
    """What happened to one training round's replies.

    Attributes:
        server_round: Flower's 1-based round number.
        accepted: node ids whose replies were aggregated, in reply order.
        rejected: {node id: reason} for replies dropped by the checks.
        failed: {node id: reason} for replies that came back as Flower errors.
        metrics: the round's aggregation metrics (empty when nothing was aggregated).
    """

    server_round: int
    accepted: List[int] = field(default_factory=list)
    rejected: Dict[int, str] = field(default_factory=dict)
    failed: Dict[int, str] = field(default_factory=dict)
    metrics: Dict[str, float] = field(default_factory=dict)


class FedRotLoRA(FedAvg):
    """Flower strategy that aggregates peft LoRA adapters with fedrot_ext.

    Keeps FedAvg's sampling, configuration and evaluation; replaces the training
    aggregation. The global ``ArrayRecord`` is the peft adapter state dict
    (``get_peft_model_state_dict`` layout plus any modules_to_save), encoded with
    :func:`fedrot_ext.flower.state_dict_to_arrayrecord` (bf16 survives the trip). Flower's
    ``server-round`` r maps to fedrot_ext's 0-based ``round = r - 1``, so round 1 is plain
    FedIT and alignment starts in round 2, as in the authors' code.

    Per-round metrics (in the returned ``MetricRecord``, next to the clients' averaged
    train metrics): ``agg-error-rel-mean`` / ``agg-error-rel-max`` (relative aggregation
    error ‖Σ w_i B_i A_i − B̄ Ā‖_F / ‖Σ w_i B_i A_i‖_F over LoRA modules; only for methods whose
    ``Method.factor_error`` is set, so not fedsa, fedex, flora), ``fedit-error-rel-mean`` /
    ``fedit-error-rel-max`` (the same for plain FedIT on the same replies; ``method="fedrot"``
    with ``report_fedit_error=True`` only); these need every reply at once, so a streaming round
    does not report them. Always: ``agg-time-s`` (the aggregation),
    ``rank`` (largest rank of the aggregate), ``replies-accepted``, ``replies-rejected``.
    Each round's :class:`RoundSummary` is appended to :attr:`history`.

    Args:
        method: one of :data:`fedrot_ext.METHODS` ("fedrot", "fedit", "ffa", "rolora",
            "fedsa", "flexlora", "fedex", "flora").
        lam: soft-rotation strength λ in [0, 1] (fedrot), or "auto": chosen per module and
            round from (0, 0.25, 0.5, 0.75, 1) by the smallest aggregation error (never worse than
            FedIT); the round metrics then carry ``lam-mean``, ``lam-min`` and ``lam-max``.
        schedule: "alternate", "A", "B", "AB" or "none" (fedrot).
        initial: first factor of the schedule; None: "A" for fedrot, "B" for rolora.
        allow_reflection: rotate over O(r) instead of SO(r) (fedrot).
        lora_config: the clients' peft ``LoraConfig``; required by fedex and flora, whose
            base-weight updates are accumulated in :attr:`base_deltas` and sent to clients
            under :data:`BASE_DELTAS_KEY`, and by every method when client ranks differ (each
            client's update keeps its own LoRA scaling through the zero-padding).
        device: where the server aggregates ("cpu", "cuda", ...).
        aggregate_options: further keyword arguments for :func:`fedrot_ext.aggregate_state_dicts`
            (for example ``clip_norm`` or ``noise_multiplier``), passed unchanged every round.
        report_fedit_error: with method "fedrot", also aggregate the same replies with FedIT and
            report both errors (``fedit-error-*`` and ``agg-error-*``; off by default: it costs a
            second aggregation every round, and needs every reply at once).
        streaming: consume the replies one at a time with :class:`fedrot_ext.StreamingAggregator`
            (True), or aggregate all of them in one aggregate_state_dicts call (False), which reads
            every decoded reply where it lies (views of the reply's bytes: no stack, no copy) and
            so costs no more memory than the replies Flower already holds. None: False. Both give
            the same global adapter to rounding; streaming needs a method other than flexlora, a
            numeric lam and no ``report_fedit_error``.
        error_metrics: report the ``agg-error-*`` metrics (the aggregation error of the round, in
            float64; not with streaming). Off by default: it costs more than the aggregation.
        server_optimizer: a :class:`fedrot_ext.ServerOptimizer` (FedAvgM / FedAdam / FedYogi /
            FedAdagrad) stepping the global adapter along aggregate − previous global every round;
            None: the aggregate is the new global (FedAvg). Checkpoint it with its ``state_dict()``.
        wire_format: how adapters travel (see :mod:`fedrot_ext.flower.codec`): ``"numpy"`` (default;
            bf16/fp16 as their exact float32 upcast, readable by Flower's privacy wrappers and mods)
            or ``"compact"`` (bf16 as raw 16-bit patterns: half the bytes, but any Flower code that
            reads arrays as NumPy fails on it, so a wrapping strategy raises ValueError).
        checkpoint_dir: a directory for a checkpoint after every round (see
            :mod:`fedrot_ext.flower.checkpoint`). When :meth:`start` finds a complete checkpoint
            there, it resumes after it, up to ``num_rounds`` rounds in all: restarting the same
            command is all it takes. Given deterministic clients, a run stopped and resumed ends
            bitwise equal to an uninterrupted one. Only a run that ``FedRotLoRA.start`` drives
            writes checkpoints (a Flower wrapper's ``start`` does not).
        **fedavg_kwargs: passed to ``flwr.serverapp.strategy.FedAvg`` (``fraction_train``,
            ``min_train_nodes``, ``weighted_by_key``, ``arrayrecord_key``, ...).

    Attributes:
        history: one :class:`RoundSummary` per training round.
        base_deltas: {module path: cumulative ΔW} of fedex/flora (empty otherwise); apply it
            to freshly loaded base weights with :func:`fedrot_ext.fold_into_base`.

    Raises:
        ValueError: unknown method or schedule, λ outside [0, 1], a bad ``initial``, or a
            missing ``lora_config`` for fedex/flora, or ``aggregate_options`` naming an
            argument the strategy sets itself, an unknown ``wire_format``, or ``streaming=True``
            with flexlora, lam="auto" or ``report_fedit_error``.
    """

    def __init__(
        self,
        *,
        method: str = "fedrot",
        lam: Union[float, str] = 0.5,
        schedule: str = "alternate",
        initial: Optional[str] = None,
        allow_reflection: bool = False,
        lora_config=None,
        device: Union[str, torch.device] = "cpu",
        aggregate_options: Optional[Mapping[str, Any]] = None,
        report_fedit_error: bool = False,
        server_optimizer: Optional[ServerOptimizer] = None,
        wire_format: str = "numpy",
        streaming: Optional[bool] = None,
        error_metrics: bool = False,
        checkpoint_dir: Optional[Union[str, Path]] = None,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.spec = get_method(method)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
        check_initial(initial)
        if self.spec.dense and lora_config is None:
            raise ValueError(f"lora_config: required for method {method!r} (it decides the base-weight update)")
        self.method = method
        self.lam = check_lam_or_auto(lam)
        self.schedule = schedule
        self.initial = initial
        self.allow_reflection = bool(allow_reflection)
        self.lora_config = lora_config
        self.device = torch.device(device)
        self.aggregate_options = dict(aggregate_options or {})
        taken = sorted(set(self.aggregate_options) & set(_STRATEGY_ARGUMENTS))
        if taken:
            raise ValueError(f"aggregate_options: {taken} are set by the strategy; pass them as FedRotLoRA arguments")
        self.report_fedit_error = report_fedit_error
        self.error_metrics = bool(error_metrics) or bool(report_fedit_error)
        if server_optimizer is not None and not isinstance(server_optimizer, ServerOptimizer):
            raise TypeError(f"server_optimizer: expected a fedrot_ext.ServerOptimizer or None, got {type(server_optimizer).__name__}")
        self.server_optimizer = server_optimizer
        self.wire_format = check_wire_format(wire_format)
        self._dtypes: Optional[Dict[str, torch.dtype]] = None  # the adapter's, from the first global sent
        self.streaming = self._streaming(streaming)
        self.history: List[RoundSummary] = []
        self.base_deltas: Dict[str, torch.Tensor] = {}
        self._sent: Optional[Tuple[int, ArrayRecord]] = None
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)

    def _streaming(self, requested: Optional[bool]) -> bool:
        possible = streaming_supported(self.spec) and isinstance(self.lam, numbers.Real)
        if requested and not possible:
            why = f"method {self.method!r}" if not streaming_supported(self.spec) else "lam='auto'"
            raise ValueError(f"streaming: {why} needs all replies at once; pass streaming=False or None")
        if requested and self.report_fedit_error:
            raise ValueError("streaming: report_fedit_error needs all replies at once; pass streaming=False or None")
        if requested and self.error_metrics:
            raise ValueError("streaming: error_metrics needs all replies at once; pass streaming=False or None")
        return bool(requested)

    # ------------------------------------------------------------------ configure
    def summary(self) -> None:
        """Log FedAvg's summary plus the fedrot_ext settings."""
        super().summary()
        log(
            INFO,
            "\t└──> fedrot_ext: method=%s, lam=%s, schedule=%s, initial=%s, device=%s, wire_format=%s",
            self.method, self.lam, self.schedule, self.initial or "default", self.device, self.wire_format,
        )

    def _add_settings(self, config: ConfigRecord, server_round: int) -> None:
        config[P.CONFIG_METHOD] = self.method
        config[P.CONFIG_ROUND] = server_round - 1
        config[P.CONFIG_LAM] = self.lam
        config[P.CONFIG_SCHEDULE] = self.schedule
        config[P.CONFIG_INITIAL] = self.initial or ""
        config[P.CONFIG_ALLOW_REFLECTION] = self.allow_reflection
        config[P.CONFIG_WIRE_FORMAT] = self.wire_format

    def _check_compact_is_unwrapped(self, caller: Any, config: ConfigRecord) -> None:
        """With the compact format, fail here with the fix rather than deep inside a Flower wrapper or mod."""
        if self.wire_format != "compact":
            return
        wrapper = caller if isinstance(caller, Strategy) and caller is not self else None
        if wrapper is None and P.FLOWER_CLIPPING_NORM not in config:
            return
        who = type(wrapper).__name__ if wrapper is not None else f"a Flower privacy wrapper (config has {P.FLOWER_CLIPPING_NORM!r})"
        raise ValueError(
            f"wire_format: 'compact' sends bfloat16 as {RAW_STYPE!r} arrays, which {who} cannot read "
            "(it converts arrays with ArrayRecord.to_numpy_ndarrays()); use FedRotLoRA(wire_format='numpy') "
            "and the clients' default make_train_reply(wire_format=None)"
        )

    def _as_sent(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global adapter in the adapter's dtypes and this strategy's wire format (a wrapper may
        have rewritten it as plain float32, e.g. after adding noise)."""
        state = arrayrecord_to_state_dict(arrays, like=self._dtypes)
        if self._dtypes is None:
            self._dtypes = {key: t.dtype for key, t in state.items()}
        return state_dict_to_arrayrecord(state, wire_format=self.wire_format)

    def _attach_base_deltas(self, messages: List[Message]) -> List[Message]:
        if self.base_deltas:
            record = state_dict_to_arrayrecord(self.base_deltas, wire_format=self.wire_format)
            for msg in messages:
                msg.content[BASE_DELTAS_KEY] = record
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """FedAvg's configure_train, plus the round settings in the config, the base-weight
        updates (fedex/flora), and remembering ``arrays`` as this round's reference.

        Raises:
            ValueError: ``wire_format="compact"`` while a Flower wrapper calls this strategy.
        """
        self._check_compact_is_unwrapped(sys._getframe(1).f_locals.get("self"), config)  # the caller: a wrapper?
        arrays = self._as_sent(arrays)
        self._sent = (server_round, arrays)
        self._add_settings(config, server_round)
        return self._attach_base_deltas(list(super().configure_train(server_round, arrays, config, grid)))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """FedAvg's configure_evaluate, plus the round settings and base-weight updates."""
        self._add_settings(config, server_round)
        arrays = self._as_sent(arrays)
        return self._attach_base_deltas(list(super().configure_evaluate(server_round, arrays, config, grid)))

    # ------------------------------------------------------------------ aggregate
    def _reference(self, server_round: int) -> Dict[str, torch.Tensor]:
        if self._sent is None or self._sent[0] != server_round:
            raise RuntimeError(
                f"FedRotLoRA.aggregate_train(server_round={server_round}): no global adapter was sent for this round; "
                "call configure_train first (Strategy.start does)"
            )
        # Views of the record's bytes (it lives until the next round is configured): the round only reads them.
        return arrayrecord_to_state_dict(self._sent[1], device=self.device, like=self._dtypes, copy=False)

    def _frozen_keys(self, reference: Mapping[str, torch.Tensor], round_idx: int) -> List[str]:
        frozen = self.spec.frozen_factor(round_idx, self.initial)
        if frozen is None:
            return []
        modules, _ = parse_lora_keys(reference.keys(), owner="global adapter")
        return [m.key_A if frozen == "A" else m.key_B for m in modules]

    def _timed(self, fn):
        """(fn(), seconds), synchronised on the GPU."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - start

    def _aggregate(self, states, weights, reference, round_idx) -> Tuple[AggregatedState, float]:
        # NaN/Inf replies were not screened (the aggregation finds them as it reads): dropped, then rejected.
        options = {**self.aggregate_options, "on_invalid": "skip"}
        return self._timed(lambda: aggregate_state_dicts(
            states, reference=reference, weights=weights, method=self.method, round=round_idx, lam=self.lam,
            schedule=self.schedule, initial=self.initial, allow_reflection=self.allow_reflection, lora_config=self.lora_config,
            **options,
        ))

    def _accepted(self, valid, reference, frozen, summary: RoundSummary):
        """Screen and decode the replies one at a time: yields (state, weight, metrics-only content)."""
        for msg in valid:
            node = msg.metadata.src_node_id
            try:
                state, weight = screen_reply(
                    msg.content, reference, arrayrecord_key=self.arrayrecord_key, weighted_by_key=self.weighted_by_key,
                    frozen_keys=frozen, device=self.device, check_finite=self.streaming,
                )
            except (ValueError, TypeError, KeyError) as err:  # anything a malformed reply can trigger
                summary.rejected[node] = str(err)
                log(WARNING, "aggregate_train: round %d: rejected the reply of node %d: %s", summary.server_round, node, err)
                continue
            summary.accepted.append(node)
            yield state, weight, RecordDict(dict(msg.content.metric_records))

    def _stack(self, accepted, reference, round_idx, summary: RoundSummary):
        """All accepted replies in one aggregate_state_dicts call: (aggregate, seconds, contents, error metrics), or None.
        A reply holding NaN/Inf is dropped by the aggregation and rejected here."""
        rows = list(accepted)
        if not rows:
            return None
        states, weights, contents = ([row[j] for row in rows] for j in range(3))
        nodes = summary.accepted[-len(rows):]
        try:
            aggregated, seconds = self._aggregate(states, weights, reference, round_idx)
        except AllClientsInvalid:  # every reply held NaN/Inf
            aggregated, seconds = None, 0.0
        dropped = dict(aggregated.dropped) if aggregated is not None else dict.fromkeys(range(len(rows)), "every reply did")
        for i, reason in sorted(dropped.items()):
            summary.accepted.remove(nodes[i])
            summary.rejected[nodes[i]] = f"expected finite values, found NaN or Inf ({reason})"
            log(WARNING, "aggregate_train: round %d: rejected the reply of node %d: %s", summary.server_round, nodes[i],
                summary.rejected[nodes[i]])
        if aggregated is None:
            return None
        kept = [i for i in range(len(rows)) if i not in dropped]
        states, weights, contents = ([x[i] for i in kept] for x in (states, weights, contents))
        return aggregated, seconds, contents, self._stacked_error_metrics(states, weights, aggregated)

    def _stream(self, accepted, reference, round_idx, summary: RoundSummary):
        """Add each accepted reply to a StreamingAggregator and release it: (aggregate, seconds, contents, {}), or None."""
        agg = StreamingAggregator(
            reference, method=self.method, round=round_idx, lam=self.lam, schedule=self.schedule, initial=self.initial,
            allow_reflection=self.allow_reflection, lora_config=self.lora_config, device=self.device, **self.aggregate_options,
        )
        seconds, contents = 0.0, []
        for state, weight, content in accepted:
            seconds += self._timed(lambda: agg.add(state, weight))[1]
            contents.append(content)
            del state  # the decoded reply is released before the next one is decoded
        if not agg.count:
            return None
        aggregated, tail = self._timed(agg.result)
        return aggregated, seconds + tail, contents, {}

    def _error_metrics(self, prefix: str, states, aggregated, weights) -> Dict[str, float]:
        errors = state_dict_aggregation_error(states, aggregated, weights=weights, lora_config=self.lora_config)
        relative = [rel for _, rel in errors.values()]
        return {f"{prefix}-error-rel-mean": sum(relative) / len(relative), f"{prefix}-error-rel-max": max(relative)}

    def _round_metrics(self, summary: RoundSummary, new_global, seconds, lam_used) -> Dict[str, Union[int, float]]:
        modules, _ = parse_lora_keys(new_global.keys(), owner="global adapter")
        metrics = {
            "agg-time-s": seconds,
            "rank": max(new_global[m.key_A].shape[0] for m in modules),
            "replies-accepted": len(summary.accepted),
            "replies-rejected": len(summary.rejected),
        }
        chosen = list(lam_used.values())
        if self.lam == "auto" and chosen:
            metrics.update({"lam-mean": sum(chosen) / len(chosen), "lam-min": min(chosen), "lam-max": max(chosen)})
        return metrics

    def _stacked_error_metrics(self, states, weights, aggregated) -> Dict[str, float]:
        metrics: Dict[str, float] = {}
        if self.spec.factor_error and self.error_metrics:
            metrics.update(self._error_metrics("agg", states, aggregated, weights))
        if self.spec.aligns and self.report_fedit_error:
            fedit = aggregate_state_dicts(states, weights=weights, method="fedit")
            metrics.update(self._error_metrics("fedit", states, fedit, weights))
        return metrics

    def _client_metrics(self, contents) -> Dict[str, Union[int, float]]:
        try:
            return dict(self.train_metrics_aggr_fn(contents, self.weighted_by_key))
        except Exception as err:  # a user function or inconsistent client metrics must not lose the round
            log(WARNING, "aggregate_train: could not average the clients' train metrics (%s: %s)", type(err).__name__, err)
            return {}

    def _accumulate_base_deltas(self, deltas: Mapping[str, torch.Tensor]) -> None:
        for path, delta in deltas.items():
            delta = delta.detach().to("cpu")
            self.base_deltas[path] = self.base_deltas[path] + delta if path in self.base_deltas else delta.clone()

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Screen each reply, aggregate the good ones with fedrot_ext, report metrics.

        Args:
            server_round: Flower's 1-based round number.
            replies: the train replies.

        Returns:
            (global adapter, metrics), or (None, None) when no reply passed the checks
            (Flower then keeps the previous global adapter).

        Raises:
            RuntimeError: ``configure_train`` was not called for this round.
        """
        valid, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        valid = sorted(valid, key=lambda m: m.metadata.src_node_id)  # the result does not depend on arrival order
        reference = self._reference(server_round)
        round_idx = server_round - 1
        frozen = self._frozen_keys(reference, round_idx)
        summary = RoundSummary(server_round, failed={m.metadata.src_node_id: m.error.reason for m in errors})
        self.history.append(summary)
        accepted = self._accepted(valid, reference, frozen, summary)
        outcome = (self._stream if self.streaming else self._stack)(accepted, reference, round_idx, summary)
        if outcome is None:
            log(WARNING, "aggregate_train: round %d: no usable reply; the global adapter stays as it was", server_round)
            return None, None

        aggregated, seconds, contents, error_metrics = outcome
        new_global = {key: aggregated.get(key, ref) for key, ref in reference.items()}  # fedsa: B stays
        if self.server_optimizer is not None:
            new_global = self.server_optimizer.step(reference, new_global)
        metrics = {**self._round_metrics(summary, new_global, seconds, aggregated.lam), **error_metrics}
        summary.metrics = dict(metrics)
        self._accumulate_base_deltas(aggregated.base_deltas)
        log(
            INFO,
            "aggregate_train: round %d: fedrot_ext %s over %d replies (%d rejected) in %.1f ms; rel. error mean %s, max %s",
            server_round, self.method, len(summary.accepted), len(summary.rejected), 1e3 * seconds,
            _fmt(metrics.get("agg-error-rel-mean")), _fmt(metrics.get("agg-error-rel-max")),
        )
        return state_dict_to_arrayrecord(new_global, wire_format=self.wire_format), MetricRecord({**self._client_metrics(contents), **metrics})


    # ------------------------------------------------------------------ run, checkpoint, resume
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: Optional[ConfigRecord] = None, evaluate_config: Optional[ConfigRecord] = None,
              evaluate_fn=None) -> Result:
        """Run the rounds as Flower's ``Strategy.start`` does (train, federated evaluation, the optional
        server-side ``evaluate_fn``); with ``checkpoint_dir``, write a checkpoint after every round and
        resume after the newest one found there.

        Raises:
            ValueError: the checkpoint in ``checkpoint_dir`` was written by a run with other settings
                (method, λ, schedule, ...), or cannot be read.
        """
        if self.checkpoint_dir is None:
            return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result, arrays, done = Result(), initial_arrays, 0
        found = latest_checkpoint(self.checkpoint_dir)
        if found is not None:
            arrays, done = self._resume(read_checkpoint(found), result)
            log(INFO, "FedRotLoRA: resuming from checkpoint %s: rounds 1-%d are done, %d of %d to run",
                found, done, max(num_rounds - done, 0), num_rounds)
        else:
            self.summary()
            log(INFO, "FedRotLoRA: a checkpoint after every round goes to %s", self.checkpoint_dir)
            if evaluate_fn is not None:
                self._record(result.evaluate_metrics_serverapp, 0, evaluate_fn(0, initial_arrays))
        for server_round in range(done + 1, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            replies = grid.send_and_receive(messages=self.configure_train(server_round, arrays, train_config, grid), timeout=timeout)
            new_arrays, metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            self._record(result.train_metrics_clientapp, server_round, metrics)
            replies = grid.send_and_receive(messages=self.configure_evaluate(server_round, arrays, evaluate_config, grid), timeout=timeout)
            self._record(result.evaluate_metrics_clientapp, server_round, self.aggregate_evaluate(server_round, replies))
            if evaluate_fn is not None:
                self._record(result.evaluate_metrics_serverapp, server_round, evaluate_fn(server_round, arrays))
            self._write_checkpoint(server_round, arrays, result)
        return result

    @staticmethod
    def _record(table: Dict[int, MetricRecord], server_round: int, metrics: Optional[MetricRecord]) -> None:
        if metrics is not None:
            log(INFO, "\t└──> round %d: %s", server_round, metrics)
            table[server_round] = metrics

    def _settings(self) -> dict:
        """What a resumed run must share with the one that wrote the checkpoint."""
        opt = self.server_optimizer
        return {"method": self.method, "lam": self.lam, "schedule": self.schedule, "initial": self.initial,
                "allow_reflection": self.allow_reflection, "wire_format": self.wire_format,
                "server_optimizer": None if opt is None else opt.kind}

    def _write_checkpoint(self, server_round: int, arrays: ArrayRecord, result: Result) -> None:
        tables = {"train": result.train_metrics_clientapp, "evaluate": result.evaluate_metrics_clientapp,
                  "serverapp": result.evaluate_metrics_serverapp}
        write_checkpoint(self.checkpoint_dir, Checkpoint(
            server_round=server_round, settings=self._settings(),
            global_state=arrayrecord_to_state_dict(arrays, like=self._dtypes, copy=False), base_deltas=self.base_deltas,
            optimizer=None if self.server_optimizer is None else self.server_optimizer.state_dict(),
            history=[asdict(h) for h in self.history], metrics={k: {r: dict(m) for r, m in t.items()} for k, t in tables.items()},
            random_state=_json_random_state(),
        ))

    def _resume(self, ckpt: Checkpoint, result: Result) -> Tuple[ArrayRecord, int]:
        """Take the strategy's state and the metrics so far from `ckpt`; returns (global arrays, last round done)."""
        if ckpt.settings != self._settings():
            diff = {k: v for k, v in ckpt.settings.items() if self._settings().get(k) != v}
            raise ValueError(f"checkpoint_dir: {self.checkpoint_dir} holds a run with {diff}, this strategy has "
                             f"{ {k: self._settings().get(k) for k in diff} }; use another directory or the same settings")
        if self.server_optimizer is not None:
            self.server_optimizer.load_state_dict(ckpt.optimizer)
        self.base_deltas = dict(ckpt.base_deltas)
        self.history = [RoundSummary(**{**h, "rejected": {int(k): v for k, v in h["rejected"].items()},
                                        "failed": {int(k): v for k, v in h["failed"].items()}}) for h in ckpt.history]
        self._dtypes = {k: t.dtype for k, t in ckpt.global_state.items()}
        for kind, table in (("train", result.train_metrics_clientapp), ("evaluate", result.evaluate_metrics_clientapp),
                            ("serverapp", result.evaluate_metrics_serverapp)):
            table.update((r, MetricRecord(m)) for r, m in ckpt.metrics.get(kind, {}).items())
        if ckpt.random_state is not None:
            version, internal, gauss = ckpt.random_state
            random.setstate((version, tuple(internal), gauss))
        result.arrays = state_dict_to_arrayrecord(ckpt.global_state, wire_format=self.wire_format)
        return result.arrays, ckpt.server_round


def _json_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3e}"
