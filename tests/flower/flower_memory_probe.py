"""Run in a fresh process by test_flower_streaming.py: one FedRotLoRA round over many large replies,
streaming or stacked; prints the peak RSS of aggregate_train less the RSS just before it, with the
replies already in memory (Linux: the peak is reset through /proc/self/clear_refs).

    python tests/flower/flower_memory_probe.py stream|stack N_REPLIES
"""
import gc
import json
import os
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


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def _reset_peak_rss() -> float:
    """Resets the peak RSS (VmHWM) to the current RSS and returns it, so that neither the replies' build
    nor code paged in before the round is charged to the round."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def main(mode: str, n: int) -> dict:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(SEED)
    reference = _state(g, 0.02)
    replies = [_reply(_state(g, 0.02), 100 + i, i + 1) for i in range(n)]  # built one at a time, kept as Flower keeps them
    sent = (2, state_dict_to_arrayrecord(reference))
    warm_up = FedRotLoRA(streaming=(mode == "stream"))  # a 2-reply round first, so that its code is paged in
    warm_up._sent = sent
    warm_up.aggregate_train(2, [_reply(_state(g, 0.02), 90 + i, 50 + i) for i in range(2)])
    del warm_up
    strategy = FedRotLoRA(streaming=(mode == "stream"))
    strategy._sent = sent
    before = _reset_peak_rss()
    arrays, metrics = strategy.aggregate_train(2, replies)
    peak = _status_mb("VmHWM")
    assert arrays is not None and metrics["replies-accepted"] == n
    reply_mb = n * MODULES * 2 * R * D * 4 / 2**20
    return {"mode": mode, "replies": n, "replies_MB": reply_mb, "peak_extra_MB": peak - before}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
