"""The benchmark's pure-PyTorch implementations (bench/torch_impls.py) compute the same function as fedrot_ext.

(b) authors_loop and (c) torch_batched are checked against the float64 reference on seeded,
well-conditioned problems (clients = the reference rotated by moderate random rotations, plus
noise) with mixed layer shapes and ranks, every align mode, hard / soft / no rotation, reflections
and degenerate references; tolerances follow each problem's conditioning. (c') torch_batched_native
is (c) at full precision, and otherwise runs its GEMMs, results included, in the storage dtype.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import fedrot_ext
from bench import shapes
from bench import torch_impls
from bench.torch_impls import authors_loop, torch_batched, torch_batched_native
from fedrot_ext import reference
from helpers.problems import EPS, WELL_POSED, conditioning, make_problem, rel_err

IMPLS = [authors_loop, torch_batched]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}  # on a perfectly conditioned problem
# (r, in, out): two layers share rank 4 (one SVD group), others differ.
LAYERS = [(4, 16, 12), (4, 20, 8), (3, 10, 10), (8, 24, 16)]
MAX_RANK = max(r for r, _, _ in LAYERS)
ALIGN_LAM = list(itertools.product(["A", "B", "AB", "none"], [0.0, 0.5, 1.0]))


def problem(dtype, seed, N=5):
    return make_problem(LAYERS, N, dtype, seed=seed, noise=0.3, rotations="small")


def assert_close(out, want, dtype, *, cond, seed, check_rotations=True):
    where = f"seed={seed}, cond={cond:.3g}"
    assert cond < WELL_POSED, f"the test problem is ill-conditioned ({where})"
    for l, (got, ref) in enumerate(zip(out.A + out.B, want.A + want.B)):
        tol = TOL[dtype] + 20 * EPS[dtype] * cond * MAX_RANK
        assert got.dtype == dtype and got.shape == ref.shape, where
        assert torch.isfinite(got).all(), where
        err = rel_err(got, ref)
        assert err < tol, f"factor {l}: relative error {err:.3g} >= {tol:.3g} ({where})"
    if check_rotations:
        for l, (got, ref) in enumerate(zip(out.rotations, want.rotations)):
            tol = max(TOL[dtype], 1e-4) + 20 * EPS[dtype] * cond * got.shape[-1]
            assert got.dtype == fedrot_ext.accumulate_dtype(dtype) and got.shape == ref.shape, where
            err = rel_err(got, ref)
            assert err < tol, f"rotations[{l}]: relative error {err:.3g} >= {tol:.3g} ({where})"


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("align,lam", ALIGN_LAM)
def test_matches_reference(impl, dtype, align, lam):
    seed = ALIGN_LAM.index((align, lam))  # one fixed problem per (align, λ)
    p = problem(dtype, seed)
    kw = dict(ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align=align, lam=lam, return_rotations=True)
    cond = conditioning(p.A, p.B, p.ref_A, p.ref_B, align, lam)
    assert_close(impl(p.A, p.B, **kw), reference.align_and_aggregate(p.A, p.B, **kw), dtype, cond=cond, seed=seed)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("lam", [1.0, 0.7])  # λ = 0.5 with a reflection R* is singular: no unique polar factor
def test_reflections_and_uniform_weights(impl, lam):
    seed = 7
    p = problem(torch.float32, seed)
    # Reflect the basis of every other client (A_i ← D A_i, B_i ← B_i D, D = diag(-1, 1, ...)): B_i A_i is
    # unchanged and M_i = D M_i, so det(M_i) < 0 and only O(r) brings those clients back.
    A, B = [a.clone() for a in p.A], [b.clone() for b in p.B]
    for a, b in zip(A, B):
        a[::2, 0] = -a[::2, 0]
        b[::2, :, 0] = -b[::2, :, 0]
    kw = dict(ref_A=p.ref_A, ref_B=p.ref_B, align="AB", lam=lam, allow_reflection=True, return_rotations=True)
    want = reference.align_and_aggregate(A, B, **kw)
    assert any(bool((torch.linalg.det(R) < 0).any()) for R in want.rotations), f"no reflection exercised, seed={seed}"
    cond = conditioning(A, B, p.ref_A, p.ref_B, "AB", lam, allow_reflection=True)
    assert_close(impl(A, B, **kw), want, torch.float32, cond=cond, seed=seed)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
def test_degenerate_reference_gives_identity(impl):
    seed = 3
    p = problem(torch.float32, seed)
    ref_B = [torch.zeros_like(t) for t in p.ref_B]  # peft initialises B to zero
    out = impl(p.A, p.B, ref_B=ref_B, weights=p.weights, align="B", lam=0.5, return_rotations=True)
    for R in out.rotations:
        assert torch.equal(R, torch.eye(R.shape[-1]).expand_as(R)), f"seed={seed}"
    want = reference.align_and_aggregate(p.A, p.B, ref_B=ref_B, weights=p.weights, align="B", lam=0.5, return_rotations=True)
    assert_close(out, want, torch.float32, cond=1.0, seed=seed)


def test_impls_agree_with_fused_op_on_bench_inputs():
    seed = 1
    cfg = shapes.parse("tiny_N3_r4_bf16")
    inp = shapes.make_inputs(cfg, seed=seed)
    kw = inp.kwargs()  # align "A", λ = 0.5 (the defaults)
    want = reference.align_and_aggregate(inp.A, inp.B, **kw)
    cond = conditioning(inp.A, inp.B, inp.ref_A, inp.ref_B, "A", 0.5)
    for impl in IMPLS:
        assert_close(impl(inp.A, inp.B, **kw), want, torch.bfloat16, cond=cond, seed=seed, check_rotations=False)
    fused = fedrot_ext.align_and_aggregate(inp.A, inp.B, **kw)
    assert_close(fused, want, torch.bfloat16, cond=cond, seed=seed, check_rotations=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("align", ["A", "B", "AB"])
def test_native_variant_is_the_batched_one_at_full_precision(dtype, align):
    seed = 11
    p = problem(dtype, seed)
    kw = dict(ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align=align, lam=0.5, return_rotations=True)
    a, b = torch_batched(p.A, p.B, **kw), torch_batched_native(p.A, p.B, **kw)
    for i, (x, y) in enumerate(zip(a.A + a.B + a.rotations, b.A + b.B + b.rotations)):
        assert torch.equal(x, y), f"output {i}, {dtype}, align {align}, seed={seed}"


@pytest.mark.parametrize("align", ["A", "B"])
def test_native_variant_rounds_every_gemm_to_bf16(align):
    """M_i is a bf16 GEMM with a bf16 result; the aggregates are bf16 GEMMs by bf16-rounded w_i R_i."""
    seed = 12
    p = problem(torch.bfloat16, seed)
    kw = dict(ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align=align, lam=0.5, return_rotations=True)
    out = torch_batched_native(p.A, p.B, **kw)
    w = torch.as_tensor(p.weights, dtype=torch.float32)
    w = w / w.sum()
    for l, (a, b) in enumerate(zip(p.A, p.B)):
        N, r, _ = a.shape
        x = a.reshape(N * r, -1) @ p.ref_A[l].T if align == "A" else b.transpose(1, 2).reshape(N * r, -1) @ p.ref_B[l]
        assert x.dtype == torch.bfloat16
        R = torch_impls._rotations(x.float().reshape(N, r, r), 0.5, False)
        assert torch.equal(out.rotations[l], R), f"layer {l}, align {align}, seed={seed}"
        wR = (w[:, None, None] * R).to(torch.bfloat16)
        want_A = wR.permute(2, 0, 1).reshape(r, N * r) @ a.reshape(N * r, -1)
        want_B = b.permute(1, 0, 2).reshape(b.shape[1], N * r) @ wR.reshape(N * r, r)
        assert torch.equal(out.A[l], want_A) and torch.equal(out.B[l], want_B), f"layer {l}, align {align}, seed={seed}"
