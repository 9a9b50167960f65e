"""Read peft ``save_pretrained`` directories for the CLI: config + safetensors weights, compatibility checks.

Every failure is an :class:`InputError` whose message names the directory and the file, so the
command can print it on one line and exit with status 2.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence

import torch

from ..peft.io import ADAPTER_FILE, load_adapter

CONFIG_FILE = "adapter_config.json"
# Config fields that change what the factors mean: clients must agree on them (ranks: see check_compatible).
MUST_MATCH = ("peft_type", "target_modules", "lora_alpha", "alpha_pattern", "use_rslora", "fan_in_fan_out")
RANK_FIELDS = ("r", "rank_pattern")


class InputError(ValueError):
    """Bad usage or bad input: the CLI prints the message and exits with status 2."""


class Adapter(NamedTuple):
    path: Path
    config: dict
    state: Dict[str, torch.Tensor]


def read_adapter(path) -> Adapter:
    """The ``adapter_config.json`` and ``adapter_model.safetensors`` of one directory (never a pickle)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a directory (expected a peft save_pretrained directory)")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"{config_path}: missing (expected a peft save_pretrained directory with {CONFIG_FILE} and {ADAPTER_FILE})")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{config_path}: not a readable JSON file ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{config_path}: expected a LoRA adapter config (peft_type LORA), got {str(config)[:80]}")
    _check_config_values(config, config_path)
    try:
        state = load_adapter(path)
    except (FileNotFoundError, ValueError) as err:  # the messages name the file (pickle refused, corrupt, missing)
        raise InputError(str(err)) from None
    except OSError as err:  # unreadable: a directory in its place, no permission, an I/O error
        raise InputError(f"{path / ADAPTER_FILE}: could not be read ({err.strerror or err})") from None
    return Adapter(path, config, state)


def _normalized(field: str, value):
    if field == "target_modules" and isinstance(value, (list, tuple, set)):
        return sorted(value)
    if field in ("rank_pattern", "alpha_pattern"):
        return dict(sorted((value or {}).items()))
    return value


def check_compatible(adapters: Sequence[Adapter], *, same_ranks: bool) -> None:
    """Refuse configs that disagree on a field of :data:`MUST_MATCH` (or on the ranks when `same_ranks`).

    Different ranks are otherwise left to the library (zero-padded for fedrot/fedit/fedex, exact for
    flexlora/flora, refused by ffa/rolora/fedsa with the library's own message)."""
    first = adapters[0]
    fields = MUST_MATCH + (RANK_FIELDS if same_ranks else ())
    for other in adapters[1:]:
        for field in fields:
            a, b = _normalized(field, first.config.get(field)), _normalized(field, other.config.get(field))
            if a != b:
                raise InputError(
                    f"{other.path / CONFIG_FILE}: {field} = {b!r} does not match {a!r} in {first.path / CONFIG_FILE}"
                )


def output_config(adapters: Sequence[Adapter]) -> dict:
    """The result's config: the first one, with the largest rank and rank_pattern entries over all inputs
    (the zero-padded result has the largest rank of each module)."""
    config = dict(adapters[0].config)
    config["r"] = max(int(a.config.get("r", 8)) for a in adapters)
    pattern: Dict[str, int] = {}
    for a in adapters:
        for key, rank in (a.config.get("rank_pattern") or {}).items():
            pattern[key] = max(pattern.get(key, 0), int(rank))
    config["rank_pattern"] = pattern
    return config


def config_with_ranks(config: dict, state) -> dict:
    """`config` with r and rank_pattern describing the factors' ranks in `state` (a merge may change
    them): r the most common rank, rank_pattern the modules of another."""
    from collections import Counter

    from ..peft.keys import parse_lora_keys
    from ..peft.model import PEFT_PREFIX

    modules, _ = parse_lora_keys(state.keys(), owner="merged")
    ranks = {m.path.removeprefix(PEFT_PREFIX): state[m.key_A].shape[0] for m in modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    return dict(config, r=r, rank_pattern={name: rank for name, rank in ranks.items() if rank != r})


def check_config_ranks(config: dict, state, out) -> None:
    """Refuse to write a config whose r / rank_pattern disagree with the factors' ranks (peft would not load it)."""
    from ..peft.keys import parse_lora_keys
    from ..peft.model import pattern_value

    modules, _ = parse_lora_keys(state.keys(), owner="aggregate")
    for m in modules:
        want = pattern_value(config.get("rank_pattern"), m.path, config.get("r"))
        if state[m.key_A].shape[0] != want:
            raise InputError(f"{out}: the aggregate of {m.name} has rank {state[m.key_A].shape[0]}, but the inputs' "
                             f"configs give it rank {want} (r / rank_pattern); nothing was written")


def _check_config_values(config: dict, config_path: Path) -> None:
    """The fields the command reads, with the types peft gives them; a bad one is named with its file."""
    def bad(field, expected):
        raise InputError(f"{config_path}: {field} = {config[field]!r}, expected {expected}")

    positive_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if "r" in config and not positive_int(config["r"]):
        bad("r", "an int >= 1")
    if "lora_alpha" in config and not number(config["lora_alpha"]):
        bad("lora_alpha", "a number")
    for field, ok, what in (("rank_pattern", positive_int, "ints >= 1"), ("alpha_pattern", number, "numbers")):
        value = config.get(field)
        if value is not None and not (isinstance(value, dict) and all(isinstance(k, str) and ok(v) for k, v in value.items())):
            bad(field, f"a mapping of module names to {what}")
    modules = config.get("target_modules")
    if modules is not None and not isinstance(modules, str) and not (
            isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        bad("target_modules", "a string or a list of strings")
    for field in ("fan_in_fan_out", "use_rslora", "use_dora"):
        if config.get(field) is not None and not isinstance(config[field], bool):
            bad(field, "true or false")


def client_weights(text: str, n: int) -> List[float]:
    """``--weights n1,n2,...``: one non-negative number per client directory."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--weights: expected comma-separated numbers, got {text!r}") from None
    if len(values) != n:
        raise InputError(f"--weights: expected {n} values (one per client directory), got {len(values)}")
    return values
