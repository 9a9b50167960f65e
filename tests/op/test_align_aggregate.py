"""The fused op against the float64 reference, and the properties of the method, on every device.

The op runs on `device`; the reference always runs on the CPU and results are compared there.
Tolerances follow the conditioning of each problem (helpers.problems.conditioning).
"""
import pytest
import torch

import fedrot_ext
from fedrot_ext import reference
from helpers.problems import (
    TOLERANCE, assert_matches_reference, assert_no_aliasing, conditioning, factor_average, haar_rotations,
    make_problem, rel_err,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
RANKS = [1, 2, 3, 8, 16, 33, 64]


def run_both(p, device, **kw):
    """The op on `device` and the reference on the CPU, same arguments."""
    pd = p.to(device)
    got = fedrot_ext.align_and_aggregate(pd.A, pd.B, ref_A=pd.ref_A, ref_B=pd.ref_B, weights=p.weights,
                                         return_rotations=True, **kw)
    want = reference.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights,
                                         return_rotations=True, **kw)
    return got, want


def check_against_reference(p, device, dtype, **kw):
    got, want = run_both(p, device, **kw)
    cond = conditioning(p.A, p.B, p.ref_A, p.ref_B, kw["align"], kw["lam"], kw.get("allow_reflection", False))
    assert_matches_reference(got, want, dtype, cond=cond, seed=p.seed, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", RANKS)
def test_matches_reference_each_rank(r, dtype, device):
    # Feature sizes are not multiples of 8; three layers of different shapes in one call.
    shapes = [(r, 2 * r + 13, 3 * r + 7), (r, 2 * r + 61, r + 3), (r, 97, 2 * r + 1)]
    p = make_problem(shapes, n_clients=1 + r % 7, dtype=dtype, seed=r)
    check_against_reference(p, device, dtype, align="A", lam=0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [4, 16, 24, 32, 48, 64])
def test_matches_reference_across_covariance_blocks(r, dtype, device):
    # A factors long enough for several cache blocks of the covariance kernels plus a vector tail,
    # at full and padded ranks (the transposed-reference kernel of the 32 and 64 buckets on AVX-512,
    # the bf16 broadcasts of the B kernels at full rank).
    shapes = [(r, 531, 70), (r, 301, 2 * r + 5)]
    p = make_problem(shapes, n_clients=3, dtype=dtype, seed=100 + r)
    check_against_reference(p, device, dtype, align="AB", lam=0.5)


@pytest.mark.parametrize("align", ["none", "A", "B", "AB"])
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_matches_reference_align_modes(align, lam, device):
    p = make_problem([(4, 37, 29), (8, 100, 70), (3, 13, 19)], n_clients=6, seed=11)
    check_against_reference(p, device, torch.float32, align=align, lam=lam)


@pytest.mark.parametrize("n_clients", [1, 2, 10, 50])
def test_matches_reference_client_counts_and_mixed_ranks(n_clients, device):
    shapes = [(1, 9, 17), (3, 29, 11), (8, 70, 41), (16, 45, 77), (33, 90, 71), (64, 135, 129)]
    p = make_problem(shapes, n_clients=n_clients, seed=n_clients)
    check_against_reference(p, device, torch.float32, align="AB", lam=0.7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_rank_above_fused_buckets_uses_fallback_with_same_contract(dtype, device):
    p = make_problem([(70, 150, 145), (4, 33, 20)], n_clients=3, dtype=dtype, seed=5)
    check_against_reference(p, device, dtype, align="A", lam=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs_are_read_in_place(dtype, device):
    p = make_problem([(5, 43, 31), (8, 66, 52)], n_clients=4, dtype=dtype, seed=3)
    pd = p.to(device)
    # A with inner stride 2, B stored transposed, refs transposed views, clients strided.
    A = [torch.repeat_interleave(a, 2, dim=2)[:, :, ::2] for a in pd.A]
    B = [b.transpose(1, 2).contiguous().transpose(1, 2) for b in pd.B]
    ref_A = [a.t().contiguous().t() for a in pd.ref_A]
    ref_B = [torch.cat([b, b], dim=1)[:, : b.shape[1]] for b in pd.ref_B]
    A = [torch.stack([a, a], dim=1)[:, 0] for a in A]
    assert not any(t.is_contiguous() for t in A + B + ref_A + ref_B)
    for a, a0 in zip(A, pd.A):
        assert torch.equal(a, a0)
    kw = dict(weights=p.weights, align="AB", lam=0.5, return_rotations=True)  # CPU weights, device factors
    got = fedrot_ext.align_and_aggregate(A, B, ref_A=ref_A, ref_B=ref_B, **kw)
    want = reference.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, **kw)
    cond = conditioning(p.A, p.B, p.ref_A, p.ref_B, "AB", 0.5)
    assert_matches_reference(got, want, dtype, cond=cond, seed=p.seed, device=device)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("r", [16, 32, 64])
def test_bf16_covariance_tiles_match_reference(r, padded, device):
    # The bf16 covariances of the 16 to 64 buckets (on AMX: 32 values of t per tile product, then the
    # tail in order): A views with t contiguous, B views with j contiguous, rows dense or padded.
    # Values of t (A, B): 97 and 45, 64 and 131, 31 and 40: steps with and without a tail, and none.
    shapes = [(r, 97, 45), (r, 64, 131), (r, 31, 40)]
    p = make_problem(shapes, n_clients=3, dtype=torch.bfloat16, seed=200 + r)
    pd = p.to(device)
    pad = (lambda x: torch.cat([x, x], dim=-1)[..., : x.shape[-1]]) if padded else (lambda x: x)
    A, B, ref_A, ref_B = ([pad(x) for x in xs] for xs in (pd.A, pd.B, pd.ref_A, pd.ref_B))
    kw = dict(weights=p.weights, align="AB", lam=0.5, return_rotations=True)
    got = fedrot_ext.align_and_aggregate(A, B, ref_A=ref_A, ref_B=ref_B, **kw)
    want = reference.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, **kw)
    cond = conditioning(p.A, p.B, p.ref_A, p.ref_B, "AB", 0.5)
    assert_matches_reference(got, want, torch.bfloat16, cond=cond, seed=p.seed, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("allow_reflection", [False, True])
def test_rotation_properties(dtype, allow_reflection, device):
    p = make_problem([(1, 10, 12), (3, 30, 20), (16, 50, 40), (64, 140, 130)], n_clients=7, dtype=dtype, seed=21)
    A = [a.clone() for a in p.A]
    # Reflected clients force det(U Vᵀ) < 0: SO(r) must flip, O(r) must not.
    for a in A:
        a[::2, 0] = -a[::2, 0]
    out = fedrot_ext.align_and_aggregate([a.to(device) for a in A], [b.to(device) for b in p.B],
                                         ref_A=[t.to(device) for t in p.ref_A], weights=p.weights, align="A", lam=1.0,
                                         allow_reflection=allow_reflection, return_rotations=True)
    tol = 1e-10 if dtype == torch.float64 else 4 * 64 * 1.2e-7  # Jacobi stops at r·eps
    saw_negative = False
    w = p.weights / p.weights.sum()
    for l, R in enumerate(out.rotations):
        R64 = R.double().cpu()
        r = R.shape[-1]
        eye = torch.eye(r, dtype=torch.float64)
        assert (R64.transpose(1, 2) @ R64 - eye).abs().max() < tol, f"RᵀR = I, layer {l}, seed={p.seed}"
        det = torch.linalg.det(R64)
        if allow_reflection:
            saw_negative |= bool((det < 0).any())
        else:
            assert torch.allclose(det, torch.ones_like(det), atol=tol), f"det R = +1, layer {l}, seed={p.seed}"
        a, b = A[l].double(), p.B[l].double()
        # B̃_i Ã_i = B_i A_i for every client
        assert rel_err((b @ R64) @ (R64.transpose(1, 2) @ a), b @ a) < tol, f"B̃Ã = BA, layer {l}, seed={p.seed}"
        # The aggregate is exactly Σ w_i R_iᵀ A_i, Σ w_i B_i R_i with the returned R_i.
        assert rel_err(out.A[l], torch.einsum("i,ikj,ikc->jc", w, R64, a)) < TOLERANCE[dtype], f"layer {l}, seed={p.seed}"
        assert rel_err(out.B[l], torch.einsum("i,iok,ikj->oj", w, b, R64)) < TOLERANCE[dtype], f"layer {l}, seed={p.seed}"
    assert saw_negative == allow_reflection, f"seed={p.seed}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lambda_zero_is_fedit_exactly(dtype, device):
    p = make_problem([(4, 37, 29), (16, 65, 33)], n_clients=5, dtype=dtype, seed=8)
    pd = p.to(device)
    kw = dict(ref_A=pd.ref_A, ref_B=pd.ref_B, weights=p.weights, return_rotations=True)
    soft0 = fedrot_ext.align_and_aggregate(pd.A, pd.B, align="AB", lam=0.0, **kw)
    fedit = fedrot_ext.align_and_aggregate(pd.A, pd.B, align="none", **kw)
    avg_A, avg_B = factor_average(p.A, p.B, p.weights)
    for l in range(2):
        assert torch.equal(soft0.A[l], fedit.A[l]) and torch.equal(soft0.B[l], fedit.B[l]), f"seed={p.seed}"
        R = soft0.rotations[l]
        assert torch.equal(R, torch.eye(p.A[l].shape[1]).expand_as(R).to(R)), f"seed={p.seed}"
        assert rel_err(fedit.A[l], avg_A[l]) < TOLERANCE[dtype], f"seed={p.seed}"
        assert rel_err(fedit.B[l], avg_B[l]) < TOLERANCE[dtype], f"seed={p.seed}"


def test_lambda_one_is_hard_procrustes_and_optimal(device):
    p = make_problem([(6, 40, 30)], n_clients=4, dtype=torch.float64, seed=2)
    pd = p.to(device)
    out = fedrot_ext.align_and_aggregate(pd.A, pd.B, ref_A=pd.ref_A, align="A", lam=1.0, return_rotations=True)
    R = out.rotations[0].cpu()
    a, ref = p.A[0], p.ref_A[0]
    U, _, Vh = torch.linalg.svd(a @ ref.T)
    hard = U @ Vh
    flip = torch.linalg.det(hard) < 0
    U[flip, :, -1] = -U[flip, :, -1]
    assert torch.allclose(R, U @ Vh, atol=1e-10), f"seed={p.seed}"
    best = (R.transpose(1, 2) @ a - ref).norm(dim=(1, 2))
    g = torch.Generator().manual_seed(0)
    for Q in haar_rotations(200, 6, g):  # no rotation in SO(r) does better
        assert bool(((Q.T @ a - ref).norm(dim=(1, 2)) >= best - 1e-9).all()), "seed=0 (Haar draws)"


def test_soft_rotation_interpolates_towards_identity(device):
    p = make_problem([(8, 50, 40)], n_clients=3, dtype=torch.float64, seed=4)
    pd = p.to(device)
    angles = []
    for lam in (0.0, 0.25, 0.5, 0.75, 1.0):
        R = fedrot_ext.align_and_aggregate(pd.A, pd.B, ref_A=pd.ref_A, align="A", lam=lam, return_rotations=True).rotations[0]
        angles.append(float((R.cpu() - torch.eye(8, dtype=torch.float64)).norm()))
    assert angles[0] == 0.0
    assert all(x < y for x, y in zip(angles, angles[1:])), f"not monotone in λ: {angles}, seed={p.seed}"


def test_recovers_rotated_copies_where_fedit_fails(device):
    """Clients hold the same update in different rotated bases: FedRot recovers it, FedIT does not."""
    seed = 7
    g = torch.Generator().manual_seed(seed)
    N, r, d_in, d_out = 8, 8, 96, 80
    a_star = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    b_star = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    Q = haar_rotations(N, r, g)
    A = [(Q.transpose(1, 2) @ a_star).float().to(device)]
    B = [(b_star @ Q).float().to(device)]
    # The previous global is close to (not equal to) the shared update.
    ref_A = [(a_star + 0.05 * torch.randn(r, d_in, generator=g, dtype=torch.float64)).float().to(device)]
    target = b_star @ a_star
    rot = fedrot_ext.align_and_aggregate(A, B, ref_A=ref_A, align="A", lam=1.0)
    fedit = fedrot_ext.align_and_aggregate(A, B, align="none")
    err_rot = rel_err(rot.B[0].double() @ rot.A[0].double(), target)
    err_fedit = rel_err(fedit.B[0].double() @ fedit.A[0].double(), target)
    assert err_rot < 1e-4, f"seed={seed}"
    assert err_fedit > 0.5, f"seed={seed}"


def test_zero_reference_gives_identity_and_fedit(device):
    # peft initialises B to zero: aligning on B at round 1 must be the identity, never NaN.
    p = make_problem([(4, 20, 30)], n_clients=3, seed=1).to(device)
    ref_B = [torch.zeros_like(p.ref_B[0])]
    out = fedrot_ext.align_and_aggregate(p.A, p.B, ref_B=ref_B, align="B", lam=0.5, return_rotations=True)
    fedit = fedrot_ext.align_and_aggregate(p.A, p.B, align="none")
    assert torch.equal(out.rotations[0].cpu(), torch.eye(4).expand(3, 4, 4)), f"seed={p.seed}"
    # The same sums, by the general kernels (the identity is found as the rotations are solved) against
    # the plain weighted sum of unaligned layers (cpu/weighted_sum.h): equal to a few roundings of the
    # largest value (3 clients, fp32).
    for got, want in ((out.A[0], fedit.A[0]), (out.B[0], fedit.B[0])):
        torch.testing.assert_close(got, want, rtol=0.0, atol=float(want.abs().max()) * 2.0**-21, msg=f"seed={p.seed}")


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_rank_deficient_reference_gives_valid_rotation(lam, device):
    p = make_problem([(8, 40, 30)], n_clients=4, dtype=torch.float64, seed=6)
    pd = p.to(device)
    ref_A = [pd.ref_A[0].clone()]
    ref_A[0][5:] = 0  # rank 5 reference: M has three zero singular values
    out = fedrot_ext.align_and_aggregate(pd.A, pd.B, ref_A=ref_A, align="A", lam=lam, return_rotations=True)
    R = out.rotations[0].cpu()
    assert torch.isfinite(R).all(), f"seed={p.seed}"
    assert (R.transpose(1, 2) @ R - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-12, f"seed={p.seed}"
    assert torch.allclose(torch.linalg.det(R), torch.ones(4, dtype=torch.float64)), f"seed={p.seed}"
    assert all(torch.isfinite(t).all() for t in out.A + out.B), f"seed={p.seed}"
    # Any valid answer: the aggregate is Σ w_i R_iᵀ A_i with the returned rotations.
    assert rel_err(out.A[0], (R.transpose(1, 2) @ p.A[0]).mean(0)) < 1e-12, f"seed={p.seed}"


def test_weights_are_normalised_and_accept_common_types(device):
    p = make_problem([(4, 21, 19)], n_clients=3, seed=9).to(device)
    kw = dict(ref_A=p.ref_A, align="A", lam=0.5)
    base = fedrot_ext.align_and_aggregate(p.A, p.B, weights=[1.0, 2.0, 3.0], **kw)
    for w in (torch.tensor([10, 20, 30]), torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64), (2, 4, 6)):
        other = fedrot_ext.align_and_aggregate(p.A, p.B, weights=w, **kw)
        assert rel_err(other.A[0], base.A[0]) < 1e-6 and rel_err(other.B[0], base.B[0]) < 1e-6, f"{w}, seed={p.seed}"
    uniform = fedrot_ext.align_and_aggregate(p.A, p.B, **kw)
    ones = fedrot_ext.align_and_aggregate(p.A, p.B, weights=torch.ones(3), **kw)
    assert torch.equal(uniform.A[0], ones.A[0]), f"seed={p.seed}"
    # A client with weight 0 does not contribute.
    dropped = fedrot_ext.align_and_aggregate([p.A[0][:2]], [p.B[0][:2]], weights=[1.0, 2.0], **kw)
    zero = fedrot_ext.align_and_aggregate(p.A, p.B, weights=[1.0, 2.0, 0.0], **kw)
    assert rel_err(zero.A[0], dropped.A[0]) < 1e-6, f"seed={p.seed}"


def test_cpu_layer_by_layer_and_two_pass_schedules_agree_bitwise():
    """The CPU runs both passes layer by layer when each thread gets >= 4 times the rows of the largest
    layer, else as two passes over all layers: these 6 layers of one rank bucket hold 28 row chunks of 64,
    at most 5 in a layer, so 1 thread takes the first schedule (where each layer's aggregation
    prefetches the next layer's clients and references) and 2 and 3 threads the second."""
    p = make_problem([(16, 131, 77), (13, 70, 140), (16, 100, 101)] * 2, n_clients=5, seed=21)
    A = [p.A[l].transpose(1, 2).contiguous().transpose(1, 2) if l == 4 else p.A[l] for l in range(6)]  # a strided view too
    kw = dict(ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align="AB", lam=0.5, return_rotations=True)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(fedrot_ext.align_and_aggregate(A, p.B, **kw))
    finally:
        torch.set_num_threads(threads)
    tensors = lambda out: out.A + out.B + out.rotations  # noqa: E731
    for n, run in zip((2, 3), runs[1:]):
        for i, (x, y) in enumerate(zip(tensors(runs[0]), tensors(run))):
            assert torch.equal(x, y), f"output {i} at {n} threads differs from 1 thread, seed={p.seed}"
    want = fedrot_ext.align_and_aggregate(p.A, p.B, **kw)  # contiguous layer 4: other kernels, other rounding
    assert max(rel_err(x, y) for x, y in zip(tensors(want), tensors(runs[0]))) < 1e-5, f"seed={p.seed}"


# Four layers of one rank bucket, each with clients above any L2 budget and as many row chunks as the
# others (so that 1 thread takes the layer schedule): ranks 16 and 13 (bucket 16),
# and 64 and 48 (bucket 64: three 16-row blocks of j per AMX tile unit).
CLIENT_AT_A_TIME_SHAPES = {
    "r16": [(16, 8200, 8195), (13, 8195, 8200), (16, 8200, 8200), (16, 8201, 8199)],
    "r64": [(64, 2050, 2049), (48, 2049, 2050), (64, 2050, 2050), (64, 2051, 2049)],
}


@pytest.mark.parametrize("ranks", sorted(CLIENT_AT_A_TIME_SHAPES))
@pytest.mark.parametrize("align", ["A", "B", "AB"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_client_at_a_time_aggregation_agrees_bitwise(dtype, align, ranks):
    """A layer whose clients exceed half of L2 (8 clients of ~8.4 MB here, above any L2 budget) is
    aggregated one client at a time, the accumulators kept between clients: with 1 thread these 4
    layers take the layer-by-layer schedule and that path; with 2 threads the two-pass schedule sums
    all clients in one go. Same FMAs (or, bf16 on AMX, tile products) in the same order: bitwise
    equal. Odd ranks, in/out not multiples of the tiles, and a strided A (layer 2, by row chunks in
    both) are covered. Each align mode, since it sets which view goes first and what the kernels
    prefetch meanwhile (with 1 thread, the last client group of each layer also prefetches the next
    layer's first covariance inputs)."""
    p = make_problem(CLIENT_AT_A_TIME_SHAPES[ranks], n_clients=8, dtype=dtype, seed=23, rotations="small")
    A = [p.A[l].transpose(1, 2).contiguous().transpose(1, 2) if l == 2 else p.A[l] for l in range(4)]
    kw = dict(ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align=align, lam=0.5)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(fedrot_ext.align_and_aggregate(A, p.B, **kw))
    finally:
        torch.set_num_threads(threads)
    for i, (x, y) in enumerate(zip(runs[0].A + runs[0].B, runs[1].A + runs[1].B)):
        assert torch.equal(x, y), f"output {i} ({dtype}, align {align}, {ranks}) differs between the schedules, seed={p.seed}"
    want = reference.align_and_aggregate(p.A, p.B, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert max(rel_err(x, y) for x, y in zip(runs[0].A + runs[0].B, want.A + want.B)) < tol, f"seed={p.seed}"


def test_deterministic_across_calls_threads_and_streams(device):
    """Bitwise identical across calls, CPU thread counts and (on CUDA) a non-default stream."""
    p = make_problem([(4, 300, 257), (16, 129, 200), (64, 130, 140)], n_clients=10, seed=12).to(device)
    kw = dict(ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align="AB", lam=0.5, return_rotations=True)
    threads = torch.get_num_threads()
    try:
        first = fedrot_ext.align_and_aggregate(p.A, p.B, **kw)
        again = fedrot_ext.align_and_aggregate(p.A, p.B, **kw)
        torch.set_num_threads(1)
        single = fedrot_ext.align_and_aggregate(p.A, p.B, **kw)
    finally:
        torch.set_num_threads(threads)
    runs = [first, again, single]
    if device == "cuda":  # the kernels run on the current stream
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            side = fedrot_ext.align_and_aggregate(p.A, p.B, **kw)
        stream.synchronize()
        runs.append(side)
    tensors = lambda out: out.A + out.B + out.rotations  # noqa: E731
    for k, run in enumerate(runs[1:], 1):
        for i, (x, y) in enumerate(zip(tensors(first), tensors(run))):
            assert torch.equal(x, y), f"output {i} of run {k} differs, seed={p.seed}"


def test_rank_above_fused_buckets_is_deterministic_across_calls(device):
    """The r > 64 fallback (ATen's batched SVD) repeats bitwise at a fixed thread count."""
    p = make_problem([(70, 80, 75), (4, 30, 20)], n_clients=5, seed=16).to(device)
    kw = dict(ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align="AB", lam=0.5, return_rotations=True)
    first, again = (fedrot_ext.align_and_aggregate(p.A, p.B, **kw) for _ in range(2))
    for i, (x, y) in enumerate(zip(first.A + first.B + first.rotations, again.A + again.B + again.rotations)):
        assert torch.equal(x, y), f"output {i} differs, seed={p.seed}"


def test_inputs_are_not_modified(device):
    p = make_problem([(4, 37, 29), (70, 150, 145)], n_clients=3, seed=13).to(device)
    before = [t.clone() for t in p.A + p.B + p.ref_A + p.ref_B]
    fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align="AB")
    for b, a in zip(before, p.A + p.B + p.ref_A + p.ref_B):
        assert torch.equal(a, b), f"seed={p.seed}"


@pytest.mark.parametrize("n_clients", [1, 3])
@pytest.mark.parametrize("align, lam", [("none", 0.5), ("A", 0.0), ("AB", 0.5), ("B", 1.0)])
def test_outputs_do_not_alias_inputs(n_clients, align, lam, device):
    """No output (factors, rotations) shares storage with any input, for N = 1 too, where the average
    is the client itself and a lazy implementation could hand back a view of it; writing to the
    outputs leaves the inputs untouched. Fused ranks and the r > 64 fallback."""
    p = make_problem([(1, 9, 7), (4, 20, 30), (70, 75, 72)], n_clients=n_clients, seed=14).to(device)
    weights = torch.ones(n_clients)
    out = fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, weights=weights, align=align, lam=lam,
                                         return_rotations=True)
    outputs = out.A + out.B + out.rotations
    assert all(t.is_contiguous() for t in out.A + out.B)
    assert_no_aliasing(outputs, p.A + p.B + p.ref_A + p.ref_B + [weights], f"seed={p.seed}")


def test_rotations_are_optional(device):
    p = make_problem([(4, 20, 30)], n_clients=2, seed=15).to(device)
    assert fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A).rotations is None


def test_python_list_weights_keep_float64_precision(device):
    """Shrunk from the fuzz suite: list weights were rounded to float32 before normalising."""
    A = [torch.tensor([[[-2.1788]], [[0.5684]]], dtype=torch.float64, device=device)]
    B = [torch.ones(2, 1, 1, dtype=torch.float64, device=device)]
    weights = [1.0, 0.5731390926297487]
    out = fedrot_ext.align_and_aggregate(A, B, weights=weights, align="none")
    w = torch.tensor(weights, dtype=torch.float64)
    want = (w / w.sum() * A[0].cpu().flatten()).sum()
    assert abs(float(out.A[0]) - float(want)) < 1e-15
