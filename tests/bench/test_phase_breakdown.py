"""bench/phase_breakdown.py end to end on the tiny config (structure and floors, never timings)."""
import json

import pytest

from bench import phase_breakdown, shapes


def test_floors_split_the_work_of_the_whole_call():
    cfg = shapes.parse("tiny_N3_r4_fp32")
    ceil = {"copy_GBps": 10.0, "mm_GFLOPs": 100.0}
    floors = phase_breakdown.phase_floors_ms(cfg, "A", 0.5, ceil)
    flop_ms = lambda align, lam: shapes.flops(cfg, align, lam) / 100e9 * 1e3  # noqa: E731
    assert floors["covariance"] + floors["rotations"] == pytest.approx(flop_ms("A", 0.5) - flop_ms("none", 0.0))
    assert floors["rotations"] > 0 and floors["covariance"] > 0
    assert phase_breakdown.phase_floors_ms(cfg, "A", 0.0, ceil)["rotations"] == 0  # λ = 0: no polar factor


def test_main_writes_every_phase_for_both_implementations(tmp_path, capsys):
    out = tmp_path / "phases.json"
    assert phase_breakdown.main(["--configs", "tiny_N3_r4_fp32", "--repeats", "3", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    for impl in ("fused", "batched"):
        ms = row[impl]["ms"]
        assert set(ms) == {*phase_breakdown.PHASES, "total"}
        assert sum(ms[p] for p in phase_breakdown.PHASES) == pytest.approx(ms["total"])
    assert "| tiny_N3_r4_fp32 | aggregation |" in capsys.readouterr().out
