"""on_invalid / clip_norm / noise_multiplier of aggregate_state_dicts, for every method, on real tiny peft models."""
import math

import pytest
import torch

import fedrot_ext
from helpers.peft_models import (
    HEAD, KA, KB, assert_same_state as assert_same, assert_states_equal, clone_states, make_round, tiny_bert, to_device,
)
from helpers.problems import poisoned as _poisoned, rel_err
ROUND = 1  # fedrot aligns on A; rolora (initial "B") trains A, so B is frozen
FROZEN = {"ffa": "A", "rolora": "B"}
WEIGHTS = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0])


def setup(method, n_clients=5, dtype=torch.float32, seed=0):
    """A round for `method`: the frozen factor of ffa/rolora is the reference's on every client."""
    model = tiny_bert(dtype)
    ref, clients = make_round(model, n_clients, seed=seed)
    modules, _ = fedrot_ext.parse_lora_keys(ref)
    for m in modules:
        for c in clients:
            if method in FROZEN:
                key = m.key_A if FROZEN[method] == "A" else m.key_B
                c[key] = ref[key].clone()
    kw = dict(reference=ref, method=method, round=ROUND, lora_config=model.peft_config["default"])
    return ref, clients, kw, modules


def lora_scaling(module):
    """lora_alpha / r of tiny_bert's modules: alpha 8, r 4 (r 2 for layer 1's value, rank_pattern)."""
    return 4.0 if "layer.1.attention.self.value" in module.path else 2.0


def poisoned(t, value=math.nan):
    return _poisoned(t, value, position=2)


@pytest.mark.parametrize("method", fedrot_ext.METHODS)
def test_skip_drops_invalid_clients_and_equals_aggregating_without_them(method):
    ref, clients, kw, _ = setup(method)
    clients[1][KB] = poisoned(clients[1][KB])  # a LoRA factor (frozen for rolora)
    clients[3][HEAD] = poisoned(clients[3][HEAD], math.inf)  # a non-LoRA tensor
    before = clone_states(clients + [ref])
    out = fedrot_ext.aggregate_state_dicts(clients, weights=WEIGHTS, on_invalid="skip", **kw)
    assert_states_equal(before, clients + [ref])
    assert [i for i, _ in out.dropped] == [1, 3]
    assert out.dropped[0][1] == f"client_states[1][{KB!r}] holds NaN or Inf"
    assert out.dropped[1][1] == f"client_states[3][{HEAD!r}] holds NaN or Inf"
    kept = [0, 2, 4]
    want = fedrot_ext.aggregate_state_dicts([clients[i] for i in kept], weights=WEIGHTS[kept], **kw)
    assert want.dropped == ()
    assert_same(out, want)


@pytest.mark.parametrize("method", ["fedrot", "flexlora"])
def test_skip_then_clip_and_noise_equal_the_kept_clients(method):
    ref, clients, kw, _ = setup(method, n_clients=4, seed=1)
    clients[0][KA] = poisoned(clients[0][KA])
    policy = dict(clip_norm=0.5, noise_multiplier=0.3)
    out = fedrot_ext.aggregate_state_dicts(clients, on_invalid="skip", generator=torch.Generator().manual_seed(3), **policy, **kw)
    want = fedrot_ext.aggregate_state_dicts(clients[1:], generator=torch.Generator().manual_seed(3), **policy, **kw)
    assert [i for i, _ in out.dropped] == [0]
    assert_same(out, want)


def test_skip_a_dropped_client_no_longer_sets_the_rank():
    _, low = make_round(tiny_bert(r=2, rank_pattern={}), 2, seed=2)
    _, high = make_round(tiny_bert(), 1, seed=3)
    high[0][KA] = poisoned(high[0][KA])
    out = fedrot_ext.aggregate_state_dicts(low + high, method="fedit", on_invalid="skip")
    want = fedrot_ext.aggregate_state_dicts(low, method="fedit")
    assert out[KA].shape == (2, 16) and [i for i, _ in out.dropped] == [2]
    assert_same(out, want)


@pytest.mark.parametrize("method", ["fedrot", "flexlora", "ffa"])
def test_raise_names_the_first_invalid_client_and_key(method):
    ref, clients, kw, _ = setup(method)
    clients[4][KB] = poisoned(clients[4][KB])
    clients[2][HEAD] = poisoned(clients[2][HEAD])
    before = clone_states(clients + [ref])
    pattern = rf"client_states\[2\]\['{HEAD}'\]: expected finite values, found NaN or Inf \(pass on_invalid='skip'"
    with pytest.raises(ValueError, match=pattern):
        fedrot_ext.aggregate_state_dicts(clients, **kw)
    assert_states_equal(before, clients + [ref])


def test_skip_with_nothing_left_raises():
    ref, clients, kw, _ = setup("fedrot", n_clients=2)
    bad = [dict(c, **{KA: poisoned(c[KA])}) for c in clients]
    with pytest.raises(ValueError, match=r"client_states: all 2 clients hold NaN or Inf"):
        fedrot_ext.aggregate_state_dicts(bad, on_invalid="skip", **kw)
    clients[0][KA] = poisoned(clients[0][KA])
    with pytest.raises(ValueError, match=r"weights: every valid client has weight 0"):
        fedrot_ext.aggregate_state_dicts(clients, weights=[1.0, 0.0], on_invalid="skip", **kw)


def dense_norms(clients, modules):
    """‖ΔW_i‖_F over all modules, by forming every B A."""
    return torch.stack([sum((c[m.key_B] @ c[m.key_A]).norm() ** 2 for m in modules).sqrt() for c in clients])


def scaled(clients, modules, scales, exponents):
    out = clone_states(clients)
    for c, s in zip(out, scales):
        for m in modules:
            c[m.key_A] = c[m.key_A] * s ** exponents[0]
            c[m.key_B] = c[m.key_B] * s ** exponents[1]
    return out


EXPONENTS = {"ffa": (0.0, 1.0), "rolora": (1.0, 0.0), "fedsa": (1.0, 0.0)}  # rolora trains A in ROUND


@pytest.mark.parametrize("method", fedrot_ext.METHODS)
def test_clip_equals_aggregating_clients_clipped_by_hand(method):
    ref, clients, kw, modules = setup(method, dtype=torch.float64, seed=4)
    norms = dense_norms(clients, modules)
    clip = float(norms.sort().values[1])  # the smallest update passes, the others are clipped
    scales = (clip / norms).clamp(max=1.0)
    before = clone_states(clients + [ref])
    out = fedrot_ext.aggregate_state_dicts(clients, weights=WEIGHTS, clip_norm=clip, **kw)
    assert_states_equal(before, clients + [ref])
    by_hand = scaled(clients, modules, scales, EXPONENTS.get(method, (0.5, 0.5)))
    want = fedrot_ext.aggregate_state_dicts(by_hand, weights=WEIGHTS, **kw)
    for k in want:
        assert rel_err(out[k], want[k]) < 1e-12, k
    for k in want.base_deltas:
        assert rel_err(out.base_deltas[k], want.base_deltas[k]) < 1e-12, k
    loose = fedrot_ext.aggregate_state_dicts(clients, weights=WEIGHTS, clip_norm=2 * float(norms.max()), **kw)
    assert_same(loose, fedrot_ext.aggregate_state_dicts(clients, weights=WEIGHTS, **kw))


def total_update_norm(out, modules, scalings=None):
    """Dense ‖ΔW‖_F over all modules of an aggregate: B̄ Ā, plus base_deltas / s_m if any."""
    total = 0.0
    for m in modules:
        delta = out[m.key_B] @ out[m.key_A]
        if m.path in out.base_deltas:
            base = out.base_deltas[m.path]
            delta = delta + (base.mT if base.shape != delta.shape else base) / scalings[m.path]
        total += float(delta.norm()) ** 2
    return math.sqrt(total)


@pytest.mark.parametrize("method", ["fedrot", "fedit", "flexlora", "fedex", "flora"])
def test_clip_bounds_the_dense_update(method):
    ref, clients, kw, modules = setup(method, dtype=torch.float64, seed=5)
    scalings = {m.path: lora_scaling(m) for m in modules}
    one = fedrot_ext.aggregate_state_dicts(clients[:1], clip_norm=0.25, **kw)  # one client: exactly the clip
    assert math.isclose(total_update_norm(one, modules, scalings), 0.25, rel_tol=1e-10)
    if method in ("flexlora", "fedex", "flora"):  # exact-product methods: Σ w_i s_i ΔW_i, so ≤ clip
        many = fedrot_ext.aggregate_state_dicts(clients, weights=WEIGHTS, clip_norm=0.25, **kw)
        assert total_update_norm(many, modules, scalings) <= 0.25 * (1 + 1e-12)


def test_clip_tames_a_hostile_client_whose_product_would_overflow():
    ref, clients, kw, modules = setup("fedex", n_clients=3, seed=6)
    for m in modules:  # finite float32 factors whose product B A overflows float32
        clients[1][m.key_A] = clients[1][m.key_A] * 1e25
        clients[1][m.key_B] = clients[1][m.key_B] * 1e25
    out = fedrot_ext.aggregate_state_dicts(clients, clip_norm=1.0, **kw)
    assert all(torch.isfinite(t).all() for t in list(out.values()) + list(out.base_deltas.values()))
    scalings = {m.path: lora_scaling(m) for m in modules}
    assert total_update_norm(out, modules, scalings) <= 1.0 + 1e-4


def noise_of(noisy, clean, keys):
    return torch.cat([(noisy[k].double() - clean[k].double()).flatten() for k in keys])


def test_noise_is_seeded_and_calibrated_on_the_aggregated_factors():
    ref, clients, kw, modules = setup("fedit", n_clients=3, dtype=torch.float64, seed=7)
    policy = dict(weights=[3.0, 1.0, 2.0], clip_norm=2.0, **kw)
    clean = fedrot_ext.aggregate_state_dicts(clients, **policy)
    noisy = [fedrot_ext.aggregate_state_dicts(clients, noise_multiplier=0.5, generator=torch.Generator().manual_seed(s), **policy)
             for s in (11, 11, 12)]
    assert_same(noisy[0], noisy[1])
    assert not torch.equal(noisy[0][KA], noisy[2][KA])
    factor_keys = [k for m in modules for k in (m.key_A, m.key_B)]
    residual = noise_of(noisy[0], clean, factor_keys)
    sigma = 0.5 * 2.0 * 0.5  # noise_multiplier · clip_norm · max_i w_i
    assert abs(float(residual.std()) / sigma - 1) < 0.12 and abs(float(residual.mean())) < 4 * sigma / residual.numel() ** 0.5
    for k in clean:
        if k not in factor_keys:  # the classifier head is neither clipped nor noised
            assert torch.equal(noisy[0][k], clean[k])


@pytest.mark.parametrize("method", ["ffa", "rolora", "fedsa"])
def test_noise_spares_copied_and_personal_factors(method):
    ref, clients, kw, modules = setup(method, n_clients=3, seed=8)
    policy = dict(clip_norm=1.0, **kw)
    clean = fedrot_ext.aggregate_state_dicts(clients, **policy)
    noisy = fedrot_ext.aggregate_state_dicts(clients, noise_multiplier=1.0, generator=torch.Generator().manual_seed(0), **policy)
    spared = {"ffa": "A", "rolora": "B", "fedsa": None}[method]
    for m in modules:
        assert not torch.equal(noisy[m.key_A if spared != "A" else m.key_B], clean[m.key_A if spared != "A" else m.key_B])
        if spared is not None:
            key = m.key_A if spared == "A" else m.key_B
            assert torch.equal(noisy[key], clean[key])
    if method == "fedsa":
        assert all(m.key_B not in noisy for m in modules)


@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_noise_on_dense_methods_is_calibrated_on_the_total_update(method):
    """fedex's residual absorbs its factors' noise: the total update is the clean one plus σ·s_m noise."""
    ref, clients, kw, modules = setup(method, n_clients=3, dtype=torch.float64, seed=9)
    policy = dict(weights=[3.0, 1.0, 2.0], clip_norm=2.0, **kw)
    clean = fedrot_ext.aggregate_state_dicts(clients, **policy)
    noisy = fedrot_ext.aggregate_state_dicts(clients, noise_multiplier=0.5, generator=torch.Generator().manual_seed(5), **policy)
    sigma = 0.5 * 2.0 * 0.5
    parts = []
    for m in modules:
        s = lora_scaling(m)
        def total(out):
            base = out.base_deltas[m.path]
            product = out[m.key_B] @ out[m.key_A] * s
            return base + (product.mT if product.shape != base.shape else product)
        parts.append(((total(noisy) - total(clean)) / s).flatten())
    residual = torch.cat(parts)
    assert abs(float(residual.std()) / sigma - 1) < 0.12
    if method == "flora":
        assert all(torch.equal(noisy[m.key_B], torch.zeros_like(noisy[m.key_B])) for m in modules)


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(on_invalid="ignore"), r"on_invalid: expected 'raise' or 'skip'"),
        (dict(clip_norm=0.0), r"clip_norm: expected a positive finite number"),
        (dict(clip_norm=math.nan), r"clip_norm: expected a positive finite number"),
        (dict(clip_norm="1"), r"clip_norm: expected a positive finite number"),
        (dict(noise_multiplier=0.1), r"noise_multiplier: requires clip_norm"),
        (dict(noise_multiplier=math.inf, clip_norm=1.0), r"noise_multiplier: expected a finite number >= 0"),
    ],
)
def test_policy_arguments_are_checked(kw, pattern):
    ref, clients, base_kw, _ = setup("flexlora", n_clients=2)
    before = clone_states(clients + [ref])
    with pytest.raises(ValueError, match=pattern):
        fedrot_ext.aggregate_state_dicts(clients, **base_kw, **kw)
    assert_states_equal(before, clients + [ref])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["fedrot", "flexlora", "fedex"])
def test_cuda_skip_clip_and_noise_match_cpu_and_repeat_bitwise(method):
    ref, clients, kw, _ = setup(method)
    clients[1][KB] = poisoned(clients[1][KB])
    to_cuda = lambda s: to_device(s, "cuda")  # noqa: E731
    policy = dict(weights=WEIGHTS, on_invalid="skip", clip_norm=0.5)
    cpu = fedrot_ext.aggregate_state_dicts(clients, **policy, **kw)
    kw["reference"] = to_cuda(ref)
    gpu = [fedrot_ext.aggregate_state_dicts([to_cuda(c) for c in clients], **policy, **kw) for _ in range(2)]
    assert gpu[0].dropped == cpu.dropped
    for k in cpu:
        assert gpu[0][k].is_cuda and rel_err(gpu[0][k], cpu[k]) < 1e-4, k
    for k in cpu.base_deltas:
        assert rel_err(gpu[0].base_deltas[k], cpu.base_deltas[k]) < 1e-4, k
    assert_same(gpu[0], gpu[1])
    noisy = [fedrot_ext.aggregate_state_dicts([to_cuda(c) for c in clients], noise_multiplier=0.1,
                                              generator=torch.Generator("cuda").manual_seed(0), **policy, **kw)
             for _ in range(2)]
    assert_same(noisy[0], noisy[1])


@pytest.mark.parametrize("method", ["fedrot", "fedit", "fedsa"])
def test_a_nonfinite_client_of_weight_zero_is_still_found(method):
    """The default path has no NaN/Inf pre-scan: the fused op's status finds the client (0 · NaN is NaN),
    then the screening path names it, as the pre-scan did."""
    ref, clients, kw, _ = setup(method, n_clients=3, seed=5)
    clients[1][KA] = poisoned(clients[1][KA], math.inf)
    weights = [1.0, 0.0, 2.0]
    with pytest.raises(ValueError, match=rf"client_states\[1\]\['{KA}'\]: expected finite values"):
        fedrot_ext.aggregate_state_dicts(clients, weights=weights, **kw)
    out = fedrot_ext.aggregate_state_dicts(clients, weights=weights, on_invalid="skip", **kw)
    assert [i for i, _ in out.dropped] == [1]
    assert_same(out, fedrot_ext.aggregate_state_dicts([clients[0], clients[2]], weights=[1.0, 2.0], **kw))


def test_a_nonfinite_reference_is_named_without_a_pre_scan():
    ref, clients, kw, modules = setup("fedrot", n_clients=3, seed=6)
    key = next(m.key_A for m in modules if not m.embedding)
    kw["reference"] = dict(ref, **{key: poisoned(ref[key])})
    with pytest.raises(ValueError, match=rf"reference\['{key}'\]: expected finite values"):
        fedrot_ext.aggregate_state_dicts(clients, **kw)
