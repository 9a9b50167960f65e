"""FedRotLoRA(server_optimizer=...): the global adapter moves by the optimizer's step, round after round."""
import pytest
import torch

import fedrot_ext
from fedrot_ext.flower import FedRotLoRA, arrayrecord_to_state_dict
from helpers.peft_models import assert_same_state, make_round, tiny_bert
from test_flower import _reply, _sent


@pytest.mark.parametrize("kind", ["adam", "avgm"])
def test_strategy_applies_server_optimizer_over_two_rounds(kind):
    reference, clients = make_round(tiny_bert(torch.float32), 3, seed=5)
    strategy = FedRotLoRA(lam=0.5, server_optimizer=fedrot_ext.ServerOptimizer(kind, 0.3))
    mirror = fedrot_ext.ServerOptimizer(kind, 0.3)
    expected_global = reference
    current = reference
    for server_round in (2, 3):
        _sent(strategy, server_round, current)
        replies = [_reply(c, n, node, server_round) for c, n, node in zip(clients, (3, 5, 9), (11, 12, 13))]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        aggregated = fedrot_ext.aggregate_state_dicts(clients, reference=expected_global, weights=[3, 5, 9], round=server_round - 1, lam=0.5)
        expected_global = mirror.step(expected_global, dict(aggregated))
        current = arrayrecord_to_state_dict(arrays)
        # The strategy's aggregate and the direct call's differ in the last float32 bits (the wire
        # format, the weight normalisation); two Adam steps carry that to ~3e-6.
        assert_same_state(current, expected_global, rtol=1e-5, atol=1e-5)
    assert strategy.server_optimizer.steps == 2
    plain = dict(fedrot_ext.aggregate_state_dicts(clients, reference=reference, weights=[3, 5, 9], round=1, lam=0.5))
    assert not torch.allclose(next(iter(current.values())), next(iter(plain.values())))


def test_strategy_refuses_a_non_optimizer():
    with pytest.raises(TypeError, match="server_optimizer"):
        FedRotLoRA(server_optimizer="adam")
