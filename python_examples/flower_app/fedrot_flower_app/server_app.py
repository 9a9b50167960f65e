"""ServerApp: FedRotLoRA strategy over the clients' LoRA adapters, central evaluation each round.

``placement = "server"`` (default): the strategy aligns and aggregates with ``method``.
``placement = "client"``: clients align before upload and the strategy only averages
(``method="fedit"``), the placement that works with secure aggregation.
"""
from __future__ import annotations

import json
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

import fedrot_ext
from fedrot_ext.flower import FedRotLoRA, arrayrecord_to_state_dict, state_dict_to_arrayrecord

from .task import TaskConfig, build_model, demo_modules, task_of, test_set

app = ServerApp()


def _strategy(rc, lora_config) -> FedRotLoRA:
    placement, method = str(rc["placement"]), str(rc["method"])
    if placement not in ("server", "client"):
        raise ValueError(f"placement: expected 'server' or 'client', got {placement!r}")
    if placement == "client" and method != "fedrot":
        raise ValueError(f"placement 'client' is FedRot-LoRA's client-side alignment: set method = 'fedrot', not {method!r}")
    nodes = int(rc["min-nodes"])
    return FedRotLoRA(
        method="fedit" if placement == "client" else method, lam=float(rc["lam"]), schedule=str(rc["schedule"]),
        lora_config=lora_config, device=str(rc["server-device"]), fraction_train=float(rc["fraction-train"]),
        fraction_evaluate=float(rc["fraction-evaluate"]), min_train_nodes=nodes, min_evaluate_nodes=nodes, min_available_nodes=nodes,
        report_fedit_error=True,  # the example prints FedIT's error beside FedRot's
        checkpoint_dir=str(rc["checkpoint-dir"]) or None,
    )


def _central_evaluation(cfg: TaskConfig, strategy: FedRotLoRA):
    """evaluate_fn for Strategy.start: accuracy of the global adapter on the whole test split."""
    evaluate = demo_modules(cfg.examples_dir)[2].evaluate

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model, _ = build_model(cfg)
        if strategy.base_deltas:  # fedex / flora: part of the update lives in the base weights
            fedrot_ext.fold_into_base(model, {k: v.to(cfg.torch_dtype) for k, v in strategy.base_deltas.items()})
        set_peft_model_state_dict(model, arrayrecord_to_state_dict(arrays))
        return MetricRecord({"accuracy": evaluate(task_of(cfg), model, test_set(cfg))})

    return evaluate_fn


def _report(result, save_dir: str) -> None:
    rounds = sorted(result.train_metrics_clientapp)
    log(INFO, "round | accuracy | agg. error (mean rel.) | FedIT error on the same replies | agg. ms | rejected")
    for r in rounds:
        m = result.train_metrics_clientapp[r]
        acc = result.evaluate_metrics_serverapp.get(r, {}).get("accuracy", float("nan"))
        log(INFO, "%5d | %8.4f | %22.3e | %31.3e | %7.1f | %d", r, acc, m.get("agg-error-rel-mean", float("nan")),
            m.get("fedit-error-rel-mean", float("nan")), 1e3 * m["agg-time-s"], m["replies-rejected"])
    if save_dir:
        out = Path(save_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(arrayrecord_to_state_dict(result.arrays), str(out / "adapter_model.safetensors"))
        metrics = {r: {**dict(result.train_metrics_clientapp.get(r, {})), **dict(result.evaluate_metrics_serverapp.get(r, {}))}
                   for r in sorted(set(rounds) | set(result.evaluate_metrics_serverapp))}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        log(INFO, "wrote %s and %s", out / "adapter_model.safetensors", out / "metrics.json")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of federated LoRA fine-tuning."""
    rc = context.run_config
    cfg = TaskConfig.from_run_config(rc)
    model, lora_config = build_model(cfg)
    initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    strategy = _strategy(rc, lora_config)
    result = strategy.start(
        grid=grid, initial_arrays=state_dict_to_arrayrecord(initial), num_rounds=int(rc["num-server-rounds"]),
        evaluate_fn=_central_evaluation(cfg, strategy),
    )
    _report(result, str(rc.get("save-dir", "")))
