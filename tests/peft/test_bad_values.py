"""Values that used to give a silently wrong result or a late, unclear error: base-weight updates that
overflow, weights whose sum overflows, NumPy scalar weights, a refused first streaming client, a merge
tolerance given as a string."""
import math

import numpy as np
import pytest
import torch

import fedrot_ext
from helpers.peft_models import KA, assert_same_state, bert_lora_config, make_round, tiny_bert


@pytest.mark.parametrize("method", ["fedex", "flora"])
@pytest.mark.parametrize("streaming", [False, True])
def test_base_deltas_that_overflow_are_refused(method, streaming):
    ref, clients = make_round(tiny_bert(), 2, seed=31)
    modules, _ = fedrot_ext.parse_lora_keys(ref)
    m = modules[1]
    for c, scale in zip(clients, (1.0, 3.0)):  # finite, different factors whose products overflow float32 (1e40)
        c[m.key_A] = torch.full_like(c[m.key_A], 1e20 * scale)
        c[m.key_B] = torch.full_like(c[m.key_B], -1e20)
    kw = dict(method=method, round=1, lora_config=bert_lora_config())
    with pytest.raises(ValueError, match="client_states: the aggregate overflowed"):
        if streaming:
            agg = fedrot_ext.StreamingAggregator(ref, **kw)
            for c in clients:
                agg.add(c)
            agg.result()
        else:
            fedrot_ext.aggregate_state_dicts(clients, reference=ref, **kw)


def test_weights_whose_sum_overflows_raise_a_value_error_naming_weights():
    ref, clients = make_round(tiny_bert(), 3, seed=32)
    with pytest.raises(ValueError, match="weights: expected a finite sum"):
        fedrot_ext.aggregate_state_dicts(clients, reference=ref, round=1, weights=[1e308, 1e308, 1.0])
    w = fedrot_ext.aggregate_state_dicts(clients, reference=ref, round=1, weights=[1e300, 2e300, 1e300])
    assert_same_state(w, fedrot_ext.aggregate_state_dicts(clients, reference=ref, round=1, weights=[1, 2, 1]),
                      rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weight", [np.float32(2.0), np.int64(2), np.float64(2.0)], ids=str)
def test_streaming_takes_numpy_scalar_weights(weight):
    ref, clients = make_round(tiny_bert(), 2, seed=33)
    agg = fedrot_ext.StreamingAggregator(ref, round=1)
    agg.add(clients[0], weight)
    agg.add(clients[1], 1.0)
    want = fedrot_ext.aggregate_state_dicts(clients, reference=ref, round=1, weights=[2.0, 1.0])
    assert_same_state(agg.result(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["fedit", "ffa"])
def test_a_refused_first_client_does_not_become_the_template(method):
    """A first upload with NaN and other feature sizes (a corrupt file) is dropped; the next good client
    is not measured against it (fedit reads it in the op, ffa screens it first)."""
    ref, clients = make_round(tiny_bert(), 2, seed=34)
    corrupt = {k: torch.full((v.shape[0] + ("lora_B" in k), v.shape[1] + ("lora_A" in k)), math.nan) if "lora_" in k else v
               for k, v in clients[0].items()}
    agg = fedrot_ext.StreamingAggregator(ref, round=0, method=method, on_invalid="skip")
    assert agg.add(corrupt) is False
    assert agg.count == 0 and [i for i, _ in agg.dropped] == [0]
    assert agg.add(clients[1]) is True
    want = fedrot_ext.aggregate_state_dicts([clients[1]], method=method, round=0)
    assert_same_state(agg.result(), want, rtol=1e-6, atol=1e-7)


def test_merge_tol_as_a_string_fails_before_any_work():
    _, clients = make_round(tiny_bert(), 2, seed=35)
    with pytest.raises(TypeError, match=r"tol: expected a non-negative float, got str '1e-3'"):
        fedrot_ext.merge_adapters(clients, tol="1e-3")
