"""The machine a benchmark runs on: its description, and the ceilings rows are judged against.

Ceilings: copy bandwidth (bytes read + written per second of a large copy) and
the GEMM rate in fp32 and in bf16, each the best of several calls, and the last-level cache
size (CPU L3, GPU L2), which decides how many input copies the timed calls
rotate through. On a shared CPU, wait_quiet holds off until other processes idle.
"""
from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from bench.timing import time_calls


def copy_bandwidth(device: torch.device, mib: Optional[int] = None) -> dict:
    """Bytes read + written per second of a large copy (dst preallocated), and of clone().

    clone() on the CPU also pays first-touch page faults for its fresh output, so
    the preallocated copy is the ceiling used; on CUDA the two agree (caching allocator)."""
    n_bytes = (mib or (2048 if device.type == "cuda" else 256)) << 20
    x = torch.randn(n_bytes // 4, device=device)
    y = torch.empty_like(x)
    # A ceiling: the best of several copies (the median moved by up to 2x on this shared CPU).
    copy_s = min(time_calls(lambda k: y.copy_(x), device, 2, 9, 9, 1e9))
    clone_s = min(time_calls(lambda k: x.clone(), device, 2, 9, 9, 1e9))
    return {"bytes": n_bytes, "copy_GBps": 2 * n_bytes / copy_s / 1e9, "clone_GBps": 2 * n_bytes / clone_s / 1e9}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: Optional[int] = None) -> float:
    """GFLOP/s of a large square matmul (the compute ceiling used for %floor)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = min(time_calls(lambda k: a @ b, device, 1, 5, 3, 5.0))
    return 2 * n**3 / t / 1e9


def llc_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(size.rstrip("K")) * 1024 if size.endswith("K") else int(size)
    except (OSError, ValueError):
        return 32 << 20


# The GEMM probes: a row's dtype -> (its ceilings key, the probe's dtype). fp32's is the one every
# roofline takes; bf16 rows are also judged against bf16's (AMX or AVX512-BF16 run it 3-4x faster).
GEMM_PROBES = {"fp32": ("mm_GFLOPs", torch.float32), "bf16": ("mm_bf16_GFLOPs", torch.bfloat16)}


def ceilings(device: torch.device, copy_mib: Optional[int] = None, mm_size: Optional[int] = None) -> dict:
    ceil = copy_bandwidth(device, copy_mib)
    for key, dtype in GEMM_PROBES.values():
        ceil[key] = matmul_rate(device, dtype, mm_size)
    ceil["llc_bytes"] = llc_bytes(device)
    return ceil


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
