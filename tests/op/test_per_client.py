"""The fused op on per-client tensors (align_and_aggregate_clients): the kernels read each client where it
lies, through a pointer table, and give the stacked op's result.

Per-client tensors with the stacked layout's strides run the same kernels in the same order, so the
results are bitwise equal; clients whose strides differ are read as contiguous copies (other kernels,
the same sums to rounding).
"""
import pytest
import torch

import fedrot_ext
from helpers.problems import make_problem, poisoned, rel_err

from test_opcheck import op_args

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def per_client(stacks, clone=True):
    """[layer][client] -> the op's flat list A[l * N + i], each client its own allocation."""
    return [s[i].clone() if clone else s[i] for s in stacks for i in range(s.shape[0])]


def both(p, align, lam=0.5, w=None, transform=lambda t: t):
    """(stacked op result, per-client op result) on the same problem."""
    acc = fedrot_ext.accumulate_dtype(p.A[0].dtype)
    L, N = len(p.A), p.A[0].shape[0]
    w = (p.weights / p.weights.sum()).to(acc) if w is None else w.to(acc)
    codes = [align] * L
    ref_A = p.ref_A if align in (1, 3) else []
    ref_B = p.ref_B if align in (2, 3) else []
    lam_t = torch.full((L,), lam, dtype=acc)
    stacked = torch.ops.fedrot_ext.align_and_aggregate(p.A, p.B, ref_A, ref_B, w, codes, lam_t, False)
    A, B = [transform(t) for t in per_client(p.A)], [transform(t) for t in per_client(p.B)]
    clients = torch.ops.fedrot_ext.align_and_aggregate_clients(A, B, ref_A, ref_B, w, codes, lam_t, False)
    return stacked, clients, N


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 3, 16, 33, 64])
@pytest.mark.parametrize("align", [0, 1, 2, 3])
def test_per_client_tensors_give_the_stacked_result_bitwise(r, align, dtype):
    shapes = [(r, 2 * r + 13, 3 * r + 7), (r, 97, 2 * r + 1)]  # feature sizes not multiples of 8
    p = make_problem(shapes, n_clients=1 + r % 5, dtype=dtype, seed=200 + r + align)
    stacked, clients, _ = both(p, align)
    for got, want in zip(sum(clients[:3], []), sum(stacked[:3], [])):
        assert torch.equal(got, want), (r, align, dtype, p.seed)
    assert torch.equal(clients[3], stacked[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transposed_and_mixed_layouts_match_to_rounding(dtype):
    """Every client transposed in memory (column-major), or only some: read through other kernels, or
    as contiguous copies; the same aggregate to rounding."""
    p = make_problem([(8, 77, 45), (16, 130, 40)], n_clients=4, dtype=dtype, seed=31)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    column_major = lambda t: t.t().contiguous().t()  # noqa: E731
    stacked, every, _ = both(p, 3, transform=column_major)
    flip = iter(range(10**6))
    some = lambda t: column_major(t) if next(flip) % 3 == 1 else t  # noqa: E731
    _, mixed, _ = both(p, 3, transform=some)
    for got in (every, mixed):
        for g, w in zip(got[0] + got[1], stacked[0] + stacked[1]):
            assert rel_err(g, w) < tol, (dtype, p.seed)


def test_clients_are_read_in_place_not_copied():
    """No copy of any client factor: the op's only allocations are its outputs and workspaces (the
    profiler sees no aten op that copies or stacks), and the inputs are left untouched."""
    p = make_problem([(8, 300, 200)] * 6, n_clients=8, seed=4)
    w = (p.weights / p.weights.sum()).float()
    A, B = per_client(p.A), per_client(p.B)
    before = [t.clone() for t in A + B]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ops.fedrot_ext.align_and_aggregate_clients(A, B, p.ref_A, [], w, [1] * 6, torch.full((6,), 0.5), False)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::stack", "aten::cat", "aten::clone", "aten::contiguous", "aten::copy_"}, names
    assert all(torch.equal(t, b) for t, b in zip(A + B, before))


def test_a_nonfinite_client_is_flagged_in_its_layer_whatever_its_weight():
    """The status bit the peft layer relies on to skip its NaN/Inf pre-scan: a NaN or Inf anywhere in
    any client, at any weight (zero included: 0 · NaN is NaN), makes that layer's aggregate non-finite."""
    p = make_problem([(4, 37, 29), (8, 100, 70), (3, 13, 19)], n_clients=5, seed=12)
    for value in (float("nan"), float("inf")):
        for layer, client, factor in ((0, 0, 0), (1, 4, 1), (2, 2, 0)):
            w = p.weights.clone()
            w[client] = 0.0
            stacks = [list(p.A), list(p.B)]
            stacks[factor][layer] = poisoned(stacks[factor][layer], value, client=client)
            q = p._replace(A=stacks[0], B=stacks[1])
            _, (out_A, out_B, _, status), _ = both(q, 1, w=w / w.sum())
            assert int(status) & 1, (value, layer, client, factor)
            bad = [l for l in range(3) if not (bool(out_A[l].isfinite().all()) and bool(out_B[l].isfinite().all()))]
            assert bad == [layer], (value, layer, client, factor, bad)


def test_bad_per_client_input_names_the_argument():
    p = make_problem([(4, 21, 19), (3, 10, 12)], n_clients=3, seed=5)
    w = (p.weights / p.weights.sum()).float()
    lam = torch.full((2,), 0.5)
    A, B = per_client(p.A), per_client(p.B)
    op = torch.ops.fedrot_ext.align_and_aggregate_clients
    with pytest.raises(ValueError, match=r"A: expected 2 layers x 3 clients = 6 tensors"):
        op(A[:5], B, p.ref_A, [], w, [1, 1], lam, False)
    with pytest.raises(ValueError, match=r"A\[4\]: expected shape \[3, 10\] \(as A\[3\]"):
        op(A[:4] + [A[4][:, :9]] + A[5:], B, p.ref_A, [], w, [1, 1], lam, False)
    with pytest.raises(TypeError, match=r"B\[2\]: expected dtype Float"):
        op(A, B[:2] + [B[2].double()] + B[3:], p.ref_A, [], w, [1, 1], lam, False)
    with pytest.raises(ValueError, match=r"ref_A\[1\]: expected shape \[3, 10\]"):
        op(A, B, [p.ref_A[0], p.ref_A[1][:2]], [], w, [1, 1], lam, False)


def test_fake_kernel_and_opcheck():
    A, B, ref_A, ref_B, w, aligns, lam, refl = op_args(torch.float32, 3)
    args = (per_client(A), per_client(B), ref_A, ref_B, w, aligns, lam, refl)
    torch.library.opcheck(torch.ops.fedrot_ext.align_and_aggregate_clients.default, args)
