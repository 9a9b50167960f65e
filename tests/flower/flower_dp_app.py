"""In-process Flower runs for tests/flower/test_flower_dp.py: a ClientApp (with Flower mods) and a Grid
that hands each message straight to it.

Everything Flower does with the arrays runs for real: ``Strategy.start``, the privacy
wrapper, ``FedAvg``'s sampling, the ClientApp with its mods. Only the transport is
skipped (messages are deep-copied each way, so neither side shares objects with the
other), which makes a 2-round run take about a second instead of a Ray start-up.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, List, Optional, Tuple

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedrot_ext.flower import FedRotLoRA, make_train_reply, read_global, round_settings, state_dict_to_arrayrecord
from flower_sim_app import TRAIN_SIZES, _local_training
from helpers.peft_models import load_into, tiny_bert
from peft import get_peft_model_state_dict


SERVER_NODE_ID = 1  # Flower's SUPERLINK_NODE_ID


def make_client_app(dtype: torch.dtype, mods: List, trained: Dict[Tuple[int, int], dict]) -> ClientApp:
    """A ClientApp training tiny_bert(dtype) from the global adapter; ``trained[(round, node)]`` keeps
    each adapter as trained (before any mod clips it)."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        settings = round_settings(msg.content["config"])
        global_state, _ = read_global(msg)
        model = load_into(tiny_bert(dtype, seed=0), global_state)
        loss = _local_training(model, partition, settings.round)
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        trained[(settings.round + 1, context.node_id)] = state
        return make_train_reply(msg, state, TRAIN_SIZES[partition], {"train-loss": loss})

    return app


@contextlib.contextmanager
def task_identity(run_id: int, node_id: int, task_id: int):
    """Who is running: ``Message(...)`` reads it (a real SuperLink/SuperNode process sets it once)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class InProcessGrid(Grid):
    """A Grid whose nodes are one ClientApp called in this process.

    Attributes:
        sent / received: per round (1-based), the messages as the server sent them and the
            replies as the server got them (a server-side wrapper rewrites the latter in place,
            so after the round they hold what the wrapper passed on).
        probes: per round, ``probe()`` at send time (e.g. an adaptive wrapper's clipping norm).
    """

    def __init__(self, client_app: ClientApp, num_nodes: int = 3, probe: Optional[Callable[[], float]] = None) -> None:
        self.client_app = client_app
        self.contexts = {
            100 + p: Context(run_id=1, node_id=100 + p, node_config={"partition-id": p}, state=RecordDict(), run_config={})
            for p in range(num_nodes)
        }
        self.probe = probe
        self.sent: Dict[int, List[Message]] = {}
        self.received: Dict[int, List[Message]] = {}
        self.probes: Dict[int, float] = {}
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def get_nodes(self):
        raise NotImplementedError("InProcessGrid: only send_and_receive is used by Strategy.start")

    def push_messages(self, messages):
        raise NotImplementedError("InProcessGrid: only send_and_receive is used by Strategy.start")

    def pull_messages(self, message_ids):
        raise NotImplementedError("InProcessGrid: only send_and_receive is used by Strategy.start")

    def send_and_receive(self, messages, *, timeout=None) -> List[Message]:
        messages = list(messages)
        server_round = int(messages[0].content["config"]["server-round"]) if messages else 0
        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"r{server_round}-m{i}"  # what a real Grid sets on push
            node = msg.metadata.dst_node_id
            with task_identity(1, node, node):
                reply = self.client_app(copy.deepcopy(msg), self.contexts[node])
            replies.append(copy.deepcopy(reply))
        if messages and messages[0].metadata.message_type == "train":
            # a copy: Strategy.start reuses one train ConfigRecord, which a wrapper updates every round
            self.sent[server_round], self.received[server_round] = copy.deepcopy(messages), replies
            if self.probe is not None:
                self.probes[server_round] = float(self.probe())
        return replies


def run_in_process(
    dtype: torch.dtype, wrap: Callable[[FedRotLoRA], object], mods: List, num_rounds: int = 2,
    probe_of: Optional[Callable[[object], float]] = None, **strategy_kwargs,
):
    """Run ``wrap(FedRotLoRA(**strategy_kwargs))`` for ``num_rounds`` on 3 in-process nodes.

    Returns:
        (strategy, wrapper, result, grid, trained, initial adapter).
    """
    trained: Dict[Tuple[int, int], dict] = {}
    initial = get_peft_model_state_dict(tiny_bert(dtype, seed=0))
    strategy = FedRotLoRA(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3, **strategy_kwargs)
    wrapper = wrap(strategy)
    grid = InProcessGrid(make_client_app(dtype, mods, trained), probe=(lambda: probe_of(wrapper)) if probe_of else None)
    with task_identity(1, SERVER_NODE_ID, 1):
        result = wrapper.start(
            grid=grid, initial_arrays=state_dict_to_arrayrecord(initial, wire_format=strategy.wire_format),
            num_rounds=num_rounds, train_config=ConfigRecord({}),
        )
    return strategy, wrapper, result, grid, trained, initial
