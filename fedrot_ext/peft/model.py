"""What touches a live model: dense LoRA updates in the base weight's layout, folding them
in, and which LoRA factor a client trains (FFA-LoRA freezes A, RoLoRA alternates by round).

peft applies ΔW = s · B A with s = lora_alpha / r (lora_alpha / √r with rsLoRA),
per-module r and alpha from ``rank_pattern`` / ``alpha_pattern``. The base weight
holds ΔW as is for ``nn.Linear``, but transposed for GPT-2 ``Conv1D``
(``fan_in_fan_out=True``, weight (in, out)) and for ``nn.Embedding`` (weight
(num_embeddings, embedding_dim), while lora_embedding_B A is (embedding_dim,
num_embeddings)). Forgetting that transpose is a known FedEx-LoRA bug elsewhere.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .._stacking import pad_rank
from .keys import LoraModule, parse_factor_key

PEFT_PREFIX = "base_model.model."


def _config_value(config, name: str, default=None):
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def pattern_value(patterns: Optional[Mapping], path: str, default):
    """peft's rule: a pattern matches a module name ending in ``.<pattern>`` (or equal to it)."""
    name = path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def module_scaling(lora_config, module: LoraModule, factor_ranks: Sequence[int], method: str) -> float:
    """LoRA scaling s of `module`'s aggregate under `lora_config` (a peft LoraConfig or its JSON dict).

    Args:
        lora_config: the clients' shared LoraConfig (r, lora_alpha, rank_pattern,
            alpha_pattern, use_rslora, use_dora).
        module: the LoRA module.
        factor_ranks: the module's rank on each client, to cross-check the config.
        method: the method that needs the scaling (for error messages).

    Returns:
        alpha / r, or alpha / √r with ``use_rslora``, at the aggregate's rank r: the largest
        of `factor_ranks` (clients of a smaller rank are rescaled to it by :func:`pad_client`).

    Raises:
        ValueError naming ``lora_config`` and the module: missing r/lora_alpha, a rank
        that none of the clients' factors has, or DoRA (not an additive update).
    """
    if _config_value(lora_config, "use_dora", False):
        raise ValueError(f"lora_config: use_dora=True is not supported by method {method!r} (a DoRA update is not additive)")
    r = _config_value(lora_config, "r")
    alpha = _config_value(lora_config, "lora_alpha")
    if r is None or alpha is None:
        raise ValueError(f"lora_config: expected 'r' and 'lora_alpha' (a peft LoraConfig or adapter_config.json), got r={r!r}, lora_alpha={alpha!r}")
    r = pattern_value(_config_value(lora_config, "rank_pattern"), module.path, r)
    alpha = pattern_value(_config_value(lora_config, "alpha_pattern"), module.path, alpha)
    if r not in factor_ranks:
        raise ValueError(
            f"lora_config: rank {r} for module {module.path!r} does not match its factors' rank "
            f"{sorted(set(factor_ranks))} (check r and rank_pattern)"
        )
    return alpha / _rank_divisor(lora_config, max(factor_ranks))


def _rank_divisor(lora_config, rank: int) -> float:
    """r in peft's scaling alpha / r, or √r with rsLoRA."""
    return math.sqrt(rank) if _config_value(lora_config, "use_rslora", False) else float(rank)


def rank_rescale(lora_config, rank: int, out_rank: int, where: str) -> float:
    """The factor √(s_rank / s_out) by which both LoRA factors of a rank-`rank` update are multiplied
    when zero-padded to `out_rank`, so that it keeps its own LoRA scaling: s_out · B′A′ = s_rank · B A
    (s = alpha / r, or alpha / √r with rsLoRA; the clients share alpha, so it cancels).

    Raises:
        ValueError naming ``lora_config`` and `where` when the ranks differ and no config says
        how peft scales (use_rslora).
    """
    if rank == out_rank:
        return 1.0
    if lora_config is None:
        raise ValueError(
            f"lora_config: required when ranks differ ({where} has rank {rank}, the aggregate {out_rank}): peft scales each "
            "client's update by lora_alpha / r, and zero-padding must keep that scaling (pass the clients' LoraConfig)"
        )
    return math.sqrt(_rank_divisor(lora_config, out_rank) / _rank_divisor(lora_config, rank))


def pad_client(t: torch.Tensor, rank: int, dim: int, lora_config, where: str) -> torch.Tensor:
    """One client's LoRA factor zero-padded to `rank` along `dim` and rescaled by :func:`rank_rescale`
    (a fresh tensor when padded; `t` itself when it already has the rank)."""
    padded = pad_rank(t, rank, dim)
    if padded is not t:
        padded.mul_(rank_rescale(lora_config, t.shape[dim], rank, where))
    return padded


def to_base_layout(delta: torch.Tensor, module: LoraModule, lora_config) -> torch.Tensor:
    """An (out, in) update B A in the layout of the module's base weight.

    Transposed for embeddings and for ``fan_in_fan_out`` (Conv1D) layers.
    """
    transposed = module.embedding or bool(_config_value(lora_config, "fan_in_fan_out", False))
    return delta.mT if transposed else delta


def _find_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    candidates = [path] + ([path[len(PEFT_PREFIX):]] if path.startswith(PEFT_PREFIX) else [])
    for candidate in candidates:
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise ValueError(f"base_deltas[{path!r}]: no such module in the model")


def fold_into_base(model: torch.nn.Module, base_deltas: Dict[str, torch.Tensor]) -> None:
    """Add each update to the frozen base weight of its module, in place (FedEx-LoRA, FLoRA).

    Args:
        model: the peft model (or the underlying model) whose base weights receive the updates.
        base_deltas: {module path: ΔW in the base weight's layout}, as in
            ``aggregate_state_dicts(...).base_deltas``.

    Raises:
        ValueError naming the module: not found, or a shape other than its base weight's
        (e.g. ``fan_in_fan_out`` missing from the LoraConfig for a Conv1D layer).
    """
    targets = []
    for path, delta in base_deltas.items():  # check everything before touching any weight
        module = _find_module(model, path)
        weight = (module.get_base_layer() if hasattr(module, "get_base_layer") else module).weight
        if weight.shape != delta.shape:
            raise ValueError(
                f"base_deltas[{path!r}]: expected the base weight's shape {tuple(weight.shape)}, got "
                f"{tuple(delta.shape)} (is fan_in_fan_out set in the LoraConfig for Conv1D layers?)"
            )
        targets.append((weight, delta))
    with torch.no_grad():
        for weight, delta in targets:
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))


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
