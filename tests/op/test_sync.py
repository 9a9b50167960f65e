"""What docs/ARCHITECTURE.md states: one host synchronisation per op call, and a number of them that does not
grow with the number of layers along the state-dict path. Counted on the CPU by intercepting every
tensor-to-Python conversion; on a GPU with torch.cuda.set_sync_debug_mode."""
import contextlib
import warnings

import pytest
import torch

import fedrot_ext
from helpers.problems import make_problem

CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def counting(monkeypatch):
    """Yields a list that receives the name of every tensor-to-Python conversion made inside."""
    seen = []
    with monkeypatch.context() as m:
        for name in CONVERSIONS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _name=name, _original=original, **kwargs):
                seen.append(_name)
                return _original(self, *args, **kwargs)

            m.setattr(torch.Tensor, name, counted)
        yield seen


def _layers(L):
    return [(4 + (l % 3), 13 + 2 * l, 9 + l) for l in range(L)]


@pytest.mark.parametrize("align", ["none", "A", "B", "AB"])
@pytest.mark.parametrize("L", [1, 12])
def test_op_reads_back_once_whatever_the_layer_count(align, L, monkeypatch):
    p = make_problem(_layers(L), n_clients=4, seed=L)
    with counting(monkeypatch) as conversions:
        fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, align=align)  # weights=None: nothing else to read
    assert conversions == ["tolist"], f"expected the single status read, got {conversions} (seed={L})"


def test_weights_are_read_once_on_the_host(monkeypatch):
    p = make_problem(_layers(5), n_clients=4, seed=7)
    with counting(monkeypatch) as conversions:
        fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, weights=p.weights, clip_norm=1.0)
    assert conversions == ["tolist", "tolist"], f"expected one weights read and one status read, got {conversions}"


def _states(n_modules, n_clients=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = [f"base_model.model.layer.{m}.attn" for m in range(n_modules)]
    states = [{**{f"{k}.lora_A.weight": torch.randn(4, 10 + m, generator=g) for m, k in enumerate(keys)},
               **{f"{k}.lora_B.weight": torch.randn(8 + m, 4, generator=g) for m, k in enumerate(keys)},
               "classifier.weight": torch.randn(3, 5, generator=g)} for _ in range(n_clients)]
    return states


@pytest.mark.parametrize("method", fedrot_ext.METHODS)
def test_state_dict_path_syncs_do_not_grow_with_modules(method, monkeypatch):
    counts = {}
    for n_modules in (2, 9):
        states = _states(n_modules, seed=n_modules)
        if method == "ffa":  # A frozen and shared
            for s in states[1:]:
                s.update({k: v.clone() for k, v in states[0].items() if "lora_A" in k})
        if method == "rolora":  # round 1 trains A: B frozen and shared
            for s in states[1:]:
                s.update({k: v.clone() for k, v in states[0].items() if "lora_B" in k})
        kw = dict(reference=states[0], round=1, method=method)
        if method in ("fedex", "flora"):
            kw["lora_config"] = {"r": 4, "lora_alpha": 8}
        with counting(monkeypatch) as seen:
            fedrot_ext.aggregate_state_dicts(states, weights=[1, 2, 3], **kw)
        counts[n_modules] = len(seen)
    assert counts[2] == counts[9], f"{method}: host reads grew with the module count: {counts}"
    assert counts[2] <= 8, f"{method}: {counts[2]} host reads for one aggregation"


def test_state_dict_path_calls_the_op_unchecked(monkeypatch):
    """Clients are validated once by the peft layer; the op's own argument checks must not run again."""
    import fedrot_ext._ops as ops

    def fail(*args, **kwargs):
        raise AssertionError("the state-dict path re-validated its clients through the public op")

    monkeypatch.setattr(ops, "check_factors", fail)
    monkeypatch.setattr(ops, "normalized_weights", fail)
    states = _states(3)
    for method in ("fedrot", "fedit", "flexlora", "fedex", "flora"):
        kw = {"lora_config": {"r": 4, "lora_alpha": 8}} if method in ("fedex", "flora") else {}
        fedrot_ext.aggregate_state_dicts(states, reference=states[0], round=1, method=method, **kw)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("align", ["none", "A", "AB"])
def test_cuda_op_synchronises_once(align):
    p = make_problem(_layers(6), n_clients=5, seed=11, device="cuda")
    fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, align=align)  # warm-up: allocator, tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, align=align)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
