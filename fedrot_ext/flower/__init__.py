"""Flower (flwr) integration: run fedrot_ext's aggregation inside a real federated deployment.

- :class:`FedRotLoRA`: a ``flwr.serverapp.strategy.FedAvg`` subclass that aggregates
  peft LoRA adapters with :func:`fedrot_ext.aggregate_state_dicts` (server-side placement),
  screens every reply (keys, shapes, dtypes, NaN/Inf, num-examples) and reports
  aggregation error, time and rank per round.
- Client helpers: :func:`read_global`, :func:`align_for_upload` (client-side placement for
  secure-aggregation deployments: align before upload, plain FedAvg on the server),
  :func:`make_train_reply`, :func:`round_settings`.
- :func:`state_dict_to_arrayrecord` / :func:`arrayrecord_to_state_dict`: lossless transport
  of torch state dicts, bfloat16 included (NumPy has no bfloat16), in the NumPy-readable
  ``"numpy"`` wire format (default) or the raw-bf16 ``"compact"`` one (:data:`WIRE_FORMATS`).

``import fedrot_ext`` never imports this package; importing it needs Flower
(``pip install "fedrot_ext[flower]"``).
"""
try:
    import flwr  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without flwr installed
    raise ImportError(
        "fedrot_ext.flower needs Flower (flwr >= 1.41 with the Message API); install it with "
        "pip install 'fedrot_ext[flower]'"
    ) from err

from .client import RoundSettings, align_for_upload, make_train_reply, read_global, round_settings
from . import checkpoint
from .codec import RAW_STYPE, WIRE_FORMATS, arrayrecord_to_state_dict, state_dict_to_arrayrecord
from .strategy import BASE_DELTAS_KEY, FedRotLoRA, RoundSummary

__all__ = [
    "BASE_DELTAS_KEY",
    "RAW_STYPE",
    "FedRotLoRA",
    "RoundSettings",
    "RoundSummary",
    "WIRE_FORMATS",
    "align_for_upload",
    "arrayrecord_to_state_dict",
    "make_train_reply",
    "read_global",
    "round_settings",
    "state_dict_to_arrayrecord",
]
