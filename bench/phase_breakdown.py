"""Where the time of one call goes: covariance, rotations and aggregation, for the fused op and batched PyTorch.

    python bench/phase_breakdown.py --device cpu [--configs 'roberta*_N10_*'] [--threads 1] [--out results/phases.json]

The phases are measured by difference, with the implementation itself (no instrumentation), the
three calls taking turns (bench/timing.py, time_interleaved):
- aggregation = a call with align="none" (no covariance, no rotation: the weighted factor sums);
- covariance  = a call with the align mode at λ = 0 (M_i is formed, then R_i = I) minus aggregation;
- rotations   = a call at the λ asked for minus the λ = 0 call (the polar factors: one at λ = 1, two below).
Each phase is also given as a fraction of its own roofline floor: the FMAs it must do at the measured
GEMM rate, or (aggregation) the bytes it must move at the measured copy bandwidth, whichever binds;
the total against the whole call's floor as in run_bench.py.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `fedrot_ext` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import fedrot_ext
from bench import cli, machine, shapes
from bench.timing import spread, time_interleaved
from bench.torch_impls import torch_batched

CONFIGS = (
    "roberta-large-qv_N10_r4_fp32", "roberta-large-qv_N10_r16_fp32", "roberta-large-qv_N10_r64_fp32",
    "llama3-8b-qkvo_N10_r16_fp32", "llama3-8b-qkvo_N10_r64_fp32", "roberta-large-qv_N10_r16_bf16",
)
IMPLS = {"fused": fedrot_ext.align_and_aggregate, "batched": torch_batched}
PHASES = ("aggregation", "covariance", "rotations")


def phase_floors_ms(cfg: shapes.Config, align: str, lam: float, ceil: dict) -> dict:
    """Roofline floor of each phase in ms: FMAs at the GEMM rate; aggregation also bytes at copy bandwidth."""
    gemm = ceil["mm_GFLOPs"] * 1e9
    agg_bytes = shapes.bytes_moved(cfg, "none")  # the client factors read once, the outputs written once
    agg = max(agg_bytes / (ceil["copy_GBps"] * 1e9), shapes.flops(cfg, "none", 0.0) / gemm)
    cov = (shapes.flops(cfg, align, 0.0) - shapes.flops(cfg, "none", 0.0)) / gemm
    rot = (shapes.flops(cfg, align, lam) - shapes.flops(cfg, align, 0.0)) / gemm
    total = max(shapes.bytes_moved(cfg, align) / (ceil["copy_GBps"] * 1e9), shapes.flops(cfg, align, lam) / gemm)
    return {"aggregation": agg * 1e3, "covariance": cov * 1e3, "rotations": rot * 1e3, "total": total * 1e3}


def run(config_id: str, device: torch.device, repeats: int, align: str, lam: float, ceil: dict) -> dict:
    cfg = shapes.parse(config_id)
    inp = shapes.make_inputs(cfg, device, seed=0)
    sets = shapes.copies(inp, max(1, min(4, math.ceil(2 * ceil["llc_bytes"] / shapes.input_bytes(cfg)))))
    floors = phase_floors_ms(cfg, align, lam, ceil)
    row = {"config": config_id, "align": align, "lam": lam, "floor_ms": floors}
    for impl, f in IMPLS.items():
        def call(mode, lam_):
            return lambda k: f(sets[k % len(sets)].A, sets[k % len(sets)].B, **sets[k % len(sets)].kwargs(), align=mode, lam=lam_)

        # The three calls take turns, so that their differences compare the same state of a drifting VM.
        times = time_interleaved({"none": call("none", 0.0), "zero": call(align, 0.0), "full": call(align, lam)},
                                 device, warmup=1, repeats=repeats, min_repeats=3, max_s=90.0)
        none, zero, full = (spread(times[key])["median_s"] * 1e3 for key in ("none", "zero", "full"))
        ms = {"aggregation": none, "covariance": zero - none, "rotations": full - zero, "total": full}
        row[impl] = {"ms": ms, "floor_frac": {k: floors[k] / ms[k] if ms[k] > 0 else float("nan") for k in ms}}
    row["fused_vs_batched"] = row["batched"]["ms"]["total"] / row["fused"]["ms"]["total"]
    return row


def markdown(rows) -> str:
    lines = ["| config | phase | fused ms | batched ms | batched / fused | fused % of floor | batched % of floor |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for phase in (*PHASES, "total"):
            f, b = row["fused"], row["batched"]
            ratio = b["ms"][phase] / f["ms"][phase] if f["ms"][phase] > 0 else float("nan")
            lines.append(f"| {row['config'] if phase == PHASES[0] else ''} | {phase} | {f['ms'][phase]:.1f} | {b['ms'][phase]:.1f} | "
                         f"{ratio:.2f}× | {100 * f['floor_frac'][phase]:.0f} % | {100 * b['floor_frac'][phase]:.0f} % |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "comma-separated config ids or globs over the sweep's (default: the list above)")
    ap.add_argument("--align", default="A", choices=["A", "B", "AB"])
    ap.add_argument("--lam", type=float, default=0.5)
    args = ap.parse_args(argv)
    device = cli.start(args)
    configs = [shapes.parse(c) for c in CONFIGS] if not args.configs else [
        c for pattern in args.configs.split(",")
        for c in (shapes.select(shapes.sweep(), pattern) if any(ch in pattern for ch in "*?[") else [shapes.parse(pattern)])]
    ceil = machine.ceilings(device)
    print(f"copy {ceil['copy_GBps']:.1f} GB/s, GEMM {ceil['mm_GFLOPs']:.1f} GFLOP/s, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for cfg in configs:
        rows.append(run(cfg.id, device, args.repeats, args.align, args.lam, ceil))
        print(markdown(rows[-1:]), flush=True)
    print("\n" + markdown(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine.machine_info(device), "ceilings": ceil, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
