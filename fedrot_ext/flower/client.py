"""ClientApp helpers: read the global adapter, align before upload, build the train reply.

Client-side placement (secure aggregation): each client rotates its own trained
adapter onto the global adapter it started from (:func:`align_for_upload`), and the
server only averages (``FedRotLoRA(method="fedit")``, or Flower's stock ``FedAvg``, which reads the
default ``"numpy"`` wire format but returns bf16/fp16 adapters as float32). The server never needs an individual
update, and the result equals server-side ``FedRotLoRA(method="fedrot")`` to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from flwr.app import Message, MetricRecord, RecordDict

from ..peft.aggregate import align_state_dict
from . import _protocol as P
from .codec import arrayrecord_to_state_dict, check_wire_format, state_dict_to_arrayrecord

__all__ = ["RoundSettings", "round_settings", "read_global", "align_for_upload", "make_train_reply"]


@dataclass(frozen=True)
class RoundSettings:
    """What the server decided for this round (see :mod:`fedrot_ext.flower._protocol`).

    Attributes:
        method: the server's aggregation method (one of ``fedrot_ext.METHODS``).
        round: 0-based round index (Flower's ``server-round`` − 1).
        lam: soft-rotation strength in [0, 1], or "auto" (chosen per module by the server;
            client-side alignment cannot use it).
        schedule: FedRot-LoRA schedule ("alternate", "A", "B", "AB", "none").
        initial: first factor of the schedule, or None for the method's default.
        allow_reflection: rotate over O(r) instead of SO(r).
    """

    method: str = "fedrot"
    round: int = 0
    lam: Union[float, str] = 0.5
    schedule: str = "alternate"
    initial: Optional[str] = None
    allow_reflection: bool = False


def _lam_setting(value):
    """A float, or "auto" (the server chose λ per module; client-side alignment then refuses it)."""
    return value if value == "auto" else float(value)


def round_settings(config: Mapping) -> RoundSettings:
    """Read a round's settings from the ``ConfigRecord`` a ClientApp received.

    Entries the server did not send (a stock Flower strategy sends only ``server-round``
    plus your ``train_config``) take :class:`RoundSettings`' defaults.

    Args:
        config: the message's ``ConfigRecord`` (``msg.content["config"]``) or any mapping.

    Returns:
        A :class:`RoundSettings`.

    Raises:
        ValueError: neither ``fedrot-round`` nor Flower's ``server-round`` is present, or a
            value has the wrong type.
    """
    if P.CONFIG_ROUND in config:
        round_idx = config[P.CONFIG_ROUND]
    elif P.FLOWER_SERVER_ROUND in config:
        round_idx = config[P.FLOWER_SERVER_ROUND] - 1
    else:
        raise ValueError(f"config: expected {P.CONFIG_ROUND!r} or Flower's {P.FLOWER_SERVER_ROUND!r} to know the round")
    if isinstance(round_idx, bool) or not isinstance(round_idx, int) or round_idx < 0:
        raise ValueError(f"config: expected a non-negative int round index, got {round_idx!r}")
    defaults = RoundSettings()
    initial = config.get(P.CONFIG_INITIAL, "") or None
    return RoundSettings(
        method=str(config.get(P.CONFIG_METHOD, defaults.method)),
        round=round_idx,
        lam=_lam_setting(config.get(P.CONFIG_LAM, defaults.lam)),
        schedule=str(config.get(P.CONFIG_SCHEDULE, defaults.schedule)),
        initial=initial,
        allow_reflection=bool(config.get(P.CONFIG_ALLOW_REFLECTION, defaults.allow_reflection)),
    )


def read_global(
    msg: Message,
    *,
    arrayrecord_key: str = "arrays",
    device: Optional[Union[str, torch.device]] = None,
    like: Optional[Mapping[str, Union[torch.Tensor, torch.dtype]]] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Decode the global adapter (and fedex/flora base-weight updates) from a server message.

    Args:
        msg: the train or evaluate ``Message`` the ClientApp received.
        arrayrecord_key: the strategy's ``arrayrecord_key``.
        device: where to put the tensors (default: CPU).
        like: this client's adapter (or {key: dtype}): plain float32 arrays (from stock Flower code,
            e.g. ``FedAvg`` or a privacy wrapper's output) come back in its bf16/fp16 dtypes.

    Returns:
        (adapter, base_deltas): the global adapter state dict (load it with peft's
        ``set_peft_model_state_dict``), and {module path: cumulative ΔW} to add to the
        freshly loaded base weights with :func:`fedrot_ext.fold_into_base` (empty unless the
        server runs ``fedex`` or ``flora``).

    Raises:
        KeyError: the message has no ``ArrayRecord`` under ``arrayrecord_key``.
        ValueError: a corrupt array (see :func:`arrayrecord_to_state_dict`).
    """
    content = msg.content
    if arrayrecord_key not in content.array_records:
        raise KeyError(f"message: no ArrayRecord under {arrayrecord_key!r} (has {sorted(content.array_records)})")
    adapter = arrayrecord_to_state_dict(content.array_records[arrayrecord_key], device=device, like=like)
    deltas = {}
    if P.BASE_DELTAS_KEY in content.array_records:
        deltas = arrayrecord_to_state_dict(content.array_records[P.BASE_DELTAS_KEY], device=device)
    return adapter, deltas


def align_for_upload(
    trained: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    settings: Union[RoundSettings, Mapping],
) -> Dict[str, torch.Tensor]:
    """Client-side FedRot-LoRA: rotate this client's adapter onto the global one before upload.

    Uses :func:`fedrot_ext.align_state_dict` with the round's schedule; the rotation is
    applied whatever ``settings.method`` says (the server is expected to only average).
    Round 0 is never aligned (the schedule's rule), so the copy is unrotated there.

    Args:
        trained: this client's adapter after local training (peft saved layout).
        global_state: the global adapter this client started from (from :func:`read_global`).
        settings: a :class:`RoundSettings`, or the received ``ConfigRecord`` (read with
            :func:`round_settings`).

    Returns:
        A new state dict, same keys and dtypes: rotated factors, other tensors copied.

    Raises:
        ValueError/TypeError naming the key, as :func:`fedrot_ext.align_state_dict`.
    """
    if not isinstance(settings, RoundSettings):
        settings = round_settings(settings)
    return align_state_dict(
        trained,
        reference=global_state,
        round=settings.round,
        lam=settings.lam,
        schedule=settings.schedule,
        initial=settings.initial,
        allow_reflection=settings.allow_reflection,
    )


def make_train_reply(
    msg: Message,
    state: Mapping[str, torch.Tensor],
    num_examples: int,
    metrics: Optional[Mapping[str, float]] = None,
    *,
    arrayrecord_key: str = "arrays",
    metricrecord_key: str = "metrics",
    weighted_by_key: str = "num-examples",
    wire_format: Optional[str] = None,
) -> Message:
    """Build the reply to a train message: the adapter (any dtype, bf16 included) and its weight.

    Args:
        msg: the train ``Message`` being answered.
        state: the adapter to upload (e.g. ``get_peft_model_state_dict(model)``, or the output
            of :func:`align_for_upload`).
        num_examples: training examples processed this round (the aggregation weight, > 0).
        metrics: extra scalar metrics (e.g. ``{"train-loss": 0.4}``).
        arrayrecord_key, metricrecord_key, weighted_by_key: record names the strategy expects.
        wire_format: ``"numpy"`` or ``"compact"`` (see :mod:`fedrot_ext.flower.codec`); None: the
            format the server announced in the config (``fedrot-wire-format``), else ``"numpy"``.

    Returns:
        The reply ``Message``.

    Raises:
        ValueError: ``num_examples`` is not a positive int; an unknown ``wire_format``; or
            ``"compact"`` while the server's config carries Flower's ``clipping_norm`` (a client-side
            privacy mod such as ``fixedclipping_mod`` would then fail to read the reply as NumPy).
        TypeError: a tensor cannot be encoded (see :func:`state_dict_to_arrayrecord`).
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
        raise ValueError(f"num_examples: expected a positive int, got {num_examples!r}")
    config = msg.content.config_records.get("config", {}) if msg.has_content() else {}
    if wire_format is None:
        wire_format = str(config.get(P.CONFIG_WIRE_FORMAT, "numpy"))
    check_wire_format(wire_format)
    if wire_format == "compact" and P.FLOWER_CLIPPING_NORM in config:
        raise ValueError(
            f"wire_format: 'compact' bfloat16 arrays cannot be read by Flower's client-side clipping mods "
            f"(the config carries {P.FLOWER_CLIPPING_NORM!r}); use wire_format='numpy'"
        )
    record = MetricRecord({**dict(metrics or {}), weighted_by_key: num_examples})
    content = RecordDict({arrayrecord_key: state_dict_to_arrayrecord(state, wire_format=wire_format), metricrecord_key: record})
    return Message(content, reply_to=msg)

