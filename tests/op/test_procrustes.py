"""The per-matrix solver (shared header code) through the rotation-only op, on every device.

The op runs on `device`; the float64 reference runs on the CPU. Tolerances follow the
conditioning of each batch (helpers.problems.rotation_conditioning).
"""
import pytest
import torch

import fedrot_ext
from fedrot_ext import reference
from helpers.problems import EPS, WELL_POSED, assert_no_aliasing, haar_rotations, rotation_conditioning

FUSED_AND_FALLBACK = [2, 3, 5, 8, 16, 33, 64, 65]  # 65: above the largest bucket, ATen fallback
BASE = {torch.float64: 1e-9, torch.float32: 2e-3}  # max-abs error on a well-conditioned batch


def tolerance(dtype, cond, r):
    return BASE[dtype] + 20 * EPS[dtype] * cond * r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("r", [1, 2, 3, 5, 8, 13, 16, 31, 33, 64, 65])
@pytest.mark.parametrize("lam", [1.0, 0.5, 0.1])
def test_matches_reference(r, lam, dtype, device):
    seed = r
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(9, r, r, generator=g, dtype=torch.float64)
    got = fedrot_ext.procrustes_rotation(M.to(device, dtype), lam)
    want = reference.procrustes_rotation(M, lam)
    assert got.dtype == dtype and got.shape == M.shape and got.device.type == device
    cond = rotation_conditioning(M, lam, False)
    assert cond < WELL_POSED, f"ill-conditioned draw, cond={cond:.3g}, seed={seed}"
    err = float((got.double().cpu() - want).abs().max())
    assert err < tolerance(dtype, cond, r), f"max error {err:.3g}, cond={cond:.3g}, seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("r", FUSED_AND_FALLBACK)
def test_recovers_the_rotation_of_a_rotated_reference(r, dtype, device):
    """A = Qᵀ Ā with a random non-orthonormal Ā and a random Q ≠ I: M = A Āᵀ = Qᵀ (Ā Āᵀ) has the
    polar factor Qᵀ, so λ = 1 must return Qᵀ itself; λ < 1 the reference's soft step towards it."""
    seed = 100 + r
    g = torch.Generator().manual_seed(seed)
    n = 64
    Q = haar_rotations(n, r, g)
    eye = torch.eye(r, dtype=torch.float64)
    assert float((Q - eye).norm(dim=(1, 2)).mean()) > 0.5, f"the draws are not far from I, seed={seed}"
    ref = torch.randn(n, r, 2 * r + 3, generator=g, dtype=torch.float64)  # full row rank, far from orthonormal
    M = (Q.transpose(1, 2) @ ref) @ ref.transpose(1, 2)
    cond = rotation_conditioning(M, 1.0, False)
    assert cond < WELL_POSED, f"ill-conditioned draw, cond={cond:.3g}, seed={seed}"
    R = fedrot_ext.procrustes_rotation(M.to(device, dtype), 1.0).double().cpu()
    err = float((R - Q.transpose(1, 2)).abs().max())
    assert err < tolerance(dtype, cond, r), f"max error {err:.3g} recovering Qᵀ, cond={cond:.3g}, seed={seed}"
    for lam in (0.3, 0.7):
        soft_cond = rotation_conditioning(M, lam, False)
        if soft_cond >= WELL_POSED:  # some Q rotates by nearly π: the soft step is not unique there
            continue
        soft = fedrot_ext.procrustes_rotation(M.to(device, dtype), lam).double().cpu()
        err = float((soft - reference.procrustes_rotation(M, lam)).abs().max())
        assert err < tolerance(dtype, soft_cond, r), f"λ={lam}: max error {err:.3g}, seed={seed}"


def with_spectrum(U, sigma, V, det_negative):
    """U diag(σ) Vᵀ for Haar rotations U, V; det < 0 by flipping U's first column."""
    U = U.clone()
    if det_negative:
        U[:, :, 0] = -U[:, :, 0]
    return U @ torch.diag_embed(sigma) @ V.transpose(1, 2)


# Spectra that steer common/polar.h down each of its paths (σ descending): Newton steps then
# Schulz steps (spread, σ_1 = 10); Schulz steps alone, the determinant's sign then taken from
# the result (near_orthogonal: σ within 10 % of each other); each with the power-iteration det
# fix (det-); and Jacobi where Newton cannot vouch for its answer: cond_F(M) beyond 1/eps in float32 (the tiny σ_min cases; float64 stays on
# Newton), or σ_{r-1}/σ_r within 1e-9 of 1 with det < 0 (the fix's iteration cannot settle).
SPECTRA = {
    "spread": lambda r: torch.logspace(1, 0, r, dtype=torch.float64),
    "near_orthogonal": lambda r: torch.linspace(1.1, 1.0, r, dtype=torch.float64),
    "tiny_smallest": lambda r: torch.cat([torch.logspace(1, 0, r - 1, dtype=torch.float64),
                                          torch.tensor([1e-8], dtype=torch.float64)]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("r", [2, 3, 16, 33, 64])
@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("det_negative", [False, True], ids=["det+", "det-"])
def test_each_solver_path_matches_the_reference(spectrum, det_negative, r, dtype, device):
    seed = 300 + r
    g = torch.Generator().manual_seed(seed)
    M = with_spectrum(haar_rotations(4, r, g), SPECTRA[spectrum](r), haar_rotations(4, r, g), det_negative)
    for lam in (1.0, 0.5):
        cond = rotation_conditioning(M, lam, False)
        assert cond < WELL_POSED, f"ill-conditioned draw, cond={cond:.3g}, seed={seed}"
        got = fedrot_ext.procrustes_rotation(M.to(device, dtype), lam).double().cpu()
        err = float((got - reference.procrustes_rotation(M, lam)).abs().max())
        assert err < tolerance(dtype, cond, r), f"λ={lam}: max error {err:.3g}, cond={cond:.3g}, seed={seed}"
        assert torch.allclose(torch.linalg.det(got), torch.ones(4, dtype=torch.float64), atol=1e-4), f"seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("r", [1, 2, 3, 8, 16, 33, 64])
def test_an_exact_rotation_comes_back_bit_for_bit(r, dtype, device):
    """M a signed permutation with det +1 (exact in every dtype): λ = 1 returns M itself and the
    soft step of M = I is I, with no rounding, so a client equal to the reference is left as is."""
    seed = 300 + r
    g = torch.Generator().manual_seed(seed)
    P = torch.zeros(4, r, r, dtype=dtype)
    for k in range(4):
        signs = torch.randint(0, 2, (r,), generator=g).to(dtype) * 2 - 1
        P[k, torch.arange(r), torch.randperm(r, generator=g)] = signs
        if torch.linalg.det(P[k].double()) < 0:
            P[k, 0] = -P[k, 0]
    got = fedrot_ext.procrustes_rotation(P.to(device), 1.0).cpu()
    assert torch.equal(got, P), f"max change {float((got - P).abs().max()):.3g}, seed={seed}"
    eye = torch.eye(r, dtype=dtype).expand(4, r, r)
    for lam in (0.1, 0.5):
        soft = fedrot_ext.procrustes_rotation(eye.to(device), lam).cpu()
        assert torch.equal(soft, eye), f"λ={lam}: max change {float((soft - eye).abs().max()):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("r", [2, 3, 16, 64])
def test_near_tie_of_the_smallest_pair_gives_an_optimal_rotation(r, dtype, device):
    """det M < 0 and σ_{r-1} = σ_r (1 + 1e-9): the SO(r) maximiser is not unique, so the
    answer is checked by what defines it: orthogonal, det +1, and tr(Rᵀ M) as high as the reference's."""
    seed = 400 + r
    g = torch.Generator().manual_seed(seed)
    sigma = torch.logspace(1, 0, r, dtype=torch.float64)
    sigma[-2] = sigma[-1] * (1 + 1e-9)
    M = with_spectrum(haar_rotations(4, r, g), sigma, haar_rotations(4, r, g), True)
    R = fedrot_ext.procrustes_rotation(M.to(device, dtype), 1.0).double().cpu()
    eye = torch.eye(r, dtype=torch.float64)
    orth_tol = 1e-12 if dtype == torch.float64 else 4 * r * 1.2e-7
    assert (R.transpose(1, 2) @ R - eye).abs().max() < orth_tol, f"seed={seed}"
    assert torch.allclose(torch.linalg.det(R), torch.ones(4, dtype=torch.float64), atol=1e-5), f"seed={seed}"
    best = torch.einsum("bij,bij->b", reference.procrustes_rotation(M, 1.0), M)
    got = torch.einsum("bij,bij->b", R, M)
    assert bool((got >= best - 20 * EPS[dtype] * r * float(sigma.sum())).all()), f"{got} < {best}, seed={seed}"


@pytest.mark.parametrize("r", [2, 3, 8, 33, 65])
def test_hard_rotation_is_optimal_over_random_rotations(r, device):
    """R* = argmax_{R ∈ SO(r)} tr(Rᵀ M): no Haar-random rotation and no small perturbation of R* does better."""
    seed = 200 + r
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(8, r, r, generator=g, dtype=torch.float64)
    R = fedrot_ext.procrustes_rotation(M.to(device), 1.0).cpu()
    best = torch.einsum("bij,bij->b", R, M)  # tr(Rᵀ M)
    for Q in haar_rotations(256, r, g).split(32):
        others = torch.einsum("kij,bij->kb", Q, M)
        assert bool((others <= best + 1e-9).all()), f"a random rotation beats R*, seed={seed}"
    S = torch.randn(64, r, r, generator=g, dtype=torch.float64) * 1e-3
    nearby = R.unsqueeze(0) @ torch.linalg.matrix_exp(S - S.transpose(1, 2)).unsqueeze(1)  # (64, 8, r, r)
    assert bool((torch.einsum("kbij,bij->kb", nearby, M) <= best + 1e-12).all()), f"R* is not a local maximum, seed={seed}"


@pytest.mark.parametrize("r", [2, 3, 8, 64])
def test_reflection_option(r, device):
    seed = 3
    g = torch.Generator().manual_seed(seed)
    Q = haar_rotations(4, r, g)
    Q[:, :, 0] = -Q[:, :, 0]  # det -1 targets
    M = Q @ torch.diag(torch.linspace(1.0, 2.0, r, dtype=torch.float64))  # distinct σ: unique answers
    so = fedrot_ext.procrustes_rotation(M.to(device), 1.0, allow_reflection=False).cpu()
    o = fedrot_ext.procrustes_rotation(M.to(device), 1.0, allow_reflection=True).cpu()
    assert torch.allclose(o, Q, atol=1e-10), f"O(r) must recover the reflection exactly, seed={seed}"
    assert torch.allclose(torch.linalg.det(so), torch.ones(4, dtype=torch.float64)), f"seed={seed}"
    assert torch.allclose(so, reference.procrustes_rotation(M, 1.0), atol=1e-9), f"seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("r", [1, 4, 7, 16, 64])
def test_degenerate_inputs_give_valid_rotations(r, dtype, device):
    seed = r
    g = torch.Generator().manual_seed(seed)
    zero = torch.zeros(1, r, r, dtype=dtype)
    low_rank = torch.randn(1, r, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 1, r, generator=g, dtype=torch.float64)
    tiny = torch.randn(1, r, r, generator=g, dtype=torch.float64) * 1e-30
    huge = torch.randn(1, r, r, generator=g, dtype=torch.float64) * (1e30 if dtype == torch.float32 else 1e200)
    antipodal = -torch.eye(r, dtype=torch.float64).unsqueeze(0)  # soft step: (1-λ)I + λR* singular at λ = 0.5
    M = torch.cat([zero.double(), low_rank, tiny, huge, antipodal]).to(device, dtype)
    for lam in (1.0, 0.5):
        R = fedrot_ext.procrustes_rotation(M, lam).double().cpu()
        eye = torch.eye(r, dtype=torch.float64)
        assert torch.isfinite(R).all(), f"λ={lam}, seed={seed}"
        assert (R.transpose(1, 2) @ R - eye).abs().max() < (1e-12 if dtype == torch.float64 else 4 * r * 1.2e-7), f"λ={lam}, seed={seed}"
        assert torch.allclose(torch.linalg.det(R), torch.ones(5, dtype=torch.float64), atol=1e-5), f"λ={lam}, seed={seed}"
        assert torch.equal(R[0], eye)  # zero M: identity


def test_scale_invariance_and_batch_shape(device):
    seed = 0
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64).to(device)
    R = fedrot_ext.procrustes_rotation(M, 0.5)
    assert R.shape == M.shape and R.device == M.device
    assert torch.allclose(fedrot_ext.procrustes_rotation(M * 1e-8, 0.5), R, atol=1e-12), f"seed={seed}"
    assert torch.equal(fedrot_ext.procrustes_rotation(M, 0.0).cpu(), torch.eye(6, dtype=torch.float64).expand_as(M))


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_result_does_not_alias_the_input(lam, device):
    seed = 1
    M = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    assert_no_aliasing([fedrot_ext.procrustes_rotation(M, lam)], [M], f"seed={seed}")
