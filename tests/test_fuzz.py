"""Property-based fuzzing of the fused op against the float64 reference.

Profiles: "ci" (default, ~150 examples) and "fuzz" (10,000 examples):
    FEDROT_FUZZ_PROFILE=fuzz python -m pytest tests/test_fuzz.py -q
Comparisons are scaled by the conditioning of each Procrustes problem; draws whose
rotation is not unique (rank-deficient M, a singular soft step) are checked on the
properties that hold for any valid answer.
"""
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedrot_ext
from fedrot_ext import reference
from factories import TOLERANCE, haar_rotations

settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz", max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("FEDROT_FUZZ_PROFILE", "ci"))

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
EPS = {torch.float64: 2.2e-16, torch.float32: 1.2e-7, torch.bfloat16: 1.2e-7, torch.float16: 1.2e-7}  # rotation math


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n_clients = draw(st.integers(1, 8))
    layers = draw(st.lists(st.tuples(st.one_of(st.integers(1, 8), st.integers(9, 64)), st.integers(1, 96),
                                     st.integers(1, 96)), min_size=1, max_size=3))
    weights = draw(st.lists(st.floats(0, 10), min_size=n_clients, max_size=n_clients).filter(lambda w: sum(w) > 0.1))
    return dict(
        dtype=dtype, n_clients=n_clients, layers=layers, weights=weights,
        align=draw(st.sampled_from(["none", "A", "B", "AB"])),
        lam=draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1))),
        allow_reflection=draw(st.booleans()),
        rotated_copies=draw(st.booleans()),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(spec):
    g = torch.Generator().manual_seed(spec["seed"])
    N = spec["n_clients"]
    A, B, ref_A, ref_B = [], [], [], []
    for r, d_in, d_out in spec["layers"]:
        a0 = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        b0 = torch.randn(d_out, r, generator=g, dtype=torch.float64)
        if spec["rotated_copies"]:
            Q = haar_rotations(N, r, g)
            a = Q.transpose(1, 2) @ (a0 + 0.3 * torch.randn(N, r, d_in, generator=g, dtype=torch.float64))
            b = (b0 + 0.3 * torch.randn(N, d_out, r, generator=g, dtype=torch.float64)) @ Q
        else:
            a = torch.randn(N, r, d_in, generator=g, dtype=torch.float64)
            b = torch.randn(N, d_out, r, generator=g, dtype=torch.float64)
        A.append(a.to(spec["dtype"]))
        B.append(b.to(spec["dtype"]))
        ref_A.append(a0.to(spec["dtype"]))
        ref_B.append(b0.to(spec["dtype"]))
    if spec["strided"]:  # same values, non-contiguous layouts
        A = [torch.repeat_interleave(a, 2, dim=2)[:, :, ::2] for a in A]
        B = [b.transpose(1, 2).contiguous().transpose(1, 2) for b in B]
        ref_A = [t.t().contiguous().t() for t in ref_A]
    return A, B, ref_A, ref_B


def conditioning(A, B, ref_A, ref_B, spec, want_rots):
    """Worst sensitivity of the rotations to rounding, over all (layer, client)."""
    worst = 1.0
    for l, R in enumerate(want_rots):
        if spec["align"] == "none" or spec["lam"] == 0:
            continue
        a, b = A[l].double(), B[l].double()
        M = torch.zeros(a.shape[0], a.shape[1], a.shape[1], dtype=torch.float64)
        if spec["align"] in ("A", "AB"):
            M += a @ ref_A[l].double().T
        if spec["align"] in ("B", "AB"):
            M += b.transpose(1, 2) @ ref_B[l].double()
        U, s, Vh = torch.linalg.svd(M)
        # Polar-factor sensitivity ~ σ_1 / min_{i≠j}(σ_i + σ_j) over *signed* singular values:
        # in SO(r) the smallest carries sign(det U Vᵀ); in O(r) σ_min = 0 leaves a sign free.
        signed = s.clone()
        if spec["allow_reflection"]:
            pair = 2 * s[:, -1]
        else:
            signed[:, -1] = signed[:, -1] * torch.sign(torch.linalg.det(U @ Vh))
            pair = signed[:, -1] + signed[:, -2] if s.shape[-1] >= 2 else s[:, 0]
        worst = max(worst, float((s[:, 0] / pair.clamp_min(1e-300)).max()))
        if spec["lam"] < 1:
            eye = torch.eye(R.shape[-1], dtype=torch.float64)
            hard = reference.procrustes_rotation(M, 1.0, spec["allow_reflection"])
            soft = torch.linalg.svdvals((1 - spec["lam"]) * eye + spec["lam"] * hard)
            worst = max(worst, float((1.0 / soft[:, -1].clamp_min(1e-300)).max()))
    return worst


@given(problems())
def test_fused_op_matches_reference(spec):
    A, B, ref_A, ref_B = build(spec)
    kw = dict(ref_A=ref_A, ref_B=ref_B, weights=spec["weights"], align=spec["align"], lam=spec["lam"],
              allow_reflection=spec["allow_reflection"], return_rotations=True)
    got = fedrot_ext.align_and_aggregate(A, B, **kw)
    want = reference.align_and_aggregate(A, B, **kw)
    w = torch.tensor(spec["weights"], dtype=torch.float64)
    w = w / w.sum()
    dtype = spec["dtype"]
    eps = EPS[dtype]
    cond = conditioning(A, B, ref_A, ref_B, spec, want.rotations)
    for l in range(len(A)):
        R = got.rotations[l].double()
        r = R.shape[-1]
        assert got.A[l].dtype == dtype and got.A[l].shape == want.A[l].shape
        assert torch.isfinite(got.A[l]).all() and torch.isfinite(got.B[l]).all()
        # Properties that hold for any valid answer.
        assert (R.transpose(1, 2) @ R - torch.eye(r, dtype=torch.float64)).abs().max() < 50 * r * eps
        if not spec["allow_reflection"]:
            assert (torch.linalg.det(R) - 1).abs().max() < 50 * r * eps
        a, b = A[l].double(), B[l].double()
        scale_A = float((w * a.flatten(1).norm(dim=1)).sum()) + 1e-30
        scale_B = float((w * b.flatten(1).norm(dim=1)).sum()) + 1e-30
        assert float((got.A[l].double() - torch.einsum("i,ikj,ikc->jc", w, R, a)).norm()) / scale_A < TOLERANCE[dtype]
        assert float((got.B[l].double() - torch.einsum("i,iok,ikj->oj", w, b, R)).norm()) / scale_B < TOLERANCE[dtype]
        # Agreement with the reference where the answer is unique and well conditioned.
        if cond < 1e4:
            tol = TOLERANCE[dtype] + 20 * eps * cond * r
            assert float((R - want.rotations[l]).abs().max()) < tol
            assert float((got.A[l].double() - want.A[l]).norm()) / scale_A < tol
            assert float((got.B[l].double() - want.B[l]).norm()) / scale_B < tol
