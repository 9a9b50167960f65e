"""pytest-benchmark comparison of the fused op, (b) the per-client loop and (c) batched PyTorch.

    pytest bench/ --benchmark-group-by=param:config          # implementations side by side
    FEDROT_BENCH=smoke pytest bench/                         # one tiny config, a few seconds (CI)
    FEDROT_BENCH=full FEDROT_BENCH_DEVICE=cuda pytest bench/ # the whole sweep within the memory budget

FEDROT_BENCH: smoke | quick (default) | full. FEDROT_BENCH_DEVICE: cpu (default) | cuda.
FEDROT_BENCH_BUDGET_GIB: skip configs whose inputs exceed this (default 4).
Every test also checks its output against an independent float64 result
(bench.accuracy.expected: the float64 reference, or float64 batched PyTorch on
large configs); no timing assertions. The loop baseline is skipped where
N x layers > 1280 (minutes per round); bench/run_bench.py extrapolates it from
a subset of layers instead.
"""
from __future__ import annotations

import os

import pytest
import torch

import fedrot_ext
from bench import shapes
from bench.accuracy import expected, rel_err
from bench.torch_impls import authors_loop, torch_batched

MODE = os.environ.get("FEDROT_BENCH", "quick")
DEVICE = os.environ.get("FEDROT_BENCH_DEVICE", "cpu")
BUDGET = float(os.environ.get("FEDROT_BENCH_BUDGET_GIB", "4"))
LOOP_MAX_CLIENT_LAYERS = 1280

IMPLS = {"fused": fedrot_ext.align_and_aggregate, "batched": torch_batched, "loop": authors_loop}

if MODE == "smoke":
    CONFIGS = list(shapes.SMOKE)
elif MODE == "full":
    CONFIGS = [c.id for c in shapes.sweep()]
elif MODE == "quick":
    CONFIGS = list(shapes.QUICK)
else:
    raise ValueError(f"FEDROT_BENCH: expected smoke, quick or full, got {MODE!r}")

_cache: dict = {}


def _inputs(config: str):
    """Inputs of the current config (one config held at a time) and their float64 expected result."""
    if config not in _cache:
        _cache.clear()
        inp = shapes.make_inputs(shapes.parse(config), DEVICE)
        _cache[config] = (inp, expected(inp.A, inp.B, **inp.kwargs()))
    return _cache[config]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("config,impl", [(c, i) for c in CONFIGS for i in IMPLS])
def test_aggregate(benchmark, config, impl):
    cfg = shapes.parse(config)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("FEDROT_BENCH_DEVICE=cuda but no CUDA device")
    if shapes.input_bytes(cfg) > BUDGET * 2**30:
        pytest.skip(f"inputs {shapes.input_bytes(cfg) / 2**30:.1f} GiB > budget {BUDGET:g} GiB")
    if impl == "loop" and cfg.N * len(cfg.layers) > LOOP_MAX_CLIENT_LAYERS:
        pytest.skip("loop baseline too slow for pytest here; see bench/run_bench.py (extrapolated)")
    inp, want = _inputs(config)
    fn = IMPLS[impl]

    def call():
        out = fn(inp.A, inp.B, **inp.kwargs())
        _sync()
        return out

    benchmark.group = config
    benchmark.extra_info.update(bytes_moved=shapes.bytes_moved(cfg), flops=shapes.flops(cfg), device=DEVICE)
    if impl == "loop":
        out = benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
    else:
        out = benchmark(call)
    if benchmark.stats is not None:  # None under --benchmark-disable
        med = benchmark.stats.stats.median
        benchmark.extra_info["GBps"] = shapes.bytes_moved(cfg) / med / 1e9

    tol = 1e-3 if cfg.dtype == "fp32" else 2e-2
    err = rel_err(out, want)
    assert err < tol, f"{impl} differs from the float64 result by {err:.2e} on {config}"
