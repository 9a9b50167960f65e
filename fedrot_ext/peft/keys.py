"""Parse peft state-dict keys and pair each module's lora_A with its lora_B.

Pairing is structural: a key is split on dots, the last LoRA factor token
(``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``) splits it into
the module path before it and the suffix after it, and the suffix must be one of
the layouts peft writes:

- saved adapters (``get_peft_model_state_dict``, ``adapter_model.safetensors``):
  ``<module>.lora_A.weight``, ``<module>.lora_embedding_A``;
- a live model's ``state_dict()``: ``<module>.lora_A.<adapter>.weight``,
  ``<module>.lora_embedding_A.<adapter>``.

``<module>.lora_B[.<adapter>].bias`` (peft's ``lora_bias``) is not a factor: it is
averaged like any other tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

# token -> (factor, embedding layer?)
FACTOR_TOKENS = {
    "lora_A": ("A", False),
    "lora_B": ("B", False),
    "lora_embedding_A": ("A", True),
    "lora_embedding_B": ("B", True),
}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module and the keys of its two factors.

    Attributes:
        path: module path as it appears in the keys, e.g.
            ``base_model.model.roberta.encoder.layer.0.attention.self.query``.
        adapter: adapter name in live-model keys (``"default"``), None in saved adapters.
        key_A: key of the (r, in_features) factor (``lora_A`` / ``lora_embedding_A``).
        key_B: key of the (out_features, r) factor (``lora_B`` / ``lora_embedding_B``).
        embedding: True for an ``nn.Embedding`` layer (A is (r, num_embeddings),
            B is (embedding_dim, r); the base weight holds the transposed product).
    """

    path: str
    adapter: Optional[str]
    key_A: str
    key_B: str
    embedding: bool

    @property
    def name(self) -> str:
        """Readable identifier: the path, plus ``[adapter]`` for live-model keys."""
        return self.path if self.adapter is None else f"{self.path}[{self.adapter}]"


def parse_factor_key(key: str) -> Optional[Tuple[str, Optional[str], str, bool]]:
    """Split a LoRA factor key into (module path, adapter, factor "A"/"B", embedding?).

    Returns None for keys that are not LoRA factors (heads, biases, modules_to_save).

    Raises:
        ValueError: the key contains a LoRA factor token in a layout peft does not write.
    """
    tokens = key.split(".")
    positions = [j for j, token in enumerate(tokens) if token in FACTOR_TOKENS]
    if not positions:
        return None
    j = positions[-1]
    factor, embedding = FACTOR_TOKENS[tokens[j]]
    suffix = tokens[j + 1:]
    if not embedding and suffix[-1:] == ["bias"] and len(suffix) <= 2:
        return None  # lora_bias: an ordinary trainable tensor
    if embedding:
        ok = len(suffix) <= 1
        adapter = suffix[0] if suffix else None
    else:
        ok = len(suffix) in (1, 2) and suffix[-1] == "weight"
        adapter = suffix[0] if len(suffix) == 2 else None
    if not ok or j == 0 or (adapter is not None and not adapter):
        expected = (
            "'<module>.lora_embedding_A' or '<module>.lora_embedding_A.<adapter>'"
            if embedding
            else "'<module>.lora_A.weight' or '<module>.lora_A.<adapter>.weight'"
        )
        raise ValueError(f"{key!r}: unrecognised LoRA key layout; expected {expected}")
    return ".".join(tokens[:j]), adapter, factor, embedding


def parse_lora_keys(keys: Iterable[str], owner: str = "state dict") -> Tuple[List[LoraModule], List[str]]:
    """Pair every LoRA factor key with its partner, in the order the modules first appear.

    Args:
        keys: state-dict keys.
        owner: how error messages name the state dict (e.g. ``"client_states[2]"``).

    Returns:
        (modules, other_keys): the paired LoRA modules and every key that is not a factor.

    Raises:
        ValueError: a factor key has no partner (naming it and the key it expected), or
            an unrecognised LoRA key layout.
    """
    found = {}  # (path, adapter, embedding) -> {"A": key, "B": key}
    others = []
    for key in keys:
        try:
            parsed = parse_factor_key(key)
        except ValueError as err:
            raise ValueError(f"{owner}: {err}") from None
        if parsed is None:
            others.append(key)
            continue
        path, adapter, factor, embedding = parsed
        found.setdefault((path, adapter, embedding), {})[factor] = key
    modules = []
    for (path, adapter, embedding), pair in found.items():
        for have, missing in (("A", "B"), ("B", "A")):
            if missing not in pair:
                raise ValueError(
                    f"{owner}: key {pair[have]!r} has no matching lora_{missing} key "
                    f"(expected {_partner_key(pair[have], have, missing)!r})"
                )
        modules.append(LoraModule(path, adapter, pair["A"], pair["B"], embedding))
    return modules, others


def _partner_key(key: str, have: str, missing: str) -> str:
    tokens = key.split(".")
    j = max(i for i, token in enumerate(tokens) if token in FACTOR_TOKENS)
    tokens[j] = tokens[j][: -len(have)] + missing
    return ".".join(tokens)
