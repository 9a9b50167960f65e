"""Lossless transport of torch state dicts in Flower ``ArrayRecord``s, bfloat16 included.

Flower serialises every ``Array`` through NumPy (``np.save``), and NumPy has no
bfloat16: ``ArrayRecord(state_dict)`` fails on a bf16 adapter. Two wire formats
(:data:`WIRE_FORMATS`):

- ``"numpy"`` (the default): every array is a NumPy ``Array`` that stock Flower code
  (``ArrayRecord.to_numpy_ndarrays()``, the differential-privacy wrappers and mods)
  can read. bfloat16 and float16 tensors travel as their float32 upcast (exact) with the
  ``Array``'s ``dtype`` field naming the adapter's dtype; decoding casts them back, so
  the round trip is bit-exact for every finite value. Why float16 too: Flower's clipping
  squares and sums the values, which overflows float16 (max 65504).
- ``"compact"`` (opt-in): a bf16 tensor travels as its raw 16-bit patterns in
  little-endian order, in an ``Array`` whose ``stype`` is :data:`RAW_STYPE`; half the
  bytes of ``"numpy"``, but no NumPy code can read it. float16 uses NumPy's float16.

Every other dtype uses Flower's own NumPy encoding unchanged in both formats.
A Flower wrapper or mod that rewrites an array returns plain float32; pass ``like=``
(the adapter, or {key: dtype}) to :func:`arrayrecord_to_state_dict` to get the
adapter's dtypes back.

Decoding checks what Flower does not: that the bytes match the declared dtype and
shape. A reply that lies about them raises ``ValueError`` naming the key. It reads the
payload where it lies: each distinct ``.npy`` header is parsed once per process (a round's
replies share their headers), and the values are one copy of the payload
(``copy=False``: a read-only view of it, with no copy at all).
"""
from __future__ import annotations

import io
import math
import warnings
from typing import Dict, Mapping, NamedTuple, Optional, Union

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

__all__ = ["RAW_STYPE", "WIRE_FORMATS", "check_wire_format", "state_dict_to_arrayrecord", "arrayrecord_to_state_dict"]

WIRE_FORMATS = ("numpy", "compact")
# 16-bit floats that the "numpy" format widens to float32 (exact), named in the Array's dtype field
_WIDENED = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_WIDENED_BY_TORCH = {torch_dtype: name for name, torch_dtype in _WIDENED.items()}
RAW_STYPE = "fedrot_ext.raw-le"
# dtypes NumPy cannot hold -> the integer type of the same width that carries their bits
_RAW_DTYPES = {"bfloat16": (torch.bfloat16, torch.int16, "<i2")}
_RAW_BY_TORCH = {torch_dtype: (name, bits, wire) for name, (torch_dtype, bits, wire) in _RAW_DTYPES.items()}


def check_wire_format(wire_format: str, argument: str = "wire_format") -> str:
    """Return ``wire_format`` if it is one of :data:`WIRE_FORMATS`, else raise ValueError naming ``argument``."""
    if wire_format not in WIRE_FORMATS:
        raise ValueError(f"{argument}: expected one of {WIRE_FORMATS}, got {wire_format!r}")
    return wire_format


def _encode(key: str, tensor: torch.Tensor, wire_format: str) -> Array:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"state[{key!r}]: expected a torch.Tensor, got {type(tensor).__name__}")
    t = tensor.detach().to("cpu").contiguous()
    if wire_format == "numpy" and t.dtype in _WIDENED_BY_TORCH:
        wide = Array.from_numpy_ndarray(t.float().numpy())
        return Array(dtype=_WIDENED_BY_TORCH[t.dtype], shape=wide.shape, stype=wide.stype, data=wide.data)
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


class _Npy(NamedTuple):
    """What an .npy header says, and how to read the values after it."""

    dtype: np.dtype
    name: str  # str(dtype), as Array.dtype names it
    shape: tuple
    fortran: bool
    offset: int  # of the values
    torch_dtype: Optional[torch.dtype]  # set where torch can view the bytes as they are (native, C order)


# .npy header bytes -> _Npy; bounded, cleared when full
_NPY_HEADERS: Dict[bytes, _Npy] = {}
_NPY_HEADERS_MAX = 4096


def _npy_header(data: bytes) -> _Npy:
    """An .npy payload's header, parsed by NumPy's own reader the first time it is seen."""
    head = bytes(data[:12])
    if head[:6] != b"\x93NUMPY" or len(head) < 10:
        raise ValueError("not an .npy payload (bad magic string)")
    size = 2 if head[6] == 1 else 4
    offset = 8 + size + int.from_bytes(head[8:8 + size], "little")
    header = bytes(data[:offset])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        f = io.BytesIO(header)
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = read(f)
        if dtype.hasobject:
            raise ValueError("object arrays are not accepted (they would need pickle)")
        try:
            direct = None if fortran or not dtype.isnative else torch.from_numpy(np.empty(0, dtype)).dtype
        except TypeError:  # a dtype torch has no tensor for: the NumPy path below names it
            direct = None
        if len(_NPY_HEADERS) >= _NPY_HEADERS_MAX:
            _NPY_HEADERS.clear()
        parsed = _NPY_HEADERS[header] = _Npy(dtype, str(dtype), tuple(shape), bool(fortran), offset, direct)
    return parsed


def _decode_numpy(key: str, array: Array, copy: bool = True) -> torch.Tensor:
    data = array.data
    try:
        h = _npy_header(data)
        count = math.prod(h.shape)
        if len(data) - h.offset != count * h.dtype.itemsize:
            raise ValueError(f"{len(data) - h.offset} bytes after the header do not hold {h.name} of shape {h.shape}")
    except Exception as err:  # a corrupt payload can fail in several ways
        raise ValueError(f"{key!r}: not a valid NumPy payload ({type(err).__name__}: {err})") from None
    widened = array.dtype in _WIDENED and h.name == "float32"
    if h.shape != tuple(array.shape) or (h.name != array.dtype and not widened):
        raise ValueError(
            f"{key!r}: declared dtype {array.dtype} and shape {tuple(array.shape)}, but the payload holds "
            f"{h.name} of shape {h.shape}"
        )
    if h.torch_dtype is not None:  # the bytes as they lie: a view (copy=False) or one copy
        tensor = torch.frombuffer(data, dtype=h.torch_dtype, count=count, offset=h.offset) if count else \
            torch.empty(0, dtype=h.torch_dtype)
        tensor = tensor.view(h.shape)
        if copy and not widened:  # not clone(): on a frombuffer tensor it runs at a few % of copy_'s speed
            tensor = torch.empty(h.shape, dtype=h.torch_dtype).copy_(tensor)
    else:
        values = np.frombuffer(data, dtype=h.dtype, count=count, offset=h.offset).reshape(h.shape, order="F" if h.fortran else "C")
        values = np.ascontiguousarray(values.astype(h.dtype.newbyteorder("="), copy=True))
        try:
            tensor = torch.from_numpy(values)
        except TypeError as err:
            raise ValueError(f"{key!r}: dtype {values.dtype} cannot become a torch tensor ({err})") from None
    return tensor.to(_WIDENED[array.dtype]) if widened else tensor


def _like_dtypes(like) -> Dict[str, torch.dtype]:
    if like is None:
        return {}
    if not isinstance(like, Mapping):
        raise TypeError(f"like: expected a mapping of str to torch.Tensor or torch.dtype, got {type(like).__name__}")
    return {k: v.dtype if isinstance(v, torch.Tensor) else v for k, v in like.items()}


def state_dict_to_arrayrecord(state: Mapping[str, torch.Tensor], *, wire_format: str = "numpy") -> ArrayRecord:
    """Encode a torch state dict as a Flower ``ArrayRecord``, keeping every dtype.

    Args:
        state: {name: tensor}; tensors may live on any device (they are copied to the CPU).
        wire_format: ``"numpy"`` (default: readable by every Flower strategy, wrapper and mod;
            bfloat16/float16 travel as their exact float32 upcast) or ``"compact"`` (bfloat16 as
            raw 16-bit patterns under :data:`RAW_STYPE`: half the bytes, unreadable by NumPy code).

    Returns:
        An ``ArrayRecord`` with the same keys in the same order.

    Raises:
        ValueError: an unknown ``wire_format``.
        TypeError: a value is not a tensor, a key is not a str, or a dtype can be encoded neither way.
    """
    check_wire_format(wire_format)
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a mapping of str to torch.Tensor, got {type(state).__name__}")
    record = ArrayRecord()
    for key, tensor in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state: expected str keys, got {key!r}")
        record[key] = _encode(key, tensor, wire_format)
    return record


def arrayrecord_to_state_dict(
    record: ArrayRecord,
    *,
    device: Optional[Union[str, torch.device]] = None,
    like: Optional[Mapping[str, Union[torch.Tensor, torch.dtype]]] = None,
    copy: bool = True,
) -> Dict[str, torch.Tensor]:
    """Decode an ``ArrayRecord`` (from :func:`state_dict_to_arrayrecord` or stock Flower) into tensors.

    Args:
        record: the ``ArrayRecord``, in either wire format.
        device: where to put the tensors; None keeps them on the CPU.
        like: the adapter (or {key: dtype}) the record stands for: a plain float32 array whose
            key is bfloat16/float16 in ``like`` is cast back to that dtype (Flower's privacy
            wrappers and mods rewrite arrays as float32). Other dtypes are never changed.
        copy: False: CPU tensors of the NumPy format are read-only views of the record's bytes
            (no copy; the record must outlive them, and writing to them is undefined): for a
            caller that only reads, such as the server's aggregation.

    Returns:
        {name: tensor} in the record's key order, with the dtypes that were encoded
        (bfloat16 comes back as bfloat16, bit for bit).

    Raises:
        TypeError: ``record`` is not an ``ArrayRecord`` or ``like`` is not a mapping.
        ValueError naming the key: an unknown serialisation type, a corrupt payload, or
            bytes that do not match the declared dtype and shape.
    """
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"record: expected a flwr.app.ArrayRecord, got {type(record).__name__}")
    dtypes = _like_dtypes(like)
    state = {}
    with warnings.catch_warnings():  # torch.frombuffer warns that bytes are read-only: copy=False views are only read
        warnings.simplefilter("ignore", UserWarning)
        for key, array in record.items():
            state[key] = _decode_array(key, array, dtypes, device, copy)
    return state


def _decode_array(key: str, array: Array, dtypes, device, copy: bool) -> torch.Tensor:
    if array.stype == RAW_STYPE:
        tensor = _decode_raw(key, array)
    elif array.stype == SType.NUMPY:
        tensor = _decode_numpy(key, array, copy)
    else:
        raise ValueError(f"{key!r}: unknown serialisation type {array.stype!r} (expected {SType.NUMPY!r} or {RAW_STYPE!r})")
    if tensor.dtype == torch.float32 and dtypes.get(key) in _WIDENED_BY_TORCH:
        tensor = tensor.to(dtypes[key])
    return tensor if device is None else tensor.to(device)
