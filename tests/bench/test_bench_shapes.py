"""The benchmark's input generator and byte counts (bench/shapes.py), and one run of bench/run_bench.py."""
from __future__ import annotations

import json

import torch

from bench import shapes
from fedrot_ext import reference
from helpers.problems import rel_err


def test_bench_inputs_and_counts():
    seed = 5
    cfg = shapes.parse("tiny_N3_r8_fp32")
    inp = shapes.make_inputs(cfg, seed=seed)
    again = shapes.make_inputs(cfg, seed=seed)
    assert all(torch.equal(x, y) for x, y in zip(inp.A + inp.B, again.A + again.B)), "not seeded"
    for t in inp.A + inp.B + inp.ref_A + inp.ref_B:
        assert t.dtype == torch.float32 and torch.isfinite(t).all() and (t != 0).all()
    # Clients are rotated noisy copies of the reference: hard Procrustes brings them back near it.
    out = reference.align_and_aggregate(inp.A, inp.B, ref_A=inp.ref_A, lam=1.0)
    assert max(rel_err(a, ra) for a, ra in zip(out.A, inp.ref_A)) < 0.3, f"seed={seed}"
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
                    "--copy-mib", "16", "--mm-size", "256", "--min-time", "0"])
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"fused", "batched", "loop"}
    for r in rows:
        assert r["median_ms"] > 0 and r["err_vs_ref"] < 1e-4 and r["bytes_moved"] > 0
