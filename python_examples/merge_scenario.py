"""The merge scenario: adapters trained independently, from their own initialisations, merged once.

Each client builds its own LoRA adapter and classifier head from its own seed, fine-tunes it on its
shard for ``merge_steps`` steps, and the server merges the N adapters in one shot, with:

- FedIT: factor-wise average (``aggregate_state_dicts(method="fedit")``);
- peft's ``add_weighted_adapter``, ``combination_type="linear"`` (Σ √w_i A_i, Σ √w_i B_i) and
  ``"svd"`` (rank-r truncated SVD of Σ w_i B_i A_i), what peft users reach for today;
- ``fedrot_ext.merge_adapters`` (generalised Procrustes: align every client to a common gauge, average);
- ``fedrot_ext.merge_adapters(method=...)`` in core space: "svd" (the same update as peft's svd merge,
  without forming it), and the interference-aware "ties" and "tsv", all at the clients' rank;
- and, for scale, each client alone and the best single client.

Every merge averages the classifier heads the same way (sample-weighted). peft's merge refuses
adapters that carry ``modules_to_save`` (the head), so it runs on LoRA-only copies on a second
peft model, and the averaged head is added back. Reported: test accuracy and the relative
aggregation error ‖Σ w_i B_i A_i − B̄Ā‖ / ‖Σ w_i B_i A_i‖ (mean over modules) of every merge.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

import fedrot_ext
from fl_loop import RunConfig, _seed, _snapshot, evaluate, train_client

MERGES = ("fedit", "peft_linear", "peft_svd", "merge_adapters", "merge_svd", "merge_ties", "merge_tsv")
LABELS = {"fedit": "FedIT (factor average)", "peft_linear": "peft add_weighted_adapter linear",
          "peft_svd": "peft add_weighted_adapter svd", "merge_adapters": "fedrot_ext.merge_adapters (procrustes)",
          "merge_svd": "fedrot_ext.merge_adapters svd (core space)", "merge_ties": "fedrot_ext.merge_adapters ties (core space)",
          "merge_tsv": "fedrot_ext.merge_adapters tsv (core space)",
          "best_client": "best single client", "mean_client": "clients alone (mean)"}


def _split(state: Dict[str, torch.Tensor]):
    """(LoRA factor keys, other keys) of a peft state dict."""
    modules, others = fedrot_ext.parse_lora_keys(state.keys())
    return [k for m in modules for k in (m.key_A, m.key_B)], list(others)


def _peft_merge(task, states: Sequence[Dict[str, torch.Tensor]], weights: Sequence[float], kind: str, rank: int,
                seed: int) -> Dict[str, torch.Tensor]:
    """peft's add_weighted_adapter on LoRA-only copies of the clients' adapters (weights normalised)."""
    from transformers import AutoModelForSequenceClassification

    lora_keys, _ = _split(states[0])
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(task.model_dir, num_labels=task.num_labels)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(task.target_modules))
    model = get_peft_model(base, config, adapter_name="c0")
    for i in range(1, len(states)):
        model.add_adapter(f"c{i}", config)
    for i, state in enumerate(states):
        set_peft_model_state_dict(model, {k: state[k] for k in lora_keys}, adapter_name=f"c{i}")
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    model.add_weighted_adapter([f"c{i}" for i in range(len(states))], w.tolist(), "merged", combination_type=kind,
                               svd_rank=rank if kind == "svd" else None)
    merged = get_peft_model_state_dict(model, adapter_name="merged")
    # peft's merged adapter carries the clients' scaling in its factors (its own lora_alpha = r, scaling 1);
    # in the clients' convention (scaling lora_alpha / r) B is divided by the clients' scaling.
    merged_cfg = model.peft_config["merged"]
    ratio = (merged_cfg.lora_alpha / merged_cfg.r) / (config.lora_alpha / config.r)
    b_keys = {m.key_B for m in fedrot_ext.parse_lora_keys(states[0].keys())[0]}
    return {k: merged[k].detach().clone() * (ratio if k in b_keys else 1.0) for k in lora_keys}


def merged_adapters(task, states, weights, rank: int, seed: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """Every merge of the clients' adapters, as full state dicts (LoRA factors and averaged head)."""
    fedit = fedrot_ext.aggregate_state_dicts(states, weights=weights, method="fedit")
    _, other_keys = _split(states[0])
    head = {k: fedit[k] for k in other_keys}
    out = {"fedit": dict(fedit), "merge_adapters": dict(fedrot_ext.merge_adapters(states, weights=weights))}
    for method in ("svd", "ties", "tsv"):  # at the clients' rank, in core space
        out[f"merge_{method}"] = dict(fedrot_ext.merge_adapters(states, weights=weights, method=method, rank=rank))
    for kind in ("linear", "svd"):
        out[f"peft_{kind}"] = {**_peft_merge(task, states, weights, kind, rank, seed), **head}
    return out


def _relative_error(states, merged, weights) -> float:
    errors = fedrot_ext.state_dict_aggregation_error(states, merged, weights=weights)
    return float(np.mean([rel for _, rel in errors.values()]))


def run_merge(task, shards, test, cfg: RunConfig, merge_steps: int, *, desc: str = "merge", progress: bool = True) -> dict:
    """Train every client from its own initialisation, merge once, evaluate every merge and every client."""
    states, alone = [], []
    local = dataclasses.replace(cfg, local_steps=merge_steps)
    for i in tqdm(range(len(shards)), desc=f"{desc}: local training", disable=not progress, dynamic_ncols=True):
        model, _ = task.build(_seed(cfg.seed, 1000 + i), cfg.rank, cfg.dropout)  # the client's own LoRA and head init
        model.to(cfg.device)
        torch.manual_seed(_seed(cfg.seed, i, 7))  # LoRA dropout
        train_client(task, model, shards[i], local, torch.Generator().manual_seed(_seed(cfg.seed, i)))
        alone.append(evaluate(task, model, test, cfg.eval_batch_size))
        states.append(_snapshot(model))
        del model
    weights = [float(len(s)) for s in shards]
    merges = merged_adapters(task, states, weights, cfg.rank, cfg.seed)
    model, _ = task.build(cfg.seed, cfg.rank, cfg.dropout)
    model.to(cfg.device)
    results = {"client_accuracy": alone, "best_client": max(alone), "mean_client": float(np.mean(alone)), "merges": {}}
    for name in tqdm(MERGES, desc=f"{desc}: evaluating merges", disable=not progress, dynamic_ncols=True):
        set_peft_model_state_dict(model, merges[name])
        results["merges"][name] = {"accuracy": evaluate(task, model, test, cfg.eval_batch_size),
                                   "aggregation_error": _relative_error(states, merges[name], weights)}
    return results


def summarize_merge(runs: List[dict]) -> List[dict]:
    """Per (α, merge): accuracy and aggregation error, mean ± std over seeds; plus the single clients."""
    rows = []
    for alpha in sorted({r["alpha"] for r in runs}):
        sel = [r["merge"] for r in runs if r["alpha"] == alpha]
        for name in MERGES:
            acc = np.array([m["merges"][name]["accuracy"] for m in sel])
            err = np.array([m["merges"][name]["aggregation_error"] for m in sel])
            rows.append(dict(alpha=alpha, merge=name, seeds=len(sel), acc_mean=float(acc.mean()), acc_std=float(acc.std()),
                             err_mean=float(err.mean()), err_std=float(err.std())))
        for name in ("best_client", "mean_client"):
            acc = np.array([m[name] for m in sel])
            rows.append(dict(alpha=alpha, merge=name, seeds=len(sel), acc_mean=float(acc.mean()), acc_std=float(acc.std()),
                             err_mean=float("nan"), err_std=float("nan")))
    return rows


def merge_table(rows: List[dict]) -> str:
    lines = ["| α | merge | seeds | test accuracy | mean rel. aggregation error |", "|---|---|---|---|---|"]
    for r in rows:
        err = "—" if np.isnan(r["err_mean"]) else f"{r['err_mean']:.3e} ± {r['err_std']:.1e}"
        lines.append(f"| {r['alpha']:g} | {LABELS[r['merge']]} | {r['seeds']} | {r['acc_mean']:.4f} ± {r['acc_std']:.4f} | {err} |")
    return "\n".join(lines)


def plot_merge(rows: List[dict], out_dir) -> List:
    """One bar chart per α: accuracy of every merge and of the single clients, aggregation error (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for alpha in sorted({r["alpha"] for r in rows}):
        sel = [r for r in rows if r["alpha"] == alpha]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        names = [LABELS[r["merge"]] for r in sel]
        ax1.barh(names, [r["acc_mean"] for r in sel], xerr=[r["acc_std"] for r in sel], color="tab:blue")
        ax1.set_xlabel("test accuracy")
        ax1.set_title(f"one-shot merge of independently trained adapters, α = {alpha:g}")
        with_err = [r for r in sel if not np.isnan(r["err_mean"])]
        ax2.barh([LABELS[r["merge"]] for r in with_err], [r["err_mean"] for r in with_err], color="tab:red")
        ax2.set_xscale("log")
        ax2.set_xlabel("relative aggregation error (mean over modules)")
        fig.tight_layout()
        path = out_dir / f"merge_alpha{alpha:g}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
