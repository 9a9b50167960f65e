"""Lossless transport of torch state dicts in Flower ``ArrayRecord``s, bfloat16 included.

Flower serialises every ``Array`` through NumPy (``np.save``), and NumPy has no
bfloat16: ``ArrayRecord(state_dict)`` fails on a bf16 adapter, and casting to float32
doubles the upload. Here a bf16 tensor travels as its raw 16-bit patterns in
little-endian order, in an ``Array`` whose ``stype`` is :data:`RAW_STYPE` and whose
``dtype`` is ``"bfloat16"``; decoding reinterprets the bits, so the round trip is
bit-exact. Every other dtype uses Flower's own NumPy encoding unchanged, so float32 /
float16 records stay readable by stock Flower strategies.

Decoding checks what Flower does not: that the bytes match the declared dtype and
shape. A reply that lies about them raises ``ValueError`` naming the key.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Union

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

__all__ = ["RAW_STYPE", "state_dict_to_arrayrecord", "arrayrecord_to_state_dict"]

RAW_STYPE = "fedrot_ext.raw-le"
# dtypes NumPy cannot hold -> the integer type of the same width that carries their bits
_RAW_DTYPES = {"bfloat16": (torch.bfloat16, torch.int16, "<i2")}
_RAW_BY_TORCH = {torch_dtype: (name, bits, wire) for name, (torch_dtype, bits, wire) in _RAW_DTYPES.items()}


def _encode(key: str, tensor: torch.Tensor) -> Array:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"state[{key!r}]: expected a torch.Tensor, got {type(tensor).__name__}")
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype in _RAW_BY_TORCH:
        name, bits, wire = _RAW_BY_TORCH[t.dtype]
        data = t.view(bits).numpy().astype(wire, copy=False).tobytes()
        return Array(dtype=name, shape=tuple(int(d) for d in t.shape), stype=RAW_STYPE, data=data)
    try:
        return Array.from_numpy_ndarray(t.numpy())
    except TypeError as err:
        raise TypeError(f"state[{key!r}]: dtype {t.dtype} has no NumPy or raw encoding ({err})") from None


def _decode_raw(key: str, array: Array) -> torch.Tensor:
    if array.dtype not in _RAW_DTYPES:
        raise ValueError(f"{key!r}: stype {RAW_STYPE!r} carries only {sorted(_RAW_DTYPES)}, got dtype {array.dtype!r}")
    torch_dtype, bits, wire = _RAW_DTYPES[array.dtype]
    shape = tuple(array.shape)
    count = math.prod(shape)
    width = np.dtype(wire).itemsize
    if any(d < 0 for d in shape) or len(array.data) != count * width:
        raise ValueError(f"{key!r}: {len(array.data)} bytes do not hold a {array.dtype} array of shape {shape}")
    ints = np.frombuffer(array.data, dtype=wire).astype(np.dtype(wire).newbyteorder("="))
    return torch.from_numpy(ints).view(torch_dtype).reshape(shape)


def _decode_numpy(key: str, array: Array) -> torch.Tensor:
    try:
        values = array.numpy()
    except Exception as err:  # np.load raises several error types for corrupt payloads
        raise ValueError(f"{key!r}: not a valid NumPy payload ({type(err).__name__}: {err})") from None
    if tuple(values.shape) != tuple(array.shape) or str(values.dtype) != array.dtype:
        raise ValueError(
            f"{key!r}: declared dtype {array.dtype} and shape {tuple(array.shape)}, but the payload holds "
            f"{values.dtype} of shape {tuple(values.shape)}"
        )
    if not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(np.ascontiguousarray(values))
    except TypeError as err:
        raise ValueError(f"{key!r}: dtype {values.dtype} cannot become a torch tensor ({err})") from None


def state_dict_to_arrayrecord(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Encode a torch state dict as a Flower ``ArrayRecord``, keeping every dtype.

    Args:
        state: {name: tensor}; tensors may live on any device (they are copied to the CPU).

    Returns:
        An ``ArrayRecord`` with the same keys in the same order. bfloat16 tensors use
        :data:`RAW_STYPE`; every other dtype uses Flower's NumPy encoding.

    Raises:
        TypeError: a value is not a tensor, a key is not a str, or a dtype can be encoded neither way.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a mapping of str to torch.Tensor, got {type(state).__name__}")
    record = ArrayRecord()
    for key, tensor in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state: expected str keys, got {key!r}")
        record[key] = _encode(key, tensor)
    return record


def arrayrecord_to_state_dict(
    record: ArrayRecord, *, device: Optional[Union[str, torch.device]] = None
) -> Dict[str, torch.Tensor]:
    """Decode an ``ArrayRecord`` (from :func:`state_dict_to_arrayrecord` or stock Flower) into tensors.

    Args:
        record: the ``ArrayRecord``.
        device: where to put the tensors; None keeps them on the CPU.

    Returns:
        {name: tensor} in the record's key order, with the dtypes that were encoded
        (bfloat16 comes back as bfloat16, bit for bit).

    Raises:
        TypeError: ``record`` is not an ``ArrayRecord``.
        ValueError naming the key: an unknown serialisation type, a corrupt payload, or
            bytes that do not match the declared dtype and shape.
    """
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"record: expected a flwr.app.ArrayRecord, got {type(record).__name__}")
    state = {}
    for key, array in record.items():
        if array.stype == RAW_STYPE:
            tensor = _decode_raw(key, array)
        elif array.stype == SType.NUMPY:
            tensor = _decode_numpy(key, array)
        else:
            raise ValueError(f"{key!r}: unknown serialisation type {array.stype!r} (expected {SType.NUMPY!r} or {RAW_STYPE!r})")
        state[key] = tensor if device is None else tensor.to(device)
    return state
