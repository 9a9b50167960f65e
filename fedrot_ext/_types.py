"""Result types and constants shared by the fused op and the reference."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

ALIGN_MODES = ("none", "A", "B", "AB")
# The candidates of lam="auto", in the op, the float64 reference and every caller.
DEFAULT_LAM_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
# Integer codes passed to the C++ op (csrc/align_aggregate.h: AlignMode).
ALIGN_CODES = {"none": 0, "A": 1, "B": 2, "AB": 3}
# Bits of the op's status output, as kStatus* in csrc/align_aggregate.h.
STATUS_AGGREGATE_NONFINITE, STATUS_REFERENCE_NONFINITE = 1, 2


def align_uses(align: str) -> Tuple[bool, bool]:
    """(uses ref_A, uses ref_B): which references an align mode reads."""
    return align in ("A", "AB"), align in ("B", "AB")


def module_align(align: str, embedding: bool) -> str:
    """The align mode of one peft module: the factor playing A's role is mirrored for
    embeddings (peft zero-initialises lora_embedding_A and randomises lora_embedding_B,
    the reverse of linear layers), so "A" becomes "B" there and vice versa."""
    return {"A": "B", "B": "A"}.get(align, align) if embedding else align


class Aggregate(NamedTuple):
    """Result of an aggregation over L LoRA layers.

    A[l]: (r_l, in_l) aggregated A factor; B[l]: (out_l, r_l) aggregated B factor,
    both in the input dtype. rotations[l]: (N, r_l, r_l) per-client rotations R_i
    (float32, or float64 for float64 input) when requested, else None.
    dropped: (client index, reason) of the clients left out with on_invalid="skip".
    lam: the soft-rotation strength each layer used (the chosen one with lam="auto").
    """

    A: List[torch.Tensor]
    B: List[torch.Tensor]
    rotations: Optional[List[torch.Tensor]] = None
    dropped: Tuple[Tuple[int, str], ...] = ()
    lam: Tuple[float, ...] = ()
