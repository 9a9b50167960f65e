"""fedrot_ext: fast, correct aggregation of LoRA adapters in federated fine-tuning.

Implements FedRot-LoRA (arXiv 2602.23638): client LoRA factors are rotated onto
the previous global factors (orthogonal Procrustes, soft strength λ) before
factor-wise averaging, in one fused C++/CUDA op over all layers and clients.
"""
from ._runtime import build_info, check_running_torch

check_running_torch()  # before _C loads: a torch mismatch is a clear ImportError, not an undefined symbol

from . import reference  # noqa: E402
from ._ops import DEFAULT_LAM_GRID, accumulate_dtype, align_and_aggregate, procrustes_rotation
from ._types import ALIGN_MODES, Aggregate
from .baselines import fedex_residual, flexlora_aggregate, weighted_product_sum
from .methods import METHOD_TABLE, METHODS, Method
from .metrics import AggregationError, aggregation_error
from .peft.error import state_dict_aggregation_error
from .peft import (
    AggregatedState,
    LoraModule,
    aggregate_state_dicts,
    align_state_dict,
    fold_into_base,
    load_adapter,
    parse_lora_keys,
    set_trainable_factor,
    StreamingAggregator,
)
from .peft.merge import MergedState, merge_adapters
from .schedule import SCHEDULES, alignment_for_round, rolora_trained_factor
from .server_opt import SERVER_OPTIMIZERS, ServerOptimizer

__version__ = build_info()["version"]

__all__ = [
    "DEFAULT_LAM_GRID",
    "ALIGN_MODES",
    "Aggregate",
    "accumulate_dtype",
    "build_info",
    "align_and_aggregate",
    "procrustes_rotation",
    "reference",
    "METHODS",
    "METHOD_TABLE",
    "Method",
    "SCHEDULES",
    "AggregatedState",
    "AggregationError",
    "LoraModule",
    "aggregate_state_dicts",
    "aggregation_error",
    "align_state_dict",
    "alignment_for_round",
    "fedex_residual",
    "flexlora_aggregate",
    "fold_into_base",
    "load_adapter",
    "parse_lora_keys",
    "rolora_trained_factor",
    "set_trainable_factor",
    "StreamingAggregator",
    "state_dict_aggregation_error",
    "weighted_product_sum",
    "MergedState",
    "merge_adapters",
    "SERVER_OPTIMIZERS",
    "ServerOptimizer",
]
