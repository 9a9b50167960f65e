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


def synthetic_round(modules, n_clients: int, *, seed: int = 0, rotated: bool = True, client_ranks=None,
                    head_dtype=None, noise: float = 0.3):
    """peft-style (saved layout) reference and client state dicts without building a model.

    modules: (module path, r, in_features, out_features, dtype) per LoRA module; keys are
    ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``. Clients are randomly
    rotated, noisy copies of the reference (``rotated``) or independent draws; with
    ``client_ranks[m][i]`` client i keeps only the leading rows of A / columns of B of module m.
    A classifier head (weight (3, 8) and bias) in ``head_dtype`` (default: the first module's
    dtype), random per client, is added unless ``head_dtype`` is False.

    Returns (reference, clients).
    """
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    reference, clients = {}, [{} for _ in range(n_clients)]
    for m, (path, r, d_in, d_out, dtype) in enumerate(modules):
        key_A, key_B = f"base_model.model.{path}.lora_A.weight", f"base_model.model.{path}.lora_B.weight"
        a0, b0 = randn(r, d_in) / d_in**0.5, randn(d_out, r) / r**0.5
        reference[key_A], reference[key_B] = a0.to(dtype), b0.to(dtype)
        Q = haar_rotations(n_clients, r, g) if rotated else None
        for i, state in enumerate(clients):
            if rotated:
                a = Q[i].T @ (a0 + noise * randn(r, d_in) / d_in**0.5)
                b = (b0 + noise * randn(d_out, r) / r**0.5) @ Q[i]
            else:
                a, b = randn(r, d_in) / d_in**0.5, randn(d_out, r) / r**0.5
            keep = r if client_ranks is None else client_ranks[m][i]
            state[key_A], state[key_B] = a[:keep].to(dtype), b[:, :keep].to(dtype)
    if head_dtype is not False:
        dtype = head_dtype or modules[0][4]
        for state in [reference] + clients:
            state["base_model.model.classifier.weight"] = randn(3, 8).to(dtype)
            state["base_model.model.classifier.bias"] = randn(3).to(dtype)
    return reference, clients
