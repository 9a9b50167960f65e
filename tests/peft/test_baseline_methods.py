"""Every baseline method (flexlora, fedex, flora, ffa, rolora, fedsa, fedit) against its dense float64
definition, on stacked tensors and on real peft models. (The benchmark's pure-PyTorch implementations
of FedRot-LoRA: tests/bench/test_torch_impls.py.)"""
import pytest
import torch
from peft import get_peft_model_state_dict

import fedrot_ext
from helpers.peft_models import (
    assert_states_equal, bert_lora_config, clone_states, effective_weights, gpt2_lora_config, load_into,
    make_round, stacked, tiny_bert, tiny_gpt2,
)
from helpers.problems import dense_product_sum as dense_sum, factor_average, make_problem, rel_err

SHAPES = [(3, 11, 9), (3, 11, 9), (5, 7, 13), (2, 20, 6)]  # (r, in, out); two layers batch together


@pytest.mark.parametrize("rank", [None, 2])
def test_flexlora_is_the_truncated_svd_of_the_weighted_product(rank):
    p = make_problem(SHAPES, n_clients=4, dtype=torch.float64, seed=1)
    out = fedrot_ext.flexlora_aggregate(p.A, p.B, weights=p.weights, rank=rank)
    for l, P in enumerate(dense_sum(p.A, p.B, p.weights)):
        k = rank or SHAPES[l][0]
        U, S, Vh = torch.linalg.svd(P)
        assert out.A[l].shape == (k, P.shape[1]) and out.B[l].shape == (P.shape[0], k)
        assert rel_err(out.B[l] @ out.A[l], U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]) < 1e-10
        assert torch.allclose(out.A[l] @ out.A[l].T, torch.eye(k, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(out.B[l], P @ out.A[l].T, atol=1e-12)  # the singular values sit in B


def test_flexlora_zero_update_keeps_A_alive():
    p = make_problem(SHAPES, n_clients=3, dtype=torch.float64, seed=2)
    zero_B = [torch.zeros_like(b) for b in p.B]  # round 0 of peft: B = 0 on every client
    out = fedrot_ext.flexlora_aggregate(p.A, zero_B)
    for a, b in zip(out.A, out.B):
        assert torch.equal(b, torch.zeros_like(b))
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-12)


def test_flexlora_and_gram_metric_never_form_the_dense_matrix():
    # A dense 300k x 300k float32 matrix would need 360 GB: only the QR / Gram route fits.
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(2, 2, 300_000, generator=g)]
    B = [torch.randn(2, 300_000, 2, generator=g)]
    out = fedrot_ext.flexlora_aggregate(A, B)
    assert out.A[0].shape == (2, 300_000) and torch.isfinite(out.B[0]).all()
    err = fedrot_ext.aggregation_error(A, B, agg_A=out.A, agg_B=out.B)
    assert err.relative.shape == (1,) and 0 < float(err.relative[0]) < 1


def test_fedex_residual_and_flora_product_match_dense_definitions():
    p = make_problem(SHAPES, n_clients=5, dtype=torch.float64, seed=3)
    P = dense_sum(p.A, p.B, p.weights)
    avg_A, avg_B = factor_average(p.A, p.B, p.weights)
    for l, res in enumerate(fedrot_ext.fedex_residual(p.A, p.B, weights=p.weights)):
        assert rel_err(res, P[l] - avg_B[l] @ avg_A[l]) < 1e-10
    other_A, other_B = [a[0] for a in p.A], [b[0] for b in p.B]
    for l, res in enumerate(fedrot_ext.fedex_residual(p.A, p.B, agg_A=other_A, agg_B=other_B, weights=p.weights)):
        assert rel_err(res, P[l] - other_B[l] @ other_A[l]) < 1e-10
    for l, prod in enumerate(fedrot_ext.weighted_product_sum(p.A, p.B, weights=p.weights)):
        assert rel_err(prod, P[l]) < 1e-12


def _round_of(kind):
    if kind.startswith("bert"):  # Linear + Embedding (transposed base layout) + rank_pattern + alpha_pattern
        extra = dict(alpha_pattern={"layer.0.attention.self.query": 16}, use_rslora=kind == "bert_rslora")
        build = lambda seed=0: tiny_bert(torch.float64, seed=seed, **extra)  # noqa: E731
    else:  # GPT-2 Conv1D, fan_in_fan_out=True
        build = lambda seed=0: tiny_gpt2(torch.float64, seed=seed)  # noqa: E731
    ref, clients = make_round(build(), 3, seed=11)
    return build, ref, clients


@pytest.mark.parametrize("kind", ["bert", "bert_rslora", "gpt2"])
@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_dense_methods_fold_the_exact_average_update_into_the_base(kind, method):
    build, ref, clients = _round_of(kind)
    w = torch.tensor([1.0, 2.0, 5.0])
    base = {k: v.clone() for k, v in effective_weights(build()).items()}  # B = 0: the base weights
    client_eff = [effective_weights(load_into(build(), c)) for c in clients]  # peft's own scaling and layout
    ideal = {k: base[k] + sum(wi / w.sum() * (e[k] - base[k]) for wi, e in zip(w, client_eff)) for k in base}

    server = build()
    before = clone_states(clients)
    out = fedrot_ext.aggregate_state_dicts(clients, weights=w, method=method, lora_config=server.peft_config["default"])
    assert_states_equal(before, clients)
    assert set(out.base_deltas) == set(base)
    fedrot_ext.fold_into_base(server, out.base_deltas)
    load_into(server, out)
    for k, eff in effective_weights(server).items():
        assert rel_err(eff, ideal[k]) < 1e-12, k
    modules, _ = fedrot_ext.parse_lora_keys(clients[0])
    for m in modules:
        if method == "flora":
            assert torch.equal(out[m.key_B], torch.zeros_like(out[m.key_B]))
        else:
            avg_A, avg_B = factor_average(*stacked(clients, [m]), w)
            assert rel_err(out[m.key_A], avg_A[0]) < 1e-12 and rel_err(out[m.key_B], avg_B[0]) < 1e-12


def test_conv1d_residual_without_fan_in_fan_out_is_refused():
    build, _, clients = _round_of("gpt2")
    wrong = gpt2_lora_config(fan_in_fan_out=False)
    out = fedrot_ext.aggregate_state_dicts(clients, method="fedex", lora_config=wrong)
    with pytest.raises(ValueError, match=r"base_deltas\['base_model.model.transformer.h.0.attn.c_attn'\].*fan_in_fan_out"):
        fedrot_ext.fold_into_base(build(), out.base_deltas)
    right = fedrot_ext.aggregate_state_dicts(clients, method="fedex", lora_config=gpt2_lora_config())
    as_json = fedrot_ext.aggregate_state_dicts(clients, method="fedex", lora_config=gpt2_lora_config().to_dict())
    for k, delta in right.base_deltas.items():  # adapter_config.json's dict works like the LoraConfig
        assert torch.equal(as_json.base_deltas[k], delta) and torch.equal(out.base_deltas[k], delta.T)
    with pytest.raises(ValueError, match=r"lora_config: required for method 'flora'"):
        fedrot_ext.aggregate_state_dicts(clients, method="flora")
    with pytest.raises(ValueError, match=r"lora_config: rank 8 for module '.*word_embeddings'"):
        fedrot_ext.aggregate_state_dicts(make_round(tiny_bert(), 2)[1], method="fedex", lora_config=bert_lora_config(r=8))


def _shared_A_clients(seed=0):
    ref, clients = make_round(tiny_bert(torch.float64), 3, seed=seed)
    modules, _ = fedrot_ext.parse_lora_keys(ref)
    for c in clients:
        for m in modules:
            c[m.key_A] = ref[m.key_A].clone()  # frozen at the shared value
    return ref, clients, modules


def test_ffa_averages_B_and_keeps_the_frozen_A():
    ref, clients, modules = _shared_A_clients()
    w = torch.tensor([2.0, 1.0, 1.0])
    out = fedrot_ext.aggregate_state_dicts(clients, weights=w, method="ffa")
    for m in modules:
        assert torch.equal(out[m.key_A], ref[m.key_A])
        _, avg_B = factor_average(*stacked(clients, [m]), w)
        assert rel_err(out[m.key_B], avg_B[0]) < 1e-12
    clients[1][modules[2].key_A] = clients[1][modules[2].key_A] + 1e-3
    with pytest.raises(ValueError, match=r"client_states\[1\]\['.*layer.0.attention.self.value.lora_A.weight'\]: differs .* 'ffa' keeps lora_A frozen"):
        fedrot_ext.aggregate_state_dicts(clients, method="ffa")


def test_set_trainable_factor_freezes_one_factor_only():
    model = tiny_bert()
    frozen = fedrot_ext.set_trainable_factor(model, "B")  # FFA-LoRA
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(frozen) == 5 and all("lora_A" in n or "lora_embedding_A" in n for n in frozen)
    assert trainable and all("lora_B" in n or "lora_embedding_B" in n or "classifier" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    fedrot_ext.set_trainable_factor(model, fedrot_ext.rolora_trained_factor(1))  # RoLoRA round 1: A
    assert all(p.requires_grad == ("_A" in n) for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="factor: expected"):
        fedrot_ext.set_trainable_factor(model, "C")
    with pytest.raises(ValueError, match="no LoRA factor parameters"):
        fedrot_ext.set_trainable_factor(torch.nn.Linear(2, 2), "A")


def test_rolora_averages_the_trained_factor_of_the_round():
    ref, clients, modules = _shared_A_clients(seed=1)  # A frozen: a round where B trains
    out = fedrot_ext.aggregate_state_dicts(clients, method="rolora", round=0)  # round 0 trains B
    for m in modules:
        assert torch.equal(out[m.key_A], ref[m.key_A])
        assert rel_err(out[m.key_B], sum(c[m.key_B] for c in clients) / 3) < 1e-12
    with pytest.raises(ValueError, match=r"'rolora' keeps lora_B frozen in round 1"):
        fedrot_ext.aggregate_state_dicts(clients, method="rolora", round=1)
    out = fedrot_ext.aggregate_state_dicts(clients, method="rolora", round=1, initial="A")  # round 1 then trains B
    assert all(torch.equal(out[m.key_A], ref[m.key_A]) for m in modules)
    with pytest.raises(ValueError, match="round: required for RoLoRA"):
        fedrot_ext.aggregate_state_dicts(clients, method="rolora")


def test_fedsa_shares_A_and_leaves_B_personal():
    ref, clients = make_round(tiny_bert(), 3, seed=4)
    out = fedrot_ext.aggregate_state_dicts(clients, method="fedsa")
    modules, others = fedrot_ext.parse_lora_keys(clients[0])
    assert set(out) == {m.key_A for m in modules} | set(others)
    for m in modules:
        assert rel_err(out[m.key_A], sum(c[m.key_A] for c in clients) / 3) < 1e-6
    client_model = load_into(tiny_bert(), clients[1])
    load_into(client_model, out)
    now = get_peft_model_state_dict(client_model)
    for m in modules:
        assert torch.equal(now[m.key_B], clients[1][m.key_B]) and torch.equal(now[m.key_A], out[m.key_A])


def test_flexlora_on_state_dicts_is_exact_for_mixed_ranks():
    """s_out B̄ Ā is the rank-k truncation of Σ w_i s_i B_i A_i: each client at its own LoRA scaling s_i = alpha / r_i."""
    _, clients = make_round(tiny_bert(torch.float64), 2, seed=5)
    _, low = make_round(tiny_bert(torch.float64, r=2, rank_pattern={}), 1, seed=6)
    clients = clients + low
    w = torch.tensor([1.0, 1.0, 2.0])
    out = fedrot_ext.aggregate_state_dicts(clients, weights=w, method="flexlora", lora_config=bert_lora_config())
    modules, _ = fedrot_ext.parse_lora_keys(clients[0])
    for m in modules:
        k = max(c[m.key_A].shape[0] for c in clients)
        P = sum(wi / w.sum() * (k / c[m.key_A].shape[0]) * c[m.key_B] @ c[m.key_A] for wi, c in zip(w, clients))  # s_i / s_out
        U, S, Vh = torch.linalg.svd(P)
        assert out[m.key_A].shape[0] == k
        assert rel_err(out[m.key_B] @ out[m.key_A], U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]) < 1e-10


def test_fedit_is_the_plain_factor_average():
    _, clients = make_round(tiny_gpt2(torch.float64), 4, seed=8)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    out = fedrot_ext.aggregate_state_dicts(clients, weights=w, method="fedit", round=3, lam=1.0)  # round/lam ignored
    for k in out:
        assert rel_err(out[k], sum(wi / w.sum() * c[k] for wi, c in zip(w, clients))) < 1e-12


@pytest.mark.parametrize("rslora", [False, True])
def test_flora_base_deltas_keep_each_clients_scaling_for_mixed_ranks(rslora):
    """flora's base_deltas is Σ w_i s_i B_i A_i with s_i = alpha / r_i (alpha / √r_i with rsLoRA), in the base layout."""
    config = bert_lora_config(use_rslora=rslora)
    _, clients = make_round(tiny_bert(torch.float64), 2, seed=9)
    _, low = make_round(tiny_bert(torch.float64, r=2, rank_pattern={}), 1, seed=10)
    clients = clients + low
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    out = fedrot_ext.aggregate_state_dicts(clients, weights=w, method="flora", lora_config=config)
    modules, _ = fedrot_ext.parse_lora_keys(clients[0])
    for m in modules:
        s = lambda r: 8 / (r ** 0.5 if rslora else r)  # noqa: E731
        want = sum(wi / w.sum() * s(c[m.key_A].shape[0]) * c[m.key_B] @ c[m.key_A] for wi, c in zip(w, clients))
        got = out.base_deltas[m.path]
        assert rel_err(got.mT if m.embedding else got, want) < 1e-12, m.name
