"""The benchmark's rows as a terminal table, a launch-count table, or markdown merged from JSON files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

LABEL = {"fused": "fused (a)", "loop": "loop (b)", "batched": "batched (c)", "batched_native": "native (c')"}


def _cells(r: dict) -> dict:
    """The optional figures of a timed row, formatted the same in every table."""
    return {
        "vs_b": f"{r['speedup_vs_loop']:.1f}x" if "speedup_vs_loop" in r else "-",
        "vs_c": f"{r['speedup_vs_batched']:.2f}x" if "speedup_vs_batched" in r else "-",
        "mem": "n/a" if r.get("peak_extra_bytes") is None else f"{r['peak_extra_bytes'] / 2**20:.1f}",
        "err": f"{r['err_vs_ref']:.1e}" if "err_vs_ref" in r else "-",
        "own": f"{100 * r['floor_frac_dtype_gemm']:.0f}" if "floor_frac_dtype_gemm" in r else "-",
        "note": "; ".join(
            ([f"vs (c') {r['speedup_vs_batched_native']:.2f}x"] if "speedup_vs_batched_native" in r else [])
            + ([f"extrapolated from {r['layers_run']}/{r['layers']} layers"] if r.get("extrapolated") else [])),
    }


def fmt_table(rows: List[dict]) -> str:
    """Header, rule, then one line a row (fmt_table([]) is the header alone, printed before the first config)."""
    head = (f"{'config':32} {'impl':12} {'median ms':>10} {'±iqr%':>6} {'vs (b)':>7} {'vs (c)':>7} {'GB/s':>7} "
            f"{'%copy':>6} {'GFLOP/s':>8} {'%floor':>6} {'%fl-dt':>6} {'peak MiB':>9} {'err':>8}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['config']:32} {LABEL[r['impl']]:12} {'skipped: ' + r['skipped']}")
            continue
        c = _cells(r)
        lines.append(
            f"{r['config']:32} {LABEL[r['impl']]:12} {r['median_ms']:10.3f} {r['iqr_pct']:6.1f} {c['vs_b']:>7} {c['vs_c']:>7} "
            f"{r['GBps']:7.2f} {100 * r['copy_frac']:6.1f} {r['GFLOPs']:8.2f} {100 * r['floor_frac']:6.1f} {c['own']:>6} "
            f"{c['mem']:>9} {c['err']:>8}  {c['note']}"
        )
    return "\n".join(lines)


def fmt_launches(rows: List[dict]) -> str:
    lines = []
    for r in rows:
        c = r.get("launches")
        if not c:
            continue
        if "error" in c:
            lines.append(f"{r['config']:32} {LABEL[r['impl']]:12} profiler failed: {c['error']}")
            continue
        lines.append(
            f"{r['config']:32} {LABEL[r['impl']]:12} kernels {c['kernels']:5d}  memcpy {c['memcpy']:3d}  memset {c['memset']:3d}  "
            f"launch API calls {c['launch_api_calls']:5d}  host syncs {c['sync_api_calls']:3d}"
        )
    return "\n".join(lines)


def _busy(r: dict) -> str:
    b = r.get("others_busy_before")
    return f"{100 * b:.0f}%" if b is not None else str(r.get("load1", "-"))


def markdown(paths: List[str]) -> str:
    """Markdown table of one or more JSON outputs; a later file's rows replace earlier ones."""
    merged: Dict[tuple, dict] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["rows"]:
            merged[(r["config"], r["impl"])] = r
    lines = ["| config | impl | median ms | vs (b) | vs (c) | GB/s | % copy BW | GFLOP/s | roofline ms | % of roofline "
             "| % of roofline, GEMM in its dtype | peak extra MiB | err vs fp64 | others' CPU | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in merged.values():
        if "skipped" in r:
            lines.append(f"| {r['config']} | {LABEL[r['impl']]} | skipped: {r['skipped']} | | | | | | | | | | | | |")
            continue
        c = _cells(r)
        note = "(b) " + c["note"] if c["note"] else ""
        lines.append(f"| {r['config']} | {LABEL[r['impl']]} | {r['median_ms']:.2f} | {c['vs_b']} | {c['vs_c']} | {r['GBps']:.2f} | "
                     f"{100 * r['copy_frac']:.1f} | {r['GFLOPs']:.1f} | {r['floor_ms']:.2f} | {100 * r['floor_frac']:.0f} | "
                     f"{c['own']} | {c['mem']} | {c['err']} | {_busy(r)} | {note} |")
    return "\n".join(lines)


def _span(values: List[float]) -> str:
    return f"{min(values):.0f}–{max(values):.0f} %" if values else "-"


def summary(paths: List[str]) -> str:
    """Markdown: per align mode, model and dtype, the fused op's worst and median speed-up over batched
    PyTorch, how many configs reach 1.5x, and its fraction of the roofline at r >= 16 (range, and how many reach 50 %),
    with the fp32 GEMM rate, then with the GEMM rate in the rows' dtype ("-" where the run did not measure it)."""
    groups: Dict[tuple, List[dict]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for r in data["rows"]:
            if r["impl"] == "fused" and "skipped" not in r and "speedup_vs_batched" in r:
                groups.setdefault((data["args"]["align"], r["model"], r["dtype"]), []).append(r)
    lines = ["| align | shapes | dtype | configs | fused vs batched: worst (config) | median | >= 1.5x | % of roofline at r >= 16 "
             "| r >= 16 at >= 50 % | % of roofline at r >= 16, GEMM in its dtype | r >= 16 at >= 50 %, GEMM in its dtype |",
             "|---|---|---|---:|---|---:|---:|---|---:|---|---:|"]
    for (align, model, dtype), rows in groups.items():
        ratios = sorted(r["speedup_vs_batched"] for r in rows)
        worst = min(rows, key=lambda r: r["speedup_vs_batched"])
        roof = [100 * r["floor_frac"] for r in rows if r["r"] >= 16]
        own = [100 * r["floor_frac_dtype_gemm"] for r in rows if r["r"] >= 16 and "floor_frac_dtype_gemm" in r]
        own = own if len(own) == len(roof) else []
        lines.append(f"| {align} | {model} | {dtype} | {len(rows)} | {worst['speedup_vs_batched']:.2f}x "
                     f"(N = {worst['N']}, r = {worst['r']}) | {ratios[len(ratios) // 2]:.2f}x | "
                     f"{sum(x >= 1.5 for x in ratios)}/{len(ratios)} | {_span(roof)} | {sum(x >= 50 for x in roof)}/{len(roof)} | "
                     f"{_span(own)} | {f'{sum(x >= 50 for x in own)}/{len(own)}' if own else '-'} |")
    return "\n".join(lines)
