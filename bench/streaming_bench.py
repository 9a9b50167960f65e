"""Streaming aggregation at scale: peak extra RSS and clients/s, next to the stacked call.

Clients are a Llama-shaped adapter slice (``MODULES`` q/k/v/o-like 4096×4096 modules at rank 16,
fp32) drawn one at a time from a seeded generator, so the only adapter-sized memory the
process holds is the one client in flight, the reference and the aggregator's sums.
Each measurement runs in a fresh subprocess: ru_maxrss is a process-wide high-water mark.

    python -m bench.streaming_bench            # 200 streamed clients, 20 stacked; prints a JSON line each
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
MODULES = 32  # 8 layers x (q, k, v, o): 16.8 MB of fp32 factors per client at rank 16
DIM, RANK, SEED = 4096, 16, 0


def client_bytes(modules: int = MODULES, dim: int = DIM, rank: int = RANK) -> int:
    return modules * 2 * rank * dim * 4


def _keys(m: int):
    layer, proj = divmod(m, 4)
    path = f"base_model.model.model.layers.{layer}.self_attn.{'qkvo'[proj]}_proj"
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


def llama_slice(g: torch.Generator, modules: int = MODULES, dim: int = DIM, rank: int = RANK) -> Dict[str, torch.Tensor]:
    """One adapter (saved peft layout) drawn from `g`."""
    state = {}
    for m in range(modules):
        key_A, key_B = _keys(m)
        state[key_A] = torch.randn(rank, dim, generator=g) / dim**0.5
        state[key_B] = torch.randn(dim, rank, generator=g) / rank**0.5
    return state


def clients(n: int, seed: int = SEED, **shape) -> Iterator[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield llama_slice(g, **shape)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure_streaming(n_clients: int = 200, summation: str = "plain", **shape) -> dict:
    """Stream `n_clients` through StreamingAggregator (fedrot, round 1): peak extra RSS over the
    baseline after setup (imports, the reference) and clients/s (generation included)."""
    import fedrot_ext

    reference = llama_slice(torch.Generator().manual_seed(SEED + 1), **shape)
    agg = fedrot_ext.StreamingAggregator(reference, method="fedrot", round=1, summation=summation)
    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    aggregating = 0.0  # add() and result() only, without drawing the clients
    for i, state in enumerate(clients(n_clients, **shape)):
        t0 = time.perf_counter()
        agg.add(state, weight=1.0 + i % 7)
        aggregating += time.perf_counter() - t0
        del state
    t0 = time.perf_counter()
    out = agg.result()
    aggregating += time.perf_counter() - t0
    seconds = time.perf_counter() - start
    assert agg.count == n_clients and all(bool(torch.isfinite(t).all()) for t in out.values())
    return {"path": "streaming", "summation": summation, "clients": n_clients, "client_MB": client_bytes(**shape) / 1e6,
            "stacked_total_MB": n_clients * client_bytes(**shape) / 1e6, "peak_extra_MB": (_peak_rss_bytes() - baseline) / 1e6,
            "seconds": seconds, "clients_per_s": n_clients / seconds, "aggregate_seconds": aggregating,
            "aggregate_clients_per_s": n_clients / aggregating}


def measure_stacked(n_clients: int = 20, **shape) -> dict:
    """aggregate_state_dicts on `n_clients` held in memory at once (peak extra RSS includes them)."""
    import fedrot_ext

    reference = llama_slice(torch.Generator().manual_seed(SEED + 1), **shape)
    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    states = list(clients(n_clients, **shape))
    generated = time.perf_counter()
    fedrot_ext.aggregate_state_dicts(states, reference=reference, weights=[1.0 + i % 7 for i in range(n_clients)], round=1)
    seconds = time.perf_counter() - start
    return {"path": "stacked", "clients": n_clients, "client_MB": client_bytes(**shape) / 1e6,
            "peak_extra_MB": (_peak_rss_bytes() - baseline) / 1e6, "seconds": seconds,
            "clients_per_s": n_clients / seconds, "aggregate_seconds": seconds - (generated - start),
            "aggregate_clients_per_s": n_clients / (seconds - (generated - start))}


def in_subprocess(call: str, threads: int = 1) -> dict:
    """Run ``bench.streaming_bench.<call>`` in a fresh interpreter; its JSON result. One thread by
    default: on the shared 2-core CPU, 2-thread parallel regions wait on a descheduled thread."""
    code = (f"import json, torch; torch.set_num_threads({threads}); import bench.streaming_bench as b; "
            f"print(json.dumps(b.{call}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    for call in ("measure_streaming(200)", "measure_streaming(200, summation='kahan')", "measure_stacked(20)"):
        print(json.dumps(in_subprocess(call)), flush=True)


if __name__ == "__main__":
    main()
