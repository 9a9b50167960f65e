"""Run in a fresh process by test_flower_streaming.py: one FedRotLoRA round over many large replies,
streaming or stacked; prints the peak RSS of aggregate_train less the RSS just before it, with the replies already in memory.

    python tests/flower/flower_memory_probe.py stream|stack N_REPLIES
"""
import json
import os
import resource
import sys

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402

from fedrot_ext.flower import FedRotLoRA, state_dict_to_arrayrecord  # noqa: E402
from test_flower import _reply  # noqa: E402

MODULES, D, R, SEED = 24, 2048, 16, 5  # 24 modules of 2048 × 2048 at r = 16: 6.3 MB of fp32 factors per reply


def _state(g: torch.Generator, scale: float):
    out = {}
    for m in range(MODULES):
        key = f"base_model.model.layers.{m}.proj"
        out[f"{key}.lora_A.weight"] = torch.randn(R, D, generator=g) * scale
        out[f"{key}.lora_B.weight"] = torch.randn(D, R, generator=g) * scale
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    # Not the peak: building the replies left a higher peak behind it, which would hide part of the round's growth.
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(mode: str, n: int) -> dict:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(SEED)
    reference = _state(g, 0.02)
    replies = [_reply(_state(g, 0.02), 100 + i, i + 1) for i in range(n)]  # built one at a time, kept as Flower keeps them
    strategy = FedRotLoRA(streaming=(mode == "stream"))
    strategy._sent = (2, state_dict_to_arrayrecord(reference))
    before = _current_rss_mb()
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert arrays is not None and metrics["replies-accepted"] == n
    reply_mb = n * MODULES * 2 * R * D * 4 / 2**20
    return {"mode": mode, "replies": n, "replies_MB": reply_mb, "peak_extra_MB": _peak_rss_mb() - before}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
