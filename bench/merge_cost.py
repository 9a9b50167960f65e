"""Cost of merging LoRA adapters: fedrot_ext's core-space svd merge against the dense route of peft's
``add_weighted_adapter(combination_type="svd")`` (form Σ w_i s_i B_i A_i, then its SVD), on Llama-3-8B
module shapes, in one run.

Each measurement runs in its own process, so that its peak extra RSS (``ru_maxrss`` after the merge minus
after building the inputs) is its own. The dense route is timed with ``full_matrices=False``, a lower bound
for peft, whose default ``full_matrices=True`` also forms the out × out left factor. Both routes' updates
are compared (relative Frobenius difference of s_out B̄ Ā).

    python bench/merge_cost.py                     # the grid below; dense only where --dense-configs says
    python bench/merge_cost.py --out bench/results_merge_cost_cpu.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

# Llama-3-8B projections (out, in): q and o 4096 × 4096, k and v 1024 × 4096, the MLP 14336 × 4096 and 4096 × 14336.
MODULES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}
CORE_GRID = [(module, n, r) for module in MODULES for n in (2, 6, 10) for r in (16, 64)]
DENSE_GRID = [("k_proj", 2, 16), ("q_proj", 2, 16), ("gate_proj", 2, 16), ("gate_proj", 6, 16), ("gate_proj", 10, 64), ("down_proj", 2, 16)]
ALPHA = 32.0


def _inputs(module: str, n: int, r: int, seed: int = 0):
    import torch

    out, d_in = MODULES[module]
    g = torch.Generator().manual_seed(seed)
    key = f"base_model.model.model.layers.0.mlp.{module}"
    return [{f"{key}.lora_A.weight": torch.randn(r, d_in, generator=g) / d_in ** 0.5,
             f"{key}.lora_B.weight": torch.randn(out, r, generator=g) / r ** 0.5} for _ in range(n)], key


def _one(route: str, module: str, n: int, r: int) -> dict:
    """One measurement, in this process: seconds, peak extra RSS, and the merged update's Frobenius norm."""
    import torch

    import fedrot_ext

    torch.set_num_threads(2)
    states, key = _inputs(module, n, r)
    w = [1.0 / n] * n
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if route == "core":
        merged = fedrot_ext.merge_adapters(states, weights=w, method="svd", lora_config=dict(r=r, lora_alpha=ALPHA))
        seconds = time.perf_counter() - start
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        update = (ALPHA / r) * merged[f"{key}.lora_B.weight"] @ merged[f"{key}.lora_A.weight"]  # for the comparison only
    else:
        dense = sum(wi * (ALPHA / r) * s[f"{key}.lora_B.weight"] @ s[f"{key}.lora_A.weight"] for wi, s in zip(w, states))
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        B, A = U[:, :r] * S[:r], Vh[:r]
        seconds = time.perf_counter() - start
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        update = B @ A
    return {"route": route, "module": module, "n": n, "r": r, "seconds": seconds, "peak_extra_mb": peak_mb,
            "update": update}


def _measure(route: str, module: str, n: int, r: int, compare_with: str = "") -> dict:
    """`_one` in a fresh process; the update is saved to `compare_with`'s sibling file for the comparison."""
    code = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); "
            f"from bench.merge_cost import _one; res = _one({route!r}, {module!r}, {n}, {r}); "
            f"torch.save(res.pop('update'), sys.argv[1]); import json; print(json.dumps(res))")
    path = Path(compare_with or "/tmp") / f"merge_cost_{route}_{module}_{n}_{r}.pt"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["update_file"] = str(path)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--core-only", action="store_true", help="skip the dense route (minutes per MLP module)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.machine, run as a script
    import torch

    rows = []
    for module, n, r in CORE_GRID:
        rows.append(_measure("core", module, n, r))
        print(f"core  {module:9s} N={n:2d} r={r:2d}: {rows[-1]['seconds']:8.3f} s, {rows[-1]['peak_extra_mb']:7.1f} MB", flush=True)
    if not args.core_only:
        for module, n, r in DENSE_GRID:
            dense = _measure("dense", module, n, r)
            core = next(row for row in rows if (row["module"], row["n"], row["r"]) == (module, n, r))
            a, b = torch.load(core["update_file"]), torch.load(dense["update_file"])
            dense["relative_difference"] = float((a - b).norm() / b.norm())
            dense["speedup_of_core"] = dense["seconds"] / core["seconds"]
            rows.append(dense)
            print(f"dense {module:9s} N={n:2d} r={r:2d}: {dense['seconds']:8.3f} s, {dense['peak_extra_mb']:7.1f} MB; "
                  f"core is {dense['speedup_of_core']:.0f}x faster, updates differ by {dense['relative_difference']:.1e}", flush=True)
    for row in rows:
        Path(row.pop("update_file")).unlink(missing_ok=True)
    if args.out:
        from bench.machine import machine_info

        meta = {"date": date.today().isoformat(), **machine_info(torch.device("cpu")), "threads": 2}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
