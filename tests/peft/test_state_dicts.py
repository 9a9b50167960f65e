"""aggregate_state_dicts / align_state_dict / load_adapter on real peft models (tiny configs, random weights)."""
import pytest
import torch
from peft import get_peft_model_state_dict

import fedrot_ext
from fedrot_ext import reference as ref_impl
from fedrot_ext._types import module_align
from helpers.peft_models import (
    assert_states_equal, bert_lora_config, clone_states, live_state, load_into, make_round, stacked, tiny_bert, tiny_gpt2, to_device,
)
from helpers.problems import haar_rotations, rel_err

WEIGHTS = torch.tensor([3.0, 1.0, 2.0])


def test_keys_pair_by_module_structure():
    model = tiny_bert()
    saved = get_peft_model_state_dict(model)
    modules, others = fedrot_ext.parse_lora_keys(saved)
    paths = [m.path for m in modules]
    assert len(modules) == 5 and paths[0].endswith("embeddings.word_embeddings")
    assert [m.embedding for m in modules] == [True, False, False, False, False]
    assert all(m.adapter is None for m in modules)
    assert others == ["base_model.model.classifier.weight", "base_model.model.classifier.bias"]
    # embedding factors: A is (r, num_embeddings), B is (embedding_dim, r)
    assert saved[modules[0].key_A].shape == (4, 30) and saved[modules[0].key_B].shape == (16, 4)
    assert saved[modules[4].key_A].shape == (2, 16)  # rank_pattern
    live_modules, live_others = fedrot_ext.parse_lora_keys(model.state_dict())
    assert [m.path for m in live_modules] == paths and {m.adapter for m in live_modules} == {"default"}
    assert live_modules[1].key_A.endswith("query.lora_A.default.weight")
    assert live_modules[0].key_A.endswith("word_embeddings.lora_embedding_A.default")
    assert "base_model.model.classifier.modules_to_save.default.weight" in live_others
    # lora_bias is an ordinary tensor, not a factor
    mods, rest = fedrot_ext.parse_lora_keys(["m.lora_A.weight", "m.lora_B.weight", "m.lora_B.bias"])
    assert len(mods) == 1 and rest == ["m.lora_B.bias"]


@pytest.mark.parametrize("round,align", [(0, "none"), (1, "A"), (2, "B"), (3, "A")])
def test_fedrot_equals_fused_op_on_same_numbers(round, align):
    model = tiny_bert()
    ref, clients = make_round(model, 3, seed=round)
    before = clone_states(clients + [ref])
    out = fedrot_ext.aggregate_state_dicts(clients, reference=ref, weights=WEIGHTS, round=round, lam=0.5)
    assert_states_equal(before, clients + [ref])
    modules, _ = fedrot_ext.parse_lora_keys(clients[0])
    A, B, ref_A, ref_B = stacked(clients, modules, ref)
    for l, m in enumerate(modules):  # embedding modules align on the mirrored factor
        mode = module_align(align, m.embedding)
        want = fedrot_ext.align_and_aggregate([A[l]], [B[l]], ref_A=[ref_A[l]], ref_B=[ref_B[l]], weights=WEIGHTS, align=mode, lam=0.5)
        assert torch.equal(out[m.key_A], want.A[0]) and torch.equal(out[m.key_B], want.B[0]), m.name
    assert list(out) == list(clients[0])
    assert all(out[k].dtype == clients[0][k].dtype and out[k].shape == clients[0][k].shape for k in out)


def test_fedrot_float64_matches_reference_and_averages_other_tensors():
    model = tiny_bert(torch.float64)
    ref, clients = make_round(model, 3, seed=4)
    out = fedrot_ext.aggregate_state_dicts(clients, reference=ref, weights=WEIGHTS, round=5, schedule="AB", lam=0.7)
    modules, others = fedrot_ext.parse_lora_keys(clients[0])
    A, B, ref_A, ref_B = stacked(clients, modules, ref)
    want = ref_impl.align_and_aggregate(A, B, ref_A=ref_A, ref_B=ref_B, weights=WEIGHTS, align="AB", lam=0.7)
    for l, m in enumerate(modules):
        assert rel_err(out[m.key_A], want.A[l]) < 1e-10 and rel_err(out[m.key_B], want.B[l]) < 1e-10
    w = WEIGHTS.double() / WEIGHTS.sum()
    for k in others:  # classifier head: plain weighted average, never rotated
        assert torch.allclose(out[k], sum(wi * c[k] for wi, c in zip(w, clients)), atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_result_loads_with_set_peft_model_state_dict(dtype):
    ref, clients = make_round(tiny_bert(dtype), 3, seed=1)
    out = fedrot_ext.aggregate_state_dicts(clients, reference=ref, round=1)
    assert all(v.dtype == dtype for v in out.values())
    fresh = load_into(tiny_bert(dtype, seed=9), out)
    loaded = get_peft_model_state_dict(fresh)
    assert list(loaded) == list(out) and all(torch.equal(loaded[k], out[k]) for k in out)


def test_live_model_keys_give_the_same_aggregate():
    ref, clients = make_round(tiny_bert(), 3, seed=2)
    live_clients = [live_state(tiny_bert(), c) for c in clients]
    live_ref = live_state(tiny_bert(), ref)
    out_saved = fedrot_ext.aggregate_state_dicts(clients, reference=ref, weights=WEIGHTS, round=2)
    out_live = fedrot_ext.aggregate_state_dicts(live_clients, reference=live_ref, weights=WEIGHTS, round=2)
    assert list(out_live) == list(live_clients[0])
    saved_mods, _ = fedrot_ext.parse_lora_keys(out_saved)
    live_mods = {m.path: m for m in fedrot_ext.parse_lora_keys(out_live)[0]}
    for m in saved_mods:
        assert torch.equal(out_saved[m.key_A], out_live[live_mods[m.path].key_A])
        assert torch.equal(out_saved[m.key_B], out_live[live_mods[m.path].key_B])
    head = "base_model.model.classifier.modules_to_save.default.weight"
    assert torch.allclose(out_live[head], out_saved["base_model.model.classifier.weight"])
    tiny_bert().load_state_dict(out_live)  # strict: every key of the model, right shapes


@pytest.mark.parametrize("round", [0, 1, 2, 3])
def test_client_side_alignment_plus_fedavg_equals_server_side(round):
    ref, clients = make_round(tiny_bert(), 4, seed=10 + round)
    weights = torch.tensor([1.0, 4.0, 2.0, 3.0])
    server = fedrot_ext.aggregate_state_dicts(clients, reference=ref, weights=weights, round=round, lam=0.5)
    before = clone_states(clients + [ref])
    uploaded = [fedrot_ext.align_state_dict(c, reference=ref, round=round, lam=0.5) for c in clients]
    assert_states_equal(before, clients + [ref])
    client_side = fedrot_ext.aggregate_state_dicts(uploaded, weights=weights, method="fedit")
    assert list(client_side) == list(server)
    for k in server:
        assert rel_err(client_side[k], server[k]) < 1e-5, k
    if round > 0:  # the upload is rotated, yet every module's product B A is unchanged
        modules, _ = fedrot_ext.parse_lora_keys(clients[0])
        m = modules[1]
        assert not torch.allclose(uploaded[0][m.key_A], clients[0][m.key_A])
        assert rel_err(uploaded[0][m.key_B] @ uploaded[0][m.key_A], clients[0][m.key_B] @ clients[0][m.key_A]) < 1e-5


def test_gpt2_conv1d_fan_in_fan_out():
    model = tiny_gpt2()
    ref, clients = make_round(model, 3, seed=3)
    out = fedrot_ext.aggregate_state_dicts(clients, reference=ref, round=1, lam=1.0)
    modules, _ = fedrot_ext.parse_lora_keys(clients[0])
    c_attn = next(m for m in modules if m.path.endswith("attn.c_attn"))
    assert out[c_attn.key_A].shape == (4, 16) and out[c_attn.key_B].shape == (48, 4)  # same as for Linear
    A, B, ref_A, _ = stacked(clients, modules, ref)
    want = fedrot_ext.align_and_aggregate(A, B, ref_A=ref_A, align="A", lam=1.0)
    assert all(torch.equal(out[m.key_A], want.A[l]) for l, m in enumerate(modules))
    load_into(tiny_gpt2(seed=1), out)


@pytest.mark.parametrize("rslora", [False, True])
def test_heterogeneous_ranks_zero_padded_keep_each_clients_scaling(rslora):
    """A rank-2 client among rank-4 ones: zero-padded, and both factors multiplied by √(s_2 / s_4), so that
    its update at the aggregate's scaling s_4 is the one it trained at s_2 (s = alpha / r, or alpha / √r)."""
    config = bert_lora_config(use_rslora=rslora)
    low = tiny_bert(seed=0, r=2, rank_pattern={})
    ref, clients = make_round(tiny_bert(), 3, seed=5)  # rank 4 (2 on layer 1 value)
    _, low_clients = make_round(low, 1, seed=6)
    clients = clients[:2] + low_clients
    with pytest.raises(ValueError, match=r"lora_config: required when ranks differ \(client_states\[2\]"):
        fedrot_ext.aggregate_state_dicts(clients, method="fedit", weights=WEIGHTS)
    out = fedrot_ext.aggregate_state_dicts(clients, method="fedit", weights=WEIGHTS, lora_config=config)
    modules, _ = fedrot_ext.parse_lora_keys(clients[0])
    w = WEIGHTS / WEIGHTS.sum()
    c = (4 / 2) ** (0.25 if rslora else 0.5)
    pad_A = lambda a: torch.cat([a * c, a.new_zeros(4 - a.shape[0], a.shape[1])]) if a.shape[0] < 4 else a  # noqa: E731
    pad_B = lambda b: torch.cat([b * c, b.new_zeros(b.shape[0], 4 - b.shape[1])], 1) if b.shape[1] < 4 else b  # noqa: E731
    for m in modules:
        r_max = max(c[m.key_A].shape[0] for c in clients)
        assert out[m.key_A].shape[0] == r_max and out[m.key_B].shape[1] == r_max
        if r_max == 4:
            torch.testing.assert_close(out[m.key_A], sum(wi * pad_A(c[m.key_A]) for wi, c in zip(w, clients)), rtol=0, atol=1e-6)
            torch.testing.assert_close(out[m.key_B], sum(wi * pad_B(c[m.key_B]) for wi, c in zip(w, clients)), rtol=0, atol=1e-6)
            # The padded client alone: its update at the aggregate's scaling is the one it trained.
            alone = fedrot_ext.aggregate_state_dicts([clients[2], clients[0]], method="fedit", weights=[1, 0], lora_config=config)
            s_low, s_out = 8 / (2 ** 0.5 if rslora else 2), 8 / (4 ** 0.5 if rslora else 4)
            torch.testing.assert_close(s_out * alone[m.key_B] @ alone[m.key_A], s_low * clients[2][m.key_B] @ clients[2][m.key_A],
                                       rtol=1e-5, atol=1e-6)
    fed = fedrot_ext.aggregate_state_dicts(clients, reference=ref, round=1, lora_config=config)
    assert all(fed[k].shape == out[k].shape for k in out)
    with pytest.raises(ValueError, match=r"client_states\[2\]\['base_model.*word_embeddings.lora_embedding_A'\]: rank 2 differs"):
        fedrot_ext.aggregate_state_dicts(clients, method="fedsa")


def test_load_adapter_safetensors_and_refuses_pickle(tmp_path):
    model = tiny_bert()
    _, clients = make_round(model, 1, seed=7)
    load_into(model, clients[0])
    model.save_pretrained(tmp_path / "safe")
    loaded = fedrot_ext.load_adapter(tmp_path / "safe")
    assert sorted(loaded) == sorted(clients[0]) and all(torch.equal(loaded[k], clients[0][k]) for k in loaded)
    assert fedrot_ext.load_adapter(tmp_path / "safe" / "adapter_model.safetensors").keys() == loaded.keys()

    model.save_pretrained(tmp_path / "legacy", safe_serialization=False)
    with pytest.raises(ValueError, match=r"adapter_model\.bin: refusing to load a pickle file"):
        fedrot_ext.load_adapter(tmp_path / "legacy")
    torch.save(clients[0], tmp_path / "update.pt")
    with pytest.raises(ValueError, match="refusing to load a pickle file"):
        fedrot_ext.load_adapter(tmp_path / "update.pt")
    (tmp_path / "update.pt").rename(tmp_path / "disguised.safetensors")
    with pytest.raises(ValueError, match="refusing to load a pickle file"):
        fedrot_ext.load_adapter(tmp_path / "disguised.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        fedrot_ext.load_adapter(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        fedrot_ext.load_adapter(tmp_path / "missing")


def test_one_fused_call_for_every_module_whatever_its_mode():
    """The dispatcher sees the fused op (its per-client form) once for the 4 attention modules (two ranks) and the embedding
    (mirrored mode) together, and no other op of fedrot_ext's (counted by the profiler)."""
    ref, clients = make_round(tiny_bert(), 3, seed=12)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fedrot_ext.aggregate_state_dicts(clients, reference=ref, round=1)
    calls = [e.name for e in prof.events() if e.name.startswith("fedrot_ext::")]
    assert calls == ["fedrot_ext::align_and_aggregate_clients"]  # the clients read in place, never stacked
    modules, _ = fedrot_ext.parse_lora_keys(clients[0])
    A, B, ref_A, ref_B = stacked(clients, modules, ref)
    assert len(modules) == 5 and [m.embedding for m in modules] == [True] + [False] * 4
    want_linear = fedrot_ext.align_and_aggregate(A[1:], B[1:], ref_A=ref_A[1:], ref_B=ref_B[1:], align="A")
    want_embedding = fedrot_ext.align_and_aggregate(A[:1], B[:1], ref_A=ref_A[:1], ref_B=ref_B[:1], align="B")
    for m, a, b in zip(modules, want_embedding.A + want_linear.A, want_embedding.B + want_linear.B):
        assert torch.equal(out[m.key_A], a) and torch.equal(out[m.key_B], b), m.name
    assert out.lam == {m.name: 0.5 for m in modules}


@pytest.mark.parametrize("method", ["fedrot", "fedit"])
def test_default_round_reads_the_clients_in_place(method):
    """At default settings no client factor is stacked, copied or scanned for NaN/Inf apart from the one
    fused op call, which reads every client where it lies and screens it as it reads."""
    ref, clients = make_round(tiny_bert(), 4, seed=14)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fedrot_ext.aggregate_state_dicts(clients, reference=ref, round=1, method=method)
    names = [e.name for e in prof.events()]
    assert names.count("fedrot_ext::align_and_aggregate_clients") == 1
    modules, _ = fedrot_ext.parse_lora_keys(clients[0])
    others = len(clients[0]) - 2 * len(modules)  # the classifier head: stacked and averaged apart (small)
    assert 0 < others < len(modules)
    for op in ("aten::stack", "aten::isfinite", "aten::cat"):
        assert names.count(op) <= others + (1 if op == "aten::cat" else 0), (op, names.count(op))  # cat: the status read


def test_mixed_dtypes_and_integer_tensors():
    ref, clients = make_round(tiny_bert(), 3, seed=13)
    modules, _ = fedrot_ext.parse_lora_keys(clients[0])
    emb = modules[0]
    for state in clients + [ref]:
        state[emb.key_A], state[emb.key_B] = state[emb.key_A].double(), state[emb.key_B].double()
        state["num_batches_tracked"] = torch.tensor(7)
    out = fedrot_ext.aggregate_state_dicts(clients, reference=ref, round=1)
    assert out[emb.key_A].dtype == torch.float64 and out[modules[1].key_A].dtype == torch.float32
    A, B, ref_A, ref_B = stacked(clients, modules[:1], ref)
    want = fedrot_ext.align_and_aggregate(A, B, ref_B=ref_B, align="B")  # the embedding's mirrored mode
    assert torch.equal(out[emb.key_A], want.A[0])
    assert torch.equal(out["num_batches_tracked"], torch.tensor(7))
    clients[2]["num_batches_tracked"] = torch.tensor(8)
    with pytest.raises(ValueError, match=r"client_states\[2\]\['num_batches_tracked'\]: differs .* non-floating"):
        fedrot_ext.aggregate_state_dicts(clients, reference=ref, round=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["fedrot", "flexlora", "fedex"])
def test_cuda_matches_cpu(method):
    model = tiny_bert()
    ref, clients = make_round(model, 3, seed=14)
    kw = dict(weights=WEIGHTS, method=method, round=2, lora_config=model.peft_config["default"])
    cpu = fedrot_ext.aggregate_state_dicts(clients, reference=ref, **kw)
    gpu = fedrot_ext.aggregate_state_dicts([to_device(c, "cuda") for c in clients], reference=to_device(ref, "cuda"), **kw)
    for k in cpu:
        assert gpu[k].is_cuda and rel_err(gpu[k], cpu[k]) < 1e-4, k
    for k in cpu.base_deltas:
        assert rel_err(gpu.base_deltas[k], cpu.base_deltas[k]) < 1e-4, k
    err = fedrot_ext.state_dict_aggregation_error([to_device(c, "cuda") for c in clients], gpu, weights=WEIGHTS)
    assert all(0 <= rel < 1 for _, rel in err.values())


def _peft_init_round(seed: int, n_clients: int = 4):
    """A global adapter as peft leaves it after little training (lora_embedding_A and linear lora_B
    near zero, the other factors O(1)) and clients that are randomly rotated, noisy copies of it."""
    g = torch.Generator().manual_seed(seed)
    model = tiny_bert(seed=seed)
    ref = {k: v.double() for k, v in get_peft_model_state_dict(model).items()}
    modules, _ = fedrot_ext.parse_lora_keys(ref)
    for m in modules:
        small = m.key_A if m.embedding else m.key_B  # the zero-initialised factor
        ref[small] = 0.01 * torch.randn(ref[small].shape, generator=g, dtype=torch.float64)
    clients = []
    for _ in range(n_clients):
        state = dict(ref)
        for m in modules:
            a, b = ref[m.key_A], ref[m.key_B]
            Q = haar_rotations(1, a.shape[0], g)[0]
            state[m.key_A] = Q.T @ (a + 0.01 * torch.randn(a.shape, generator=g, dtype=torch.float64))
            state[m.key_B] = (b + 0.01 * torch.randn(b.shape, generator=g, dtype=torch.float64)) @ Q
        clients.append(state)
    return ref, clients, modules


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_embedding_module_aligned_on_mirrored_factor_beats_fedit(seed):
    """peft's reversed initialisation for embeddings: aligning lora_embedding_* on the random factor
    (B, mirrored "A") keeps the embedding's error at or below FedIT's; the unmirrored mode (align on
    the near-zero lora_embedding_A) rotates by noise and is worse."""
    ref, clients, modules = _peft_init_round(seed)
    fedrot = fedrot_ext.aggregate_state_dicts(clients, reference=ref, round=1, lam=1.0)  # round 1 aligns on "A"
    fedit = fedrot_ext.aggregate_state_dicts(clients, method="fedit")
    err_rot = fedrot_ext.state_dict_aggregation_error(clients, fedrot)
    err_it = fedrot_ext.state_dict_aggregation_error(clients, fedit)
    emb = modules[0]
    assert emb.embedding
    A, B, ref_A, ref_B = stacked(clients, [emb], ref)
    unmirrored = fedrot_ext.align_and_aggregate(A, B, ref_A=ref_A, ref_B=ref_B, align="A", lam=1.0)
    err_old = fedrot_ext.aggregation_error(A, B, agg_A=unmirrored.A, agg_B=unmirrored.B).relative[0].item()
    assert err_rot[emb.name][1] <= err_it[emb.name][1]
    assert err_rot[emb.name][1] < 0.5 * err_old
    for m in modules:
        assert err_rot[m.name][1] <= err_it[m.name][1] + 1e-12, m.name
