"""Property-based fuzzing of the fused op, and of aggregate_state_dicts (fedrot, fedit) on
synthetic peft-style state dicts, against the float64 reference.

Profiles: "ci" (default, 150 examples per test) and "fuzz" (10,000 examples per test):
    FEDROT_FUZZ_PROFILE=fuzz python -m pytest tests/test_fuzz.py -q   (-k state_dict: that test only)
Comparisons are scaled by the conditioning of each Procrustes problem; draws whose
rotation is not unique (rank-deficient M, a singular soft step) are checked on the
properties that hold for any valid answer.
"""
import os

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fedrot_ext
from fedrot_ext import reference
from factories import TOLERANCE, haar_rotations, synthetic_round

settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz", max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("FEDROT_FUZZ_PROFILE", "ci"))

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
EPS = {torch.float64: 2.2e-16, torch.float32: 1.2e-7, torch.bfloat16: 1.2e-7, torch.float16: 1.2e-7}  # rotation math


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n_clients = draw(st.integers(1, 8))
    layers = draw(st.lists(st.tuples(st.one_of(st.integers(1, 8), st.integers(9, 64)), st.integers(1, 96),
                                     st.integers(1, 96)), min_size=1, max_size=3))
    weights = draw(st.lists(st.floats(0, 10), min_size=n_clients, max_size=n_clients).filter(lambda w: sum(w) > 0.1))
    return dict(
        dtype=dtype, n_clients=n_clients, layers=layers, weights=weights,
        align=draw(st.sampled_from(["none", "A", "B", "AB"])),
        lam=draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1))),
        allow_reflection=draw(st.booleans()),
        rotated_copies=draw(st.booleans()),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(spec):
    g = torch.Generator().manual_seed(spec["seed"])
    N = spec["n_clients"]
    A, B, ref_A, ref_B = [], [], [], []
    for r, d_in, d_out in spec["layers"]:
        a0 = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        b0 = torch.randn(d_out, r, generator=g, dtype=torch.float64)
        if spec["rotated_copies"]:
            Q = haar_rotations(N, r, g)
            a = Q.transpose(1, 2) @ (a0 + 0.3 * torch.randn(N, r, d_in, generator=g, dtype=torch.float64))
            b = (b0 + 0.3 * torch.randn(N, d_out, r, generator=g, dtype=torch.float64)) @ Q
        else:
            a = torch.randn(N, r, d_in, generator=g, dtype=torch.float64)
            b = torch.randn(N, d_out, r, generator=g, dtype=torch.float64)
        A.append(a.to(spec["dtype"]))
        B.append(b.to(spec["dtype"]))
        ref_A.append(a0.to(spec["dtype"]))
        ref_B.append(b0.to(spec["dtype"]))
    if spec["strided"]:  # same values, non-contiguous layouts
        A = [torch.repeat_interleave(a, 2, dim=2)[:, :, ::2] for a in A]
        B = [b.transpose(1, 2).contiguous().transpose(1, 2) for b in B]
        ref_A = [t.t().contiguous().t() for t in ref_A]
    return A, B, ref_A, ref_B


def layer_conditioning(a, b, ref_a, ref_b, align, lam, allow_reflection):
    """Sensitivity of one layer's rotations to rounding, worst over its clients.

    a (N, r, in), b (N, out, r), ref_a (r, in), ref_b (out, r); 1.0 when nothing rotates.
    """
    if align == "none" or lam == 0:
        return 1.0
    a, b = a.double(), b.double()
    M = torch.zeros(a.shape[0], a.shape[1], a.shape[1], dtype=torch.float64)
    if align in ("A", "AB"):
        M += a @ ref_a.double().T
    if align in ("B", "AB"):
        M += b.transpose(1, 2) @ ref_b.double()
    U, s, Vh = torch.linalg.svd(M)
    # Polar-factor sensitivity ~ σ_1 / min_{i≠j}(σ_i + σ_j) over *signed* singular values:
    # in SO(r) the smallest carries sign(det U Vᵀ); in O(r) σ_min = 0 leaves a sign free.
    signed = s.clone()
    if allow_reflection:
        pair = 2 * s[:, -1]
    else:
        signed[:, -1] = signed[:, -1] * torch.sign(torch.linalg.det(U @ Vh))
        pair = signed[:, -1] + signed[:, -2] if s.shape[-1] >= 2 else s[:, 0]
    worst = max(1.0, float((s[:, 0] / pair.clamp_min(1e-300)).max()))
    if lam < 1:
        eye = torch.eye(M.shape[-1], dtype=torch.float64)
        hard = reference.procrustes_rotation(M, 1.0, allow_reflection)
        soft = torch.linalg.svdvals((1 - lam) * eye + lam * hard)
        worst = max(worst, float((1.0 / soft[:, -1].clamp_min(1e-300)).max()))
    return worst


def conditioning(A, B, ref_A, ref_B, spec):
    """Worst sensitivity of the rotations to rounding, over all (layer, client)."""
    return max(layer_conditioning(A[l], B[l], ref_A[l], ref_B[l], spec["align"], spec["lam"], spec["allow_reflection"])
               for l in range(len(A)))


@given(problems())
def test_fused_op_matches_reference(spec):
    A, B, ref_A, ref_B = build(spec)
    kw = dict(ref_A=ref_A, ref_B=ref_B, weights=spec["weights"], align=spec["align"], lam=spec["lam"],
              allow_reflection=spec["allow_reflection"], return_rotations=True)
    got = fedrot_ext.align_and_aggregate(A, B, **kw)
    want = reference.align_and_aggregate(A, B, **kw)
    w = torch.tensor(spec["weights"], dtype=torch.float64)
    w = w / w.sum()
    dtype = spec["dtype"]
    eps = EPS[dtype]
    cond = conditioning(A, B, ref_A, ref_B, spec)
    for l in range(len(A)):
        R = got.rotations[l].double()
        r = R.shape[-1]
        assert got.A[l].dtype == dtype and got.A[l].shape == want.A[l].shape
        assert torch.isfinite(got.A[l]).all() and torch.isfinite(got.B[l]).all()
        # Properties that hold for any valid answer.
        assert (R.transpose(1, 2) @ R - torch.eye(r, dtype=torch.float64)).abs().max() < 50 * r * eps
        if not spec["allow_reflection"]:
            assert (torch.linalg.det(R) - 1).abs().max() < 50 * r * eps
        a, b = A[l].double(), B[l].double()
        scale_A = float((w * a.flatten(1).norm(dim=1)).sum()) + 1e-30
        scale_B = float((w * b.flatten(1).norm(dim=1)).sum()) + 1e-30
        assert float((got.A[l].double() - torch.einsum("i,ikj,ikc->jc", w, R, a)).norm()) / scale_A < TOLERANCE[dtype]
        assert float((got.B[l].double() - torch.einsum("i,iok,ikj->oj", w, b, R)).norm()) / scale_B < TOLERANCE[dtype]
        # Agreement with the reference where the answer is unique and well conditioned.
        if cond < 1e4:
            tol = TOLERANCE[dtype] + 20 * eps * cond * r
            assert float((R - want.rotations[l]).abs().max()) < tol
            assert float((got.A[l].double() - want.A[l]).norm()) / scale_A < tol
            assert float((got.B[l].double() - want.B[l]).norm()) / scale_B < tol


# ---- aggregate_state_dicts(method="fedrot" | "fedit") on synthetic peft-style state dicts ----

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
        strided=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_state_dicts(spec):
    ref, clients = synthetic_round(spec["modules"], spec["n_clients"], seed=spec["seed"], rotated=spec["rotated_copies"],
                                   client_ranks=spec["client_ranks"], head_dtype=spec["head_dtype"])
    if spec["strided"]:  # same values, non-contiguous layouts
        clients = [{k: (v.t().contiguous().t() if v.dim() == 2 else v.repeat_interleave(2)[::2]) for k, v in c.items()}
                   for c in clients]
    return ref, clients


def padded_stack(clients, key, rank, dim):
    return torch.stack([torch.cat([c[key], c[key].new_zeros(
        (rank - c[key].shape[0], c[key].shape[1]) if dim == 0 else (c[key].shape[0], rank - c[key].shape[1]))], dim=dim)
        for c in clients])


def check_state_dict_module(spec, got, clients, ref, module, path, align, w):
    """One module of the aggregate: properties always, the float64 reference where well posed."""
    _, r_ref, d_in, d_out, dtype = next(m for m in spec["modules"] if m[0] == path)
    # The largest rank among the clients, and the reference's when the round aligns on it.
    r = max(c[module.key_A].shape[0] for c in clients) if align == "none" else r_ref
    A, B = padded_stack(clients, module.key_A, r, 0), padded_stack(clients, module.key_B, r, 1)
    got_A, got_B = got[module.key_A], got[module.key_B]
    assert got_A.dtype == dtype and got_A.shape == (r, d_in) and got_B.dtype == dtype and got_B.shape == (d_out, r)
    assert torch.isfinite(got_A).all() and torch.isfinite(got_B).all()
    refs = ([ref[module.key_A]], [ref[module.key_B]]) if align != "none" else (None, None)
    kw = dict(ref_A=refs[0], ref_B=refs[1], weights=spec["weights"], align=align,
              lam=spec["lam"], allow_reflection=spec["allow_reflection"])
    scale_A = float((w * A.double().flatten(1).norm(dim=1)).sum()) + 1e-30
    scale_B = float((w * B.double().flatten(1).norm(dim=1)).sum()) + 1e-30
    tol = TOLERANCE[dtype]
    # A property of any valid answer: rotations are orthogonal, so ‖Σ w_i R_iᵀ A_i‖ <= Σ w_i ‖A_i‖.
    assert float(got_A.double().norm()) <= scale_A * (1 + tol) and float(got_B.double().norm()) <= scale_B * (1 + tol)
    cond = layer_conditioning(A, B, ref[module.key_A], ref[module.key_B], align, spec["lam"], spec["allow_reflection"])
    event("state-dict module vs float64 reference" if cond < 1e4 else "state-dict module ill-posed: properties + fused op")
    if cond < 1e4:  # agreement with the float64 reference where the answer is unique and well conditioned
        want = reference.align_and_aggregate([A], [B], **kw)
        tol = TOLERANCE[dtype] + 20 * EPS[dtype] * cond * r
    else:  # ill-posed: the state-dict layer must add nothing to the fused op (fuzzed on its own above)
        want = fedrot_ext.align_and_aggregate([A], [B], **kw)
    assert float((got_A.double() - want.A[0].double()).norm()) / scale_A < tol
    assert float((got_B.double() - want.B[0].double()).norm()) / scale_B < tol


def run_state_dict_case(spec):
    ref, clients = build_state_dicts(spec)
    before = [{k: v.clone() for k, v in c.items()} for c in clients + [ref]]
    method = spec["method"]
    got = fedrot_ext.aggregate_state_dicts(
        clients, reference=ref if method == "fedrot" else None, weights=spec["weights"], method=method,
        round=spec["round"], lam=spec["lam"], schedule=spec["schedule"], initial=spec["initial"],
        allow_reflection=spec["allow_reflection"])
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
