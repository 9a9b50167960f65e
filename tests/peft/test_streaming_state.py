"""StreamingAggregator.state_dict / load_state_dict (resume after a restart) and merge (disjoint shards)."""
import io

import pytest
import torch

import fedrot_ext
from helpers.peft_models import assert_same_state
from helpers.problems import poisoned
from test_streaming import CASES, CLOSE, CONFIG, WEIGHTS, _round

# One shard's ranks are smaller on some modules: the merge rescales its sums, on either side of merge().
SHARDS = [([0, 2], [1, 3, 4]), ([1, 3, 4], [0, 2])]


def _aggregator(ref, method, round, **kw):
    return fedrot_ext.StreamingAggregator(ref, method=method, round=round, lora_config=CONFIG, **kw)


def _fed(agg, clients, idx):
    return [agg.add(clients[i], WEIGHTS[i]) for i in idx]


def _saved(state) -> dict:
    """Through torch.save and a weights-only load, as a server writes it to disk."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("shards", SHARDS)
@pytest.mark.parametrize("summation", ["plain", "kahan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, round", CASES)
def test_merged_shards_equal_one_aggregator(method, round, dtype, summation, shards):
    ref, clients = _round(method, round, dtype)
    whole = _aggregator(ref, method, round, summation=summation)
    _fed(whole, clients, shards[0] + shards[1])
    first, second = (_aggregator(ref, method, round, summation=summation) for _ in shards)
    _fed(first, clients, shards[0])
    _fed(second, clients, shards[1])
    first.merge(second)
    assert first.count == 5
    assert_same_state(first.result(), whole.result(), **CLOSE[dtype])  # one more rounding per entry (seed in _round)


@pytest.mark.parametrize("method, round", [("fedrot", 1), ("fedit", 0), ("flora", 1)])
def test_resume_from_a_saved_state_is_bitwise_the_uninterrupted_run(method, round):
    ref, clients = _round(method, round, torch.float32)
    whole = _aggregator(ref, method, round)
    _fed(whole, clients, range(5))
    before = _aggregator(ref, method, round)
    _fed(before, clients, [0, 1])
    state = _saved(before.state_dict())
    del before  # the server restarts
    after = _aggregator(ref, method, round)
    after.load_state_dict(state)
    _fed(after, clients, [2, 3, 4])
    got, want = after.result(), whole.result()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert got.base_deltas.keys() == want.base_deltas.keys()
    assert all(torch.equal(got.base_deltas[k], want.base_deltas[k]) for k in want.base_deltas)


def test_dropped_clients_keep_their_numbers_through_merge_and_resume():
    ref, clients = _round("fedrot", 1, torch.float32)
    key = next(k for k in clients[3] if "lora_A" in k)
    clients[3] = dict(clients[3], **{key: poisoned(clients[3][key])})
    first, second = (_aggregator(ref, "fedrot", 1, on_invalid="skip") for _ in range(2))
    _fed(first, clients, [0, 1, 2])
    assert _fed(second, clients, [3, 4]) == [False, True]
    assert second.dropped[0][0] == 0  # its own numbering
    first.merge(second)
    assert [i for i, _ in first.dropped] == [3] and "client_states[3]" in first.dropped[0][1]
    resumed = _aggregator(ref, "fedrot", 1, on_invalid="skip")
    resumed.load_state_dict(_saved(first.state_dict()))
    assert resumed.dropped == first.dropped and resumed.count == 4
    want = fedrot_ext.aggregate_state_dicts(clients, reference=ref, weights=WEIGHTS, round=1, lora_config=CONFIG, on_invalid="skip")
    assert want.dropped == resumed.result().dropped
    assert_same_state(resumed.result(), want, **CLOSE[torch.float32])


def test_a_held_group_is_aggregated_before_the_state_is_taken():
    ref, clients = _round("fedrot", 1, torch.float32)
    grouped = _aggregator(ref, "fedrot", 1, group=4)
    _fed(grouped, clients, [0, 1])  # held, not yet aggregated
    resumed = _aggregator(ref, "fedrot", 1, group=4)
    resumed.load_state_dict(_saved(grouped.state_dict()))
    _fed(resumed, clients, [2, 3, 4])
    whole = _aggregator(ref, "fedrot", 1)
    _fed(whole, clients, range(5))
    assert resumed.count == 5
    assert_same_state(resumed.result(), whole.result(), **CLOSE[torch.float32])


def test_refusals_name_the_argument_and_change_nothing():
    ref, clients = _round("fedrot", 1, torch.float32)
    agg = _aggregator(ref, "fedrot", 1)
    _fed(agg, clients, [0, 1])
    state = agg.state_dict()
    with pytest.raises(ValueError, match=r"state: saved by an aggregator built with \{'lam': 0.5\}"):
        _aggregator(ref, "fedrot", 1, lam=0.7).load_state_dict(state)
    other_ref = {k: v + 1 if v.is_floating_point() else v for k, v in ref.items()}
    fresh = _aggregator(other_ref, "fedrot", 1)
    with pytest.raises(ValueError, match="state: its clients were aligned to another reference"):
        fresh.load_state_dict(state)
    assert fresh.count == 0 and fresh.state_dict()["template"] is None  # unchanged: still takes clients
    fresh.add(clients[0])
    with pytest.raises(ValueError, match="state: this aggregator has taken clients already"):
        fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="state: expected the output of StreamingAggregator.state_dict"):
        _aggregator(ref, "fedrot", 1).load_state_dict({"weights": []})
    with pytest.raises(ValueError, match="other: cannot merge an aggregator with itself"):
        agg.merge(agg)
    with pytest.raises(TypeError, match="other: expected a StreamingAggregator"):
        agg.merge(state)
    with pytest.raises(ValueError, match="other: built with options"):
        agg.merge(_aggregator(ref, "fedrot", 2))
    elsewhere = _aggregator(other_ref, "fedrot", 1)
    _fed(elsewhere, clients, [2])
    with pytest.raises(ValueError, match="other: its clients were aligned to another reference"):
        agg.merge(elsewhere)
    assert agg.count == 2
