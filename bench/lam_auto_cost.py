"""Cost of lam="auto" against a fixed λ, in one run on the same inputs.

    python bench/lam_auto_cost.py --device cpu [--configs 'roberta*_N10_*'] [--out results/lam_auto.json]

"auto" = the choose_lam op (per layer: the cross-covariances, the hard and the soft
candidate rotations of every grid value, the (N·r)² Grams of both factors, the
scores) followed by the fused op at the chosen λ. Reported per config: median ms of
each and their ratio. The Grams cost (N·r)²·(in + out) FMAs per layer against the
fused op's ~N·r²·(2·in + out), so the ratio grows with N·r; the table says where.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `fedrot_ext` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import fedrot_ext
from bench import cli, machine, shapes
from bench.timing import spread, time_interleaved

CONFIGS = (
    "roberta-large-qv_N10_r4_fp32", "roberta-large-qv_N10_r16_fp32", "roberta-large-qv_N10_r64_fp32",
    "roberta-large-qv_N50_r16_fp32", "roberta-large-qv_N100_r8_fp32", "roberta-large-qv_N10_r16_bf16",
    "llama3-8b-qkvo_N10_r16_fp32",
)


def run(config_id: str, device: torch.device, repeats: int, align: str) -> dict:
    cfg = shapes.parse(config_id)
    inp = shapes.make_inputs(cfg, device, seed=0)
    call = lambda lam: fedrot_ext.align_and_aggregate(inp.A, inp.B, **inp.kwargs(), align=align, lam=lam)  # noqa: E731
    # The two calls take turns (bench/timing.py, time_interleaved): their ratio then holds on a drifting VM.
    times = time_interleaved({"fixed": lambda k: call(0.5), "auto": lambda k: call("auto")}, device, warmup=1,
                             repeats=repeats, min_repeats=3, max_s=120.0)
    fixed, auto = (spread(times[key])["median_s"] * 1e3 for key in ("fixed", "auto"))
    chosen = call("auto").lam
    return {"config": config_id, "align": align, "fixed_ms": fixed, "auto_ms": auto, "ratio": auto / fixed,
            "lam_chosen": sorted(set(chosen))}


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "glob over the config ids (default: the list above)")
    ap.add_argument("--align", default="A")
    args = ap.parse_args(argv)
    device = cli.start(args)
    ids = [c.id for c in shapes.select(map(shapes.parse, CONFIGS), args.configs)] if args.configs else list(CONFIGS)
    info = machine.machine_info(device)
    rows = []
    print("| config | fixed λ=0.5 ms | auto ms | auto / fixed | λ chosen |\n|---|---|---|---|---|")
    for cid in ids:
        row = run(cid, device, args.repeats, args.align)
        rows.append(row)
        print(f"| {cid} | {row['fixed_ms']:.1f} | {row['auto_ms']:.1f} | {row['ratio']:.2f}× | {row['lam_chosen']} |",
              flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
