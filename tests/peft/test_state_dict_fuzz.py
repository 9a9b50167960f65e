"""Property-based fuzzing of aggregate_state_dicts (fedrot, fedit) on synthetic peft-style state
dicts, against the float64 reference. Profiles as for tests/op/test_op_fuzz.py:
    FEDROT_FUZZ_PROFILE=fuzz python -m pytest tests/peft/test_state_dict_fuzz.py -q
"""
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import fedrot_ext
from fedrot_ext import reference
from helpers.problems import TOLERANCE, WELL_POSED, layer_conditioning, reference_tolerance, synthetic_round

SD_DTYPES = [torch.float32, torch.bfloat16, torch.float64]
PATHS = ["bert.encoder.layer.{i}.attention.self.query", "bert.encoder.layer.{i}.attention.self.value",
         "transformer.h.{i}.attn.c_attn", "model.layers.{i}.self_attn.q_proj", "model.layers.{i}.mlp.down_proj"]
HEAD_KEYS = ("base_model.model.classifier.weight", "base_model.model.classifier.bias")


@st.composite
def state_dict_problems(draw):
    n_clients = draw(st.integers(1, 6))
    names = draw(st.lists(st.tuples(st.sampled_from(PATHS), st.integers(0, 11)), min_size=1, max_size=4, unique=True))
    dtype = draw(st.sampled_from(SD_DTYPES))
    mixed = draw(st.booleans())  # one dtype per module: several fused calls
    hetero = draw(st.booleans())  # clients with a smaller rank (zero-padded)
    modules, client_ranks = [], []
    for template, i in names:
        r = draw(st.one_of(st.integers(1, 8), st.integers(9, 64)))
        d_in, d_out = draw(st.integers(1, 64)), draw(st.integers(1, 64))
        modules.append((template.format(i=i), r, d_in, d_out, draw(st.sampled_from(SD_DTYPES)) if mixed else dtype))
        client_ranks.append([draw(st.integers(1, r)) if hetero else r for _ in range(n_clients)])
    weights = draw(st.one_of(st.none(), st.lists(st.floats(0, 10), min_size=n_clients, max_size=n_clients)
                             .filter(lambda w: sum(w) > 0.1)))
    return dict(
        n_clients=n_clients, modules=modules, client_ranks=client_ranks, head_dtype=dtype, weights=weights,
        method=draw(st.sampled_from(["fedrot", "fedit"])), round=draw(st.integers(0, 5)),
        schedule=draw(st.sampled_from(fedrot_ext.SCHEDULES)), initial=draw(st.sampled_from(["A", "B"])),
        lam=draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1))),
        allow_reflection=draw(st.booleans()), rotated_copies=draw(st.booleans()),
        strided=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)), rslora=draw(st.booleans()),
    )


def build_state_dicts(spec):
    ref, clients = synthetic_round(spec["modules"], spec["n_clients"], seed=spec["seed"], rotated=spec["rotated_copies"],
                                   client_ranks=spec["client_ranks"], head_dtype=spec["head_dtype"])
    if spec["strided"]:  # same values, non-contiguous layouts
        clients = [{k: (v.t().contiguous().t() if v.dim() == 2 else v.repeat_interleave(2)[::2]) for k, v in c.items()}
                   for c in clients]
    return ref, clients


def padded_stack(clients, key, rank, dim, rslora):
    """Each client zero-padded to `rank` and rescaled by √(s_own / s_rank), s = alpha / r (alpha / √r with rsLoRA)."""
    def scaled(t):
        ratio = rank / t.shape[dim]
        return t * (ratio ** 0.25 if rslora else ratio ** 0.5) if t.shape[dim] != rank else t
    return torch.stack([torch.cat([scaled(c[key]), c[key].new_zeros(
        (rank - c[key].shape[0], c[key].shape[1]) if dim == 0 else (c[key].shape[0], rank - c[key].shape[1]))], dim=dim)
        for c in clients])


def check_state_dict_module(spec, got, clients, ref, module, path, align, w):
    """One module of the aggregate: properties always, the float64 reference where well posed."""
    _, r_ref, d_in, d_out, dtype = next(m for m in spec["modules"] if m[0] == path)
    # The largest rank among the clients, and the reference's when the round aligns on it.
    r = max(c[module.key_A].shape[0] for c in clients) if align == "none" else r_ref
    A, B = padded_stack(clients, module.key_A, r, 0, spec["rslora"]), padded_stack(clients, module.key_B, r, 1, spec["rslora"])
    got_A, got_B = got[module.key_A], got[module.key_B]
    where = f"module {path}, seed={spec['seed']}"
    assert got_A.dtype == dtype and got_A.shape == (r, d_in) and got_B.dtype == dtype and got_B.shape == (d_out, r), where
    assert torch.isfinite(got_A).all() and torch.isfinite(got_B).all(), where
    refs = ([ref[module.key_A]], [ref[module.key_B]]) if align != "none" else (None, None)
    kw = dict(ref_A=refs[0], ref_B=refs[1], weights=spec["weights"], align=align,
              lam=spec["lam"], allow_reflection=spec["allow_reflection"])
    scale_A = float((w * A.double().flatten(1).norm(dim=1)).sum()) + 1e-30
    scale_B = float((w * B.double().flatten(1).norm(dim=1)).sum()) + 1e-30
    tol = TOLERANCE[dtype]
    # A property of any valid answer: rotations are orthogonal, so ‖Σ w_i R_iᵀ A_i‖ <= Σ w_i ‖A_i‖.
    assert float(got_A.double().norm()) <= scale_A * (1 + tol) and float(got_B.double().norm()) <= scale_B * (1 + tol), where
    cond = layer_conditioning(A, B, ref[module.key_A], ref[module.key_B], align, spec["lam"], spec["allow_reflection"])
    where += f", cond={cond:.3g}"
    event("state-dict module vs float64 reference" if cond < WELL_POSED else "state-dict module ill-posed: properties + fused op")
    if cond < WELL_POSED:  # agreement with the float64 reference where the answer is unique and well conditioned
        want = reference.align_and_aggregate([A], [B], **kw)
        tol = reference_tolerance(dtype, cond, r)
    elif spec["strided"]:  # ill-posed, and the op reads the clients' own layouts: another rounding of a rank-deficient M
        return                # may pick another completion. Properties only (layouts are compared in tests/op/test_per_client.py)
    else:  # ill-posed: the state-dict layer must add nothing to the fused op (fuzzed on its own in tests/op/test_op_fuzz.py)
        want = fedrot_ext.align_and_aggregate([A], [B], **kw)
    assert float((got_A.double() - want.A[0].double()).norm()) / scale_A < tol, where
    assert float((got_B.double() - want.B[0].double()).norm()) / scale_B < tol, where


def run_state_dict_case(spec):
    ref, clients = build_state_dicts(spec)
    before = [{k: v.clone() for k, v in c.items()} for c in clients + [ref]]
    method = spec["method"]
    got = fedrot_ext.aggregate_state_dicts(
        clients, reference=ref if method == "fedrot" else None, weights=spec["weights"], method=method,
        round=spec["round"], lam=spec["lam"], schedule=spec["schedule"], initial=spec["initial"],
        allow_reflection=spec["allow_reflection"], lora_config=dict(r=8, lora_alpha=16, use_rslora=spec["rslora"]))
    for b, a in zip(before, clients + [ref]):  # inputs untouched
        assert all(torch.equal(b[k], a[k]) for k in b)
    assert list(got) == list(clients[0]) and got.dropped == () and got.base_deltas == {}
    align = fedrot_ext.alignment_for_round(spec["round"], spec["schedule"], spec["initial"]) if method == "fedrot" else "none"
    w = torch.ones(spec["n_clients"], dtype=torch.float64) if spec["weights"] is None else torch.tensor(spec["weights"], dtype=torch.float64)
    w = w / w.sum()
    modules, others = fedrot_ext.parse_lora_keys(clients[0])
    for module, (path, *_rest) in zip(modules, spec["modules"]):
        check_state_dict_module(spec, got, clients, ref, module, path, align, w)
    assert sorted(others) == sorted(HEAD_KEYS)
    for key in others:  # plain weighted average, never rotated
        stack = torch.stack([c[key].double() for c in clients])
        want = torch.einsum("i,i...->...", w, stack)
        assert got[key].dtype == spec["head_dtype"]
        scale = float((w * stack.flatten(1).norm(dim=1)).sum()) + 1e-30
        assert float((got[key].double() - want).norm()) / scale < TOLERANCE[spec["head_dtype"]]


@given(state_dict_problems())
def test_state_dicts_match_reference(spec):
    run_state_dict_case(spec)
