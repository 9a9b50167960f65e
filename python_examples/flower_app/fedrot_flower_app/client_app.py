"""ClientApp: local LoRA training from the global adapter, reply with the adapter and its weight.

The node's shard is picked by the node config's ``partition-id`` / ``num-partitions``
(Flower's simulation sets them; on a real SuperNode pass
``--node-config "partition-id=0 num-partitions=3"``). With ``placement = "client"`` the
client rotates its adapter onto the global one before upload (FedRot-LoRA's client-side
placement), so the server only averages.
"""
from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

import fedrot_ext
from fedrot_ext.flower import align_for_upload, make_train_reply, read_global, round_settings

from .task import TaskConfig, build_model, cached_model, demo_modules, partition, task_of, test_set

app = ClientApp()


def _model_for(cfg: TaskConfig, base_deltas):
    """The cached model, or (fedex/flora) a fresh one with the cumulative base-weight updates folded in."""
    if not base_deltas:
        return cached_model(cfg)[0]
    model, _ = build_model(cfg)
    fedrot_ext.fold_into_base(model, {k: v.to(cfg.torch_dtype) for k, v in base_deltas.items()})
    return model


def _set_trainable(model, settings) -> None:
    """FFA-LoRA trains B only; RoLoRA alternates the trained factor by round; the rest train both."""
    if settings.method == "ffa":
        fedrot_ext.set_trainable_factor(model, "B")
    elif settings.method == "rolora":
        fedrot_ext.set_trainable_factor(model, fedrot_ext.rolora_trained_factor(settings.round, settings.initial or "B"))
    else:
        fedrot_ext.set_trainable_factor(model, "AB")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally from the global adapter; reply with the (optionally aligned) adapter."""
    cfg = TaskConfig.from_run_config(context.run_config)
    pid, parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    settings = round_settings(msg.content["config"])
    global_state, base_deltas = read_global(msg)
    model = _model_for(cfg, base_deltas)
    set_peft_model_state_dict(model, global_state)
    _set_trainable(model, settings)
    shard = partition(cfg, pid, parts)
    torch.manual_seed(cfg.seed_for(settings.round, pid))  # LoRA dropout
    generator = torch.Generator().manual_seed(cfg.seed_for(settings.round, pid, 1))  # mini-batches
    train_client = demo_modules(cfg.examples_dir)[2].train_client
    loss = train_client(task_of(cfg), model, shard, cfg.local_training(), generator)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    if context.run_config.get("placement", "server") == "client":
        state = align_for_upload(state, global_state, settings)
    return make_train_reply(msg, state, len(shard), {"train-loss": float(loss)})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the global adapter on this node's slice of the test split."""
    cfg = TaskConfig.from_run_config(context.run_config)
    pid, parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    global_state, base_deltas = read_global(msg)
    model = _model_for(cfg, base_deltas)
    set_peft_model_state_dict(model, global_state)
    test = test_set(cfg)
    rows = torch.arange(pid, len(test), parts)
    local = type(test)(test.input_ids[rows], test.attention_mask[rows], test.labels[rows], test.left_padded)
    accuracy = demo_modules(cfg.examples_dir)[2].evaluate(task_of(cfg), model, local)
    metrics = MetricRecord({"accuracy": accuracy, "num-examples": len(local)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
