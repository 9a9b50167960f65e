"""Property-based fuzzing of the fused op against the float64 reference, on every device.

Profiles (tests/conftest.py): "ci" (default: 150 examples per test, derandomized, no example
database, so every run draws the same examples) and "fuzz" (10,000 fresh random examples per test):
    FEDROT_FUZZ_PROFILE=fuzz python -m pytest tests/op/test_op_fuzz.py -q
Every drawn problem carries its own seed (printed in the falsifying example and in assertion
messages). Comparisons are scaled by the conditioning of each Procrustes problem
(helpers.problems.conditioning); draws whose rotation is not unique (rank-deficient M, a singular
soft step) are checked on the properties that hold for any valid answer.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fedrot_ext
from fedrot_ext import reference
from helpers.problems import DEVICES, EPS, TOLERANCE, WELL_POSED, conditioning, haar_rotations, reference_tolerance

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


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


def strided(A, B, ref_A):
    """The same values in non-contiguous layouts."""
    return ([torch.repeat_interleave(a, 2, dim=2)[:, :, ::2] for a in A],
            [b.transpose(1, 2).contiguous().transpose(1, 2) for b in B],
            [t.t().contiguous().t() for t in ref_A])


def build(spec):
    """Contiguous CPU tensors of the drawn problem."""
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
    return A, B, ref_A, ref_B


@pytest.mark.parametrize("device", DEVICES)
@given(spec=problems())
def test_fused_op_matches_reference(device, spec):
    A, B, ref_A, ref_B = build(spec)  # the reference reads these (CPU); the op their copies on `device`
    dev_A, dev_B, dev_ref_A, dev_ref_B = ([t.to(device) for t in ts] for ts in (A, B, ref_A, ref_B))
    if spec["strided"]:
        dev_A, dev_B, dev_ref_A = strided(dev_A, dev_B, dev_ref_A)
    kw = dict(weights=spec["weights"], align=spec["align"], lam=spec["lam"],
              allow_reflection=spec["allow_reflection"], return_rotations=True)
    got = fedrot_ext.align_and_aggregate(dev_A, dev_B, ref_A=dev_ref_A, ref_B=dev_ref_B, **kw)
    want = reference.align_and_aggregate(A, B, ref_A=ref_A, ref_B=ref_B, **kw)
    w = torch.tensor(spec["weights"], dtype=torch.float64)
    w = w / w.sum()
    dtype = spec["dtype"]
    eps = EPS[dtype]
    cond = conditioning(A, B, ref_A, ref_B, spec["align"], spec["lam"], spec["allow_reflection"])
    where = f"seed={spec['seed']}, cond={cond:.3g}"
    for l in range(len(A)):
        R = got.rotations[l].double().cpu()
        assert got.A[l].device.type == device, where
        r = R.shape[-1]
        assert got.A[l].dtype == dtype and got.A[l].shape == want.A[l].shape, where
        assert torch.isfinite(got.A[l]).all() and torch.isfinite(got.B[l]).all(), where
        # Properties that hold for any valid answer.
        assert (R.transpose(1, 2) @ R - torch.eye(r, dtype=torch.float64)).abs().max() < 50 * r * eps, where
        if not spec["allow_reflection"]:
            assert (torch.linalg.det(R) - 1).abs().max() < 50 * r * eps, where
        a, b = A[l].double(), B[l].double()
        scale_A = float((w * a.flatten(1).norm(dim=1)).sum()) + 1e-30
        scale_B = float((w * b.flatten(1).norm(dim=1)).sum()) + 1e-30
        assert float((got.A[l].double().cpu() - torch.einsum("i,ikj,ikc->jc", w, R, a)).norm()) / scale_A < TOLERANCE[dtype], where
        assert float((got.B[l].double().cpu() - torch.einsum("i,iok,ikj->oj", w, b, R)).norm()) / scale_B < TOLERANCE[dtype], where
        # Agreement with the reference where the answer is unique and well conditioned.
        if cond < WELL_POSED:
            tol = reference_tolerance(dtype, cond, r)
            assert float((R - want.rotations[l]).abs().max()) < tol, where
            assert float((got.A[l].double().cpu() - want.A[l]).norm()) / scale_A < tol, where
            assert float((got.B[l].double().cpu() - want.B[l]).norm()) / scale_B < tol, where


