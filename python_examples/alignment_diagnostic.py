#!/usr/bin/env python
"""How much aggregation error can rotation alignment remove in a given setting?

Runs FedIT rounds of the default experiment and, in every round, aggregates the *same*
client adapters with several FedRot variants (align on A / B / both, λ = 0.5 / 1, reflections
allowed or not) and a Haar-random rotation, reporting each variant's relative aggregation
error divided by FedIT's, and the mean rotation angle of the full Procrustes solution.

    python python_examples/alignment_diagnostic.py --alpha 0.1 --rounds 4
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

VARIANTS = [("A", 0.5, False), ("A", 1.0, False), ("B", 0.5, False), ("B", 1.0, False), ("AB", 0.5, False), ("AB", 1.0, False),
            ("AB", 1.0, True)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="results/diagnostic.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from federated_finetune import PRESETS, _offline_env

    _offline_env(Path("."))
    try:
        import fedrot_ext
    except ImportError:
        sys.path.insert(0, str(HERE.parent))
        import fedrot_ext
    import numpy as np
    import torch
    from peft import set_peft_model_state_dict

    from fl_data import dirichlet_split, load_text_data
    from fl_loop import RunConfig, _seed, _snapshot, randomly_rotated, train_client
    from fl_model import EncoderTask

    if args.threads:
        torch.set_num_threads(args.threads)
    p = PRESETS["cpu"]
    data = load_text_data(p["dataset"], train_size=p["train_size"], test_size=p["test_size"], seed=args.seed)
    task = EncoderTask(len(data.labels), p["max_length"])
    train = task.encode(data.train["text"], data.train["label"])
    shards = [type(train)(train.input_ids[i], train.attention_mask[i], train.labels[i]) for i in
              map(torch.as_tensor, dirichlet_split(data.train, p["clients"], args.alpha, args.seed))]
    cfg = RunConfig(local_steps=p["local_steps"], batch_size=p["batch_size"], lr=p["lr"], optimizer=p["optimizer"], rank=p["rank"], seed=args.seed)
    model, _ = task.build(cfg.seed, cfg.rank, cfg.dropout)
    global_state = _snapshot(model)
    n, per_round = len(shards), max(1, int(round(p["fraction"] * len(shards))))

    def err(states, agg, w):
        e = fedrot_ext.state_dict_aggregation_error(states, agg, weights=w)
        return float(np.mean([rel for _, rel in e.values()]))

    report = []
    for t in range(args.rounds):
        chosen = sorted(np.random.default_rng(_seed(cfg.seed, t)).choice(n, size=per_round, replace=False).tolist())
        states, w = [], []
        for i in chosen:
            set_peft_model_state_dict(model, global_state)
            torch.manual_seed(_seed(cfg.seed, t, i, 7))
            train_client(task, model, shards[i], cfg, torch.Generator().manual_seed(_seed(cfg.seed, t, i)))
            states.append(_snapshot(model))
            w.append(float(len(shards[i])))
        fedit = fedrot_ext.aggregate_state_dicts(states, weights=w, method="fedit")
        row = {"round": t, "fedit_error": err(states, fedit, w)}
        if t > 0:
            for align, lam, refl in VARIANTS:
                agg = fedrot_ext.aggregate_state_dicts(states, reference=global_state, weights=w, method="fedrot", round=t, schedule=align,
                                                       lam=lam, allow_reflection=refl)
                row[f"align={align} lam={lam:g}{' O(r)' if refl else ''}"] = err(states, agg, w) / row["fedit_error"]
            rand = [randomly_rotated(s, torch.Generator().manual_seed(_seed(t, k))) for k, s in enumerate(states)]
            row["haar-random"] = err(rand, fedrot_ext.aggregate_state_dicts(rand, weights=w, method="fedit"), w) / row["fedit_error"]
            # Angle of the full rotation on A: arccos((tr R - 1)/... ) summarised as ‖R − I‖_F / √2 (rad for small angles).
            modules, _ = fedrot_ext.parse_lora_keys(states[0].keys())
            M = torch.stack([s[m.key_A] @ global_state[m.key_A].T for s in states for m in modules]).double()
            R = fedrot_ext.procrustes_rotation(M, lam=1.0)
            row["mean ‖R*−I‖_F/√2 (A)"] = float((R - torch.eye(R.shape[-1], dtype=R.dtype)).flatten(1).norm(dim=1).mean() / 2**0.5)
            drift = torch.stack([(s[m.key_A] - global_state[m.key_A]).norm() / global_state[m.key_A].norm() for s in states for m in modules])
            row["mean ‖A_i−Ā‖/‖Ā‖"] = float(drift.mean())
        global_state = {k: v.clone() for k, v in fedit.items()}
        report.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
