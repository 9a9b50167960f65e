"""Which LoRA factor a client trains: FFA-LoRA freezes A, RoLoRA alternates by round."""
from __future__ import annotations

from typing import List

import torch

from .peft_keys import parse_factor_key

__all__ = ["set_trainable_factor"]


def set_trainable_factor(model: torch.nn.Module, factor: str) -> List[str]:
    """Make only one LoRA factor trainable (``requires_grad``) in every LoRA module of `model`.

    FFA-LoRA: ``set_trainable_factor(model, "B")`` keeps A at its shared random
    initialisation (start every client from the same global adapter). RoLoRA:
    ``set_trainable_factor(model, rolora_trained_factor(round))`` each round. ``"AB"``
    makes both trainable again. Parameters that are not LoRA factors are left untouched.

    Args:
        model: a peft model (or any module whose parameter names follow peft's layout).
        factor: "A", "B" or "AB".

    Returns:
        The names of the LoRA factor parameters that are now frozen.

    Raises:
        ValueError: an unknown factor, or a model without LoRA factor parameters.
    """
    if factor not in ("A", "B", "AB"):
        raise ValueError(f"factor: expected 'A', 'B' or 'AB', got {factor!r}")
    frozen, found = [], False
    for name, param in model.named_parameters():
        parsed = parse_factor_key(name)
        if parsed is None:
            continue
        found = True
        trainable = parsed[2] in factor
        param.requires_grad_(trainable)
        if not trainable:
            frozen.append(name)
    if not found:
        raise ValueError("model: no LoRA factor parameters found (expected names like '<module>.lora_A.<adapter>.weight')")
    return frozen
