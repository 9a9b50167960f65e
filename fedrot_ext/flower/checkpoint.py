"""Checkpoints of a :class:`fedrot_ext.flower.FedRotLoRA` run, so that a server that dies resumes.

After every round the strategy writes one directory ``round-NNNNNN`` under its
``checkpoint_dir`` with everything the next round needs:

- ``global.safetensors``: the global adapter, in its own dtypes;
- ``base_deltas.safetensors``: fedex / flora's cumulative base-weight updates (when any);
- ``server_optimizer.safetensors``: the server optimizer's moments and master copies (when any);
- ``state.json``: the round number, the settings the run was started with, the optimizer's
  hyper-parameters and step count, the per-round summaries and metrics, and the state of
  Python's ``random`` (Flower samples nodes with it).

The directory is written under a temporary name, flushed to disk and renamed: a checkpoint
directory is complete or absent, whenever the process is killed. Older checkpoints and
leftovers of an interrupted write are removed after the rename. Tensors go through
safetensors, never pickle.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file

__all__ = ["Checkpoint", "latest_checkpoint", "read_checkpoint", "write_checkpoint"]

FORMAT = 1
_NAME = re.compile(r"^round-(\d{6})$")
_STATE, _GLOBAL, _DELTAS, _OPTIMIZER = "state.json", "global.safetensors", "base_deltas.safetensors", "server_optimizer.safetensors"
_TABLES = ("m", "v", "master")


@dataclass
class Checkpoint:
    """One round's checkpoint.

    Attributes:
        server_round: the last round it holds (1-based, as Flower counts).
        settings: what the run was started with; a resume with other settings is refused.
        global_state: the global adapter after that round.
        base_deltas: fedex / flora's cumulative base-weight updates.
        optimizer: the server optimizer's ``state_dict()``, or None.
        history: the per-round summaries (as dicts).
        metrics: {"train": {round: metrics}, "evaluate": {...}, "serverapp": {...}}.
        random_state: ``random.getstate()`` after that round, as JSON lists.
    """

    server_round: int
    settings: dict
    global_state: Dict[str, torch.Tensor]
    base_deltas: Dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: Optional[dict] = None
    history: List[dict] = field(default_factory=list)
    metrics: Dict[str, Dict[int, dict]] = field(default_factory=dict)
    random_state: Optional[list] = None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(path))
    _fsync(path)


def write_checkpoint(directory, ckpt: Checkpoint) -> Path:
    """Write `ckpt` as ``directory/round-NNNNNN`` (complete or absent at every instant); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"round-{ckpt.server_round:06d}"
    staging = directory / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    _save(ckpt.global_state, staging / _GLOBAL)
    if ckpt.base_deltas:
        _save(ckpt.base_deltas, staging / _DELTAS)
    scalars = None
    if ckpt.optimizer is not None:
        scalars = {k: v for k, v in ckpt.optimizer.items() if k not in _TABLES}
        _save({f"{table}/{key}": t for table in _TABLES for key, t in ckpt.optimizer.get(table, {}).items()}, staging / _OPTIMIZER)
    state = {
        "format": FORMAT, "server_round": ckpt.server_round, "settings": ckpt.settings, "optimizer": scalars,
        "dtypes": {k: str(t.dtype).removeprefix("torch.") for k, t in ckpt.global_state.items()},
        "history": ckpt.history, "metrics": {kind: {str(r): m for r, m in per.items()} for kind, per in ckpt.metrics.items()},
        "random_state": ckpt.random_state,
    }
    (staging / _STATE).write_text(json.dumps(state))
    _fsync(staging / _STATE)
    _fsync(staging)
    if final.exists():  # the same round written again (a rerun after the last checkpoint): the new one wins
        aside = directory / f".{final.name}.old-{os.getpid()}"
        os.rename(final, aside)
        os.rename(staging, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(staging, final)
    _fsync(directory)
    for old in directory.iterdir():  # earlier rounds and leftovers of interrupted writes
        if old != final and (_NAME.match(old.name) or old.name.startswith(".round-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory) -> Optional[Path]:
    """The newest complete checkpoint directory under `directory`, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and (p / _STATE).is_file()]
    return max(found, key=lambda p: p.name, default=None)


def read_checkpoint(path) -> Checkpoint:
    """Read a checkpoint directory written by :func:`write_checkpoint`.

    Raises:
        ValueError naming the file: not a checkpoint of this format, or unreadable.
    """
    path = Path(path)
    try:
        state = json.loads((path / _STATE).read_text())
        if state.get("format") != FORMAT:
            raise ValueError(f"format {state.get('format')!r}, expected {FORMAT}")
        global_state = load_file(str(path / _GLOBAL))
        base_deltas = load_file(str(path / _DELTAS)) if (path / _DELTAS).is_file() else {}
        optimizer = None
        if state["optimizer"] is not None:
            tables = load_file(str(path / _OPTIMIZER))
            optimizer = dict(state["optimizer"])
            for table in _TABLES:
                optimizer[table] = {k.split("/", 1)[1]: t for k, t in tables.items() if k.split("/", 1)[0] == table}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable FedRotLoRA checkpoint ({err})") from None
    order = list(state["dtypes"])  # the adapter's key order
    return Checkpoint(
        server_round=int(state["server_round"]), settings=state["settings"],
        global_state={k: global_state[k] for k in order}, base_deltas=base_deltas, optimizer=optimizer,
        history=state["history"], metrics={kind: {int(r): m for r, m in per.items()} for kind, per in state["metrics"].items()},
        random_state=state["random_state"],
    )
