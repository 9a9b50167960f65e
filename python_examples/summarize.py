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
from plots import plot_results  # noqa: E402


def paired_differences(runs, a="fedrot", b="fedit"):
    """Per α: mean ± std over seeds of (a − b) in best-round accuracy and the ratio of mean aggregation errors."""
    rows = []
    for alpha in sorted({r["alpha"] for r in runs}):
        pairs = []
        for seed in sorted({r["seed"] for r in runs if r["alpha"] == alpha}):
            ra = [r for r in runs if r["alpha"] == alpha and r["seed"] == seed and r["method"] == a]
            rb = [r for r in runs if r["alpha"] == alpha and r["seed"] == seed and r["method"] == b]
            if ra and rb:
                ha, hb = ra[0]["history"], rb[0]["history"]
                pairs.append((max(ha["accuracy"]) - max(hb["accuracy"]), ha["accuracy"][-1] - hb["accuracy"][-1],
                              np.nanmean(ha["aggregation_error"][1:]) / np.nanmean(hb["aggregation_error"][1:])))
        if pairs:
            p = np.array(pairs)
            rows.append(dict(alpha=alpha, n=len(p), best=p[:, 0], final=p[:, 1], ratio=p[:, 2]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=HERE / "figures")
    ap.add_argument("--table", type=Path, default=None)
    args = ap.parse_args(argv)
    loaded = [json.loads(p.read_text()) for p in args.results]
    runs = [r for res in loaded for r in res["runs"]]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    args.out.mkdir(parents=True, exist_ok=True)
    plots = plot_results({"runs": runs}, args.out, prefix="federated_")
    lines = [markdown_table(summarize(runs, methods)), "",
             "| α | seeds | Δ best-round acc. (FedRot − FedIT) | Δ final acc. | agg. error ratio FedRot / FedIT (rounds ≥ 1) |",
             "|---|---|---|---|---|"]
    for d in paired_differences(runs):
        lines.append(f"| {d['alpha']:g} | {d['n']} | {d['best'].mean():+.4f} ± {d['best'].std():.4f} | {d['final'].mean():+.4f} ± {d['final'].std():.4f} | "
                     f"{d['ratio'].mean():.3f} ± {d['ratio'].std():.3f} |")
    text = "\n".join(lines)
    print(text)
    print("plots:", ", ".join(map(str, plots)))
    if args.table:
        args.table.write_text(text + "\n")


if __name__ == "__main__":
    main()
