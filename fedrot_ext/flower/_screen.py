"""Per-reply checks the server runs before aggregating (Flower's own checks do not
look at shapes, dtypes or values, and they reject a whole round for one bad reply).

A reply is compared with the global adapter the server sent that round: the client
trained from it, so every key, shape and dtype must match it exactly.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from flwr.app import ArrayRecord, RecordDict

from .codec import arrayrecord_to_state_dict

State = Dict[str, torch.Tensor]


def _list_keys(keys: Iterable[str], limit: int = 3) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def reply_arrays(content: RecordDict, arrayrecord_key: str) -> ArrayRecord:
    """The reply's ``ArrayRecord``: the one under ``arrayrecord_key``, else the only one."""
    records = content.array_records
    if arrayrecord_key in records:
        return records[arrayrecord_key]
    if len(records) == 1:
        return next(iter(records.values()))
    raise ValueError(f"expected one ArrayRecord (named {arrayrecord_key!r}), got {len(records)}: {sorted(records)}")


def reply_weight(content: RecordDict, weighted_by_key: str) -> float:
    """The reply's aggregation weight: a finite number > 0 under ``weighted_by_key`` in its one MetricRecord."""
    records = content.metric_records
    if len(records) != 1:
        raise ValueError(f"expected exactly one MetricRecord (holding {weighted_by_key!r}), got {len(records)}")
    metrics = next(iter(records.values()))
    if weighted_by_key not in metrics:
        raise ValueError(f"its MetricRecord has no {weighted_by_key!r} (the aggregation weight)")
    value = metrics[weighted_by_key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{weighted_by_key!r} must be a finite number > 0, got {value!r}")
    return float(value)


def check_state(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], frozen_keys: Iterable[str] = (),
                check_finite: bool = True) -> None:
    """Check a decoded client adapter against the global adapter of the round.

    Args:
        state: the client's decoded adapter.
        reference: the global adapter sent this round.
        frozen_keys: keys whose values must equal the reference's (a factor the method keeps frozen).
        check_finite: False leaves NaN/Inf to the aggregation, which finds them as it reads every value.

    Raises:
        ValueError naming the key: missing or unexpected keys, a shape or dtype that differs
        from the reference, NaN/Inf in a floating tensor, a changed frozen factor.
    """
    missing = reference.keys() - state.keys()
    extra = state.keys() - reference.keys()
    if missing or extra:
        parts = ([f"missing {_list_keys(missing)}"] if missing else []) + ([f"unexpected {_list_keys(extra)}"] if extra else [])
        raise ValueError("keys differ from the global adapter: " + "; ".join(parts))
    for key, ref in reference.items():
        t = state[key]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise ValueError(
                f"{key!r}: expected shape {tuple(ref.shape)} and dtype {ref.dtype} (as the global adapter), "
                f"got {tuple(t.shape)} {t.dtype}"
            )
    floating = [k for k, t in state.items() if t.is_floating_point() and t.numel()] if check_finite else []
    if floating:
        finite = torch.stack([torch.isfinite(state[k]).all() for k in floating])
        if not bool(finite.all()):
            bad = floating[int((~finite).nonzero()[0, 0])]
            raise ValueError(f"{bad!r}: expected finite values, found NaN or Inf")
    for key in frozen_keys:
        if not torch.equal(state[key], reference[key].to(state[key].device)):
            raise ValueError(f"{key!r}: this factor is frozen this round (it must equal the global adapter's), but it changed")


def screen_reply(
    content: RecordDict,
    reference: Mapping[str, torch.Tensor],
    *,
    arrayrecord_key: str,
    weighted_by_key: str,
    frozen_keys: Iterable[str] = (),
    device: Optional[Union[str, torch.device]] = None,
    check_finite: bool = True,
) -> Tuple[State, float]:
    """Decode and check one reply; return (adapter state dict, weight). The tensors are read-only
    views of the reply's bytes where they can be (the reply must outlive them).

    Raises:
        ValueError with the reason (no key of the round is trusted before this passes).
    """
    weight = reply_weight(content, weighted_by_key)
    # like=: a Flower privacy wrapper or mod hands back plain float32 for a bf16/fp16 adapter
    state = arrayrecord_to_state_dict(reply_arrays(content, arrayrecord_key), device=device, like=reference, copy=False)
    check_state(state, reference, frozen_keys, check_finite)
    return state, weight
