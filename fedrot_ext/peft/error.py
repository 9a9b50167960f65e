"""The aggregation error over peft state dicts, per LoRA module (the diagnostic of :mod:`fedrot_ext.metrics`)."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

import torch

from .._checks import normalized_weights
from ..metrics import error_of_factors
from .batch import collect_clients, collect_reference, rescale_padded, stack_factors

__all__ = ["state_dict_aggregation_error"]


def state_dict_aggregation_error(
    client_states: Sequence[Mapping[str, torch.Tensor]], aggregated: Mapping[str, torch.Tensor], *, weights=None,
    lora_config=None,
) -> Dict[str, Tuple[float, float]]:
    """:func:`aggregation_error` over peft state dicts, per LoRA module.

    Args:
        client_states: N peft adapter state dicts (see :func:`fedrot_ext.aggregate_state_dicts`).
        aggregated: the aggregated state dict (its lora_A/lora_B factors are compared).
        weights: (N,) client weights as used for the aggregation; None means uniform.
        lora_config: the clients' LoraConfig; required when ranks differ (each client's update is
            taken at its own LoRA scaling, in the units of the aggregate's rank, as the aggregation takes it).

    Returns:
        {module name: (absolute, relative)} as Python floats (one host synchronisation).

    Raises:
        ValueError/TypeError naming the client and key for malformed client states, or
        ``aggregated`` and the key for a missing or mis-shaped factor.
    """
    batch = collect_clients(client_states)
    agg = collect_reference(aggregated, batch, "AB", label="aggregated")
    ranks = [max(rs + [r]) for rs, r in zip(batch.ranks, agg.rank)]
    A, B = stack_factors(batch, ranks)  # names the client and key of a NaN
    rescale_padded(batch, A, B, lora_config)
    w = normalized_weights(weights, len(batch.states), batch.device, torch.float64)
    result = error_of_factors(A, B, agg.A, agg.B, w)  # float64 a chunk of modules at a time (they may differ in dtype)
    values = torch.stack([result.absolute, result.relative], dim=1).tolist()
    return {m.name: (v[0], v[1]) for m, v in zip(batch.modules, values)}
