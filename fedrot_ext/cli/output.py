"""Write the aggregated adapter atomically: a temporary directory next to OUT_DIR, then one rename.

An interrupted run leaves at most a hidden ``.OUT_DIR.tmp-*`` directory, never a half-written OUT_DIR.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Mapping

import torch

from ..peft.io import ADAPTER_FILE
from .adapters import CONFIG_FILE, InputError

BASE_DELTAS_FILE = "base_deltas.safetensors"


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse before any work: an existing OUT_DIR (unless `overwrite`), a missing or unwritable parent."""
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{parent}: parent directory of --out does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{parent}: not writable (needed for {out})")


def _contiguous(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def write_adapter(out: Path, state: Mapping[str, torch.Tensor], config: dict, base_deltas: Mapping[str, torch.Tensor], overwrite: bool) -> None:
    """OUT_DIR with adapter_config.json, adapter_model.safetensors and, when non-empty, base_deltas.safetensors
    ({module path: ΔW in the base weight's layout, already scaled}; fold with fedrot_ext.fold_into_base)."""
    from safetensors.torch import save_file

    parent = out.parent if str(out.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        save_file(_contiguous(state), str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if base_deltas:
            save_file(_contiguous(base_deltas), str(tmp / BASE_DELTAS_FILE), metadata={"format": "pt"})
        if out.exists():  # --overwrite: move the old one aside first, so OUT_DIR is always complete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as err:
        raise InputError(f"{out}: could not write ({err})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
