"""ServerOptimizer: each kind against a hand-written float64 update, checkpoint round trip, bad input."""
import math

import pytest
import torch

import fedrot_ext
from fedrot_ext import ServerOptimizer


def _rounds(seed=0, n_rounds=3):
    g = torch.Generator().manual_seed(seed)
    ref = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64), "steps": torch.tensor([7])}
    aggs = []
    for _ in range(n_rounds):
        aggs.append({"a": torch.randn(3, 4, generator=g, dtype=torch.float64), "steps": torch.tensor([7])})
    return ref, aggs


def _by_hand(kind, ref, aggs, lr, mu=0.5, b1=0.9, b2=0.99, tau=1e-3):
    """Element-by-element Python floats: the formulas of Reddi et al. as in the module docstring."""
    x = ref["a"].flatten().tolist()
    m = [0.0] * len(x)
    v = [0.0] * len(x)
    for t, agg in enumerate(aggs, start=1):
        g = agg["a"].flatten().tolist()
        for i in range(len(x)):
            d = g[i] - x[i]
            if kind == "avgm":
                m[i] = d if t == 1 else mu * m[i] + d
                x[i] += lr * m[i]
                continue
            m[i] = b1 * m[i] + (1 - b1) * d if kind != "adagrad" else d
            if kind == "adam":
                v[i] = b2 * v[i] + (1 - b2) * d * d
                step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            elif kind == "yogi":
                s = (v[i] > d * d) - (v[i] < d * d)
                v[i] = v[i] - (1 - b2) * d * d * s
                step = lr
            else:
                v[i] = v[i] + d * d
                step = lr
            x[i] += step * m[i] / (math.sqrt(v[i]) + tau)
        # The next round's aggregate is a fixed offset from this round's new global.
    return torch.tensor(x, dtype=torch.float64).reshape(3, 4)


@pytest.mark.parametrize("kind,opts", [("avgm", dict(momentum=0.5)), ("adam", {}), ("yogi", {}), ("adagrad", {})])
def test_each_kind_matches_hand_written_float64_update(kind, opts):
    ref, aggs = _rounds()
    lr = 0.3
    opt = ServerOptimizer(kind, lr, **opts)
    x = ref
    for agg in aggs:
        x = opt.step(x, agg)
    expected = _by_hand(kind, ref, aggs, lr, mu=opts.get("momentum", 0.5))
    torch.testing.assert_close(x["a"], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(x["steps"], aggs[-1]["steps"])  # non-floating tensors copied


def test_avgm_without_momentum_and_lr_one_is_fedavg():
    ref, aggs = _rounds(1, 1)
    out = ServerOptimizer("avgm", 1.0).step(ref, aggs[0])
    torch.testing.assert_close(out["a"], aggs[0]["a"], rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["avgm", "adam", "yogi", "adagrad"])
def test_checkpoint_round_trip_resumes_identically(kind, tmp_path):
    ref, aggs = _rounds(2, 4)
    full = ServerOptimizer(kind, 0.2)
    x = ref
    for agg in aggs:
        x = full.step(x, agg)
    first = ServerOptimizer(kind, 0.2)
    y = ref
    for agg in aggs[:2]:
        y = first.step(y, agg)
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    resumed = ServerOptimizer(kind)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for agg in aggs[2:]:
        y = resumed.step(y, agg)
    assert resumed.steps == 4
    assert torch.equal(x["a"], y["a"])


def test_dtype_kept_inputs_untouched_and_aggregated_state_carried():
    g = torch.Generator().manual_seed(3)
    ref = {"k": torch.randn(2, 2, generator=g).bfloat16()}
    agg = fedrot_ext.AggregatedState({"k": torch.randn(2, 2, generator=g).bfloat16()}, base_deltas={"m": torch.ones(1)}, dropped=((1, "x"),))
    ref_copy, agg_copy = ref["k"].clone(), agg["k"].clone()
    out = ServerOptimizer("adam").step(ref, agg)
    assert out["k"].dtype == torch.bfloat16 and isinstance(out, fedrot_ext.AggregatedState)
    assert out.dropped == ((1, "x"),) and torch.equal(out.base_deltas["m"], torch.ones(1))
    assert torch.equal(ref["k"], ref_copy) and torch.equal(agg["k"], agg_copy)


def test_frozen_factor_gets_no_step():
    ref, aggs = _rounds(4, 1)
    frozen = {"a": ref["a"].clone(), "steps": ref["steps"]}
    for kind in ("avgm", "adam", "yogi", "adagrad"):
        assert torch.equal(ServerOptimizer(kind).step(ref, frozen)["a"], ref["a"])


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (("sgd",), {}, "kind must be one of"),
        (("adam", -1.0), {}, "lr"),
        (("adam",), dict(momentum=0.9), "takes"),
        (("yogi",), dict(beta_1=1.0), "beta_1"),
        (("adagrad",), dict(tau=0.0), "tau"),
    ],
)
def test_bad_options_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServerOptimizer(*args, **kwargs)


def test_bad_states_raise():
    opt = ServerOptimizer("adam")
    with pytest.raises(ValueError, match="reference_state has no key 'b'"):
        opt.step({"a": torch.zeros(2)}, {"b": torch.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        opt.step({"a": torch.zeros(2)}, {"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="non-finite"):
        opt.step({"a": torch.zeros(2)}, {"a": torch.tensor([0.0, float("nan")])})
    with pytest.raises(ValueError, match="kind 'adam'"):
        ServerOptimizer("yogi").load_state_dict(opt.state_dict())
