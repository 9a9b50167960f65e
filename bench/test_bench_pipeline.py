"""pytest-benchmark group of bench/pipeline.py: every user path of one round on the same data.

    pytest bench/test_bench_pipeline.py --benchmark-group-by=param:config   # paths side by side
    FEDROT_BENCH=smoke pytest bench/                                      # the tiny config (CI)

FEDROT_BENCH: smoke (tiny_N3_r4_fp32) | quick (default: Llama-3-8B q,k,v,o N = 10 r = 16 fp32) | full
(bench.pipeline.DEFAULT_CONFIGS). No timing assertions: the goals are read off the table.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench import pipeline, shapes

MODE = os.environ.get("FEDROT_BENCH", "quick")
CONFIGS = {"smoke": ["tiny_N3_r4_fp32"], "quick": ["llama3-8b-qkvo_N10_r16_fp32"], "full": list(pipeline.DEFAULT_CONFIGS)}[MODE]
PATHS = ("flower_fedavg", "strategy_fedrot", "strategy_fedit", "strategy_fedrot_streaming", "state_dicts", "streaming",
         "streaming_group8", "op", "copy")

_cache: dict = {}


def _paths(config: str):
    if config not in _cache:
        _cache.clear()
        cfg = shapes.parse(config)
        reference, clients, inp = pipeline.make_round(cfg)
        _cache[config] = pipeline.in_process_paths(cfg, reference, clients, inp)
    return _cache[config]


@pytest.mark.parametrize("config,path", [(c, p) for c in CONFIGS for p in PATHS])
def test_pipeline(benchmark, config, path):
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    fn = _paths(config)[path]
    benchmark.group = f"pipeline {config}"
    out = benchmark.pedantic(lambda: fn(0), rounds=3, iterations=1, warmup_rounds=1)
    assert out is not None or path == "copy"
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
