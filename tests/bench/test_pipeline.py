"""bench/pipeline.py on the tiny config: every path runs on the same round, the paths that aggregate
with FedRot-LoRA agree with aggregate_state_dicts, and the rows carry each ratio the goals read."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import pipeline, shapes  # noqa: E402

import fedrot_ext  # noqa: E402
from fedrot_ext.flower import arrayrecord_to_state_dict  # noqa: E402


def test_every_path_aggregates_the_same_round():
    cfg = shapes.parse("tiny_N3_r4_fp32")
    reference, clients, inp = pipeline.make_round(cfg)
    assert len(clients) == 3 and all(c.keys() == reference.keys() for c in clients)
    paths = pipeline.in_process_paths(cfg, reference, clients, inp)
    weights = [101, 102, 103]
    want = fedrot_ext.aggregate_state_dicts(clients, reference=reference, weights=weights, round=1)
    arrays, _ = paths["strategy_fedrot"](0)
    got = arrayrecord_to_state_dict(arrays)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)
    streamed = paths["streaming_group8"](0)
    for key in want:
        torch.testing.assert_close(streamed[key], want[key], rtol=1e-5, atol=1e-6)
    op = paths["op"](0)
    modules, _ = fedrot_ext.parse_lora_keys(reference)
    for m, a in zip(modules, op.A):
        torch.testing.assert_close(a, want[m.key_A], rtol=1e-5, atol=1e-6)


def test_a_row_carries_every_ratio(tmp_path):
    row = pipeline.run_config("tiny_N3_r4_fp32", repeats=2, cli_repeats=1)
    assert set(row["ratios"]) == {f"{p}/{b}" for p, b, _ in pipeline.RATIOS}
    assert set(row["goals_met"]) == {f"{p}/{b}" for p, b, g in pipeline.RATIOS if g is not None}
    assert all(t > 0 for ts in row["times_s"].values() for t in ts)
    assert pipeline.table([row]).splitlines()[-1].startswith("| tiny_N3_r4_fp32 |")
