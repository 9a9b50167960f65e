#!/usr/bin/env python
"""Merge results.json files of several runs into one table and one set of plots.

    python python_examples/summarize.py results/grid/alpha0.1/results.json results/grid/alpha0.5/results.json \
        --out python_examples/figures --table python_examples/figures/table.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from federated_finetune import markdown_table, summarize  # noqa: E402
from plots import label_of as _label, plot_results  # noqa: E402


def paired_differences(runs, a="fedrot", b="fedit"):
    """Per α: mean ± std over seeds of (a − b) in best-round accuracy and the ratio of mean aggregation errors (a, b: run labels)."""
    rows = []
    for alpha in sorted({r["alpha"] for r in runs}):
        pairs = []
        for seed in sorted({r["seed"] for r in runs if r["alpha"] == alpha}):
            ra = [r for r in runs if r["alpha"] == alpha and r["seed"] == seed and _label(r) == a]
            rb = [r for r in runs if r["alpha"] == alpha and r["seed"] == seed and _label(r) == b]
            if ra and rb:
                ha, hb = ra[0]["history"], rb[0]["history"]
                pairs.append((seed, max(ha["accuracy"]) - max(hb["accuracy"]), ha["accuracy"][-1] - hb["accuracy"][-1],
                              np.nanmean(ha["aggregation_error"][1:]) / np.nanmean(hb["aggregation_error"][1:])))
        if pairs:
            p = np.array(pairs)
            rows.append(dict(alpha=alpha, n=len(p), seeds=p[:, 0].astype(int), best=p[:, 1], final=p[:, 2], ratio=p[:, 3]))
    return rows


def comparisons(labels):
    """The pairs to difference: every label against fedit, and fedrot at other λ against fedrot at λ=0.5."""
    pairs = [(label, "fedit") for label in labels if label != "fedit" and "fedit" in labels]
    return pairs + [(label, "fedrot") for label in labels if label.startswith("fedrot λ=") and "fedrot" in labels]


def chosen_lams(runs):
    """Per (α, label) of runs that recorded λ per round: how often each λ was chosen over modules × aligned rounds × seeds."""
    counts = {}
    for r in runs:
        for per_module in r["history"].get("lam", []):
            bucket = counts.setdefault((r["alpha"], _label(r)), {})
            for value in per_module.values():
                bucket[value] = bucket.get(value, 0) + 1
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=HERE / "figures")
    ap.add_argument("--table", type=Path, default=None)
    args = ap.parse_args(argv)
    loaded = [json.loads(p.read_text()) for p in args.results]
    runs = [r for res in loaded for r in res["runs"]]
    methods = list(dict.fromkeys(map(_label, runs)))
    args.out.mkdir(parents=True, exist_ok=True)
    plots = plot_results({"runs": runs}, args.out, prefix="federated_")
    lines = [markdown_table(summarize(runs, methods)), "",
             "| α | a − b | seeds | Δ best-round acc. | Δ final acc. | agg. error ratio a / b (rounds ≥ 1) | per seed: Δ best / Δ final |",
             "|---|---|---|---|---|---|---|"]
    for a, b in comparisons(methods):
        for d in paired_differences(runs, a, b):
            per_seed = ", ".join(f"{s}: {x:+.4f} / {y:+.4f}" for s, x, y in zip(d["seeds"], d["best"], d["final"]))
            lines.append(f"| {d['alpha']:g} | {a} − {b} | {d['n']} | {d['best'].mean():+.4f} ± {d['best'].std():.4f} | "
                         f"{d['final'].mean():+.4f} ± {d['final'].std():.4f} | {d['ratio'].mean():.3f} ± {d['ratio'].std():.3f} | {per_seed} |")
    lams = chosen_lams(runs)
    if lams:
        lines += ["", "| α | run | chosen λ: share of module-rounds (count) |", "|---|---|---|"]
        for (alpha, label), bucket in sorted(lams.items()):
            total = sum(bucket.values())
            shares = ", ".join(f"{v:g}: {c / total:.0%} ({c})" for v, c in sorted(bucket.items()))
            lines.append(f"| {alpha:g} | {label} | {shares} |")
    text = "\n".join(lines)
    print(text)
    print("plots:", ", ".join(map(str, plots)))
    if args.table:
        args.table.write_text(text + "\n")


if __name__ == "__main__":
    main()
