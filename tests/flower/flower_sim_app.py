"""A tiny Flower app for tests/flower/test_flower.py: a random bf16 BERT with LoRA, trained a few steps.

The ClientApp runs inside Ray workers (they import this module: Flower passes the
test process's sys.path to them). Each client saves the adapter it trained to
``save-dir`` *before* any corruption, so the test can recompute the aggregation
independently of the strategy. The ServerApp runs in a thread of the test process
and leaves its strategy, result and every round's global adapter in :data:`RESULTS`.

Train config entries read by the client: ``save-dir`` (str), ``corrupt`` (str,
"round:partition:kind;..." with kind "nan" or "shape"), ``client-side`` (bool: align
before upload; the saved file is the unaligned adapter), ``dtype`` ("bf16" or "fp32").
:data:`CLIENT_APPS` holds the ClientApp bare and under each of Flower's clipping mods
(module-level, so that Ray workers import them rather than unpickle closures).
"""
from __future__ import annotations

import os

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp import Grid, ServerApp
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from fedrot_ext.flower import FedRotLoRA, align_for_upload, make_train_reply, read_global, round_settings, state_dict_to_arrayrecord
from helpers.peft_models import load_into, tiny_bert

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TRAIN_SIZES = (8, 12, 16)  # examples per partition: the aggregation weights
RESULTS: dict = {}


def _corruption(plan: str, server_round: int, partition: int) -> str:
    for item in filter(None, plan.split(";")):
        r, p, kind = item.split(":")
        if int(r) == server_round and int(p) == partition:
            return kind
    return ""


def _corrupt(state, kind: str):
    state = dict(state)
    key = next(k for k in state if "lora_A" in k)
    if kind == "nan":
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    elif kind == "shape":
        state[key] = torch.cat([state[key], state[key][:1]])  # one row more: rank 5 instead of 4
    return state


def _local_training(model, partition: int, round_idx: int) -> float:
    """Three full-batch SGD steps on random tokens; seeded by (round, partition)."""
    n = TRAIN_SIZES[partition]
    g = torch.Generator().manual_seed(1000 * round_idx + partition)
    ids = torch.randint(0, 30, (n, 8), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(1000 * round_idx + partition)  # dropout
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    config = msg.content["config"]
    settings = round_settings(config)
    global_state, _ = read_global(msg)
    model = load_into(tiny_bert(DTYPES[str(config.get("dtype", "bf16"))], seed=0), global_state)
    loss = _local_training(model, partition, settings.round)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    name = f"round{settings.round + 1}_node{context.node_id}.safetensors"
    save_file(state, os.path.join(str(config["save-dir"]), name), metadata={"num-examples": str(TRAIN_SIZES[partition])})
    if config.get("client-side", False):
        state = align_for_upload(state, global_state, settings)
    state = _corrupt(state, _corruption(str(config.get("corrupt", "")), settings.round + 1, partition))
    return make_train_reply(msg, state, TRAIN_SIZES[partition], {"train-loss": loss})


def _client_app(mods) -> ClientApp:
    app = ClientApp(mods=list(mods))
    app.train()(train)
    return app


CLIENT_APPS = {"none": _client_app([]), "fixed": _client_app([fixedclipping_mod]), "adaptive": _client_app([adaptiveclipping_mod])}
client_app = CLIENT_APPS["none"]


def make_server_app(num_rounds: int, train_config: dict, wrap=None, **strategy_kwargs) -> ServerApp:
    """A ServerApp running ``FedRotLoRA(**strategy_kwargs)`` on 3 nodes from the tiny model's adapter,
    or ``wrap(FedRotLoRA(...))`` (e.g. a Flower privacy wrapper) when ``wrap`` is given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        initial = get_peft_model_state_dict(tiny_bert(DTYPES[str(train_config.get("dtype", "bf16"))], seed=0))
        strategy = FedRotLoRA(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3, **strategy_kwargs)
        globals_ = {}

        def keep_global(server_round: int, arrays) -> None:  # Strategy.start's server-side evaluation hook
            globals_[server_round] = arrays

        runner = strategy if wrap is None else wrap(strategy)
        result = runner.start(
            grid=grid, initial_arrays=state_dict_to_arrayrecord(initial), num_rounds=num_rounds,
            train_config=ConfigRecord(train_config), evaluate_fn=keep_global,
        )
        RESULTS.update(strategy=strategy, runner=runner, result=result, initial=initial, globals=globals_)

    return app
