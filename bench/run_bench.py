"""Time the fused op against the two PyTorch baselines on the same inputs, in one run.

    python bench/run_bench.py --device cpu --quick
    python bench/run_bench.py --device cuda --out results/bench_cuda.json
    python bench/run_bench.py --configs 'roberta*_N10_*_fp32' --impls fused,batched

Implementations: fused = fedrot_ext.align_and_aggregate, loop = (b)
bench.torch_impls.authors_loop, batched = (c) bench.torch_impls.torch_batched;
on request (--impls), batched_native = (c') torch_batched_native, every GEMM in
the storage dtype (faster bf16 GEMMs, bf16-rounded M_i and coefficients).
How calls are timed and memory measured: bench/timing.py; the machine's
ceilings: bench/machine.py; the tables: bench/report.py. When one input set
fits in the last-level cache (CPU L3, GPU L2), the calls rotate through several
copies in distinct memory, so that no call is timed out of the cache.

Figures per row: median ms (and the interquartile spread), speedup of each impl
over (b) and (c), effective bandwidth = bytes_moved / median (bench.shapes:
every client factor read once + the aligning reference + both outputs written
once), its fraction of the measured copy bandwidth, useful GFLOP/s, the
roofline floor max(bytes / copy BW, flops / matmul rate) as a fraction of the
median ("%floor"), peak extra memory, and the max relative error against the
float64 reference on the first few layers.

Fused and batched calls take turns (bench/timing.py, time_interleaved), and the
ceilings are measured again just before each config, so that a row's ratio and
its %floor compare states of the machine seconds apart, not minutes: on a shared
VM the same matmul ran at 200 and 280 GFLOP/s a second apart. The run-start
ceilings stay in the JSON header; each row carries its own.

The loop baseline (b) is capped: a probe call on one period of layers
estimates the full call; if that is above --loop-cap seconds, (b) runs on the
first k periods of layers (k chosen to fit the cap) and its time is scaled by
L / layers_run, flagged 'extrapolated' (the loop has no cross-layer work, so its
time is linear in the layers). Its memory figure is then the subset's.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

if __package__ in (None, ""):  # run as a script: make `bench` and `fedrot_ext` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import fedrot_ext
from bench import machine, report, shapes
from bench.accuracy import expected, rel_err
from bench.shapes import Config, Inputs
from bench.timing import count_launches, peak_extra_bytes, spread, time_calls, time_interleaved
from bench.torch_impls import authors_loop, torch_batched, torch_batched_native

IMPLS: Dict[str, Callable] = {
    "fused": fedrot_ext.align_and_aggregate,
    "batched": torch_batched,
    "loop": authors_loop,
    "batched_native": torch_batched_native,
}


def subset(inp: Inputs, n: int) -> Inputs:
    return Inputs(inp.A[:n], inp.B[:n], inp.ref_A[:n], inp.ref_B[:n], inp.weights)


def loop_layers(cfg: Config, caller, device: torch.device, cap_s: float) -> Tuple[int, float]:
    """Layers (b) runs on within cap_s, and the factor its time is scaled by to stand for all layers."""
    L, period = len(cfg.layers), shapes.MODELS[cfg.model].period
    probe = caller("loop", period)
    probe(0)  # warm-up on set 0, timed on set 1: the probe is not timed out of the cache
    t_period = time_calls(lambda k: probe(k + 1), device, warmup=0, repeats=1, min_repeats=1, max_s=0.0)[0]
    if t_period * L / period <= cap_s:
        return L, 1.0
    n_layers = min(L, period * max(1, int(cap_s / t_period)))
    return n_layers, L / n_layers


def samples_ms(times: List[float]) -> dict:
    """The timed calls in ms: all of them when few, else their deciles (min, 10 %, ..., max)."""
    if len(times) <= 64:
        return {"times_ms": [t * 1e3 for t in times]}
    ms = sorted(t * 1e3 for t in times)
    return {"deciles_ms": [ms[round(q * (len(ms) - 1) / 10)] for q in range(11)]}


def rates(moved: int, fl: int, med: float, ceil: dict, dtype: str) -> dict:
    """Bandwidth, FLOP rate, and the roofline floor (time at the copy or GEMM ceiling, whichever binds),
    with the fp32 GEMM rate (floor_ms, floor_frac) and, where it was measured, the GEMM rate in the
    row's dtype (floor_ms_dtype_gemm, floor_frac_dtype_gemm; machine.GEMM_PROBES)."""
    gbps = moved / med / 1e9

    def floor_s(gemm: str) -> float:
        return max(moved / (ceil["copy_GBps"] * 1e9), fl / (ceil[gemm] * 1e9))

    fp32 = floor_s(machine.GEMM_PROBES["fp32"][0])
    out = {"GBps": gbps, "copy_frac": gbps / ceil["copy_GBps"], "GFLOPs": fl / med / 1e9,
           "floor_ms": fp32 * 1e3, "floor_frac": fp32 / med}
    own_key = machine.GEMM_PROBES.get(dtype, (None,))[0]
    if own_key in ceil:
        own = floor_s(own_key)
        out.update(floor_ms_dtype_gemm=own * 1e3, floor_frac_dtype_gemm=own / med)
    return out


def run_config(cfg: Config, args, device: torch.device, ceil: dict) -> List[dict]:
    base = {"config": cfg.id, "model": cfg.model, "N": cfg.N, "r": cfg.r, "dtype": cfg.dtype, "layers": len(cfg.layers),
            "load1": round(os.getloadavg()[0], 2)}
    in_bytes = shapes.input_bytes(cfg)
    if in_bytes > args.budget_gib * 2**30:
        reason = f"inputs {in_bytes / 2**30:.1f} GiB > budget {args.budget_gib:g} GiB"
        return [dict(base, impl=impl, skipped=reason) for impl in args.impls]

    inp = shapes.make_inputs(cfg, device, seed=args.seed)
    k_sets = max(1, min(8, math.ceil(2 * ceil["llc_bytes"] / in_bytes)))
    sets = shapes.copies(inp, k_sets)
    L = len(cfg.layers)
    moved, fl = shapes.bytes_moved(cfg, args.align), shapes.flops(cfg, args.align, args.lam)
    opts = {"align": args.align, "lam": args.lam}

    def caller(impl: str, n_layers: int):
        f = IMPLS[impl]

        def call(k: int):  # call k reads input set k mod len(sets)
            s = subset(sets[k % len(sets)], n_layers)
            return f(s.A, s.B, **s.kwargs(), **opts)

        return call

    # Float64 result on the first few layers: every impl's error against it.
    n_ref = min(L, args.ref_layers)
    head = subset(inp, n_ref)
    ref = expected(head.A, head.B, **head.kwargs(), **opts) if n_ref else None

    # The ceilings again next to this config's calls, and fused and batched calls taking turns: the
    # shared VM's speed drifts by a quarter within seconds (bench/timing.py, time_interleaved).
    here = machine.ceilings(device, args.copy_mib, args.mm_size)
    fast = [impl for impl in args.impls if impl != "loop"]
    fast_times = time_interleaved({impl: caller(impl, L) for impl in fast}, device, warmup=args.warmup,
                                  repeats=args.repeats, min_repeats=3, max_s=args.max_time * len(fast),
                                  min_s=args.min_time * len(fast))
    rows = []
    for impl in args.impls:
        row = dict(base, impl=impl, input_sets=k_sets, bytes_moved=moved, flops=fl, ceilings=here)
        n_layers, scale = loop_layers(cfg, caller, device, args.loop_cap) if impl == "loop" else (L, 1.0)
        call = caller(impl, n_layers)
        if impl == "loop":
            times = time_calls(call, device, warmup=1, repeats=3, min_repeats=3, max_s=args.max_time)
        else:
            times = fast_times[impl]
        stats = spread(times)
        med = stats["median_s"] * scale
        row.update(median_ms=med * 1e3, iqr_pct=stats["iqr_pct"], repeats=len(times), **samples_ms(times))
        if scale != 1.0:
            row.update(extrapolated=True, layers_run=n_layers)
        row.update(rates(moved, fl, med, here, cfg.dtype))
        row["peak_extra_bytes"] = peak_extra_bytes(lambda: call(0), device)
        if ref is not None:
            row["err_vs_ref"] = rel_err(caller(impl, n_ref)(0), ref)
            row["err_layers"] = n_ref
        if device.type == "cuda" and impl in ("fused", "batched") and not args.no_profile:
            try:
                row["launches"] = count_launches(lambda: call(0))
            except Exception as e:  # the profiler is a diagnostic; never lose the timing for it
                row["launches"] = {"error": repr(e)}
        rows.append(row)
        gc.collect()

    by = {r["impl"]: r for r in rows}
    for row in rows:
        for other in ("loop", "batched", "batched_native"):
            if other in by:
                row[f"speedup_vs_{other}"] = by[other]["median_ms"] / row["median_ms"]
    del sets, inp
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(shapes.QUICK)}")
    p.add_argument("--configs", default=None, help="comma-separated globs over config ids, e.g. 'roberta*_N10_*'")
    p.add_argument("--impls", default="fused,batched,loop", help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--out", default=None, help="JSON output path (default results/bench_<device>.json)")
    p.add_argument("--align", default="A", choices=["A", "B", "AB", "none"])
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--budget-gib", type=float, default=None,
                   help="skip configs whose inputs exceed this (default: cpu 4, cuda 30%% of device memory)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--max-time", type=float, default=20.0, help="stop repeating after this many seconds (min 3 repeats)")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="keep repeating fused and batched calls past --repeats until this many seconds have passed")
    p.add_argument("--loop-cap", type=float, default=3.0, help="seconds per (b) call before it is extrapolated from a subset")
    p.add_argument("--ref-layers", type=int, default=4, help="layers checked against the float64 reference (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-profile", action="store_true", help="CUDA: skip the torch.profiler launch count")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's, = cores)")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="CPU: before each config wait up to this many seconds for other processes to go quiet")
    p.add_argument("--quiet-below", type=float, default=0.15,
                   help="CPU share used by other processes that counts as quiet (default 0.15)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; configs not started in time are listed as skipped")
    p.add_argument("--copy-mib", type=int, default=None, help="size of the copy-bandwidth probe (default cpu 256, cuda 2048)")
    p.add_argument("--mm-size", type=int, default=None, help="size of the matmul-rate probe (default cpu 2048, cuda 8192)")
    p.add_argument("--markdown", nargs="+", metavar="JSON", help="print a markdown table of these JSON outputs and exit")
    p.add_argument("--summary", nargs="+", metavar="JSON",
                   help="print the per-align, model and dtype summary of these JSON outputs (fused vs batched) and exit")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.markdown:
        print(report.markdown(args.markdown))
        return 0
    if args.summary:
        print(report.summary(args.summary))
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for i in args.impls:
        if i not in IMPLS:
            p.error(f"--impls: unknown {i!r}; expected a subset of {list(IMPLS)}")
    if args.budget_gib is None:
        args.budget_gib = 4.0 if device.type == "cpu" else 0.3 * torch.cuda.get_device_properties(device).total_memory / 2**30
    configs = [shapes.parse(c) for c in shapes.QUICK] if args.quick else shapes.sweep()
    configs = shapes.select(configs, args.configs)
    if args.configs:  # exact ids outside the sweep (e.g. the tiny smoke config) are taken as given
        configs += [shapes.parse(c) for c in args.configs.split(",") if c.strip().startswith("tiny")]
    if not configs:
        p.error("no config matches --configs")
    out_path = Path(args.out or f"results/bench_{device.type}.json")

    info = machine.machine_info(device)
    if info["loadavg_start"][0] > 0.5:
        print(f"warning: 1-min load average {info['loadavg_start'][0]:.2f} > 0.5; CPU timings will be noisy", file=sys.stderr)
    if device.type == "cpu" and args.wait_quiet:
        machine.wait_quiet(args.quiet_below, args.wait_quiet)
    ceil = machine.ceilings(device, args.copy_mib, args.mm_size)
    print(f"# {info.get('gpu', info['cpu'])}, torch {info['torch']}, {info['threads']} threads, "
          f"copy {ceil['copy_GBps']:.1f} GB/s (clone {ceil['clone_GBps']:.1f}), matmul fp32 {ceil['mm_GFLOPs']:.0f} / bf16 {ceil['mm_bf16_GFLOPs']:.0f} GFLOP/s, "
          f"align={args.align} lam={args.lam}", flush=True)

    print(report.fmt_table([]), flush=True)
    rows: List[dict] = []
    t_start = time.perf_counter()
    for cfg in configs:
        t0 = time.perf_counter()
        if args.time_budget is not None and t0 - t_start > args.time_budget:
            cfg_rows = [{"config": cfg.id, "impl": i, "skipped": f"--time-budget {args.time_budget:g} s spent"} for i in args.impls]
        else:
            busy = machine.wait_quiet(args.quiet_below, args.wait_quiet) if device.type == "cpu" else None
            cfg_rows = run_config(cfg, args, device, ceil)
            for r in cfg_rows:
                r["others_busy_before"] = busy
        rows += cfg_rows
        here = cfg_rows[0].get("ceilings")
        now = f"; copy {here['copy_GBps']:.1f} GB/s, matmul fp32 {here['mm_GFLOPs']:.0f} / bf16 {here['mm_bf16_GFLOPs']:.0f} GFLOP/s" if here else ""
        print(report.fmt_table(cfg_rows).split("\n", 2)[2], f"  [{time.perf_counter() - t0:.0f} s{now}]", flush=True)
        info["loadavg_end"] = os.getloadavg()
        out_path.parent.mkdir(parents=True, exist_ok=True)  # rewritten after every config: a killed run keeps its rows
        out_path.write_text(json.dumps({"machine": info, "ceilings": ceil, "args": vars(args), "rows": rows}, indent=1))

    print()
    print(report.fmt_table(rows))
    launches = report.fmt_launches(rows)
    if launches:
        print("\n# kernel launches per call (torch.profiler)\n" + launches)
    print(f"\n# load average start {info['loadavg_start']}, end {info['loadavg_end']}; JSON: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
