"""The peft layer: adapter state dicts in, aggregated state dicts out.

- :mod:`.keys`: parse state-dict keys and pair each module's lora_A with its lora_B;
- :mod:`.batch`: validate N clients once and stack them per module;
- :mod:`.policy`: invalid clients, norm clipping and noise over whole adapters;
- :mod:`.aggregate`: :func:`aggregate_state_dicts` and :func:`align_state_dict`;
- :mod:`.model`: base-weight layouts, :func:`fold_into_base`, :func:`set_trainable_factor`;
- :mod:`.streaming`: :class:`StreamingAggregator`, one client at a time (many clients);
- :mod:`.io`: :func:`load_adapter` (safetensors only).
"""
from .aggregate import AggregatedState, aggregate_state_dicts, align_state_dict
from .io import load_adapter
from .keys import LoraModule, parse_lora_keys
from .model import fold_into_base, set_trainable_factor
from .streaming import StreamingAggregator

__all__ = [
    "AggregatedState",
    "LoraModule",
    "aggregate_state_dicts",
    "align_state_dict",
    "fold_into_base",
    "load_adapter",
    "parse_lora_keys",
    "set_trainable_factor",
    "StreamingAggregator",
]
