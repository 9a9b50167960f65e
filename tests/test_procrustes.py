"""The per-matrix solver (shared header code) through the rotation-only op."""
import pytest
import torch

import fedrot_ext
from fedrot_ext import reference
from factories import haar_rotations


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("r", [1, 2, 3, 5, 8, 13, 16, 31, 33, 64, 65])
@pytest.mark.parametrize("lam", [1.0, 0.5, 0.1])
def test_matches_reference(r, lam, dtype):
    g = torch.Generator().manual_seed(r)
    M = torch.randn(9, r, r, generator=g, dtype=torch.float64)
    got = fedrot_ext.procrustes_rotation(M.to(dtype), lam)
    want = reference.procrustes_rotation(M, lam)
    assert got.dtype == dtype and got.shape == M.shape
    # Polar-factor conditioning ~ 1/(σ_{r-1}+σ_r): Gaussian M is fine at these sizes.
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    assert (got.double() - want).abs().max() < tol


@pytest.mark.parametrize("r", [2, 3, 8, 64])
def test_reflection_option(r):
    g = torch.Generator().manual_seed(3)
    Q = haar_rotations(4, r, g)
    Q[:, :, 0] = -Q[:, :, 0]  # det -1 targets
    M = Q @ torch.diag(torch.linspace(1.0, 2.0, r, dtype=torch.float64))  # distinct σ: unique answers
    so = fedrot_ext.procrustes_rotation(M, 1.0, allow_reflection=False)
    o = fedrot_ext.procrustes_rotation(M, 1.0, allow_reflection=True)
    assert torch.allclose(o, Q, atol=1e-10)  # O(r): recovers the reflection exactly
    assert torch.allclose(torch.linalg.det(so), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(so, reference.procrustes_rotation(M, 1.0), atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("r", [1, 4, 7, 16, 64])
def test_degenerate_inputs_give_valid_rotations(r, dtype):
    g = torch.Generator().manual_seed(r)
    zero = torch.zeros(1, r, r, dtype=dtype)
    low_rank = torch.randn(1, r, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 1, r, generator=g, dtype=torch.float64)
    tiny = torch.randn(1, r, r, generator=g, dtype=torch.float64) * 1e-30
    huge = torch.randn(1, r, r, generator=g, dtype=torch.float64) * (1e30 if dtype == torch.float32 else 1e200)
    antipodal = -torch.eye(r, dtype=torch.float64).unsqueeze(0)  # soft step: (1-λ)I + λR* singular at λ = 0.5
    M = torch.cat([zero.double(), low_rank, tiny, huge, antipodal]).to(dtype)
    for lam in (1.0, 0.5):
        R = fedrot_ext.procrustes_rotation(M, lam).double()
        eye = torch.eye(r, dtype=torch.float64)
        assert torch.isfinite(R).all()
        assert (R.transpose(1, 2) @ R - eye).abs().max() < (1e-12 if dtype == torch.float64 else 4 * r * 1.2e-7)
        assert torch.allclose(torch.linalg.det(R), torch.ones(5, dtype=torch.float64), atol=1e-5)
        assert torch.equal(R[0], eye)  # zero M: identity


def test_scale_invariance_and_batch_shape():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    R = fedrot_ext.procrustes_rotation(M, 0.5)
    assert R.shape == M.shape
    assert torch.allclose(fedrot_ext.procrustes_rotation(M * 1e-8, 0.5), R, atol=1e-12)
    assert torch.equal(fedrot_ext.procrustes_rotation(M, 0.0), torch.eye(6, dtype=torch.float64).expand_as(M))


def test_rotated_reference_is_recovered():
    g = torch.Generator().manual_seed(1)
    Q = haar_rotations(16, 8, g)
    # M = A Āᵀ with A = Qᵀ Ā and Ā Āᵀ = I gives M = Qᵀ: the answer is R* = Qᵀ.
    R = fedrot_ext.procrustes_rotation(Q.transpose(1, 2).contiguous(), 1.0)
    assert torch.allclose(R, Q.transpose(1, 2), atol=1e-12)
