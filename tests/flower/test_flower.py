"""Flower integration: transport codec, reply screening, both placements, a Ray simulation."""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

# No importorskip: the Flower tests (Ray simulation included) must run wherever the suite runs;
# `make test` installs the [flower] extra (flwr[simulation]).
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import load_file, safe_open

import fedrot_ext
from fedrot_ext.flower import (
    BASE_DELTAS_KEY,
    RAW_STYPE,
    FedRotLoRA,
    RoundSettings,
    align_for_upload,
    arrayrecord_to_state_dict,
    make_train_reply,
    read_global,
    round_settings,
    state_dict_to_arrayrecord,
)
from helpers.peft_models import assert_same_state as _assert_same, bert_lora_config, make_round, tiny_bert, to_device

REPO = Path(__file__).resolve().parents[2]
BF16_ULP = dict(rtol=8e-3, atol=8e-3)  # client-side placement rounds each aligned client to bf16 once more: <= 1 ulp


# ----------------------------------------------------------------------------- helpers
def _instruction(content: RecordDict, node: int) -> Message:
    """A server->client train message, built without a running Flower run."""
    meta = Metadata(
        run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="", group_id="",
        created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN,
    )
    return Message(content, metadata=meta)


def _reply(state, num_examples, node: int, server_round: int = 2) -> Message:
    ins = _instruction(RecordDict({"config": ConfigRecord({"server-round": server_round})}), node)
    return make_train_reply(ins, state, num_examples)


def _raw_reply(content: RecordDict, node: int) -> Message:
    return Message(content, reply_to=_instruction(RecordDict(), node))


def _sent(strategy: FedRotLoRA, server_round: int, reference) -> None:
    """What configure_train records, without sampling nodes from a Grid."""
    strategy._sent = (server_round, state_dict_to_arrayrecord(reference))


@pytest.fixture(scope="module")
def bf16_round():
    return make_round(tiny_bert(torch.bfloat16), 3, seed=1)


@pytest.fixture(scope="module")
def f32_round():
    return make_round(tiny_bert(torch.float32), 3, seed=2)


# ----------------------------------------------------------------------------- codec
def test_compact_bf16_round_trip_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3.0e38], dtype=torch.bfloat16)
    state = {"a": torch.randn(4, 7, generator=g).to(torch.bfloat16), "special": special, "scalar": torch.tensor(1.5, dtype=torch.bfloat16),
             "empty": torch.zeros(0, 3, dtype=torch.bfloat16), "strided": torch.randn(6, 4, generator=g).to(torch.bfloat16).T}
    record = state_dict_to_arrayrecord(state, wire_format="compact")
    assert all(record[k].stype == RAW_STYPE and record[k].dtype == "bfloat16" for k in state)
    assert len(record["a"].data) == 2 * 4 * 7  # 2 bytes per value, no float32 detour
    back = arrayrecord_to_state_dict(record)
    for k, t in state.items():
        assert back[k].dtype == torch.bfloat16 and back[k].shape == t.shape
        assert torch.equal(back[k].view(torch.int16), t.contiguous().view(torch.int16)), k  # bit for bit, NaN and -0 included


@pytest.mark.parametrize("wire_format", ["numpy", "compact"])
def test_bf16_survives_flower_serialisation(wire_format):
    """Through Flower's own deflate/inflate (what crosses the network)."""
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(3, 5, generator=g).to(torch.bfloat16)}
    record = state_dict_to_arrayrecord(state, wire_format=wire_format)
    array = record["w"]
    children = dict(array.children)
    rebuilt = Array.inflate(array.deflate(), children)
    back = arrayrecord_to_state_dict(ArrayRecord({"w": rebuilt}))
    assert torch.equal(back["w"].view(torch.int16), state["w"].view(torch.int16))


@pytest.mark.parametrize("wire_format", ["numpy", "compact"])
def test_other_dtypes_use_flowers_numpy_encoding(wire_format):
    g = torch.Generator().manual_seed(2)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    state = {"f32": randn(2, 3), "f16": randn(3).half(), "f64": randn(2).double(),
             "i64": torch.arange(4), "b": torch.tensor([True, False])}
    record = state_dict_to_arrayrecord(state, wire_format=wire_format)
    assert all(record[k].stype == "numpy.ndarray" for k in state)
    np.testing.assert_array_equal(record["f32"].numpy(), state["f32"].numpy())  # stock Flower can read it
    _assert_same(arrayrecord_to_state_dict(record), state)


def test_decoding_rejects_lying_or_corrupt_arrays():
    good = state_dict_to_arrayrecord({"w": torch.ones(2, 2, dtype=torch.bfloat16)}, wire_format="compact")["w"]
    short = ArrayRecord({"w": Array(dtype="bfloat16", shape=(2, 3), stype=RAW_STYPE, data=good.data)})
    with pytest.raises(ValueError, match=r"'w': 8 bytes do not hold a bfloat16 array of shape \(2, 3\)"):
        arrayrecord_to_state_dict(short)
    f32 = Array(np.ones((2, 2), dtype=np.float32))
    lying = ArrayRecord({"w": Array(dtype="float32", shape=(4, 4), stype=f32.stype, data=f32.data)})
    with pytest.raises(ValueError, match="'w': declared dtype float32 and shape"):
        arrayrecord_to_state_dict(lying)
    garbage = ArrayRecord({"w": Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"not numpy")})
    with pytest.raises(ValueError, match="'w': not a valid NumPy payload"):
        arrayrecord_to_state_dict(garbage)
    alien = ArrayRecord({"w": Array(dtype="float32", shape=(2,), stype="pickle", data=b"x")})
    with pytest.raises(ValueError, match="unknown serialisation type 'pickle'"):
        arrayrecord_to_state_dict(alien)
    with pytest.raises(ValueError, match="carries only"):
        arrayrecord_to_state_dict(ArrayRecord({"w": Array(dtype="int4", shape=(1,), stype=RAW_STYPE, data=b"\0\0")}))


def test_import_fedrot_ext_does_not_need_flwr():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'flwr' or name.startswith('flwr.'):\n"
        "            raise ImportError('flwr blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fedrot_ext\n"
        "assert 'flwr' not in sys.modules\n"
        "try:\n"
        "    import fedrot_ext.flower\n"
        "except ImportError as err:\n"
        "    assert 'fedrot_ext[flower]' in str(err), err\n"
        "else:\n"
        "    raise SystemExit('fedrot_ext.flower imported without flwr')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ----------------------------------------------------------------------------- strategy (no Ray)
def test_strategy_matches_aggregate_state_dicts_and_keeps_bf16(bf16_round):
    reference, clients = bf16_round
    strategy = FedRotLoRA(lam=0.7, report_fedit_error=True)
    _sent(strategy, 2, reference)
    arrays, metrics = strategy.aggregate_train(2, [_reply(c, n, node) for c, n, node in zip(clients, (3, 5, 9), (11, 12, 13))])
    expected = fedrot_ext.aggregate_state_dicts(clients, reference=reference, weights=[3, 5, 9], round=1, lam=0.7)
    _assert_same(arrayrecord_to_state_dict(arrays), dict(expected))
    assert set(metrics) >= {"agg-error-rel-mean", "agg-error-rel-max", "fedit-error-rel-mean", "agg-time-s", "rank"}
    assert metrics["rank"] == 4 and metrics["replies-accepted"] == 3 and metrics["replies-rejected"] == 0
    assert metrics["agg-error-rel-mean"] < metrics["fedit-error-rel-mean"]  # clients are rotated copies: alignment helps
    assert strategy.history[-1].accepted == [11, 12, 13]


def _bad_replies(clients, reference):
    """(description, reply content) pairs, each malformed in one way."""
    good = clients[0]
    lora_a = next(k for k in good if "lora_A" in k)
    head = next(k for k in good if "classifier" in k)
    nan = dict(good, **{lora_a: good[lora_a].clone().index_fill_(1, torch.tensor([0]), float("nan"))})
    inf = dict(good, **{head: torch.full_like(good[head], float("inf"))})
    wide = dict(good, **{lora_a: torch.cat([good[lora_a], good[lora_a][:1]])})
    f16 = dict(good, **{lora_a: good[lora_a].half()})  # (float32 is accepted: the "numpy" wire form of bf16)
    missing = {k: v for k, v in good.items() if k != head}
    extra = dict(good, **{"base_model.model.extra.lora_A.weight": torch.zeros(2, 2, dtype=good[lora_a].dtype)})
    arrays = lambda s: state_dict_to_arrayrecord(s)  # noqa: E731
    counted = lambda s, n: RecordDict({"arrays": arrays(s), "metrics": MetricRecord({"num-examples": n})})  # noqa: E731
    broken = arrays(good)
    broken[lora_a] = Array(dtype="bfloat16", shape=(4, 99), stype=RAW_STYPE, data=b"\0" * 10)
    return [
        ("NaN in a LoRA factor", counted(nan, 5), "expected finite values"),
        ("Inf in the head", counted(inf, 5), "expected finite values"),
        ("rank 5 instead of 4", counted(wide, 5), "expected shape (4, 16)"),
        ("float16 instead of bf16", counted(f16, 5), "dtype torch.bfloat16"),
        ("missing key", counted(missing, 5), "missing"),
        ("extra key", counted(extra, 5), "unexpected"),
        ("zero examples", counted(good, 0), "finite number > 0"),
        ("NaN examples", counted(good, float("nan")), "finite number > 0"),
        ("no num-examples", RecordDict({"arrays": arrays(good), "metrics": MetricRecord({"loss": 1.0})}), "no 'num-examples'"),
        ("corrupt bytes", RecordDict({"arrays": broken, "metrics": MetricRecord({"num-examples": 5})}), "bytes do not hold"),
        ("two ArrayRecords", RecordDict({"x": arrays(good), "y": arrays(good), "metrics": MetricRecord({"num-examples": 5})}), "expected one ArrayRecord"),
    ]


def test_bad_replies_are_rejected_and_the_round_goes_on(bf16_round, caplog):
    reference, clients = bf16_round
    strategy = FedRotLoRA()
    _sent(strategy, 3, reference)
    bad = _bad_replies(clients, reference)
    replies = [_reply(clients[1], 4, 1), _reply(clients[2], 6, 2)] + [_raw_reply(content, 100 + i) for i, (_, content, _) in enumerate(bad)]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(3, replies)
    summary = strategy.history[-1]
    assert summary.accepted == [1, 2]
    for i, (what, _, reason) in enumerate(bad):
        assert reason in summary.rejected[100 + i], (what, summary.rejected[100 + i])
        assert f"rejected the reply of node {100 + i}: " in caplog.text, what
    assert metrics["replies-rejected"] == len(bad)
    expected = fedrot_ext.aggregate_state_dicts(clients[1:], reference=reference, weights=[4, 6], round=2)
    _assert_same(arrayrecord_to_state_dict(arrays), dict(expected))


def test_no_usable_reply_keeps_the_global(bf16_round):
    reference, clients = bf16_round
    strategy = FedRotLoRA()
    _sent(strategy, 1, reference)
    bad = _bad_replies(clients, reference)
    assert strategy.aggregate_train(1, [_raw_reply(content, i) for i, (_, content, _) in enumerate(bad)]) == (None, None)
    assert len(strategy.history[-1].rejected) == len(bad)


def test_aggregate_options_reach_aggregate_state_dicts(f32_round, monkeypatch):
    import fedrot_ext.flower.strategy as strategy_module

    seen = []
    real = strategy_module.aggregate_state_dicts

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **{k: v for k, v in kwargs.items() if k != "extra_option"})

    monkeypatch.setattr(strategy_module, "aggregate_state_dicts", spy)
    reference, clients = f32_round
    strategy = FedRotLoRA(aggregate_options={"extra_option": 7}, streaming=False)
    _sent(strategy, 2, reference)
    strategy.aggregate_train(2, [_reply(c, 1, i) for i, c in enumerate(clients)])
    assert seen[0]["extra_option"] == 7 and seen[0]["round"] == 1
    with pytest.raises(ValueError, match=r"\['lam'\] are set by the strategy"):
        FedRotLoRA(aggregate_options={"lam": 0.3})


def test_constructor_rejects_bad_settings():
    for kwargs, match in (({"method": "fedavg"}, "method"), ({"schedule": "C"}, "schedule"), ({"initial": "C"}, "initial"),
                          ({"lam": 1.5}, "lam"), ({"method": "fedex"}, "lora_config")):
        with pytest.raises(ValueError, match=match):
            FedRotLoRA(**kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_strategy_aggregates_on_the_gpu(bf16_round):
    reference, clients = bf16_round
    strategy = FedRotLoRA(device="cuda")
    _sent(strategy, 2, reference)
    arrays, metrics = strategy.aggregate_train(2, [_reply(c, n, i) for i, (c, n) in enumerate(zip(clients, (3, 5, 9)))])
    expected = fedrot_ext.aggregate_state_dicts([to_device(c, "cuda") for c in clients],
                                                reference=to_device(reference, "cuda"), weights=[3, 5, 9], round=1)
    _assert_same(arrayrecord_to_state_dict(arrays), {k: v.cpu() for k, v in expected.items()})
    assert metrics["agg-time-s"] > 0


def test_aggregate_train_needs_configure_train(bf16_round):
    with pytest.raises(RuntimeError, match="call configure_train first"):
        FedRotLoRA().aggregate_train(1, [_reply(bf16_round[1][0], 1, 1)])


def test_ffa_rejects_a_changed_frozen_factor(bf16_round):
    reference, clients = bf16_round
    lora_a = [m.key_A for m in fedrot_ext.parse_lora_keys(reference)[0]]
    honest = [dict(c, **{k: reference[k] for k in lora_a}) for c in clients]  # A frozen at the global value
    strategy = FedRotLoRA(method="ffa")
    _sent(strategy, 2, reference)
    arrays, _ = strategy.aggregate_train(2, [_reply(honest[0], 2, 1), _reply(honest[1], 2, 2), _reply(clients[2], 2, 3)])
    assert strategy.history[-1].accepted == [1, 2]
    assert "frozen this round" in strategy.history[-1].rejected[3]
    expected = fedrot_ext.aggregate_state_dicts(honest[:2], weights=[2, 2], method="ffa")
    _assert_same(arrayrecord_to_state_dict(arrays), dict(expected))


@pytest.mark.parametrize("method", [m for m in fedrot_ext.METHODS if m not in ("ffa", "rolora")])
def test_every_method_runs_through_the_strategy(method, f32_round):
    reference, clients = f32_round
    strategy = FedRotLoRA(method=method, lora_config=bert_lora_config(), error_metrics=True)  # exact, with agg-error metrics
    _sent(strategy, 2, reference)
    arrays, metrics = strategy.aggregate_train(2, [_reply(c, i + 1, i) for i, c in enumerate(clients)])
    expected = fedrot_ext.aggregate_state_dicts(clients, reference=reference, weights=[1, 2, 3], method=method, round=1,
                                                lora_config=bert_lora_config())
    got = arrayrecord_to_state_dict(arrays)
    assert list(got) == list(reference)  # fedsa: the global keeps its B, clients keep their own
    _assert_same({k: got[k] for k in expected}, dict(expected))
    assert ("agg-error-rel-mean" in metrics) == (method not in ("fedsa", "fedex", "flora"))
    assert set(strategy.base_deltas) == set(expected.base_deltas)


def test_fedex_base_deltas_accumulate_and_reach_the_clients(f32_round, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    class Grid:  # what FedAvg's node sampling uses
        def get_node_ids(self):
            return [1, 2, 3]

    reference, clients = f32_round
    strategy = FedRotLoRA(method="fedex", lora_config=bert_lora_config())
    record = state_dict_to_arrayrecord(reference)
    messages = list(strategy.configure_train(1, record, ConfigRecord(), Grid()))
    assert BASE_DELTAS_KEY not in messages[0].content.array_records
    arrays, _ = strategy.aggregate_train(1, [_reply(c, 1, i) for i, c in enumerate(clients)])
    first = {k: v.clone() for k, v in strategy.base_deltas.items()}
    messages = list(strategy.configure_train(2, arrays, ConfigRecord(), Grid()))
    strategy.aggregate_train(2, [_reply(c, 1, i) for i, c in enumerate(clients)])
    adapter, deltas = read_global(messages[0])
    _assert_same(adapter, arrayrecord_to_state_dict(arrays))
    _assert_same(deltas, first)
    settings = round_settings(messages[0].content["config"])
    assert settings == RoundSettings(method="fedex", round=1, lam=0.5, schedule="alternate", initial=None)
    for path, delta in strategy.base_deltas.items():  # round 2 added its own residual
        assert not torch.equal(delta, first[path])


# ----------------------------------------------------------------------------- client-side placement
@pytest.mark.parametrize("server_round", [2, 3])  # fedrot round 1 aligns on A, round 2 on B
def test_client_side_placement_equals_server_side(server_round, f32_round, bf16_round):
    for reference, clients in (f32_round, bf16_round):
        weights = [5, 2, 7]
        server = FedRotLoRA(lam=0.5)
        _sent(server, server_round, reference)
        server_side, _ = server.aggregate_train(server_round, [_reply(c, n, i) for i, (c, n) in enumerate(zip(clients, weights))])
        config = ConfigRecord({"server-round": server_round})  # all a stock strategy sends
        aligned = [align_for_upload(c, reference, config) for c in clients]
        plain = FedRotLoRA(method="fedit")
        _sent(plain, server_round, reference)
        client_side, _ = plain.aggregate_train(server_round, [_reply(a, n, i) for i, (a, n) in enumerate(zip(aligned, weights))])
        expected = arrayrecord_to_state_dict(server_side)
        dtype = next(iter(reference.values())).dtype
        tol = BF16_ULP if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        _assert_same(arrayrecord_to_state_dict(client_side), expected, **tol)
        if dtype == torch.float32:  # Flower's own FedAvg (NumPy) as the secure-aggregation server
            stock, _ = FedAvg().aggregate_train(server_round, [_reply(a, n, i) for i, (a, n) in enumerate(zip(aligned, weights))])
            _assert_same(stock.to_torch_state_dict(), expected, **tol)
        unaligned = fedrot_ext.aggregate_state_dicts(clients, weights=weights, method="fedit")
        lora = [k for k in expected if "lora_" in k]
        assert any(not torch.allclose(unaligned[k].float(), expected[k].float(), atol=1e-2) for k in lora)  # alignment did something


# ----------------------------------------------------------------------------- Ray simulation
def _saved_replies(save_dir: Path, server_round: int, nodes):
    """The adapters clients saved before corruption, in the order the server accepted them."""
    states, weights = [], []
    for node in nodes:
        path = save_dir / f"round{server_round}_node{node}.safetensors"
        states.append(load_file(str(path)))
        with safe_open(str(path), framework="pt") as f:
            weights.append(int(f.metadata()["num-examples"]))
    return states, weights


def _simulate(tmp_path: Path, num_rounds: int, train_config: dict, client_mods: str = "none", **strategy_kwargs):
    from flwr.simulation import run_simulation

    import flower_sim_app

    flower_sim_app.RESULTS.clear()
    server_app = flower_sim_app.make_server_app(num_rounds, {"save-dir": str(tmp_path), **train_config}, **strategy_kwargs)
    # One CPU per virtual client, Ray limited to the 2 cores CI has (Ray otherwise sizes itself
    # from the host and may wait for resources a sandbox does not grant).
    backend = {"init_args": {"num_cpus": 2, "num_gpus": 0}, "client_resources": {"num_cpus": 1, "num_gpus": 0}}
    pythonpath = os.environ.get("PYTHONPATH")  # Flower's Ray backend rewrites it for its workers
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(server_app=server_app, client_app=flower_sim_app.CLIENT_APPS[client_mods], num_supernodes=3, backend_config=backend)
    finally:
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    seconds = time.perf_counter() - start
    assert "result" in flower_sim_app.RESULTS, "the ServerApp did not finish (see the log above)"
    return flower_sim_app.RESULTS["strategy"], flower_sim_app.RESULTS["result"], flower_sim_app.RESULTS["initial"], seconds


def test_simulation_3_clients_2_rounds_with_corrupted_replies(tmp_path):
    """Ray simulation: round 1 has a reply of the wrong shape, round 2 a reply with NaN.

    Each is rejected with a log line, the run completes, and the final global adapter is
    exactly what aggregate_state_dicts gives on the accepted clients' own saved adapters.
    """
    strategy, result, initial, seconds = _simulate(tmp_path, 2, {"corrupt": "1:2:shape;2:1:nan"}, lam=0.5, error_metrics=True)
    r1, r2 = strategy.history
    assert len(r1.accepted) == 2 and len(r2.accepted) == 2, strategy.history
    assert not r1.failed and not r2.failed
    (why1,), (why2,) = r1.rejected.values(), r2.rejected.values()
    assert "expected shape (4, 16)" in why1 and "expected finite values, found NaN or Inf" in why2

    global_state = dict(initial)
    for summary in (r1, r2):  # recompute the chain from what the clients saved
        states, weights = _saved_replies(tmp_path, summary.server_round, summary.accepted)
        global_state = dict(fedrot_ext.aggregate_state_dicts(states, reference=global_state, weights=weights, round=summary.server_round - 1))
    final = arrayrecord_to_state_dict(result.arrays)
    assert all(t.dtype == torch.bfloat16 for t in final.values())
    assert set(final) == set(global_state)  # (safetensors files list keys sorted)
    _assert_same(final, {k: global_state[k] for k in final})  # bit for bit: same replies, same order, same op

    for rnd, metrics in result.train_metrics_clientapp.items():
        assert math.isfinite(metrics["agg-error-rel-mean"]) and metrics["replies-rejected"] == 1 and metrics["rank"] == 4
    print(f"\nsimulation 3 clients x 2 rounds: {seconds:.1f} s")
    for rnd, metrics in sorted(result.train_metrics_clientapp.items()):
        print(f"  round {rnd}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())))


def test_simulation_client_side_placement_equals_server_side(tmp_path):
    """Ray simulation with client-side alignment and a server that only averages (fedit):
    each round's global equals server-side fedrot on the clients' unaligned adapters."""
    strategy, result, initial, seconds = _simulate(tmp_path, 2, {"client-side": True}, method="fedit", streaming=False)
    globals_ = {0: state_dict_to_arrayrecord(initial), **flower_sim_globals()}
    for summary in strategy.history:
        assert len(summary.accepted) == 3 and not summary.rejected
        states, weights = _saved_replies(tmp_path, summary.server_round, summary.accepted)
        reference = arrayrecord_to_state_dict(globals_[summary.server_round - 1])
        server_side = fedrot_ext.aggregate_state_dicts(states, reference=reference, weights=weights, round=summary.server_round - 1)
        client_side = arrayrecord_to_state_dict(globals_[summary.server_round])
        _assert_same(client_side, {k: server_side[k] for k in client_side}, **BF16_ULP)
    print(f"\nclient-side placement simulation: {seconds:.1f} s")


def flower_sim_globals():
    import flower_sim_app

    return flower_sim_app.RESULTS["globals"]


# ----------------------------------------------------------------------------- the example app
def test_example_app_is_a_valid_flower_app_and_finds_the_demo(tmp_path, monkeypatch):
    """Cheap drift check of python_examples/flower_app (running it takes minutes: see its README)."""
    from flwr.cli.config_utils import load_and_validate

    app_dir = REPO / "python_examples" / "flower_app"
    config, _ = load_and_validate(app_dir / "pyproject.toml", check_module=True)
    assert config is not None
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # the app's module sets defaults for unset variables only
    from fedrot_flower_app.task import TaskConfig, demo_modules  # importable: pyproject's pytest pythonpath

    cfg = TaskConfig.from_run_config(config["tool"]["flwr"]["app"]["config"])
    fl_data, fl_model, fl_loop = demo_modules(cfg.examples_dir)
    for module, names in ((fl_data, ("load_text_data", "dirichlet_split")), (fl_model, ("EncoderTask",)),
                          (fl_loop, ("RunConfig", "train_client", "evaluate"))):
        assert all(hasattr(module, n) for n in names), (module.__name__, names)
    assert cfg.local_training().local_steps == cfg.local_steps
