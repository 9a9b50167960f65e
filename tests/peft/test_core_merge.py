"""merge_adapters(method="svd" | "cat" | "ties" | "tsv"): computed in core space, checked against float64 dense
references on odd sizes and mixed ranks, against peft's add_weighted_adapter, and for bad options."""
import math

import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

import fedrot_ext
from helpers.peft_models import bert_lora_config, make_round, tiny_bert
from helpers.problems import poisoned, rel_err

ALPHA = 6.0
SHAPES = [(37, 29), (1, 23)]  # (in, out) per module: odd sizes, a one-wide input


def _key(j, f):
    return f"base_model.model.layer{j}.lora_{f}.weight"


def _clients(ranks, seed, dtype=torch.float64):
    """Clients with ranks[i] on every module, each its own init (unrelated bases), plus a head."""
    g = torch.Generator().manual_seed(seed)
    states = []
    for r in ranks:
        state = {}
        for j, (d_in, d_out) in enumerate(SHAPES):
            state[_key(j, "A")] = torch.randn(r, d_in, generator=g, dtype=dtype)
            state[_key(j, "B")] = torch.randn(d_out, r, generator=g, dtype=dtype)
        state["base_model.model.head.weight"] = torch.randn(3, 4, generator=g, dtype=dtype)
        states.append(state)
    return states


def _dense_tasks(clients, j, w, rslora=False):
    """Each client's update w_i s_i B_i A_i, dense, float64."""
    scale = lambda r: ALPHA / (math.sqrt(r) if rslora else r)  # noqa: E731
    return [wi * scale(c[_key(j, "A")].shape[0]) * (c[_key(j, "B")].double() @ c[_key(j, "A")].double())
            for wi, c in zip(w, clients)]


def _update(out, j, rank, rslora=False):
    return ALPHA / (math.sqrt(rank) if rslora else rank) * (out[_key(j, "B")].double() @ out[_key(j, "A")].double())


def _truncated(M, k):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


CASES = [([3, 3, 3], None), ([1, 3, 8], None), ([2, 5], 3), ([4, 4, 4, 4], 1)]


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("ranks, rank", CASES)
def test_svd_is_the_truncated_svd_of_the_scaled_weighted_sum(ranks, rank, rslora):
    clients = _clients(ranks, seed=len(ranks) + (rank or 0))
    w = torch.arange(1.0, len(ranks) + 1, dtype=torch.float64)
    config = dict(r=max(ranks), lora_alpha=ALPHA, use_rslora=rslora)
    out = fedrot_ext.merge_adapters(clients, weights=w, method="svd", rank=rank, lora_config=config)
    k = rank or max(ranks)
    for j in range(len(SHAPES)):
        want = _truncated(sum(_dense_tasks(clients, j, w / w.sum(), rslora)), k)
        assert out[_key(j, "A")].shape[0] == k
        assert rel_err(_update(out, j, k, rslora), want) < 1e-10, (ranks, rank, j)
    torch.testing.assert_close(out["base_model.model.head.weight"],
                               sum(wi / w.sum() * c["base_model.model.head.weight"] for wi, c in zip(w, clients)))


@pytest.mark.parametrize("ranks", [[3, 3], [1, 3, 8]])
def test_cat_is_exact_at_the_summed_rank(ranks):
    clients = _clients(ranks, seed=5)
    w = torch.tensor([2.0, 1.0, 5.0][:len(ranks)], dtype=torch.float64)
    out = fedrot_ext.merge_adapters(clients, weights=w, method="cat", lora_config=dict(r=max(ranks), lora_alpha=ALPHA))
    for j in range(len(SHAPES)):
        assert out[_key(j, "A")].shape[0] == sum(ranks) and out.errors[f"base_model.model.layer{j}"] == (0.0, 0.0)
        assert rel_err(_update(out, j, sum(ranks)), sum(_dense_tasks(clients, j, w / w.sum()))) < 1e-12


def _dense_core(tasks, clients, j):
    """The dense route to the cores: orthonormal bases of the stacked factors, Q_Bᵀ ΔW_i Q_A. A core entry
    that is zero in exact arithmetic comes out as rounding here; TIES counts nonzero entries, so those are
    set to zero (below 1e-12 of the core's largest)."""
    Q_B, _ = torch.linalg.qr(torch.cat([c[_key(j, "B")].double() for c in clients], dim=1))
    Q_A, _ = torch.linalg.qr(torch.cat([c[_key(j, "A")].double() for c in clients], dim=0).mT)
    cores = [Q_B.mT @ t @ Q_A for t in tasks]
    return Q_B, Q_A, [torch.where(c.abs() > 1e-12 * c.abs().max(), c, 0.0) for c in cores]


def _ties_dense(cores, w, density):
    trimmed = []
    for t in cores:
        k = max(1, round(density * t.numel()))
        cut = t.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(t.abs() >= cut, t, 0.0))
    sign = torch.sign(sum(trimmed))
    num = sum(torch.where((torch.sign(t) == sign) & (t != 0), t, 0.0) for t in trimmed)
    den = sum(torch.where((torch.sign(t) == sign) & (t != 0), torch.full_like(t, wi), 0.0) for t, wi in zip(trimmed, w))
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def _tsv_dense(cores, per_task):
    Us, Ss, Vs = zip(*[(U[:, :per_task], S[:per_task], Vh[:per_task].mT)
                       for U, S, Vh in (torch.linalg.svd(c, full_matrices=False) for c in cores)])
    polar = lambda X: (lambda P, _, Qh: P @ Qh)(*torch.linalg.svd(X, full_matrices=False))  # noqa: E731
    return (polar(torch.cat(Us, 1)) * torch.cat(Ss)) @ polar(torch.cat(Vs, 1)).mT


@pytest.mark.parametrize("method", ["ties", "tsv"])
@pytest.mark.parametrize("ranks", [[3, 3, 3], [2, 4, 6]])
def test_interference_aware_merges_match_their_dense_float64_route(method, ranks):
    clients = _clients(ranks, seed=11)
    w = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    density, k = 0.3, max(ranks)
    kw = dict(density=density) if method == "ties" else {}
    out = fedrot_ext.merge_adapters(clients, weights=w, method=method, lora_config=dict(r=k, lora_alpha=ALPHA), **kw)
    wn = (w / w.sum()).tolist()
    for j in range(len(SHAPES)):
        tasks = [t / (ALPHA / k) for t in _dense_tasks(clients, j, wn)]  # in the output's factor units
        Q_B, Q_A, cores = _dense_core(tasks, clients, j)
        M = _ties_dense(cores, wn, density) if method == "ties" else _tsv_dense(cores, max(1, k // len(ranks)))
        want = _truncated(Q_B @ M @ Q_A.mT, k)
        got = out[_key(j, "B")] @ out[_key(j, "A")]
        assert rel_err(got, want) < 1e-9, (method, ranks, j)


def test_one_client_and_full_density_give_the_client_back():
    clients = _clients([3], seed=12)
    for method, kw in (("svd", {}), ("cat", {}), ("ties", dict(density=1.0)), ("tsv", {})):
        out = fedrot_ext.merge_adapters(clients, method=method, **kw)
        for j in range(len(SHAPES)):
            want = clients[0][_key(j, "B")] @ clients[0][_key(j, "A")]
            assert rel_err(out[_key(j, "B")] @ out[_key(j, "A")], want) < 1e-12, method


@pytest.mark.parametrize("combination, method", [("svd", "svd"), ("cat", "cat")])
def test_equals_peft_add_weighted_adapter(combination, method):
    """peft forms each layer's dense update (and, for svd, its full SVD); the core-space merge gives the same update."""
    config = bert_lora_config(modules_to_save=None, task_type=None)  # peft merges no adapters sharing a trained head
    _, states = make_round(tiny_bert(modules_to_save=None, task_type=None), 3, seed=31, noise=1.0)
    w = [0.2, 0.5, 0.3]
    model = tiny_bert(modules_to_save=None, task_type=None)
    for i, state in enumerate(states):
        if i:
            model.add_adapter(f"c{i}", config)
        set_peft_model_state_dict(model, state, adapter_name="default" if i == 0 else f"c{i}")
    model.add_weighted_adapter(["default", "c1", "c2"], w, "merged", combination_type=combination)
    theirs = get_peft_model_state_dict(model, adapter_name="merged")
    ours = fedrot_ext.merge_adapters(states, weights=w, method=method, rank=4 if method == "svd" else None, lora_config=config)
    modules, _ = fedrot_ext.parse_lora_keys(states[0])
    for m in modules:
        theirs_update = theirs[m.key_B].double() @ theirs[m.key_A].double()  # peft: scaling 1 (lora_alpha = r)
        r_out = ours[m.key_A].shape[0]
        base = 2 if "value" in m.name and "layer.1" in m.name else 4
        ours_update = config.lora_alpha / r_out * (ours[m.key_B].double() @ ours[m.key_A].double())
        if method == "cat":
            assert r_out == 3 * base
        assert rel_err(ours_update, theirs_update) < 1e-5, m.name


def test_bad_options_and_nan_clients_are_named():
    clients = _clients([2, 2], seed=13)
    cases = [
        (dict(method="mean"), "method: expected one of"),
        (dict(method="cat", rank=3), "rank: method 'cat' is exact"),
        (dict(method="svd", rank=0), "rank: expected an int >= 1"),
        (dict(method="svd", density=0.5), "density: an option of method 'ties'"),
        (dict(method="ties", density=0.0), r"density: expected a number in \(0, 1\]"),
        (dict(method="svd", align="A"), "align: options of method 'procrustes'"),
        (dict(method="tsv", iterations=3, tol=0.1), "iterations, tol: options of method 'procrustes'"),
        (dict(rank=2), "rank: not an option of method 'procrustes'"),
        (dict(method="cat"), "lora_config: required when ranks differ"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            fedrot_ext.merge_adapters(clients, **kw)
    clients[1] = dict(clients[1], **{_key(1, "B"): poisoned(clients[1][_key(1, "B")])})
    with pytest.raises(ValueError, match=r"client_states\[1\]\['base_model.model.layer1.lora_B.weight'\]: expected finite"):
        fedrot_ext.merge_adapters(clients, method="svd")
