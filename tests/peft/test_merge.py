"""merge_adapters: generalised Procrustes merge of adapters trained from independent inits."""
import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

import fedrot_ext
from fedrot_ext import merge_adapters
from fedrot_ext.reference import merge_adapters_ref
from helpers.peft_models import assert_states_equal, clone_states, tiny_bert
from helpers.problems import one_thread

N, D, R = 5, 48, 4


def _key(j, f):
    return f"base_model.model.layer{j}.lora_{f}.weight"


def _trained_clients(layers=2, steps=300, seed=0):
    """N clients, each from its own init (A random, B = 0, as peft), fitted with Adam to
    related rank-R targets T + client noise: same task, unrelated latent bases.
    All clients of a layer train at once as one batched problem (they are independent)."""
    g = torch.Generator().manual_seed(seed)
    states = [{} for _ in range(N)]
    for j in range(layers):
        target = torch.randn(D, R, generator=g) @ torch.randn(R, D, generator=g) / D ** 0.5
        goal = target + 0.1 * torch.randn(N, D, D, generator=g) / D ** 0.5
        a = (torch.randn(N, R, D, generator=g) / D ** 0.5).requires_grad_()
        b = torch.zeros(N, D, R, requires_grad=True)
        opt = torch.optim.Adam([a, b], lr=0.02)
        for _ in range(steps):
            opt.zero_grad()
            ((b @ a - goal) ** 2).sum().backward()
            opt.step()
        for i in range(N):
            states[i][_key(j, "A")], states[i][_key(j, "B")] = a[i].detach().clone(), b[i].detach().clone()
    for i in range(N):
        states[i]["base_model.model.head.weight"] = torch.randn(3, D, generator=g)
    return states


@pytest.fixture(scope="module")
def clients():
    with one_thread():  # hundreds of tiny steps: thread hand-offs would dominate
        return _trained_clients()


def _stacks(states, layers=2):
    A = [torch.stack([s[_key(j, "A")] for s in states]) for j in range(layers)]
    B = [torch.stack([s[_key(j, "B")] for s in states]) for j in range(layers)]
    return A, B


def test_merge_error_far_below_plain_averaging(clients):
    merged = merge_adapters(clients)
    fedit = fedrot_ext.aggregate_state_dicts(clients, method="fedit")
    plain = fedrot_ext.state_dict_aggregation_error(clients, fedit)
    for name, (_, rel) in merged.errors.items():
        assert plain[name][1] > 0.5  # independent gauges: averaging cancels most of the update
        assert rel < 0.5 * plain[name][1]
    # the reported errors are the metric's own on the returned adapter
    again = fedrot_ext.state_dict_aggregation_error(clients, merged)
    for name, (ab, rel) in merged.errors.items():
        assert rel == pytest.approx(again[name][1], rel=1e-9)


def test_merge_matches_float64_reference(clients):
    A, B = _stacks(clients)
    w = torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0])
    merged = merge_adapters([{k: v.double() for k, v in s.items()} for s in clients], weights=w, iterations=20, tol=1e-10)
    ref_A, ref_B, passes = merge_adapters_ref(
        [a.double() for a in A], [b.double() for b in B], ref_A=[a[2].double() for a in A], ref_B=[b[2].double() for b in B],
        weights=w, iterations=20, tol=1e-10,
    )
    assert merged.iterations == passes
    for j in range(2):
        torch.testing.assert_close(merged[_key(j, "A")], ref_A[j], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(merged[_key(j, "B")], ref_B[j], rtol=1e-8, atol=1e-10)
    # non-LoRA tensors: the weighted average
    head = torch.stack([s["base_model.model.head.weight"].double() for s in clients])
    torch.testing.assert_close(merged["base_model.model.head.weight"], torch.tensordot(w.double() / w.sum(), head, dims=1))


def test_convergence_and_iteration_count(clients):
    merged = merge_adapters(clients, iterations=50, tol=1e-5)
    assert merged.converged and 2 <= merged.iterations < 50
    assert merged.changes[-1] < 1e-5 <= min(merged.changes[:-1])
    assert len(merged.changes) == merged.iterations
    one = merge_adapters(clients, iterations=1)
    assert one.iterations == 1 and not one.converged
    # each realignment to the average can only grow the average's norm (the generalised
    # Procrustes objective Σ w_i ‖X_i R_i − X̄‖² = const − ‖X̄‖² with X = (A, B) jointly)
    norm = lambda s: sum(float(v.square().sum()) for k, v in s.items() if "lora_" in k)  # noqa: E731
    assert norm(merged) >= norm(one) * (1 - 1e-6)


def test_weights_and_reference(clients):
    # the default reference is the heaviest client: same as passing it explicitly
    w = [1.0, 1.0, 1.0, 5.0, 1.0]
    by_default = merge_adapters(clients, weights=w, iterations=3)
    explicit = merge_adapters(clients, weights=w, reference=clients[3], iterations=3)
    for k in by_default:
        assert torch.equal(by_default[k], explicit[k])
    # weights scale-invariant; a zero-weight client leaves the merge as without it
    scaled = merge_adapters(clients, weights=[2 * x for x in w], iterations=3)
    for k in by_default:
        torch.testing.assert_close(scaled[k], by_default[k])
    zero = merge_adapters(clients, weights=[1.0, 1.0, 0.0, 1.0, 1.0], reference=clients[0], iterations=3)
    without = merge_adapters(clients[:2] + clients[3:], reference=clients[0], iterations=3)
    for k in zero:
        torch.testing.assert_close(zero[k], without[k], rtol=1e-5, atol=1e-6)


def test_mixed_ranks_zero_padded(clients):
    small = [dict(s) for s in clients]
    small[1] = {k: (v[:2] if "lora_A" in k else v[:, :2] if "lora_B" in k else v) for k, v in clients[1].items()}
    with pytest.raises(ValueError, match="lora_config: required when ranks differ"):
        merge_adapters(small)
    config = dict(r=R, lora_alpha=2 * R)
    merged = merge_adapters(small, lora_config=config)
    assert merged[_key(0, "A")].shape == (R, D) and merged[_key(0, "B")].shape == (D, R)
    again = fedrot_ext.state_dict_aggregation_error(small, merged, lora_config=config)
    for name, (_, rel) in merged.errors.items():
        assert rel == pytest.approx(again[name][1], rel=1e-9)


def test_peft_loadable_and_inputs_untouched():
    models = [tiny_bert(seed=s) for s in range(3)]  # every client its own init
    states = [get_peft_model_state_dict(m) for m in models]
    before = clone_states(states)
    merged = merge_adapters(states)
    assert_states_equal(before, states)
    assert list(merged) == list(states[0]) and all(merged[k].dtype == states[0][k].dtype for k in merged)
    result = set_peft_model_state_dict(models[0], merged)
    assert not result.unexpected_keys
    assert all(v == v for v in (rel for _, rel in merged.errors.values()))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(align="none"), ValueError, "align: expected one of"),
    (dict(align="C"), ValueError, "align: expected one of"),
    (dict(iterations=0), ValueError, "iterations: expected an int >= 1"),
    (dict(iterations=2.5), ValueError, "iterations: expected an int >= 1"),
    (dict(tol=-1.0), ValueError, "tol: expected a finite value >= 0"),
    (dict(tol=float("nan")), ValueError, "tol: expected a finite value >= 0"),
    (dict(tol="x"), TypeError, "tol: expected a non-negative float"),
    (dict(weights=[1.0, -1.0, 1.0, 1.0, 1.0]), ValueError, "weights"),
    (dict(weights=[1.0, 1.0]), ValueError, "weights"),
    (dict(reference={}), ValueError, "reference: missing key"),
])
def test_bad_input(clients, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        merge_adapters(clients, **kwargs)


def test_bad_client_states(clients):
    with pytest.raises(TypeError, match="client_states: expected a list"):
        merge_adapters(clients[0])
    with pytest.raises(ValueError, match="client_states: expected at least one"):
        merge_adapters([])
    bad = [dict(s) for s in clients]
    bad[2] = dict(bad[2], **{_key(0, "A"): torch.full((R, D), float("nan"))})
    with pytest.raises(ValueError, match=r"client_states\[2\].*finite"):
        merge_adapters(bad)
