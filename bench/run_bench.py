"""Time the fused op against the two PyTorch baselines on the same inputs, in one run.

    python bench/run_bench.py --device cpu --quick
    python bench/run_bench.py --device cuda --out results/bench_cuda.json
    python bench/run_bench.py --configs 'roberta*_N10_*_fp32' --impls fused,batched

Implementations: fused = fedrot_ext.align_and_aggregate, loop = (b)
bench.baselines.authors_loop, batched = (c) bench.baselines.torch_batched.

Timing. CPU: time.perf_counter around each call after warm-up calls, median of
several repeats. CUDA: torch.cuda.Event pairs around each call, after warm-up,
median of several repeats. When one input set fits in the last-level cache
(CPU L3, GPU L2), the calls rotate through several copies in distinct memory,
so that no call is timed out of the cache.

Figures per row: median ms (and the interquartile spread), speedup of each impl
over (b) and (c), effective bandwidth = bytes_moved / median (bench.shapes:
every client factor read once + the aligning reference + both outputs written
once), its fraction of the measured copy bandwidth, useful GFLOP/s, the
roofline floor max(bytes / copy BW, flops / matmul rate) as a fraction of the
median ("%floor"), peak extra memory, and the max relative error against the
float64 reference on the first few layers.

Peak extra memory. CUDA: torch.cuda.max_memory_allocated() after
reset_peak_memory_stats(), minus the memory allocated before the call (outputs
included). CPU: tracemalloc does not see torch's allocations, and torch keeps no
CPU allocator statistics by default, so this uses the kernel's resident-set
high-water mark: after gc and malloc_trim, write 5 to /proc/self/clear_refs
(which resets VmHWM to the current RSS), run the call, and report VmHWM minus
the RSS before. Pages the allocator reuses without returning them to the kernel
are not counted, so it is a lower bound, accurate to a few MiB.

The loop baseline (b) is capped: a probe call on one period of layers
estimates the full call; if that is above --loop-cap seconds, (b) runs on the
first k periods of layers (k chosen to fit the cap) and its time is scaled by
L / layers_run, flagged 'extrapolated' (the loop has no cross-layer work, so its
time is linear in the layers). Its memory figure is then the subset's.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make `bench` and `fedrot_ext` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import fedrot_ext
from bench import shapes
from bench.baselines import authors_loop, torch_batched
from bench.shapes import Config, Inputs

IMPLS: Dict[str, Callable] = {
    "fused": fedrot_ext.align_and_aggregate,
    "batched": torch_batched,
    "loop": authors_loop,
}
LABEL = {"fused": "fused (a)", "loop": "loop (b)", "batched": "batched (c)"}


# ----------------------------------------------------------------------------
# Machine facts and ceilings
# ----------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[int], object], device, warmup: int, repeats: int, min_repeats: int, max_s: float) -> List[float]:
    """Seconds per call of fn(k) (k = call index), after `warmup` calls.

    Stops after `repeats` calls, or after `min_repeats` once `max_s` has passed."""
    for k in range(warmup):
        fn(k)
    sync(device)
    times: List[float] = []
    deadline = time.perf_counter() + max_s
    for k in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(k)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn(k)
            times.append(time.perf_counter() - t0)
        del out
        if len(times) >= min_repeats and time.perf_counter() > deadline:
            break
    return times


def copy_bandwidth(device: torch.device, mib: Optional[int] = None) -> dict:
    """Bytes read + written per second of a large copy (dst preallocated), and of clone()."""
    n_bytes = (mib or (2048 if device.type == "cuda" else 256)) << 20
    x = torch.randn(n_bytes // 4, device=device)
    y = torch.empty_like(x)
    copy_s = statistics.median(time_calls(lambda k: y.copy_(x), device, 2, 7, 7, 1e9))
    clone_s = statistics.median(time_calls(lambda k: x.clone(), device, 2, 7, 7, 1e9))
    return {"bytes": n_bytes, "copy_GBps": 2 * n_bytes / copy_s / 1e9, "clone_GBps": 2 * n_bytes / clone_s / 1e9}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: Optional[int] = None) -> float:
    """GFLOP/s of a large square matmul (the compute ceiling used for %floor)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = statistics.median(time_calls(lambda k: a @ b, device, 1, 5, 3, 5.0))
    return 2 * n**3 / t / 1e9


def llc_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(size.rstrip("K")) * 1024 if size.endswith("K") else int(size)
    except (OSError, ValueError):
        return 32 << 20


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["cpus"] = os.cpu_count()
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_mem_GiB=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    cuda=torch.version.cuda)
    return info


def others_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` while this process sleeps (= other processes' load)."""
    def snap():
        vals = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait
    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(threshold: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until other processes use < threshold of the CPUs; return their share."""
    deadline = time.perf_counter() + max_wait
    busy = others_busy()
    while busy >= threshold and time.perf_counter() < deadline:
        time.sleep(4.0)
        busy = others_busy()
    return busy


# ----------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------

def _status_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory one call needs beyond what is held before it (outputs included)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return peak
    _malloc_trim()
    try:
        rss0 = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark VmHWM to the current RSS
    except (OSError, KeyError):
        return None
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return max(0, peak - rss0) * 1024


# ----------------------------------------------------------------------------
# Kernel launches (CUDA)
# ----------------------------------------------------------------------------

LAUNCH_APIS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel")
SYNC_APIS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def count_launches(fn: Callable[[], object]) -> dict:
    """Kernels, memcpys and host syncs of one call, read off torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    del out
    counts = {"kernels": 0, "memcpy": 0, "memset": 0, "launch_api_calls": 0, "sync_api_calls": 0, "kernel_names": {}}
    for e in prof.events():
        name = e.name
        if e.device_type == torch.autograd.DeviceType.CUDA:
            low = name.lower()
            if low.startswith("memcpy"):
                counts["memcpy"] += 1
            elif low.startswith("memset"):
                counts["memset"] += 1
            else:
                counts["kernels"] += 1
                short = name[:80]
                counts["kernel_names"][short] = counts["kernel_names"].get(short, 0) + 1
        elif name in LAUNCH_APIS:
            counts["launch_api_calls"] += 1
        elif name in SYNC_APIS:
            counts["sync_api_calls"] += 1
    return counts


# ----------------------------------------------------------------------------
# One config
# ----------------------------------------------------------------------------

def subset(inp: Inputs, n: int) -> Inputs:
    return Inputs(inp.A[:n], inp.B[:n], inp.ref_A[:n], inp.ref_B[:n], inp.weights)


def rel_err(out, ref) -> float:
    errs = []
    for xs, ys in ((out.A, ref.A), (out.B, ref.B)):
        for x, y in zip(xs, ys):
            x, y = x.detach().double().cpu(), y.detach().double().cpu()
            errs.append(float((x - y).norm() / y.norm().clamp_min(1e-300)))
    return max(errs)


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

        def call(k: int):
            s = subset(sets[k % len(sets)], n_layers)
            return f(s.A, s.B, **s.kwargs(), **opts)

        return call

    # float64 reference on the first few layers: every impl's error against it.
    n_ref = min(L, args.ref_layers)
    ref = fedrot_ext.reference.align_and_aggregate(*subset(inp, n_ref)[:2], **subset(inp, n_ref).kwargs(), **opts) if n_ref else None

    rows = []
    for impl in args.impls:
        row = dict(base, impl=impl, input_sets=k_sets, bytes_moved=moved, flops=fl)
        n_layers, scale = L, 1.0
        if impl == "loop":
            period = shapes.MODELS[cfg.model].period
            probe = caller(impl, period)
            probe(0)
            t0 = time.perf_counter()
            sync(device)
            probe(1)
            sync(device)
            t_period = time.perf_counter() - t0
            if t_period * L / period > args.loop_cap:
                n_layers = min(L, period * max(1, int(args.loop_cap / t_period)))
                scale = L / n_layers
        call = caller(impl, n_layers)
        slow = impl == "loop" or args.quick
        times = time_calls(call, device, warmup=1 if slow else args.warmup, repeats=3 if slow else args.repeats,
                           min_repeats=3, max_s=args.max_time)
        med = statistics.median(times) * scale
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        row.update(median_ms=med * 1e3, iqr_pct=100 * (q[2] - q[0]) / statistics.median(times), repeats=len(times),
                   times_ms=[t * 1e3 for t in times])
        if scale != 1.0:
            row.update(extrapolated=True, layers_run=n_layers)
        row["GBps"] = moved / med / 1e9
        row["copy_frac"] = row["GBps"] / ceil["copy_GBps"]
        row["GFLOPs"] = fl / med / 1e9
        floor_s = max(moved / (ceil["copy_GBps"] * 1e9), fl / (ceil["mm_GFLOPs"] * 1e9))
        row["floor_ms"] = floor_s * 1e3
        row["floor_frac"] = floor_s / med
        row["peak_extra_bytes"] = peak_extra_bytes(lambda: call(0), device)
        if ref is not None:
            s = subset(sets[0], n_ref)
            row["err_vs_ref"] = rel_err(IMPLS[impl](s.A, s.B, **s.kwargs(), **opts), ref)
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
        for other in ("loop", "batched"):
            if other in by:
                row[f"speedup_vs_{other}"] = by[other]["median_ms"] / row["median_ms"]
    del sets, inp
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------

def fmt_table(rows: List[dict]) -> str:
    head = f"{'config':32} {'impl':12} {'median ms':>10} {'±iqr%':>6} {'vs (b)':>7} {'vs (c)':>7} {'GB/s':>7} {'%copy':>6} {'GFLOP/s':>8} {'%floor':>6} {'peak MiB':>9} {'err':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['config']:32} {LABEL[r['impl']]:12} {'skipped: ' + r['skipped']}")
            continue
        sb = f"{r['speedup_vs_loop']:.1f}x" if "speedup_vs_loop" in r else "-"
        sc = f"{r['speedup_vs_batched']:.2f}x" if "speedup_vs_batched" in r else "-"
        mem = "n/a" if r.get("peak_extra_bytes") is None else f"{r['peak_extra_bytes'] / 2**20:.1f}"
        err = f"{r['err_vs_ref']:.1e}" if "err_vs_ref" in r else "-"
        note = f"extrapolated from {r['layers_run']}/{r['layers']} layers" if r.get("extrapolated") else ""
        lines.append(
            f"{r['config']:32} {LABEL[r['impl']]:12} {r['median_ms']:10.3f} {r['iqr_pct']:6.1f} {sb:>7} {sc:>7} "
            f"{r['GBps']:7.2f} {100 * r['copy_frac']:6.1f} {r['GFLOPs']:8.2f} {100 * r['floor_frac']:6.1f} {mem:>9} {err:>8}  {note}"
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
    lines = ["| config | impl | median ms | vs (b) | vs (c) | GB/s | % copy BW | GFLOP/s | peak extra MiB | err vs fp64 | others' CPU | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in merged.values():
        if "skipped" in r:
            lines.append(f"| {r['config']} | {LABEL[r['impl']]} | skipped: {r['skipped']} | | | | | | | | | |")
            continue
        sb = f"{r['speedup_vs_loop']:.1f}x" if "speedup_vs_loop" in r else "-"
        sc = f"{r['speedup_vs_batched']:.2f}x" if "speedup_vs_batched" in r else "-"
        mem = "n/a" if r.get("peak_extra_bytes") is None else f"{r['peak_extra_bytes'] / 2**20:.1f}"
        err = f"{r['err_vs_ref']:.1e}" if "err_vs_ref" in r else "-"
        note = f"(b) extrapolated from {r['layers_run']}/{r['layers']} layers" if r.get("extrapolated") else ""
        lines.append(f"| {r['config']} | {LABEL[r['impl']]} | {r['median_ms']:.2f} | {sb} | {sc} | {r['GBps']:.2f} | "
                     f"{100 * r['copy_frac']:.1f} | {r['GFLOPs']:.1f} | {mem} | {err} | {_busy(r)} | {note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(shapes.QUICK)}, fewer repeats")
    p.add_argument("--configs", default=None, help="comma-separated globs over config ids, e.g. 'roberta*_N10_*'")
    p.add_argument("--impls", default="fused,batched,loop", help="comma-separated subset of fused,batched,loop")
    p.add_argument("--out", default=None, help="JSON output path (default results/bench_<device>.json)")
    p.add_argument("--align", default="A", choices=["A", "B", "AB", "none"])
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--budget-gib", type=float, default=None,
                   help="skip configs whose inputs exceed this (default: cpu 4, cuda 30%% of device memory)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--max-time", type=float, default=20.0, help="stop repeating after this many seconds (min 3 repeats)")
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
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
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

    info = machine_info(device)
    if info["loadavg_start"][0] > 0.5:
        print(f"warning: 1-min load average {info['loadavg_start'][0]:.2f} > 0.5; CPU timings will be noisy", file=sys.stderr)
    if device.type == "cpu" and args.wait_quiet:
        wait_quiet(args.quiet_below, args.wait_quiet)
    ceil = copy_bandwidth(device, args.copy_mib)
    ceil["mm_GFLOPs"] = matmul_rate(device, torch.float32, args.mm_size)
    ceil["llc_bytes"] = llc_bytes(device)
    print(f"# {info.get('gpu', info['cpu'])}, torch {info['torch']}, {info['threads']} threads, "
          f"copy {ceil['copy_GBps']:.1f} GB/s (clone {ceil['clone_GBps']:.1f}), fp32 matmul {ceil['mm_GFLOPs']:.0f} GFLOP/s, "
          f"align={args.align} lam={args.lam}", flush=True)

    print(fmt_table([]), flush=True)
    rows: List[dict] = []
    t_start = time.perf_counter()
    for cfg in configs:
        t0 = time.perf_counter()
        if args.time_budget is not None and t0 - t_start > args.time_budget:
            cfg_rows = [{"config": cfg.id, "impl": i, "skipped": f"--time-budget {args.time_budget:g} s spent"} for i in args.impls]
        else:
            busy = wait_quiet(args.quiet_below, args.wait_quiet) if device.type == "cpu" else None
            cfg_rows = run_config(cfg, args, device, ceil)
            for r in cfg_rows:
                r["others_busy_before"] = busy
        rows += cfg_rows
        print(fmt_table(cfg_rows).split("\n", 2)[2], f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
        info["loadavg_end"] = os.getloadavg()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"machine": info, "ceilings": ceil, "args": vars(args), "rows": rows}, indent=1))

    print()
    print(fmt_table(rows))
    launches = fmt_launches(rows)
    if launches:
        print("\n# kernel launches per call (torch.profiler)\n" + launches)
    print(f"\n# load average start {info['loadavg_start']}, end {info['loadavg_end']}; JSON: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
