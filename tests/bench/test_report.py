"""bench/report.py tables from real run_bench.py outputs on the tiny config (structure, never timings)."""
import json

import pytest

from bench import report, run_bench


def _run(tmp_path, align):
    out = tmp_path / f"grid_{align}.json"
    argv = ["--configs", "tiny_N3_r4_fp32,tiny_N3_r16_fp32", "--impls", "fused,batched", "--align", align,
            "--warmup", "0", "--repeats", "3", "--min-time", "0", "--copy-mib", "8", "--mm-size", "128", "--ref-layers", "0", "--out", str(out)]
    assert run_bench.main(argv) == 0
    return out


def test_summary_and_markdown_report_every_config_with_its_roofline(tmp_path):
    paths = [str(_run(tmp_path, align)) for align in ("A", "B")]
    rows = [r for p in paths for r in json.loads(open(p).read())["rows"] if r["impl"] == "fused"]
    lines = report.summary(paths).splitlines()
    assert len(lines) == 2 + 2  # header, rule, one line per align (one model, one dtype)
    for line, align in zip(lines[2:], ("A", "B")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:4] == [align, "tiny", "fp32", "2"]
        ratios = [r["speedup_vs_batched"] for r in rows[:2]] if align == "A" else [r["speedup_vs_batched"] for r in rows[2:]]
        assert cells[4].startswith(f"{min(ratios):.2f}x")
        assert cells[6] == f"{sum(x >= 1.5 for x in ratios)}/2"
        assert cells[7].endswith("%")  # r = 16 is in: a roofline fraction is reported
        r16 = next(r for r in (rows[:2] if align == "A" else rows[2:]) if r["r"] == 16)
        assert cells[8] == f"{int(r16['floor_frac'] >= 0.5)}/1"
        assert cells[9:11] == cells[7:9]  # fp32 rows: the GEMM in their dtype is the fp32 one
    table = report.markdown(paths[:1])
    assert "| roofline ms | % of roofline | % of roofline, GEMM in its dtype |" in table
    fused = next(line for line in table.splitlines() if line.startswith("| tiny_N3_r16_fp32 | fused (a) |"))
    row = next(r for r in rows[:2] if r["config"] == "tiny_N3_r16_fp32")
    assert f"| {row['floor_ms']:.2f} | {100 * row['floor_frac']:.0f} | {100 * row['floor_frac_dtype_gemm']:.0f} |" in fused


def test_native_variant_rows_name_it_and_their_ratio_to_it(tmp_path):
    out = tmp_path / "native.json"
    argv = ["--configs", "tiny_N3_r4_bf16", "--impls", "fused,batched,batched_native", "--warmup", "0", "--repeats", "3",
            "--min-time", "0", "--copy-mib", "8", "--mm-size", "128", "--out", str(out)]
    assert run_bench.main(argv) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fused", "batched", "batched_native"}
    fused = rows["fused"]
    assert fused["speedup_vs_batched_native"] == rows["batched_native"]["median_ms"] / fused["median_ms"]
    lines = report.fmt_table(list(rows.values())).splitlines()
    assert lines[2 + 2].startswith("tiny_N3_r4_bf16                  native (c')")
    assert f"vs (c') {fused['speedup_vs_batched_native']:.2f}x" in lines[2]


def test_rates_judge_bf16_rows_against_both_gemm_rates():
    ceil = {"copy_GBps": 10.0, "mm_GFLOPs": 100.0, "mm_bf16_GFLOPs": 400.0}
    moved, flops, med = 10**8, 2 * 10**9, 0.05  # 10 ms at the copy ceiling; 20 ms fp32 GEMM, 5 ms bf16
    bf16 = run_bench.rates(moved, flops, med, ceil, "bf16")
    assert bf16["floor_ms"] == pytest.approx(20.0) and bf16["floor_frac"] == pytest.approx(0.4)
    assert bf16["floor_ms_dtype_gemm"] == pytest.approx(10.0)  # bytes bind once the GEMM is 4x faster
    assert bf16["floor_frac_dtype_gemm"] == pytest.approx(0.2)
    fp32 = run_bench.rates(moved, flops, med, ceil, "fp32")
    assert fp32["floor_frac_dtype_gemm"] == fp32["floor_frac"] == pytest.approx(0.4)
    assert "floor_frac_dtype_gemm" not in run_bench.rates(moved, flops, med, ceil, "fp16")  # no fp16 probe
