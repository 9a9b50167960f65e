"""StreamingAggregator equals aggregate_state_dicts on the same clients, for every method it supports."""
import math

import pytest
import torch

import fedrot_ext
from fedrot_ext.methods import get_method
from helpers.peft_models import assert_same_state, make_round, tiny_bert
from helpers.problems import poisoned, synthetic_round

SEED = 7
CONFIG = dict(r=8, lora_alpha=16, rank_pattern={"v": 4})
# Two module kinds; the first client has the smaller ranks so that the accumulators must grow.
MODULES = lambda dtype: [(f"model.layers.{i}.{p}", r, 24, 20, dtype) for i in range(2) for p, r in (("q", 8), ("v", 4))]  # noqa: E731
MIXED = [[5, 8, 3, 8, 6], [2, 4, 4, 1, 3]] * 2  # client_ranks[m][i], never above the reference's rank
WEIGHTS = [3.0, 1.0, 4.0, 1.0, 5.0]
CLOSE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}  # bf16: one ulp
CASES = [("fedrot", 1), ("fedrot", 2), ("fedrot", 0), ("fedit", 0), ("ffa", 1), ("rolora", 1), ("rolora", 2),
         ("fedsa", 1), ("fedex", 1), ("flora", 1)]


def _round(method, round, dtype, seed=SEED):
    """Reference and 5 clients: mixed ranks where the method allows them, frozen factors shared."""
    spec = get_method(method)
    ranks = None if spec.equal_ranks else MIXED
    ref, clients = synthetic_round(MODULES(dtype), 5, seed=seed, client_ranks=ranks)
    frozen = spec.frozen_factor(round)
    if frozen:
        for c in clients[1:]:
            c.update({k: clients[0][k] for k in c if f"lora_{frozen}." in k})
    return ref, clients


def _stream(clients, weights, reference=None, **kw):
    agg = fedrot_ext.StreamingAggregator(reference, **kw)
    accepted = [agg.add(c, w) for c, w in zip(clients, weights)]
    return agg, accepted


@pytest.mark.parametrize("clip_norm", [None, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, round", CASES)
def test_equals_aggregate_state_dicts(method, round, dtype, clip_norm):
    ref, clients = _round(method, round, dtype)
    kw = dict(method=method, round=round, lora_config=CONFIG, clip_norm=clip_norm)
    want = fedrot_ext.aggregate_state_dicts(clients, reference=ref, weights=WEIGHTS, **kw)
    agg, _ = _stream(clients, WEIGHTS, ref, **kw)
    got = agg.result()
    assert agg.count == 5 and agg.dropped == ()
    assert_same_state(got, want, **CLOSE[dtype])  # keys, order, dtypes, base_deltas (seed {SEED})


@pytest.mark.parametrize("round", [1, 2])
def test_peft_model_with_embeddings_and_modules_to_save(round):
    ref, clients = make_round(tiny_bert(torch.bfloat16), 4, seed=SEED)
    want = fedrot_ext.aggregate_state_dicts(clients, reference=ref, weights=[1, 2, 3, 4], round=round)
    agg, _ = _stream(clients, [1, 2, 3, 4], ref, round=round)
    assert_same_state(agg.result(), want, **CLOSE[torch.bfloat16])


@pytest.mark.parametrize("method, round", [("fedrot", 1), ("fedex", 1), ("ffa", 1)])
def test_skip_drops_a_bad_client_as_it_arrives(method, round):
    ref, clients = _round(method, round, torch.float32)
    factor = next(k for k in clients[0] if "lora_B" in k)  # the first client too: it only lends the key layout
    clients[0] = dict(clients[0], **{factor: poisoned(clients[0][factor])})
    clients[3] = dict(clients[3], **{"base_model.model.classifier.bias": poisoned(clients[3]["base_model.model.classifier.bias"], math.inf)})
    kw = dict(method=method, round=round, lora_config=CONFIG, on_invalid="skip")
    want = fedrot_ext.aggregate_state_dicts(clients, reference=ref, weights=WEIGHTS, **kw)
    agg, accepted = _stream(clients, WEIGHTS, ref, **kw)
    got = agg.result()
    assert accepted == [False, True, True, False, True] and agg.count == 3
    assert got.dropped == want.dropped == agg.dropped and [i for i, _ in got.dropped] == [0, 3]
    assert_same_state(got, want, **CLOSE[torch.float32])


def test_raise_names_the_client_index_and_key():
    ref, clients = _round("fedrot", 1, torch.float32)
    key = next(k for k in clients[2] if "lora_A" in k)
    clients[2] = dict(clients[2], **{key: poisoned(clients[2][key])})
    agg = fedrot_ext.StreamingAggregator(ref, round=1, lora_config=CONFIG)
    agg.add(clients[0])
    agg.add(clients[1])
    with pytest.raises(ValueError, match=rf"client_states\[2\]\['{key}'\]: expected finite values.*on_invalid='skip'"):
        agg.add(clients[2])
    agg.add(clients[3])  # a refused client leaves the sums as they were
    want = fedrot_ext.aggregate_state_dicts([clients[i] for i in (0, 1, 3)], reference=ref, round=1, lora_config=CONFIG)
    assert agg.count == 3
    assert_same_state(agg.result(), want, **CLOSE[torch.float32])


@pytest.mark.parametrize("method", ["fedrot", "fedex", "rolora"])
def test_noise_is_drawn_once_with_the_same_std_and_draw_order(method):
    ref, clients = _round(method, 1, torch.float32)
    kw = dict(method=method, round=1, lora_config=CONFIG, clip_norm=0.3, noise_multiplier=0.5)
    want = fedrot_ext.aggregate_state_dicts(clients, reference=ref, weights=WEIGHTS, generator=torch.Generator().manual_seed(SEED), **kw)
    agg, _ = _stream(clients, WEIGHTS, ref, generator=torch.Generator().manual_seed(SEED), **kw)
    assert_same_state(agg.result(), want, rtol=1e-5, atol=1e-5)


def test_checks_match_aggregate_state_dicts():
    ref, clients = _round("ffa", 1, torch.float32)
    changed = next(k for k in clients[1] if "lora_A" in k)
    agg = fedrot_ext.StreamingAggregator(method="ffa")
    agg.add(clients[0])
    with pytest.raises(ValueError, match=rf"client_states\[1\]\['{changed}'\]: differs from client_states\[0\]'s, but method 'ffa' keeps lora_A frozen"):
        agg.add(dict(clients[1], **{changed: clients[1][changed] + 1}))
    # every add() call is a client index, refused ones too
    with pytest.raises(ValueError, match=r"client_states\[2\].*rank 2 differs from client_states\[0\]'s 4; method 'ffa' needs equal ranks"):
        agg.add({k: v[:, :2] if "v.lora_B" in k else v[:2] if "v.lora_A" in k else v for k, v in clients[1].items()})
    missing = {k: v for k, v in clients[1].items() if "classifier.bias" not in k}
    with pytest.raises(ValueError, match=r"client_states\[3\]: missing key 'base_model.model.classifier.bias'"):
        agg.add(missing)
    with pytest.raises(ValueError, match="weight: expected a finite number >= 0"):
        agg.add(clients[1], weight=-1.0)
    assert agg.add(clients[1]) and agg.count == 2


def test_non_floating_tensors_are_copied_and_must_agree():
    ref, clients = _round("fedit", 0, torch.float32)
    clients = [dict(c, **{"base_model.model.steps": torch.tensor([3, 4])}) for c in clients]
    agg, _ = _stream(clients[:3], WEIGHTS, method="fedit", lora_config=CONFIG)
    want = fedrot_ext.aggregate_state_dicts(clients[:3], weights=WEIGHTS[:3], method="fedit", lora_config=CONFIG)
    assert_same_state(agg.result(), want, **CLOSE[torch.float32])
    with pytest.raises(ValueError, match="a non-floating tensor cannot be averaged"):
        agg.add(dict(clients[3], **{"base_model.model.steps": torch.tensor([3, 5])}))


def test_aligning_pads_to_the_reference_rank_and_refuses_a_larger_one():
    ref, clients = _round("fedrot", 1, torch.float32)
    small = {k: v[:4] if "q.lora_A" in k else v[:, :4] if "q.lora_B" in k else v for k, v in ref.items()}
    agg = fedrot_ext.StreamingAggregator(small, round=1)
    with pytest.raises(ValueError, match=r"client_states\[0\].*rank 5 exceeds the reference's 4.*aggregate_state_dicts"):
        agg.add(clients[0])


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="method: 'flexlora' needs all clients at once.*aggregate_state_dicts"):
        fedrot_ext.StreamingAggregator(method="flexlora")
    with pytest.raises(ValueError, match="lam: 'auto' needs every client at once.*aggregate_state_dicts"):
        fedrot_ext.StreamingAggregator(method="fedrot", lam="auto")
    with pytest.raises(ValueError, match="summation: expected one of"):
        fedrot_ext.StreamingAggregator(method="fedit", summation="pairwise")
    with pytest.raises(ValueError, match="reference: required to align"):
        fedrot_ext.StreamingAggregator(round=1)
    with pytest.raises(ValueError, match="lora_config: required for method 'flora'"):
        fedrot_ext.StreamingAggregator(method="flora")
    with pytest.raises(ValueError, match="no client was added"):
        fedrot_ext.StreamingAggregator(method="fedit").result()


# ----------------------------------------------------------------------------- arrival order
def _sum_bounds(clients, weights):
    """Per key: the exact weighted mean (float64) and Σ|w_i x_i| / Σ w_i, the scale of the rounding error."""
    total = math.fsum(weights)
    exact = {k: sum(w * c[k].double() for c, w in zip(clients, weights)) / total for k in clients[0]}
    scale = {k: sum(abs(w) * c[k].double().abs() for c, w in zip(clients, weights)) / total for k in clients[0]}
    return exact, scale


@pytest.mark.parametrize("summation", ["plain", "kahan"])
def test_arrival_order_changes_only_the_summation_rounding(summation):
    n = 400
    g = torch.Generator().manual_seed(SEED)
    _, clients = synthetic_round([("m.q", 4, 32, 16, torch.float32)], n, seed=SEED, rotated=False)
    weights = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).tolist()
    results = []
    for order in (list(range(n)), list(range(n))[::-1]):
        agg, _ = _stream([clients[i] for i in order], [weights[i] for i in order], method="fedit", summation=summation)
        results.append(agg.result())
    exact, scale = _sum_bounds(clients, weights)
    u = 2.0 ** -24
    # Plain: ≲ N·u·Σ|w x| per order; Kahan: ≲ 2u·Σ|w x| (+ the final division's u·|mean|).
    bound = (n * u if summation == "plain" else 2 * u) * 1.5
    for key in exact:
        for got in results:
            err = (got[key].double() - exact[key]).abs()
            assert bool((err <= bound * scale[key] + u * exact[key].abs()).all()), f"{key} (seed {SEED})"
        diff = (results[0][key].double() - results[1][key].double()).abs()
        assert bool((diff <= 2 * bound * scale[key] + 2 * u * exact[key].abs()).all()), f"{key} (seed {SEED})"
    if summation == "kahan":  # correctly rounded but for the final division: at most a couple of ulps apart
        for key in exact:
            ulp = torch.finfo(torch.float32).eps * exact[key].abs().clamp_min(1e-30)
            assert bool(((results[0][key].double() - results[1][key].double()).abs() <= 2 * ulp + 4 * u * scale[key]).all()), key


def test_float64_accumulates_in_float64():
    ref, clients = _round("fedrot", 1, torch.float64)
    want = fedrot_ext.aggregate_state_dicts(clients, reference=ref, weights=WEIGHTS, round=1, lora_config=CONFIG)
    agg, _ = _stream(clients, WEIGHTS, ref, round=1, lora_config=CONFIG)
    assert_same_state(agg.result(), want, rtol=1e-12, atol=1e-13)


def test_device_moves_each_client(device):
    ref, clients = _round("fedrot", 1, torch.float32)
    want = fedrot_ext.aggregate_state_dicts(clients, reference=ref, weights=WEIGHTS, round=1, lora_config=CONFIG)
    agg, _ = _stream(clients, WEIGHTS, ref, round=1, device=device, lora_config=CONFIG)
    got = agg.result()
    assert all(t.device.type == device for t in got.values())
    assert_same_state({k: t.cpu() for k, t in got.items()}, dict(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, round", [("fedrot", 1), ("fedrot", 2), ("fedit", 0), ("fedsa", 1)])
@pytest.mark.parametrize("group", [2, 5, 8])
def test_groups_give_the_one_at_a_time_result(group, method, round, dtype):
    """group=k aggregates k clients per op call, read in place (mixed ranks padded per group): the same
    aggregate as one client at a time and as aggregate_state_dicts, to the summation's rounding."""
    ref, clients = _round(method, round, dtype)
    kw = dict(method=method, round=round, lora_config=CONFIG)
    one, _ = _stream(clients, WEIGHTS, ref, **kw)
    grouped, accepted = _stream(clients, WEIGHTS, ref, group=group, **kw)
    assert accepted == [True] * 5 and grouped.count == 5
    got = grouped.result()
    assert_same_state(got, one.result(), **CLOSE[dtype])
    assert_same_state(got, fedrot_ext.aggregate_state_dicts(clients, reference=ref, weights=WEIGHTS, **kw), **CLOSE[dtype])


def test_a_group_finds_its_bad_clients_when_it_is_aggregated():
    ref, clients = _round("fedrot", 1, torch.float32)
    factor = next(k for k in clients[0] if "lora_A" in k)
    clients[1] = dict(clients[1], **{factor: poisoned(clients[1][factor])})
    clients[2] = dict(clients[2], **{factor: poisoned(clients[2][factor], math.inf)})
    kw = dict(method="fedrot", round=1, lora_config=CONFIG)
    skip, accepted = _stream(clients, WEIGHTS, ref, group=3, on_invalid="skip", **kw)
    assert accepted[:2] == [True, True] and accepted[2] is False  # known when the group of 3 is aggregated
    got = skip.result()
    assert [i for i, _ in got.dropped] == [1, 2] and skip.count == 3
    kept = [0, 3, 4]
    want = fedrot_ext.aggregate_state_dicts([clients[i] for i in kept], reference=ref, weights=[WEIGHTS[i] for i in kept], **kw)
    assert_same_state(got, want, **CLOSE[torch.float32])
    agg = fedrot_ext.StreamingAggregator(ref, group=3, **kw)
    agg.add(clients[0], 1.0)
    agg.add(clients[1], 1.0)
    with pytest.raises(ValueError, match=rf"client_states\[1\]\['{factor}'\]: expected finite values"):
        agg.add(clients[2], 1.0)
    agg.add(clients[3], 1.0)
    assert agg.count == 2  # clients 0 and 3; the good client of the failed group was kept
    assert_same_state(agg.result(), fedrot_ext.aggregate_state_dicts([clients[0], clients[3]], reference=ref, **kw),
                      **CLOSE[torch.float32])


@pytest.mark.parametrize("kw, pattern", [
    (dict(group=0), r"group: expected an int >= 1"),
    (dict(group=2.0), r"group: expected an int >= 1"),
    (dict(group=2, clip_norm=1.0), r"group: 2 needs a factor method without clip_norm"),
    (dict(group=2, method="ffa"), r"group: 2 needs a factor method"),
])
def test_group_is_checked(kw, pattern):
    ref, _ = _round("fedrot", 1, torch.float32)
    with pytest.raises(ValueError, match=pattern):
        fedrot_ext.StreamingAggregator(ref, **{"round": 1, **kw})
