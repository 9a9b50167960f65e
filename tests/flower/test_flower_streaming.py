"""FedRotLoRA(streaming=...): a streaming round consumes the replies one at a time and gives the
same global adapter as the stacked round (to rounding)."""
import os

import pytest
import torch

import fedrot_ext
from fedrot_ext.flower import FedRotLoRA, arrayrecord_to_state_dict
from helpers.peft_models import assert_same_state, bert_lora_config, make_round, tiny_bert
from test_flower import _bad_replies, _raw_reply, _reply, _sent

CLOSE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}  # bf16: one ulp


def _run(strategy, reference, replies, server_round=2):
    _sent(strategy, server_round, reference)
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return arrayrecord_to_state_dict(arrays), metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["fedrot", "fedit", "fedsa", "fedex", "flora"])
def test_streaming_round_equals_the_stacked_round(method, dtype):
    reference, clients = make_round(tiny_bert(dtype), 3, seed=11)
    replies = lambda: [_reply(c, n, node) for c, n, node in zip(clients, (3, 5, 9), (11, 12, 13))]  # noqa: E731
    kw = dict(method=method, lam=0.6, lora_config=bert_lora_config())
    streaming = FedRotLoRA(**kw, streaming=True)
    assert streaming.streaming and not FedRotLoRA().streaming  # on request only: the default reads the replies in place
    got, metrics = _run(streaming, reference, replies())
    stacked = FedRotLoRA(**kw, streaming=False)
    want, stacked_metrics = _run(stacked, reference, replies())
    assert_same_state(got, want, **CLOSE[dtype])
    assert set(streaming.base_deltas) == set(stacked.base_deltas)
    for path in stacked.base_deltas:
        torch.testing.assert_close(streaming.base_deltas[path], stacked.base_deltas[path], **CLOSE[dtype])
    assert metrics["replies-accepted"] == 3 and metrics["rank"] == stacked_metrics["rank"]
    assert "agg-error-rel-mean" not in metrics  # needs every reply at once
    assert streaming.history[-1].accepted == [11, 12, 13]


def test_streaming_rejects_bad_replies_and_goes_on():
    reference, clients = make_round(tiny_bert(torch.bfloat16), 3, seed=12)
    bad = [_raw_reply(content, 20 + i) for i, (_, content, _) in enumerate(_bad_replies(clients, reference))]
    strategy = FedRotLoRA(aggregate_options={"clip_norm": 0.5})
    got, metrics = _run(strategy, reference, [_reply(clients[0], 2, 1), *bad, _reply(clients[1], 4, 2)])
    want = fedrot_ext.aggregate_state_dicts(clients[:2], reference=reference, weights=[2, 4], round=1, clip_norm=0.5)
    assert_same_state(got, dict(want), **CLOSE[torch.bfloat16])
    assert metrics["replies-rejected"] == len(bad) and strategy.history[-1].accepted == [1, 2]


def test_streaming_choice():
    assert not FedRotLoRA(method="flexlora").streaming
    assert not FedRotLoRA(report_fedit_error=True).streaming
    with pytest.raises(ValueError, match="streaming: method 'flexlora' needs all replies at once"):
        FedRotLoRA(method="flexlora", streaming=True)
    with pytest.raises(ValueError, match="streaming: report_fedit_error needs all replies"):
        FedRotLoRA(report_fedit_error=True, streaming=True)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="the probe resets the peak RSS (Linux only)")
def test_round_memory_stays_flat_streaming_or_not():
    """A fresh process per mode, 40 replies of 6.3 MB: the peak RSS growth over the replies Flower already
    holds stays within a few replies' size, streaming or not: the one-call round reads the decoded replies
    in place (views of their bytes), where it used to stack them (more than all the replies)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    result = {}
    for mode in ("stream", "stack"):
        out = subprocess.run([sys.executable, str(here / "flower_memory_probe.py"), mode, "40"], env=env, check=True,
                             capture_output=True, text=True, timeout=600)
        result[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nFlower round memory: {result}")
    total = result["stream"]["replies_MB"]
    one_reply = total / result["stream"]["replies"]
    # O(one client): the accumulators, one decoded reply and the encoded result, whatever the number of replies.
    assert result["stream"]["peak_extra_MB"] < 8 * one_reply, result
    assert result["stack"]["peak_extra_MB"] < 8 * one_reply, result


def test_lam_auto_round_stacks_and_reports_the_chosen_lambda():
    reference, clients = make_round(tiny_bert(torch.float32), 3, seed=13)
    assert not FedRotLoRA(lam="auto").streaming
    with pytest.raises(ValueError, match="streaming: lam='auto' needs all replies at once"):
        FedRotLoRA(lam="auto", streaming=True)
    strategy = FedRotLoRA(lam="auto")
    got, metrics = _run(strategy, reference, [_reply(c, n, node) for c, n, node in zip(clients, (3, 5, 9), (1, 2, 3))])
    want = fedrot_ext.aggregate_state_dicts(clients, reference=reference, weights=[3, 5, 9], round=1, lam="auto")
    assert_same_state(got, dict(want))
    chosen = list(want.lam.values())
    assert metrics["lam-mean"] == pytest.approx(sum(chosen) / len(chosen))
    assert metrics["lam-min"] == min(chosen) and metrics["lam-max"] == max(chosen)


def test_error_metrics_only_when_asked():
    """The aggregation error costs more than the aggregation: reported only with error_metrics (or
    report_fedit_error), and refused with streaming, which never holds every reply at once."""
    assert not FedRotLoRA().error_metrics and FedRotLoRA(error_metrics=True).error_metrics
    assert FedRotLoRA(report_fedit_error=True).error_metrics
    with pytest.raises(ValueError, match="error_metrics needs all replies at once"):
        FedRotLoRA(error_metrics=True, streaming=True)
