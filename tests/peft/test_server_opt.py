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


@pytest.mark.parametrize("bad", [dict(lr=float("inf")), dict(lr=float("nan")), dict(tau=float("inf")), dict(lr="0.1"), dict(lr=True)])
def test_non_finite_or_non_numeric_options_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ServerOptimizer("adam", **bad)


@pytest.mark.parametrize(
    "edit,match",
    [
        (dict(beta_1=5.0), "beta_1"),
        (dict(lr=-1.0), "lr"),
        (dict(tau=0.0), "tau"),
        (dict(steps=-5), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(m={"a": torch.tensor([1.0, float("nan")])}), r"state\['m'\]\['a'\]"),
        (dict(v={"a": -torch.ones(3, 4, dtype=torch.float64)}), r"state\['v'\]\['a'\]"),
        (dict(v={"a": torch.ones(2, 2, dtype=torch.float64)}), "same keys and shapes"),
        (dict(m="moments"), "mapping"),
    ],
)
def test_load_state_dict_refuses_bad_values_and_keeps_its_state(edit, match):
    ref, aggs = _rounds(5, 2)
    opt = ServerOptimizer("adam", 0.2)
    opt.step(ref, aggs[0])
    before = opt.state_dict()
    state = dict(before, **edit)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert {k: v for k, v in after.items() if k not in ("m", "v", "master")} == {k: v for k, v in before.items() if k not in ("m", "v", "master")}
    assert all(torch.equal(after["m"][k], before["m"][k]) and torch.equal(after["v"][k], before["v"][k]) for k in before["m"])


def test_moments_of_another_rank_are_refused_not_broadcast():
    opt = ServerOptimizer("adam")
    opt.step({"a": torch.zeros(1, 4)}, {"a": torch.ones(1, 4)})
    with pytest.raises(ValueError, match=r"moments from earlier steps have shape \(1, 4\)"):
        opt.step({"a": torch.zeros(2, 4)}, {"a": torch.ones(2, 4)})
    assert opt.steps == 1


def test_bf16_global_keeps_a_float64_master_copy_so_small_steps_add_up():
    """Adam at lr 1e-3 moves every entry by about 1e-3 a round, below half a bfloat16 ulp of values near 1:
    the master copy adds the steps up, where rounding every round to bfloat16 would lose each of them."""
    g = torch.Generator().manual_seed(21)
    start = {"a": (torch.rand(13, 20, generator=g) + 0.5).bfloat16()}
    opt, x = ServerOptimizer("adam", 1e-3), start
    for _ in range(20):
        x = opt.step(x, {"a": (x["a"].float() + 0.05).bfloat16()})  # clients push every entry up
    assert bool((x["a"] > start["a"]).all())  # all 260 entries moved
    assert torch.equal(x["a"], opt.master["a"].bfloat16())
    moved = opt.master["a"] - start["a"].double()
    assert 0.75 * 20e-3 < float(moved.min()) and float(moved.max()) < 1.05 * 20e-3  # 20 steps of about lr each
    other = {"a": torch.zeros(13, 20).bfloat16()}  # a reference that is not the master copy rounded: start from it
    y = opt.step(other, {"a": other["a"] + 1})
    assert float(y["a"].float().abs().max()) < 0.01


def test_step_on_a_merge_keeps_the_merged_state_type():
    g = torch.Generator().manual_seed(4)
    key = lambda f: f"base_model.model.layer0.lora_{f}.weight"  # noqa: E731
    clients = [{key("A"): torch.randn(2, 6, generator=g), key("B"): torch.randn(5, 2, generator=g)} for _ in range(3)]
    merged = fedrot_ext.merge_adapters(clients)
    out = ServerOptimizer("avgm", 1.0).step(clients[0], merged)
    assert type(out) is type(merged) and out.iterations == merged.iterations and out.errors == merged.errors
    torch.testing.assert_close(out[key("A")], merged[key("A")], rtol=0, atol=1e-6)
