"""Load client adapters from disk: safetensors only.

A pickle file (peft's legacy ``adapter_model.bin``, ``torch.save`` output) can run
arbitrary code when loaded, and a federated server loads files that clients sent:
such files are refused, also when they hide behind a ``.safetensors`` name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Union

import torch

__all__ = ["load_adapter", "ADAPTER_FILE"]

ADAPTER_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _refuse_pickle(path: Path) -> None:
    raise ValueError(
        f"{path}: refusing to load a pickle file (it can execute arbitrary code); fedrot_ext loads "
        "safetensors only. Re-save the adapter with save_pretrained(..., safe_serialization=True) "
        "or safetensors.torch.save_file in a trusted environment."
    )


def _looks_like_pickle(path: Path) -> bool:
    """torch.save zip archives start with 'PK', raw pickles with 0x80 and a protocol byte;
    a safetensors file starts with an 8-byte header length followed by '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":
        return False
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def load_adapter(path: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """Read an adapter state dict from a ``.safetensors`` file or a folder holding ``adapter_model.safetensors``.

    Args:
        path: the file, or a ``save_pretrained`` folder.
        device: where to place the tensors.

    Returns:
        {key: tensor} with the keys and dtypes stored in the file (peft's saved layout,
        ready for :func:`fedrot_ext.aggregate_state_dicts`).

    Raises:
        FileNotFoundError: no such file, or a folder without ``adapter_model.safetensors``.
        ValueError: a pickle file (by suffix or content), or a file that is not valid safetensors.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        candidate = path / ADAPTER_FILE
        if not candidate.is_file():
            pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                _refuse_pickle(pickles[0])
            raise FileNotFoundError(f"{path}: no {ADAPTER_FILE} in this folder")
        path = candidate
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such adapter file")
    if path.suffix.lower() in PICKLE_SUFFIXES or _looks_like_pickle(path):
        _refuse_pickle(path)
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from err
