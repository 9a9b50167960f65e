"""fedrot_ext: fast, correct aggregation of LoRA adapters in federated fine-tuning.

Implements FedRot-LoRA (arXiv 2602.23638): client LoRA factors are rotated onto
the previous global factors (orthogonal Procrustes, soft strength λ) before
factor-wise averaging, in one fused C++/CUDA op over all layers and clients.
"""
from . import reference
from ._ops import accumulate_dtype, align_and_aggregate, procrustes_rotation
from ._types import ALIGN_MODES, Aggregate
from .adapter_io import load_adapter
from .baselines import fedex_residual, flexlora_aggregate, weighted_product_sum
from .lora_layout import fold_into_base
from .metrics import AggregationError, aggregation_error, state_dict_aggregation_error
from .peft_keys import LoraModule, parse_lora_keys
from .peft_state import METHODS, AggregatedState, aggregate_state_dicts, align_state_dict
from .schedule import SCHEDULES, alignment_for_round, rolora_trained_factor
from .trainable import set_trainable_factor

__version__ = "0.1.0"

__all__ = [
    "ALIGN_MODES",
    "Aggregate",
    "accumulate_dtype",
    "align_and_aggregate",
    "procrustes_rotation",
    "reference",
    "METHODS",
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
    "state_dict_aggregation_error",
    "weighted_product_sum",
]
