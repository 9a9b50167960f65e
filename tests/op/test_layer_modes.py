"""Per-layer align modes and λ in one call of the fused op, and lam="auto" (the choose_lam op)."""
import pytest
import torch

import fedrot_ext
from fedrot_ext import reference
from helpers.problems import (
    EPS, assert_matches_reference, dense_product_sum, haar_rotations, layer_conditioning, make_problem, rel_err,
)

# Odd sizes: r = 1, 3 and 64 (the largest compiled bucket), 70 (the ATen fallback), d not a multiple of 8.
SHAPES = [(1, 13, 9), (3, 21, 19), (64, 70, 67), (70, 75, 73), (5, 33, 17)]
ALIGNS = ["A", "none", "AB", "B", "A"]
LAMS = [0.5, 0.3, 1.0, 0.0, 0.75]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_per_layer_modes_and_lams_match_the_reference_in_one_call(dtype, device):
    p = make_problem(SHAPES, n_clients=4, dtype=dtype, seed=11, rotations="small", device=device)
    got = fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align=ALIGNS, lam=LAMS,
                                         return_rotations=True)
    want = reference.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align=ALIGNS, lam=LAMS,
                                         return_rotations=True)
    cond = max(layer_conditioning(p.A[l], p.B[l], p.ref_A[l], p.ref_B[l], ALIGNS[l], LAMS[l], False)
               for l in range(len(SHAPES)))
    assert_matches_reference(got, want, dtype, cond=cond, seed=p.seed, device=device)
    assert got.lam == tuple(LAMS)


def test_per_layer_call_equals_one_call_per_layer_bitwise(device):
    """Mixing modes in one call changes nothing for any layer (the kernels read each layer's own mode)."""
    p = make_problem(SHAPES, n_clients=3, seed=12, device=device)
    together = fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align=ALIGNS,
                                              lam=LAMS, return_rotations=True)
    for l in range(len(SHAPES)):
        alone = fedrot_ext.align_and_aggregate([p.A[l]], [p.B[l]], ref_A=[p.ref_A[l]], ref_B=[p.ref_B[l]],
                                               weights=p.weights, align=ALIGNS[l], lam=LAMS[l], return_rotations=True)
        for name, x, y in (("A", together.A[l], alone.A[0]), ("B", together.B[l], alone.B[0]),
                           ("rotations", together.rotations[l], alone.rotations[0])):
            assert torch.equal(x, y), f"layer {l} {name} differs (seed={p.seed})"


def test_references_may_be_none_where_a_layer_does_not_read_them(device):
    p = make_problem(SHAPES[:3], n_clients=3, seed=13, device=device)
    aligns = ["A", "none", "B"]
    got = fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=[p.ref_A[0], None, None], ref_B=[None, None, p.ref_B[2]],
                                         weights=p.weights, align=aligns, lam=0.5)
    want = fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align=aligns, lam=0.5)
    for x, y in zip(got.A + got.B, want.A + want.B):
        assert torch.equal(x, y), f"seed={p.seed}"


# ----------------------------------------------------------------------------- lam = "auto"
def _dense_errors(A, B, agg, w):
    """Relative aggregation error per layer, on the dense product (float64)."""
    Z = dense_product_sum(A, B, w)
    return [rel_err(agg.B[l].double().cpu() @ agg.A[l].double().cpu(), Z[l]) for l in range(len(A))]


def _independent_problem(shapes, n_clients, seed, dtype=torch.float64, device="cpu"):
    """Clients whose factors live in unrelated gauges (e.g. adapters trained from their own
    initialisations): the regime where alignment matters most."""
    g = torch.Generator().manual_seed(seed)
    A, B, rA, rB = [], [], [], []
    for r, d_in, d_out in shapes:
        core_B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
        core_A = torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in**0.5
        Q = haar_rotations(n_clients, r, g)
        A.append((Q.transpose(1, 2) @ (core_A + 0.2 * torch.randn(n_clients, r, d_in, generator=g, dtype=torch.float64)
                                       / d_in**0.5)).to(device, dtype))
        B.append(((core_B + 0.2 * torch.randn(n_clients, d_out, r, generator=g, dtype=torch.float64)) @ Q).to(device, dtype))
        rA.append(A[-1][0].clone())
        rB.append(B[-1][0].clone())
    return A, B, rA, rB, torch.rand(n_clients, generator=g, dtype=torch.float64) + 0.1


@pytest.mark.parametrize("seed", range(12))
def test_auto_is_never_worse_than_fedit_or_any_fixed_lambda(seed, device):
    """λ = 0 is a candidate, so on every layer the chosen aggregate's error is <= FedIT's, and
    <= that of every other grid value, up to the rounding of the Grams it was scored from."""
    kind = seed % 3
    shapes = [(4, 23, 19), (8, 40, 31), (1, 9, 7), (16, 50, 47)]
    if kind == 0:  # clients as after a federated round: rotated noisy copies of the reference
        p = make_problem(shapes, n_clients=6, dtype=torch.float64, seed=seed, device=device)
        A, B, rA, rB, w = p.A, p.B, p.ref_A, p.ref_B, p.weights
    elif kind == 1:  # independent gauges, reference = one client
        A, B, rA, rB, w = _independent_problem(shapes, 6, seed, device=device)
    else:  # small drift: little to align, auto must not hurt
        p = make_problem(shapes, n_clients=6, dtype=torch.float64, seed=seed, rotations="small", noise=0.05, device=device)
        A, B, rA, rB, w = p.A, p.B, p.ref_A, p.ref_B, p.weights
    align = ["A", "B", "AB", "A"]
    auto = fedrot_ext.align_and_aggregate(A, B, ref_A=rA, ref_B=rB, weights=w, align=align, lam="auto")
    err_auto = _dense_errors(A, B, auto, w)
    for lam in fedrot_ext.DEFAULT_LAM_GRID:
        fixed = fedrot_ext.align_and_aggregate(A, B, ref_A=rA, ref_B=rB, weights=w, align=align, lam=lam)
        for l, (e_auto, e_fixed) in enumerate(zip(err_auto, _dense_errors(A, B, fixed, w))):
            assert e_auto <= e_fixed + 1e-6, f"layer {l}: auto {e_auto:.6g} > lam={lam} {e_fixed:.6g} (seed={seed})"
    assert all(v in fedrot_ext.DEFAULT_LAM_GRID for v in auto.lam), f"seed={seed}: {auto.lam}"


def test_auto_errors_match_the_dense_reference(device):
    """The Gram-scored errors equal the dense ‖Σ w B A − B̄Ā‖ / ‖Σ w B A‖ of every candidate (float64)."""
    A, B, rA, rB, w = _independent_problem([(4, 23, 19), (64, 66, 65), (70, 72, 71)], 5, seed=21, device=device)
    align = ["A", "AB", "B"]
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    w_n = (w / w.sum()).to(device)
    lam, errors = torch.ops.fedrot_ext.choose_lam(
        A, B, rA, rB, w_n, [fedrot_ext._types.ALIGN_CODES[a] for a in align], grid, False)
    want_lam, want_errors = reference.choose_lam_ref(A, B, ref_A=rA, ref_B=rB, weights=w, align=align, grid=grid)
    torch.testing.assert_close(errors.cpu(), want_errors, rtol=1e-7, atol=1e-9)
    assert lam.cpu().tolist() == want_lam
    # The aggregate with "auto" is exactly the fixed-λ aggregate at the chosen values.
    auto = fedrot_ext.align_and_aggregate(A, B, ref_A=rA, ref_B=rB, weights=w, align=align, lam="auto")
    fixed = fedrot_ext.align_and_aggregate(A, B, ref_A=rA, ref_B=rB, weights=w, align=align, lam=list(auto.lam))
    assert auto.lam == tuple(want_lam)
    for x, y in zip(auto.A + auto.B, fixed.A + fixed.B):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_auto_in_low_precision_is_within_rounding_of_the_best_candidate(dtype, device):
    A, B, rA, rB, w = _independent_problem([(8, 41, 37), (3, 17, 29)], 7, seed=5, dtype=dtype, device=device)
    auto = fedrot_ext.align_and_aggregate(A, B, ref_A=rA, ref_B=rB, weights=w, align="AB", lam="auto")
    _, errors = reference.choose_lam_ref(A, B, ref_A=rA, ref_B=rB, weights=w, align="AB")
    grid = list(fedrot_ext.DEFAULT_LAM_GRID)
    for l, lam in enumerate(auto.lam):
        best = float(errors[l].min())
        picked = float(errors[l, grid.index(lam)])
        assert picked <= best + 20 * EPS[dtype] ** 0.5, f"layer {l}: picked {picked:.4g}, best {best:.4g} (seed=5)"
    assert auto.A[0].dtype == dtype


def test_auto_with_a_degenerate_reference_keeps_fedit(device):
    """A zero reference gives every client R = I for every λ: all candidates tie, the first (0) is kept."""
    p = make_problem([(4, 20, 18)], n_clients=3, seed=3, device=device)
    zero = [torch.zeros_like(p.ref_A[0])]
    got = fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=zero, weights=p.weights, align="A", lam="auto")
    fedit = fedrot_ext.align_and_aggregate(p.A, p.B, weights=p.weights, align="none")
    assert got.lam == (0.0,)
    assert torch.equal(got.A[0], fedit.A[0]) and torch.equal(got.B[0], fedit.B[0])


def test_auto_on_meta_tensors_gives_shapes(device):
    p = make_problem([(4, 20, 18), (2, 9, 7)], n_clients=3, seed=4)
    meta = lambda ts: [t.to("meta") for t in ts]  # noqa: E731
    got = fedrot_ext.align_and_aggregate(meta(p.A), meta(p.B), ref_A=meta(p.ref_A), align="A", lam="auto")
    assert [tuple(a.shape) for a in got.A] == [(4, 20), (2, 9)] and got.A[0].device.type == "meta"
