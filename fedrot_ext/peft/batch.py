"""Validate peft client state dicts and stack them per key.

Every check here reads metadata only (keys, shapes, dtypes, devices); the NaN/Inf
check runs once on the stacked tensors with a single host synchronisation when
everything is finite. Errors name the client and the key. Nothing passed in is
modified: stacking and padding copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import torch

from .._checks import SUPPORTED_DTYPES
from .._stacking import nonfinite_index, pad_rank
from .keys import LoraModule, parse_lora_keys
from .model import pad_client, rank_rescale


@dataclass
class ClientBatch:
    """N validated client state dicts with the same keys.

    Attributes:
        states: the caller's state dicts (read only).
        labels: how errors name each client, e.g. ``client_states[2]``.
        modules: the paired LoRA modules, in key order of the first client.
        other_keys: every non-factor key (heads, biases, modules_to_save), in key order.
        ranks: ranks[m][i], the rank of module m on client i.
        device: the device every client tensor lives on.
    """

    states: List[Mapping[str, torch.Tensor]]
    labels: List[str]
    modules: List[LoraModule]
    other_keys: List[str]
    ranks: List[List[int]]
    device: torch.device

    def subset(self, kept: Sequence[int]) -> "ClientBatch":
        """The batch of the clients `kept` only (indices into ``states``); labels keep naming
        each client by its original index."""
        return ClientBatch(
            [self.states[i] for i in kept], [self.labels[i] for i in kept], self.modules, self.other_keys,
            [[ranks[i] for i in kept] for ranks in self.ranks], self.device,
        )


@dataclass
class FactorSet:
    """Factors of one state dict (a reference or an aggregate) per module of a batch;
    A[m] / B[m] are None for a factor that was not requested. rank[m] is its rank."""

    A: List[Optional[torch.Tensor]]
    B: List[Optional[torch.Tensor]]
    rank: List[int]


def _check_state(state, label: str) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"{label}: expected a state dict (mapping of str to tensor), got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"{label}: expected str keys, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{label}[{key!r}]: expected a torch.Tensor, got {type(value).__name__}")


def _check_same_keys(states, labels) -> None:
    first = states[0]
    for state, label in zip(states[1:], labels[1:]):
        for key in first:
            if key not in state:
                raise ValueError(f"{label}: missing key {key!r} that {labels[0]} has (every client must hold the same modules)")
        for key in state:
            if key not in first:
                raise ValueError(f"{label}: unexpected key {key!r} that {labels[0]} lacks (every client must hold the same modules)")


def _check_factors(state, label: str, module: LoraModule, first, first_label: str) -> int:
    """Check one client's factors of one module against themselves and the first client; return the rank."""
    a, b = state[module.key_A], state[module.key_B]
    a0, b0 = first[module.key_A], first[module.key_B]
    for key, t, layout in ((module.key_A, a, "(r, in_features)"), (module.key_B, b, "(out_features, r)")):
        if t.dim() != 2:
            raise ValueError(f"{label}[{key!r}]: expected a 2-D LoRA factor {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{label}[{key!r}]: expected dtype in {SUPPORTED_DTYPES}, got {t.dtype}")
    if a.dtype != a0.dtype:
        raise TypeError(f"{label}[{module.key_A!r}]: expected dtype {a0.dtype} (as {first_label}), got {a.dtype}")
    if a.shape[1] != a0.shape[1] or a.shape[0] == 0:
        raise ValueError(f"{label}[{module.key_A!r}]: expected in_features {a0.shape[1]} and rank >= 1 (as {first_label}), got shape {tuple(a.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"{label}[{module.key_B!r}]: expected dtype {a.dtype} (as {module.key_A!r}), got {b.dtype}")
    if tuple(b.shape) != (b0.shape[0], a.shape[0]):
        raise ValueError(
            f"{label}[{module.key_B!r}]: expected shape ({b0.shape[0]}, {a.shape[0]}) (out_features as {first_label}, "
            f"rank as {module.key_A!r}), got {tuple(b.shape)}"
        )
    return a.shape[0]


def _metadata(state) -> list:
    """(shape, dtype, device) of every tensor, in key order."""
    return [(t.shape, t.dtype, t.device) for t in state.values()]


def collect_clients(client_states: Sequence[Mapping[str, torch.Tensor]], labels: Optional[List[str]] = None) -> ClientBatch:
    """Validate N client state dicts and pair their LoRA factors.

    Args:
        client_states: list of peft adapter state dicts (saved or live-model keys).
        labels: names for error messages; default ``client_states[i]``.

    Returns:
        A :class:`ClientBatch`.

    Raises:
        TypeError/ValueError naming the client and key: not a list of state dicts,
        no clients, different key sets, unpaired or malformed factors, no LoRA factor
        at all, shape/rank/dtype/device disagreements.
    """
    if isinstance(client_states, Mapping) or not isinstance(client_states, (list, tuple)):
        raise TypeError(f"client_states: expected a list of state dicts (one per client), got {type(client_states).__name__}")
    if not client_states:
        raise ValueError("client_states: expected at least one client state dict, got an empty list")
    states = list(client_states)
    labels = labels or [f"client_states[{i}]" for i in range(len(states))]
    for state, label in zip(states, labels):
        _check_state(state, label)
    _check_same_keys(states, labels)
    modules, other_keys = parse_lora_keys(states[0].keys(), owner=labels[0])
    if not modules:
        raise ValueError(f"{labels[0]}: no LoRA factor keys found (expected keys like '<module>.lora_A.weight' and '<module>.lora_B.weight')")
    device = states[0][modules[0].key_A].device
    first = states[0]
    keys0, meta0 = list(first), _metadata(first)
    ranks0 = [_check_factors(first, labels[0], m, first, labels[0]) for m in modules]
    ranks = [[r] for r in ranks0]
    for i, (state, label) in enumerate(zip(states, labels)):
        if i > 0 and list(state) == keys0 and _metadata(state) == meta0:  # every check below would pass: the common case
            for m, r in zip(ranks, ranks0):
                m.append(r)
            continue
        for key, t in state.items():
            if t.device != device:
                raise ValueError(f"{label}[{key!r}]: expected device {device} (as every client tensor), got {t.device}")
        if i == 0:
            continue
        for m, module in zip(ranks, modules):
            m.append(_check_factors(state, label, module, first, labels[0]))
        for key in other_keys:
            t0, t = first[key], state[key]
            if t.shape != t0.shape or t.dtype != t0.dtype:
                raise ValueError(
                    f"{label}[{key!r}]: expected shape {tuple(t0.shape)} and dtype {t0.dtype} (as {labels[0]}), "
                    f"got {tuple(t.shape)} {t.dtype}"
                )
    return ClientBatch(states, labels, modules, other_keys, ranks, device)


def require_equal_ranks(batch: ClientBatch, method: str) -> None:
    """Raise ValueError naming the key when one module's rank differs between clients."""
    for m, ranks in zip(batch.modules, batch.ranks):
        for label, r in zip(batch.labels, ranks):
            if r != ranks[0]:
                raise ValueError(
                    f"{label}[{m.key_A!r}]: rank {r} differs from {batch.labels[0]}'s {ranks[0]}; method {method!r} "
                    "needs equal ranks (fedrot, fedit, fedex, flexlora and flora accept mixed ranks)"
                )


def collect_reference(reference, batch: ClientBatch, factors, label: str = "reference", check_finite: bool = True) -> FactorSet:
    """Look up one state dict's factors ("A", "B" or "AB", or one such string per module) for
    every module of `batch`.

    Tensors are cast to the clients' dtype and device (copies, never in place). ``check_finite=False``
    leaves the NaN/Inf check to the caller (the fused op flags a NaN/Inf reference as it reads it).

    Raises:
        TypeError/ValueError naming ``label`` and the key: not a state dict, a missing key,
        a shape that does not fit the clients' features, ranks of A and B that disagree,
        NaN/Inf values.
    """
    if not isinstance(reference, Mapping):
        raise TypeError(f"{label}: expected a state dict (the previous global adapter), got {type(reference).__name__}")
    found = FactorSet([], [], [])
    checked = []
    per_module = [factors] * len(batch.modules) if isinstance(factors, str) else list(factors)
    for m, wanted in zip(batch.modules, per_module):
        a0, b0 = batch.states[0][m.key_A], batch.states[0][m.key_B]
        got = {}
        for factor, key in (("A", m.key_A), ("B", m.key_B)):
            if factor not in wanted:
                continue
            if key not in reference:
                raise ValueError(f"{label}: missing key {key!r} that the clients have")
            t = reference[key]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{label}[{key!r}]: expected a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
            fits = t.dim() == 2 and t.numel() > 0 and (t.shape[1] == a0.shape[1] if factor == "A" else t.shape[0] == b0.shape[0])
            if not fits:
                want = f"(r, {a0.shape[1]})" if factor == "A" else f"({b0.shape[0]}, r)"
                raise ValueError(f"{label}[{key!r}]: expected shape {want} to fit the clients' factors, got {tuple(t.shape)}")
            got[factor] = t.to(device=batch.device, dtype=a0.dtype)
            checked.append((key, got[factor]))
        if len(got) == 2 and got["A"].shape[0] != got["B"].shape[1]:
            raise ValueError(f"{label}[{m.key_B!r}]: expected rank {got['A'].shape[0]} (as {m.key_A!r}), got shape {tuple(got['B'].shape)}")
        found.A.append(got.get("A"))
        found.B.append(got.get("B"))
        found.rank.append(got["A"].shape[0] if "A" in got else got["B"].shape[1])
    bad = nonfinite_index([t for _, t in checked]) if check_finite else None
    if bad is not None:
        raise ValueError(f"{label}[{checked[bad][0]!r}]: expected finite values, found NaN or Inf")
    return found


def stack_factors(batch: ClientBatch, ranks: Sequence[int], check: bool = True) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Stack every module's factors over clients, zero-padded to `ranks[m]` (not yet rescaled to the
    padded rank's LoRA scaling: see :func:`rescale_padded`).

    Args:
        batch: the validated clients.
        ranks: the rank to pad each module to.
        check: check for NaN/Inf (False: the caller screens the stacks itself).

    Returns:
        A[m] (N, ranks[m], in) and B[m] (N, out, ranks[m]) in the clients' dtype: fresh
        tensors, which the caller may modify in place.

    Raises:
        ValueError naming the client and key of the first factor with NaN/Inf (with `check`).
    """
    A = [torch.stack([pad_rank(s[m.key_A], r, 0) for s in batch.states]) for m, r in zip(batch.modules, ranks)]
    B = [torch.stack([pad_rank(s[m.key_B], r, 1) for s in batch.states]) for m, r in zip(batch.modules, ranks)]
    if check:
        check_finite(batch, A + B, factor_keys(batch))
    return A, B


def rescale_padded(batch: ClientBatch, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], lora_config) -> None:
    """Multiply, in place, both factors of every client whose rank is below its stack's by
    :func:`fedrot_ext.peft.model.rank_rescale`, so that its update keeps its own LoRA scaling."""
    for m, module in enumerate(batch.modules):
        rank = A[m].shape[1]
        for i, (r, label) in enumerate(zip(batch.ranks[m], batch.labels)):
            c = rank_rescale(lora_config, r, rank, f"{label}[{module.key_A!r}]")
            if c != 1.0:
                A[m][i].mul_(c)
                B[m][i].mul_(c)


def padded_factors(batch: ClientBatch, module: LoraModule, rank: int, dim: int, lora_config) -> List[torch.Tensor]:
    """Every client's A (dim 0) or B (dim 1) of `module` at `rank`: its own tensor, or a rescaled padded copy."""
    key = module.key_B if dim else module.key_A
    return [pad_client(s[key], rank, dim, lora_config, f"{label}[{key!r}]") for s, label in zip(batch.states, batch.labels)]


def factor_keys(batch: ClientBatch) -> List[str]:
    """The keys of ``stack_factors``' stacks, in order: every module's A key, then every B key."""
    return [m.key_A for m in batch.modules] + [m.key_B for m in batch.modules]


def stack_others(batch: ClientBatch, check: bool = True) -> List[torch.Tensor]:
    """Stack every non-factor tensor over clients: (N, *shape) per key of ``batch.other_keys``.

    Args:
        batch: the validated clients.
        check: check the floating tensors for NaN/Inf (False: the caller screens them).

    Raises:
        ValueError naming the client and key of the first floating tensor with NaN/Inf (with `check`).
    """
    stacks = [torch.stack([s[key] for s in batch.states]) for key in batch.other_keys]
    if check:
        floating = [(key, t) for key, t in zip(batch.other_keys, stacks) if t.is_floating_point()]
        check_finite(batch, [t for _, t in floating], [key for key, _ in floating])
    return stacks


def check_finite(batch: ClientBatch, stacks: Sequence[torch.Tensor], keys: Sequence[str]) -> None:
    """Raise ValueError naming client and key when a (N, ...) stack holds NaN/Inf."""
    bad = nonfinite_index(stacks)
    if bad is not None:
        client = nonfinite_index(list(stacks[bad].unbind(0)))
        raise ValueError(f"{batch.labels[client]}[{keys[bad]!r}]: expected finite values, found NaN or Inf")
