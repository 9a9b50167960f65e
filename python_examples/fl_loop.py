"""The federated loop: clients train LoRA locally, the server aggregates with fedrot_ext and evaluates.

One :func:`run_method` call runs all rounds of one aggregation method from the task's initial
adapter. Client sampling, mini-batches and dropout are seeded by (seed, round, client), so
every method of a run sees the same clients and the same data in the same order: the only
difference between methods is the aggregation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

import fedrot_ext
from fl_model import Encoded, task_loss

# fedrot_ext's methods plus the random-rotation ablation, which the example builds from primitives.
METHODS = tuple(fedrot_ext.METHODS) + ("random_rotation",)


@dataclass
class RunConfig:
    rounds: int = 15
    local_steps: int = 5
    batch_size: int = 16
    lr: float = 5e-3
    optimizer: str = "adamw"  # "sgd" is the authors' choice (see --preset paper)
    fraction: float = 1.0  # share of clients sampled per round
    rank: int = 4
    dropout: float = 0.05
    lam: Union[float, str] = 0.5  # or "auto": fedrot picks λ per module and round (history["lam"])
    schedule: str = "alternate"
    initial: str = "A"
    seed: int = 0
    eval_batch_size: int = 64
    device: str = "cpu"
    server_opt: str = "none"  # "none" (the aggregate is the new global) or a fedrot_ext.ServerOptimizer kind
    server_lr: Optional[float] = None  # None: Flower's default for the kind


def _seed(*parts: int) -> int:
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2**31 - 1)
    return value


def _snapshot(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def train_client(task, model, data: Encoded, cfg: RunConfig, generator: torch.Generator) -> float:
    """``cfg.local_steps`` optimiser steps on random mini-batches of one client's shard; returns the mean loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr)
    else:
        raise ValueError(f"optimizer: expected 'adamw' or 'sgd', got {cfg.optimizer!r}")
    losses, device = [], params[0].device
    for _ in range(cfg.local_steps):
        idx = torch.randint(len(data), (min(cfg.batch_size, len(data)),), generator=generator)
        ids, mask, labels = (x.to(device) for x in data.batch(idx))
        loss = task_loss(task, model, ids, mask, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


@torch.no_grad()
def evaluate(task, model, data: Encoded, batch_size: int = 256) -> float:
    """Accuracy of the model on `data`."""
    model.eval()
    correct, device = 0, next(model.parameters()).device
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        ids, mask, labels = (x.to(device) for x in data.batch(idx))
        correct += int((task.class_logits(model, ids, mask).argmax(-1) == labels).sum())
    return correct / len(data)


def haar_rotation(r: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random rotation in SO(r) (QR of a Gaussian matrix with the sign convention fixed)."""
    q, upper = torch.linalg.qr(torch.randn(r, r, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(upper))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def randomly_rotated(state: Dict[str, torch.Tensor], generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Ablation: rotate every module by a Haar-random R instead of the Procrustes one.

    (B R)(Rᵀ A) = B A, so the client's own update is unchanged; only the average suffers.
    """
    out = dict(state)
    modules, _ = fedrot_ext.parse_lora_keys(state.keys())
    for m in modules:
        a, b = state[m.key_A], state[m.key_B]
        R = haar_rotation(a.shape[0], generator).to(a.dtype)
        out[m.key_A], out[m.key_B] = R.T @ a, b @ R
    return out


def aggregate(method: str, states, global_state, weights, round_: int, cfg: RunConfig, lora_config, generator):
    """One server aggregation. Returns (the client states as the error metric should see them, new global)."""
    if method == "random_rotation":
        if fedrot_ext.alignment_for_round(round_, cfg.schedule, cfg.initial) != "none":  # FedRot's rounds
            states = [randomly_rotated(s, generator) for s in states]
        return states, fedrot_ext.aggregate_state_dicts(states, weights=weights, method="fedit")
    new = fedrot_ext.aggregate_state_dicts(
        states, reference=global_state, weights=weights, method=method, round=round_, lam=cfg.lam,
        schedule=cfg.schedule, initial=cfg.initial if method == "fedrot" else None, lora_config=lora_config,
    )
    return states, new


def _relative_error(states, new_global, weights) -> float:
    errors = fedrot_ext.state_dict_aggregation_error(states, new_global, weights=weights)
    return float(np.mean([rel for _, rel in errors.values()]))


def run_method(task, method: str, shards: Sequence[Encoded], test: Encoded, cfg: RunConfig, *, desc: Optional[str] = None,
               position: int = 0, progress: bool = True) -> Dict[str, list]:
    """Run ``cfg.rounds`` federated rounds of `method`; returns per-round metrics.

    Per round: sample ``fraction`` of the clients; each loads the global adapter, trains
    ``local_steps`` steps on its shard, uploads its adapter state dict; the server
    aggregates (weights = shard sizes), records the aggregation error
    ‖Σ w_i B_i A_i − B̄ Ā‖ / ‖Σ w_i B_i A_i‖ (mean over LoRA modules) and evaluates the
    new global model on the test split. ``history["lam"]`` holds, per round, the λ each module
    was aggregated with ({module: λ}; empty in rounds without alignment and for methods without λ).
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    model, lora_config = task.build(cfg.seed, cfg.rank, cfg.dropout)
    model.to(cfg.device)
    global_state = _snapshot(model)
    server_opt = None if cfg.server_opt == "none" else fedrot_ext.ServerOptimizer(cfg.server_opt, cfg.server_lr)
    n = len(shards)
    per_round = max(1, int(round(cfg.fraction * n)))
    sizes = np.array([len(s) for s in shards], dtype=np.float64)
    personal: Dict[int, Dict[str, torch.Tensor]] = {}  # fedsa: each client's own B
    b_keys = [m.key_B for m in fedrot_ext.parse_lora_keys(global_state.keys())[0]]
    history = {"accuracy": [], "aggregation_error": [], "train_loss": [], "aggregation_ms": [], "participants": [], "lam": [],
               "initial_accuracy": evaluate(task, model, test, cfg.eval_batch_size)}
    bar = tqdm(range(cfg.rounds), desc=desc or method, position=position, leave=True, dynamic_ncols=True, disable=not progress)
    for t in bar:
        rng = np.random.default_rng(_seed(cfg.seed, t))
        chosen = sorted(rng.choice(n, size=per_round, replace=False).tolist())
        if method == "ffa":
            fedrot_ext.set_trainable_factor(model, "B")
        elif method == "rolora":
            fedrot_ext.set_trainable_factor(model, fedrot_ext.rolora_trained_factor(t))
        states, losses = [], []
        for i in chosen:
            start_state = dict(global_state)
            if method == "fedsa" and i in personal:
                start_state.update(personal[i])
            set_peft_model_state_dict(model, start_state)
            torch.manual_seed(_seed(cfg.seed, t, i, 7))  # LoRA dropout
            losses.append(train_client(task, model, shards[i], cfg, torch.Generator().manual_seed(_seed(cfg.seed, t, i))))
            states.append(_snapshot(model))
            if method == "fedsa":
                personal[i] = {k: states[-1][k] for k in b_keys}
        weights = sizes[chosen].tolist()
        start = time.perf_counter()
        err_states, new_global = aggregate(method, states, global_state, weights, t, cfg, lora_config,
                                           torch.Generator().manual_seed(_seed(cfg.seed, t, 99)))
        history["aggregation_ms"].append((time.perf_counter() - start) * 1e3)
        history["lam"].append(dict(getattr(new_global, "lam", {})))  # before the server step, which returns a new state
        if method == "fedsa":
            # The global model for evaluation: the shared A with the sample-weighted mean of the personal Bs.
            w = sizes[list(personal)] / sizes[list(personal)].sum()
            merged = dict(new_global)
            for k in b_keys:
                merged[k] = sum(float(wi) * personal[i][k] for wi, i in zip(w, personal))
            new_global = merged
            history["aggregation_error"].append(float("nan"))  # B is personal: no single aggregate to compare
        elif method in ("fedex", "flora"):
            # The residual (fedex) or the whole update (flora) goes into the base weight: the global
            # model carries Σ w_i B_i A_i exactly, so the factor-level error does not apply.
            history["aggregation_error"].append(float("nan"))
        else:
            history["aggregation_error"].append(_relative_error(err_states, new_global, weights))
        if server_opt is not None:
            new_global = server_opt.step(global_state, new_global)  # AggregatedState in, AggregatedState out
        base_deltas = getattr(new_global, "base_deltas", None)
        if base_deltas:
            fedrot_ext.fold_into_base(model, base_deltas)
        global_state = {k: v.detach().clone() for k, v in new_global.items()}
        set_peft_model_state_dict(model, global_state)
        history["accuracy"].append(evaluate(task, model, test, cfg.eval_batch_size))
        history["train_loss"].append(float(np.mean(losses)))
        history["participants"].append(chosen)
        bar.set_postfix(acc=f"{history['accuracy'][-1]:.3f}", err=f"{history['aggregation_error'][-1]:.1e}")
    return history
