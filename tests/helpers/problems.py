"""Fresh random LoRA aggregation problems, tolerances that follow their conditioning, and checks.

Every factory takes an explicit ``seed`` (a ``torch.Generator`` of its own, never the global RNG)
and records it, so a failing assertion can name it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import pytest
import torch


# The devices every op test runs on: the CPU, and CUDA where a GPU is visible (skipped cleanly,
# with the reason, where there is none). Used by the `device` fixture of tests/conftest.py.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
    ]),
]

# Relative Frobenius tolerance of an aggregate against the float64 reference on a well-conditioned
# problem: output rounding dominates for half types; fp32 is bounded by the Jacobi solver in fp32.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
ROTATION_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 2e-4, torch.float16: 2e-4}
# Unit roundoff of the rotation math: float32 for every input type but float64.
EPS = {torch.float64: 2.2e-16, torch.float32: 1.2e-7, torch.bfloat16: 1.2e-7, torch.float16: 1.2e-7}
# Conditioning below which the rotation is unique and stable enough to compare with the reference.
WELL_POSED = 1e4


class Problem(NamedTuple):
    A: List[torch.Tensor]
    B: List[torch.Tensor]
    ref_A: List[torch.Tensor]
    ref_B: List[torch.Tensor]
    weights: torch.Tensor
    seed: int

    def to(self, device) -> "Problem":
        """The same problem with every factor on `device`; the weights stay on the CPU (sample counts)."""
        move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        return self._replace(A=move(self.A), B=move(self.B), ref_A=move(self.ref_A), ref_B=move(self.ref_B))


def haar_rotations(n_mats: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random matrices in SO(r), float64."""
    Q, Rr = torch.linalg.qr(torch.randn(n_mats, r, r, generator=generator, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(Rr, dim1=-2, dim2=-1)).unsqueeze(-2)
    flip = torch.linalg.det(Q) < 0
    Q[flip, :, 0] = -Q[flip, :, 0]
    return Q


def small_rotations(n_mats: int, r: int, generator: torch.Generator, scale: float = 0.3) -> torch.Tensor:
    """Moderate random rotations exp(S - Sᵀ) in SO(r), float64: angles well below π, where the soft
    step polar((1-λ) I + λ R*) is discontinuous and two correct solvers may legitimately differ."""
    S = torch.randn(n_mats, r, r, generator=generator, dtype=torch.float64) * (scale / r**0.5)
    return torch.linalg.matrix_exp(S - S.transpose(1, 2))


def make_problem(
    shapes: Sequence[Tuple[int, int, int]],
    n_clients: int,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    noise: float = 0.3,
    rotations: str = "haar",
    device: str = "cpu",
) -> Problem:
    """Clients are randomly rotated, noisy copies of a reference, as in federated LoRA.

    shapes: (r, in_features, out_features) per layer. rotations: "haar" (any angle) or "small"
    (see :func:`small_rotations`: well-conditioned soft steps by construction).
    """
    rotate = {"haar": haar_rotations, "small": small_rotations}[rotations]
    g = torch.Generator().manual_seed(seed)
    A, B, ref_A, ref_B = [], [], [], []
    for r, d_in, d_out in shapes:
        a0 = torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in**0.5
        b0 = torch.randn(d_out, r, generator=g, dtype=torch.float64) / r**0.5
        Q = rotate(n_clients, r, g)
        a = Q.transpose(1, 2) @ (a0 + noise * torch.randn(n_clients, r, d_in, generator=g, dtype=torch.float64) / d_in**0.5)
        b = (b0 + noise * torch.randn(n_clients, d_out, r, generator=g, dtype=torch.float64) / r**0.5) @ Q
        A.append(a.to(device=device, dtype=dtype))
        B.append(b.to(device=device, dtype=dtype))
        ref_A.append(a0.to(device=device, dtype=dtype))
        ref_B.append(b0.to(device=device, dtype=dtype))
    weights = torch.rand(n_clients, generator=g, dtype=torch.float64) + 0.1
    return Problem(A, B, ref_A, ref_B, weights, seed)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- conditioning
@contextlib.contextmanager
def one_thread():
    """Small r×r factorisations run fastest on one thread (and do not stall when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rotation_conditioning(M: torch.Tensor, lam: float, allow_reflection: bool) -> float:
    """Sensitivity to rounding of the rotations procrustes_rotation(M, lam) gives, worst over the batch.

    M (..., r, r). 1.0 when nothing rotates (λ = 0); huge where the answer is not unique (rank-deficient M,
    a singular soft step).
    """
    if lam == 0:
        return 1.0
    M = M.detach().double().cpu().reshape(-1, M.shape[-2], M.shape[-1])
    with one_thread():
        U, s, Vh = torch.linalg.svd(M)
        # Polar-factor sensitivity ~ σ_1 / min_{i≠j}(σ_i + σ_j) over *signed* singular values:
        # in SO(r) the smallest carries sign(det U Vᵀ); in O(r) σ_min = 0 leaves a sign free.
        det_sign = torch.sign(torch.linalg.det(U @ Vh))
        signed = s.clone()
        if allow_reflection:
            pair = 2 * s[:, -1]
        else:
            signed[:, -1] = signed[:, -1] * det_sign
            pair = signed[:, -1] + signed[:, -2] if s.shape[-1] >= 2 else s[:, 0]
        worst = max(1.0, float((s[:, 0] / pair.clamp_min(1e-300)).max()))
        if lam < 1:
            # The hard rotation R* (the reference's polar factor, det fixed on the smallest pair), then
            # the smallest singular value of the soft step (1-λ) I + λ R*.
            if not allow_reflection:
                U = U.clone()
                U[:, :, -1] *= det_sign.unsqueeze(-1)
            hard = U @ Vh
            eye = torch.eye(M.shape[-1], dtype=torch.float64)
            hard[s[:, 0] == 0] = eye  # a zero M (degenerate reference) gives R = I
            soft = torch.linalg.svdvals((1 - lam) * eye + lam * hard)
            worst = max(worst, float((1.0 / soft[:, -1].clamp_min(1e-300)).max()))
    return worst


def layer_conditioning(a, b, ref_a, ref_b, align: str, lam: float, allow_reflection: bool) -> float:
    """Sensitivity of one layer's rotations to rounding, worst over its clients.

    a (N, r, in), b (N, out, r), ref_a (r, in), ref_b (out, r); 1.0 when nothing rotates.
    """
    if align == "none" or lam == 0:
        return 1.0
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    M = torch.zeros(a.shape[0], a.shape[1], a.shape[1], dtype=torch.float64)
    if align in ("A", "AB"):
        M += a @ ref_a.detach().double().cpu().T
    if align in ("B", "AB"):
        M += b.transpose(1, 2) @ ref_b.detach().double().cpu()
    return rotation_conditioning(M, lam, allow_reflection)


def conditioning(A, B, ref_A, ref_B, align: str, lam: float, allow_reflection: bool = False) -> float:
    """Worst sensitivity of the rotations to rounding, over all (layer, client)."""
    refs = lambda R, l: None if R is None else R[l]  # noqa: E731
    return max(layer_conditioning(A[l], B[l], refs(ref_A, l), refs(ref_B, l), align, lam, allow_reflection)
               for l in range(len(A)))


def reference_tolerance(dtype: torch.dtype, cond: float, r: int, base: Optional[Dict] = None) -> float:
    """Tolerance against the float64 reference: the dtype's own plus rounding amplified by the conditioning."""
    return (TOLERANCE if base is None else base)[dtype] + 20 * EPS[dtype] * cond * r


def assert_matches_reference(got, want, dtype, *, cond: float, seed, device=None):
    """Every layer of `got` (any device) against the float64 reference `want` (CPU), tolerance scaled by `cond`."""
    where = f"seed={seed}, cond={cond:.3g}"
    assert cond < WELL_POSED, f"the test problem is ill-conditioned, pick another one ({where})"
    assert len(got.A) == len(want.A) and len(got.B) == len(want.B), where
    for l in range(len(want.A)):
        r = want.A[l].shape[0]
        tol, rot_tol = reference_tolerance(dtype, cond, r), reference_tolerance(dtype, cond, r, ROTATION_TOLERANCE)
        for name, t in (("A", got.A[l]), ("B", got.B[l])):
            assert t.dtype == dtype, f"{name}[{l}]: dtype {t.dtype} ({where})"
            if device is not None:
                assert t.device.type == torch.device(device).type, f"{name}[{l}]: on {t.device} ({where})"
        assert got.A[l].shape == want.A[l].shape and got.B[l].shape == want.B[l].shape, f"layer {l} ({where})"
        for name, g_t, w_t, t in (("A", got.A[l], want.A[l], tol), ("B", got.B[l], want.B[l], tol),
                                  ("rotations", got.rotations[l], want.rotations[l], rot_tol)):
            err = rel_err(g_t, w_t)
            assert err < t, f"{name}[{l}]: relative error {err:.3g} >= {t:.3g} ({where})"


# ----------------------------------------------------------------------------- dense definitions
def normalised(w) -> torch.Tensor:
    w = torch.as_tensor(w, dtype=torch.float64).cpu()
    return w / w.sum()


def dense_product_sum(A, B, w) -> List[torch.Tensor]:
    """Σ_i w_i B_i A_i per layer (float64, weights normalised), formed densely."""
    w = normalised(w)
    return [torch.einsum("i,iok,ikn->on", w, b.double().cpu(), a.double().cpu()) for a, b in zip(A, B)]


def factor_average(A, B, w) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """FedIT: Σ_i w_i A_i and Σ_i w_i B_i per layer (float64, weights normalised)."""
    w = normalised(w)
    avg = lambda ts: [torch.einsum("i,i...->...", w, t.double().cpu()) for t in ts]  # noqa: E731
    return avg(A), avg(B)


# ----------------------------------------------------------------------------- inputs and outputs
def poisoned(t: torch.Tensor, value: float = math.nan, client: Optional[int] = None, position: int = 1) -> torch.Tensor:
    """A copy of `t` (of `t[client]` inside it, when given) with element `position` (row-major) set to `value`."""
    t = t.clone(memory_format=torch.contiguous_format)
    (t if client is None else t[client]).view(-1)[position] = value
    return t


def _storage_span(t: torch.Tensor):
    storage = t.untyped_storage()
    return t.device, storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _overlap(x: torch.Tensor, y: torch.Tensor) -> bool:
    (dev_x, lo_x, hi_x), (dev_y, lo_y, hi_y) = _storage_span(x), _storage_span(y)
    return dev_x == dev_y and lo_x < hi_x and lo_y < hi_y and lo_x < hi_y and lo_y < hi_x


def assert_no_aliasing(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], where: str = ""):
    """No output shares memory with any input or with another output (whole storages compared, so
    a view of an input fails), and writing to every output leaves every input as it was."""
    for i, out in enumerate(outputs):
        for j, inp in enumerate(inputs):
            assert not _overlap(out, inp), f"output {i} shares storage with input {j} ({where})"
        for j in range(i):
            assert not _overlap(out, outputs[j]), f"outputs {j} and {i} share storage ({where})"
    before = [t.clone() for t in inputs]
    with torch.no_grad():
        for out in outputs:
            out.add_(1)  # outputs are fresh, writable, non-overlapping tensors
    for j, (b, a) in enumerate(zip(before, inputs)):
        assert torch.equal(b, a), f"writing to the outputs changed input {j} ({where})"


# ----------------------------------------------------------------------------- state dicts without peft
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
    reference_state, clients = {}, [{} for _ in range(n_clients)]
    for m, (path, r, d_in, d_out, dtype) in enumerate(modules):
        key_A, key_B = f"base_model.model.{path}.lora_A.weight", f"base_model.model.{path}.lora_B.weight"
        a0, b0 = randn(r, d_in) / d_in**0.5, randn(d_out, r) / r**0.5
        reference_state[key_A], reference_state[key_B] = a0.to(dtype), b0.to(dtype)
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
        for state in [reference_state] + clients:
            state["base_model.model.classifier.weight"] = randn(3, 8).to(dtype)
            state["base_model.model.classifier.bias"] = randn(3).to(dtype)
    return reference_state, clients
