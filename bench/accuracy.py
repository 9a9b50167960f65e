"""What the benchmarked outputs are checked against, and how far off they are.

The expected result never comes from an implementation under test: it is the
float64 reference (fedrot_ext.reference, one SVD per layer and client on the
CPU) where that takes seconds, else the batched PyTorch formulation run in
float64 one layer at a time (so the float64 copy costs one layer's memory).
"""
from __future__ import annotations

from typing import Sequence

import torch

from bench.torch_impls import torch_batched
from fedrot_ext import reference
from fedrot_ext._types import Aggregate

# The reference's cost grows with clients x layers; 1280 is a few seconds on a laptop CPU.
REFERENCE_MAX_CLIENT_LAYERS = 1280


def expected(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], *, ref_A=None, ref_B=None, weights=None,
             **opts) -> Aggregate:
    """Float64 result of align_and_aggregate on these arguments, on the CPU (options as the op's)."""
    if A[0].shape[0] * len(A) <= REFERENCE_MAX_CLIENT_LAYERS:
        return reference.align_and_aggregate(A, B, ref_A=ref_A, ref_B=ref_B, weights=weights, **opts)
    as64 = lambda ts, l: None if ts is None else [ts[l].double()]  # noqa: E731
    out_A, out_B = [], []
    for l in range(len(A)):
        one = torch_batched(as64(A, l), as64(B, l), ref_A=as64(ref_A, l), ref_B=as64(ref_B, l), weights=weights, **opts)
        out_A.append(one.A[0].cpu())
        out_B.append(one.B[0].cpu())
    return Aggregate(out_A, out_B)


def rel_err(out: Aggregate, ref: Aggregate) -> float:
    """Largest relative Frobenius error of any output factor, computed in float64."""
    errs = []
    for x, y in zip(out.A + out.B, ref.A + ref.B):
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        errs.append(float((x - y).norm() / y.norm().clamp_min(1e-300)))
    return max(errs)
