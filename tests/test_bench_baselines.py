"""The benchmark baselines (bench/baselines.py) compute the same function as fedrot_ext.

(b) authors_loop and (c) torch_batched are checked against the float64
reference on fresh random inputs with mixed layer shapes and ranks, every align
mode, hard / soft / no rotation, reflections, degenerate references; plus the
benchmark input generator and byte counts, and one run of the bench script.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

import fedrot_ext  # noqa: E402
from fedrot_ext import reference  # noqa: E402
from bench import shapes  # noqa: E402
from bench.baselines import authors_loop, torch_batched  # noqa: E402

BASELINES = [authors_loop, torch_batched]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}
# (out, in, r): two layers share rank 4 (one SVD group), others differ.
LAYERS = [(12, 16, 4), (8, 20, 4), (10, 10, 3), (16, 24, 8)]


def _problem(dtype, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(N, r, i, generator=g).to(dtype) for o, i, r in LAYERS]
    B = [torch.randn(N, o, r, generator=g).to(dtype) for o, i, r in LAYERS]
    ref_A = [torch.randn(r, i, generator=g).to(dtype) for o, i, r in LAYERS]
    ref_B = [torch.randn(o, r, generator=g).to(dtype) for o, i, r in LAYERS]
    weights = torch.rand(N, generator=g, dtype=torch.float64) + 0.1
    return A, B, ref_A, ref_B, weights


def _rel(x, y):
    x, y = x.double(), y.double()
    return float((x - y).norm() / y.norm().clamp_min(1e-300))


def _assert_close(out, ref, dtype, check_rotations=True):
    tol = TOL[dtype]
    for got, want in zip(out.A + out.B, ref.A + ref.B):
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.isfinite(got).all()
        assert _rel(got, want) < tol
    if check_rotations:
        for got, want in zip(out.rotations, ref.rotations):
            assert got.dtype == fedrot_ext.accumulate_dtype(dtype) and got.shape == want.shape
            assert _rel(got, want) < max(tol, 1e-4)


@pytest.mark.parametrize("impl", BASELINES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("align,lam", list(itertools.product(["A", "B", "AB", "none"], [0.0, 0.5, 1.0])))
def test_matches_reference(impl, dtype, align, lam):
    A, B, ref_A, ref_B, w = _problem(dtype, seed=hash((align, lam)) % 1000)
    kw = dict(ref_A=ref_A, ref_B=ref_B, weights=w, align=align, lam=lam, return_rotations=True)
    _assert_close(impl(A, B, **kw), reference.align_and_aggregate(A, B, **kw), dtype)


@pytest.mark.parametrize("impl", BASELINES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("lam", [1.0, 0.7])  # λ = 0.5 with a reflection R* is singular: no unique polar factor
def test_reflections_and_uniform_weights(impl, lam):
    A, B, ref_A, ref_B, _ = _problem(torch.float32, seed=7)
    kw = dict(ref_A=ref_A, ref_B=ref_B, align="AB", lam=lam, allow_reflection=True, return_rotations=True)
    _assert_close(impl(A, B, **kw), reference.align_and_aggregate(A, B, **kw), torch.float32)


@pytest.mark.parametrize("impl", BASELINES, ids=lambda f: f.__name__)
def test_degenerate_reference_gives_identity(impl):
    A, B, ref_A, ref_B, w = _problem(torch.float32, seed=3)
    ref_B = [torch.zeros_like(t) for t in ref_B]  # peft initialises B to zero
    out = impl(A, B, ref_B=ref_B, weights=w, align="B", lam=0.5, return_rotations=True)
    for R in out.rotations:
        assert torch.equal(R, torch.eye(R.shape[-1]).expand_as(R))
    ref = reference.align_and_aggregate(A, B, ref_B=ref_B, weights=w, align="B", lam=0.5, return_rotations=True)
    _assert_close(out, ref, torch.float32)


def test_baselines_agree_with_fused_op_on_bench_inputs():
    cfg = shapes.parse("tiny_N3_r4_bf16")
    inp = shapes.make_inputs(cfg, seed=1)
    fused = fedrot_ext.align_and_aggregate(inp.A, inp.B, **inp.kwargs())
    ref = reference.align_and_aggregate(inp.A, inp.B, **inp.kwargs())
    for impl in BASELINES:
        _assert_close(impl(inp.A, inp.B, **inp.kwargs()), ref, torch.bfloat16, check_rotations=False)
    _assert_close(fused, ref, torch.bfloat16, check_rotations=False)


def test_bench_inputs_and_counts():
    cfg = shapes.parse("tiny_N3_r8_fp32")
    inp = shapes.make_inputs(cfg, seed=5)
    again = shapes.make_inputs(cfg, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(inp.A + inp.B, again.A + again.B))  # seeded
    for t in inp.A + inp.B + inp.ref_A + inp.ref_B:
        assert t.dtype == torch.float32 and torch.isfinite(t).all() and (t != 0).all()
    # Clients are rotated noisy copies of the reference: hard Procrustes brings them back near it.
    out = reference.align_and_aggregate(inp.A, inp.B, ref_A=inp.ref_A, lam=1.0)
    assert max(_rel(a, ra) for a, ra in zip(out.A, inp.ref_A)) < 0.3
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert shapes.input_bytes(cfg) == nbytes(inp.A + inp.B + inp.ref_A + inp.ref_B)
    outputs = nbytes(out.A) // 2 + nbytes(out.B) // 2  # the reference returns float64
    assert shapes.bytes_moved(cfg, "A") == nbytes(inp.A + inp.B + inp.ref_A) + outputs
    assert shapes.bytes_moved(cfg, "AB") == nbytes(inp.A + inp.B + inp.ref_A + inp.ref_B) + outputs
    assert len(shapes.sweep()) == 64
    assert shapes.parse(cfg.id) == cfg
    assert [c.id for c in shapes.select(shapes.sweep(), "roberta*_N10_r4_*")] == [
        "roberta-large-qv_N10_r4_fp32", "roberta-large-qv_N10_r4_bf16"]


def test_run_bench_script_smoke(tmp_path):
    from bench import run_bench

    out = tmp_path / "bench.json"
    run_bench.main(["--configs", "tiny_N3_r4_fp32", "--out", str(out), "--repeats", "2", "--warmup", "1",
                    "--copy-mib", "16", "--mm-size", "256"])
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"fused", "batched", "loop"}
    for r in rows:
        assert r["median_ms"] > 0 and r["err_vs_ref"] < 1e-4 and r["bytes_moved"] > 0
