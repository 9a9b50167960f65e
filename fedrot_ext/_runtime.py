"""Checks of the build record against the running torch and the CUDA device in use."""
from __future__ import annotations

import functools
import os

import torch

from . import _build

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def _record() -> dict:
    return _build.read_info(_PACKAGE_DIR)


def build_info() -> dict:
    """What the extension was built against: package version, torch, torch's CUDA, whether CUDA kernels were
    compiled, nvcc, the SASS/PTX architectures and the host compiler flags. A copy: editing it changes nothing."""
    return dict(_record())


def check_running_torch() -> None:
    info = _record()
    message = _build.mismatch_message(info["torch"], info["torch_cuda"], torch.__version__, torch.version.cuda,
                                      f"in {_PACKAGE_DIR}")
    if message:
        raise ImportError(message)


@functools.lru_cache(maxsize=None)
def _device_message(index: int):
    return _build.cuda_device_message(_record(), torch.cuda.get_device_name(index),
                                      torch.cuda.get_device_capability(index))


def check_device(device: torch.device) -> None:
    """On the first call for each CUDA device: a clear error when this build cannot run there (cached, no sync)."""
    if device.type != "cuda":
        return
    message = _device_message(device.index if device.index is not None else torch.cuda.current_device())
    if message:
        raise RuntimeError(message)
