"""What one call costs: wall time, peak extra memory, and (CUDA) kernel launches.

Time. CPU: time.perf_counter around each call. CUDA: a torch.cuda.Event pair
around each call, so host-side queueing is not counted. Warm-up calls first.

Peak extra memory. CUDA: torch.cuda.max_memory_allocated() after
reset_peak_memory_stats(), minus the memory allocated before the call (outputs
included). CPU: tracemalloc does not see torch's allocations and torch keeps no
CPU allocator statistics by default, so this uses the kernel's resident-set
high-water mark: after gc and malloc_trim, write 5 to /proc/self/clear_refs
(which resets VmHWM to the current RSS), run the call, and report VmHWM minus
the RSS before. Pages the allocator reuses without returning them to the kernel
are not counted, so it is a lower bound, accurate to a few MiB.
"""
from __future__ import annotations

import ctypes
import gc
import itertools
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn: Callable[[int], object], k: int, device) -> float:
    """Seconds of one call fn(k); its output is released before the next call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(k)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    out = fn(k)
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


def time_interleaved(fns: Dict[str, Callable[[int], object]], device, warmup: int, repeats: int, min_repeats: int,
                     max_s: float, min_s: float = 0.0) -> Dict[str, List[float]]:
    """Seconds per call of each fns[name](k), the functions taking turns: round k calls each once, in order.

    A series of one function and then a series of the other would compare two states of a shared VM,
    whose speed drifts by a quarter within seconds (the same 2-thread torch.mm measured 200 and 280
    GFLOP/s a second apart); calls that alternate see the same drift, so their ratio holds.
    `warmup` rounds first. Stops after `repeats` rounds once `min_s` has passed, or after `min_repeats`
    once `max_s` has passed. `min_s` spreads the samples of a short call over time: 7 calls of 3 ms fit
    inside one burst of another tenant's load, and their median then measures the burst."""
    for k in range(warmup):
        for fn in fns.values():
            fn(k)
    sync(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    began = time.perf_counter()
    deadline, enough = began + max_s, began + min_s
    for k in itertools.count():
        now = time.perf_counter()
        if (k >= repeats and now >= enough) or (k >= min_repeats and now > deadline):
            break
        for name, fn in fns.items():
            times[name].append(_timed_call(fn, k, device))
    return times


def time_calls(fn: Callable[[int], object], device, warmup: int, repeats: int, min_repeats: int, max_s: float,
               min_s: float = 0.0) -> List[float]:
    """Seconds per call of fn(k) (k = call index): time_interleaved with one function."""
    return time_interleaved({"fn": fn}, device, warmup, repeats, min_repeats, max_s, min_s)["fn"]


def spread(times: List[float]) -> dict:
    """Median and interquartile range (as % of the median) of `times` in seconds."""
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": med, "iqr_pct": 100 * (q[2] - q[0]) / med}


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
    """Peak memory one call needs beyond what is held before it (outputs included); None if unmeasurable."""
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
            f.write("5")  # resets VmHWM to the current RSS
    except (OSError, KeyError):
        return None
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return max(0, peak - rss0) * 1024


LAUNCH_APIS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel")
SYNC_APIS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def count_launches(fn: Callable[[], object]) -> dict:
    """Kernels, memcpys and host syncs of one CUDA call, read off torch.profiler."""
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
