"""Meta and fake tensors carry shapes but no values: the ops then check shapes, dtypes and
devices only, and return outputs of the right shapes (what torch.compile tracing and
memory planning need). Value checks (finite inputs, weights' signs) need real tensors."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from ._checks import check_weights_shape, weights_total


def shape_only(t: torch.Tensor) -> bool:
    return t.device.type == "meta" or is_fake(t)


def shape_only_weights(weights, N: int, device, acc_dtype: torch.dtype) -> torch.Tensor:
    """Normalised weights without reading a tensor's values (Python numbers are still validated)."""
    if weights is None:
        return torch.full((N,), 1.0 / N, dtype=acc_dtype, device=device)
    if isinstance(weights, torch.Tensor):
        check_weights_shape(weights.shape, N)
        w = weights.to(device=device, dtype=acc_dtype)
        return w / w.sum()
    values = [float(v) for v in weights]
    check_weights_shape((len(values),), N)
    total = weights_total(values)  # the same rules (and messages) as for real tensors
    return torch.tensor([v / total for v in values], dtype=acc_dtype, device=device)
