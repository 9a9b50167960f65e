"""aggregation_error (Gram route) against the dense definition E = Σ w_i B_i A_i − B̄ Ā."""
import pytest
import torch

import fedrot_ext
from helpers.peft_models import assert_states_equal, clone_states, make_round, stacked, tiny_bert
from helpers.problems import dense_product_sum, make_problem

SHAPES = [(4, 13, 9), (4, 13, 9), (3, 8, 21), (6, 30, 5)]


def dense_error(A, B, agg_A, agg_B, w):
    absolute, relative = [], []
    for P, ga, gb in zip(dense_product_sum(A, B, w), agg_A, agg_B):
        E = P - gb.double() @ ga.double()
        absolute.append(E.norm())
        relative.append(E.norm() / P.norm())
    return torch.stack(absolute), torch.stack(relative)


@pytest.mark.parametrize("aggregate", ["fedit", "fedrot", "flexlora_rank2"])
def test_matches_dense_definition_float64(aggregate):
    p = make_problem(SHAPES, n_clients=5, dtype=torch.float64, seed=3)
    if aggregate == "fedit":
        out = fedrot_ext.align_and_aggregate(p.A, p.B, weights=p.weights, align="none")
        got = fedrot_ext.aggregation_error(p.A, p.B, weights=p.weights)  # default: FedIT's average
    else:
        if aggregate == "fedrot":
            out = fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, weights=p.weights, align="A", lam=1.0)
        else:
            out = fedrot_ext.flexlora_aggregate(p.A, p.B, weights=p.weights, rank=2)  # another rank than the clients'
        got = fedrot_ext.aggregation_error(p.A, p.B, agg_A=out.A, agg_B=out.B, weights=p.weights)
    absolute, relative = dense_error(p.A, p.B, out.A, out.B, p.weights)
    assert got.absolute.dtype == torch.float64 and got.absolute.shape == (len(SHAPES),)
    torch.testing.assert_close(got.absolute, absolute, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.relative, relative, rtol=1e-9, atol=1e-12)


def test_float32_inputs_and_small_errors_are_resolved():
    p = make_problem(SHAPES, n_clients=4, dtype=torch.float32, seed=4, noise=0.0)
    g = torch.Generator().manual_seed(p.seed)
    A = [a[:1].expand_as(a) + 1e-4 * torch.randn(a.shape, generator=g) for a in p.A]  # nearly identical clients
    B = [b[:1].expand_as(b) for b in p.B]
    got = fedrot_ext.aggregation_error(A, B, weights=p.weights)
    out = fedrot_ext.align_and_aggregate(A, B, weights=p.weights, align="none")
    absolute, relative = dense_error(A, B, out.A, out.B, p.weights)
    assert float(relative.max()) < 1e-4
    torch.testing.assert_close(got.relative, relative, rtol=1e-6, atol=0)


def test_zero_updates():
    p = make_problem(SHAPES[:2], n_clients=3, dtype=torch.float32, seed=5)
    zero_B = [torch.zeros_like(b) for b in p.B]
    got = fedrot_ext.aggregation_error(p.A, zero_B)
    assert torch.equal(got.absolute, torch.zeros(2, dtype=torch.float64)) and torch.equal(got.relative, got.absolute)
    ones_B = [torch.ones(b.shape[1:]) for b in p.B]
    got = fedrot_ext.aggregation_error(p.A, zero_B, agg_A=[a[0] for a in p.A], agg_B=ones_B)
    assert torch.isinf(got.relative).all() and (got.absolute > 0).all()


def test_state_dicts_alignment_cuts_the_error():
    ref, clients = make_round(tiny_bert(), 4, seed=6, noise=0.05)
    before = clone_states(clients + [ref])
    fedit = fedrot_ext.aggregate_state_dicts(clients, method="fedit")
    fedrot = fedrot_ext.aggregate_state_dicts(clients, reference=ref, round=1, lam=1.0)
    err_fedit = fedrot_ext.state_dict_aggregation_error(clients, fedit)
    err_fedrot = fedrot_ext.state_dict_aggregation_error(clients, fedrot)
    assert_states_equal(before, clients + [ref])
    modules, _ = fedrot_ext.parse_lora_keys(clients[0])
    assert list(err_fedit) == [m.name for m in modules]
    for name in err_fedit:  # clients are rotated copies: alignment removes most of the error
        assert err_fedrot[name][1] < 0.2 * err_fedit[name][1], name
    # same numbers as the stacked API
    A, B = stacked(clients, modules)
    from_stacks = fedrot_ext.aggregation_error(A, B, agg_A=[fedrot[m.key_A] for m in modules], agg_B=[fedrot[m.key_B] for m in modules])
    assert [v[0] for v in err_fedrot.values()] == pytest.approx(from_stacks.absolute.tolist(), rel=1e-9)
    del fedrot[modules[2].key_B]
    with pytest.raises(ValueError, match=r"aggregated: missing key '.*layer.0.attention.self.value.lora_B.weight'"):
        fedrot_ext.state_dict_aggregation_error(clients, fedrot)


def test_bad_aggregate_arguments_are_named():
    p = make_problem(SHAPES[:2], n_clients=2, seed=7)
    with pytest.raises(ValueError, match="agg_A/agg_B: pass both"):
        fedrot_ext.aggregation_error(p.A, p.B, agg_A=p.ref_A)
    with pytest.raises(ValueError, match=r"agg_B\[1\]: expected shape \(9, 4\)"):
        fedrot_ext.aggregation_error(p.A, p.B, agg_A=p.ref_A, agg_B=[p.ref_B[0], p.ref_B[1][:, :2]])
    bad = [p.ref_A[0], p.ref_A[1].clone()]
    bad[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"agg_A\[1\]: expected finite values"):
        fedrot_ext.aggregation_error(p.A, p.B, agg_A=bad, agg_B=p.ref_B)


def test_chunked_metric_equals_one_chunk(monkeypatch):
    """The state-dict metric forms float64 terms a chunk of modules at a time: any chunking gives the same errors."""
    from fedrot_ext import metrics

    reference, clients = make_round(tiny_bert(torch.bfloat16), 4, seed=21)
    agg = fedrot_ext.aggregate_state_dicts(clients, reference=reference, round=1)
    monkeypatch.setattr(metrics, "CHUNK_BYTES", 1 << 40)
    whole = fedrot_ext.state_dict_aggregation_error(clients, agg)
    monkeypatch.setattr(metrics, "CHUNK_BYTES", 1)  # one module per chunk
    modules = fedrot_ext.parse_lora_keys(clients[0].keys())[0]
    A, B = stacked(clients, modules)
    assert len(metrics._layer_chunks(A, B, [agg[m.key_A] for m in modules])) == len(whole) > 1
    per_module = fedrot_ext.state_dict_aggregation_error(clients, agg)
    for name, (absolute, relative) in whole.items():
        assert per_module[name] == pytest.approx((absolute, relative), rel=1e-12), name


MEMORY_PROBE = """
import json, resource, torch
import fedrot_ext
torch.set_num_threads(1)
g = torch.Generator().manual_seed(8)
def client():
    return {f"base_model.model.layers.{m}.proj.lora_{f}.weight": torch.randn(*s, generator=g) * 0.02
            for m in range(32) for f, s in (("A", (16, 2048)), ("B", (2048, 16)))}
clients = [client() for _ in range(6)]
agg = fedrot_ext.aggregate_state_dicts(clients, method="fedit")
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = rss()
fedrot_ext.state_dict_aggregation_error(clients, agg)
print(json.dumps({"clients_MB": 6 * 32 * 2 * 16 * 2048 * 4 / 2**20, "peak_extra_MB": rss() - before}))
"""


def test_state_dict_metric_memory_is_bounded():
    """Fresh process, 6 clients of 32 modules 2048² at r = 16 (50 MB of fp32 factors): the metric's peak extra
    RSS is one stacked copy of the clients plus a few float64 chunks, not the ~12× of forming every term at once."""
    import json
    import subprocess
    import sys

    from fedrot_ext.metrics import CHUNK_BYTES

    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nstate_dict_aggregation_error memory: {result}")
    assert result["peak_extra_MB"] < 2 * result["clients_MB"] + 4 * CHUNK_BYTES / 2**20, result
