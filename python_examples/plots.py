"""PNG plots of a results file: accuracy per round and aggregation error per round (log scale), per method."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np

COLORS = {"fedit": "tab:blue", "fedrot": "tab:red", "random_rotation": "tab:gray", "ffa": "tab:green", "rolora": "tab:purple",
          "fedsa": "tab:brown", "flexlora": "tab:orange", "fedex": "tab:olive", "flora": "tab:cyan", "fedrot λ=auto": "tab:pink"}
LABELS = {"fedit": "FedIT", "fedrot": "FedRot-LoRA", "random_rotation": "random rotation", "ffa": "FFA-LoRA", "rolora": "RoLoRA",
          "fedsa": "FedSA-LoRA", "flexlora": "FlexLoRA", "fedex": "FedEx-LoRA", "flora": "FLoRA"}


def label_of(run: Dict) -> str:
    """A run's label (federated_finetune.run_label); results files written before run labels: its method."""
    return run.get("label", run["method"])


def display_name(label: str) -> str:
    """'fedrot' -> 'FedRot-LoRA', 'fedrot λ=auto' -> 'FedRot-LoRA (λ=auto)' (run labels of federated_finetune.run_label)."""
    method, _, lam = label.partition(" ")
    return LABELS.get(method, method) + (f" ({lam})" if lam else "")


def _curves(runs: List[dict], alpha: float, label: str, key: str) -> np.ndarray:
    rows = [r["history"][key] for r in runs if r["alpha"] == alpha and label_of(r) == label]
    return np.array(rows, dtype=np.float64)


def plot_results(results: Dict, out_dir: Path, prefix: str = "") -> List[Path]:
    """One figure per alpha: accuracy (left) and relative aggregation error (right, log), mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    paths = []
    for alpha in sorted({r["alpha"] for r in runs}):
        fig, (ax_acc, ax_err) = plt.subplots(1, 2, figsize=(10, 3.8))
        for run_label in dict.fromkeys(map(label_of, runs)):
            color, label = COLORS.get(run_label), display_name(run_label)
            acc = _curves(runs, alpha, run_label, "accuracy")
            if acc.size == 0:
                continue
            x = np.arange(1, acc.shape[1] + 1)
            mean, std = acc.mean(0), acc.std(0)
            ax_acc.plot(x, mean, color=color, label=f"{label} (n={acc.shape[0]})")
            ax_acc.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
            err = _curves(runs, alpha, run_label, "aggregation_error")
            if np.isfinite(err).any():
                err = np.where(err > 0, err, np.nan)  # exact rounds (e.g. round 1 of every method is not) cannot go on a log axis
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a round where every seed was exact
                    m = np.nanmean(err, axis=0)
                ax_err.plot(x, m, color=color, label=label, marker=".")
        ax_acc.set(xlabel="round", ylabel="test accuracy", title=f"global model, Dirichlet α={alpha}")
        ax_err.set(xlabel="round", ylabel="‖Σ wᵢBᵢAᵢ − B̄Ā‖ / ‖Σ wᵢBᵢAᵢ‖", yscale="log", title="aggregation error (mean over LoRA layers)")
        ax_acc.legend(fontsize=8)
        ax_err.legend(fontsize=8)
        for ax in (ax_acc, ax_err):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(out_dir) / f"{prefix}alpha{alpha:g}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
