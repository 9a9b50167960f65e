"""Fresh random LoRA aggregation problems for the tests."""
from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple

import torch

# Relative Frobenius tolerance of an aggregate against the float64 reference:
# output rounding dominates for half types; fp32 is bounded by the conditioning
# of the Procrustes problem (Jacobi in fp32).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
ROTATION_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 2e-4, torch.float16: 2e-4}


class Problem(NamedTuple):
    A: List[torch.Tensor]
    B: List[torch.Tensor]
    ref_A: List[torch.Tensor]
    ref_B: List[torch.Tensor]
    weights: torch.Tensor


def haar_rotations(n_mats: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random matrices in SO(r), float64."""
    Q, Rr = torch.linalg.qr(torch.randn(n_mats, r, r, generator=generator, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(Rr, dim1=-2, dim2=-1)).unsqueeze(-2)
    flip = torch.linalg.det(Q) < 0
    Q[flip, :, 0] = -Q[flip, :, 0]
    return Q


def make_problem(
    shapes: Sequence[Tuple[int, int, int]],
    n_clients: int,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    noise: float = 0.3,
    device: str = "cpu",
) -> Problem:
    """Clients are randomly rotated, noisy copies of a reference, as in federated LoRA.

    shapes: (r, in_features, out_features) per layer.
    """
    g = torch.Generator().manual_seed(seed)
    A, B, ref_A, ref_B = [], [], [], []
    for r, d_in, d_out in shapes:
        a0 = torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in**0.5
        b0 = torch.randn(d_out, r, generator=g, dtype=torch.float64) / r**0.5
        Q = haar_rotations(n_clients, r, g)
        a = Q.transpose(1, 2) @ (a0 + noise * torch.randn(n_clients, r, d_in, generator=g, dtype=torch.float64) / d_in**0.5)
        b = (b0 + noise * torch.randn(n_clients, d_out, r, generator=g, dtype=torch.float64) / r**0.5) @ Q
        A.append(a.to(device=device, dtype=dtype))
        B.append(b.to(device=device, dtype=dtype))
        ref_A.append(a0.to(device=device, dtype=dtype))
        ref_B.append(b0.to(device=device, dtype=dtype))
    weights = torch.rand(n_clients, generator=g, dtype=torch.float64) + 0.1
    return Problem(A, B, ref_A, ref_B, weights)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def clone_all(*lists):
    return [[t.clone() for t in lst] if lst is not None else None for lst in lists]


def assert_unchanged(before, after):
    for b_list, a_list in zip(before, after):
        if b_list is None:
            continue
        for b, a in zip(b_list, a_list):
            assert torch.equal(b, a) or (torch.isnan(b).any() and torch.equal(b.nan_to_num(), a.nan_to_num()))
