"""Invalid-client policy, norm clipping and noise of the core op, on every device.
(The same options on state dicts: tests/peft/test_state_dict_robustness.py.)"""
import math

import pytest
import torch

import fedrot_ext
from fedrot_ext._robust import client_update_norms
from helpers.problems import make_problem, poisoned


def problem(device, n_clients=5, seed=0):
    return make_problem([(4, 37, 29), (8, 50, 41)], n_clients=n_clients, seed=seed).to(device)


def poison(p, layer, client, value=math.nan, factor="A"):
    tensors = list(p.A if factor == "A" else p.B)
    tensors[layer] = poisoned(tensors[layer], value, client=client, position=1)
    return tensors


def test_skip_drops_invalid_clients_and_renormalises(device):
    p = problem(device)
    A = poison(p, 1, 2)
    B = poison(p, 0, 4, math.inf, factor="B")
    kw = dict(ref_A=p.ref_A, ref_B=p.ref_B, align="AB", lam=0.5, return_rotations=True)
    out = fedrot_ext.align_and_aggregate(A, B, weights=p.weights, on_invalid="skip", **kw)
    assert [i for i, _ in out.dropped] == [2, 4]
    assert "A[1][2] (layer 1, client 2)" in out.dropped[0][1] and "B[0][4]" in out.dropped[1][1]
    keep = [0, 1, 3]
    subset = fedrot_ext.align_and_aggregate([a[keep] for a in A], [b[keep] for b in B], weights=p.weights[keep], **kw)
    for x, y in zip(out.A + out.B, subset.A + subset.B):
        assert torch.equal(x, y)
    for R, R_sub in zip(out.rotations, subset.rotations):
        assert torch.equal(R[keep], R_sub)
        eye = torch.eye(R.shape[-1], device=R.device)
        assert torch.equal(R[2], eye) and torch.equal(R[4], eye)


def test_raise_names_client_and_tensor_and_suggests_skip(device):
    p = problem(device)
    with pytest.raises(ValueError, match=r"A\[1\]\[3\] \(layer 1, client 3\).*on_invalid='skip'"):
        fedrot_ext.align_and_aggregate(poison(p, 1, 3), p.B, ref_A=p.ref_A)


def test_skip_with_every_client_invalid_raises(device):
    p = problem(device, n_clients=2)
    A = [a * math.nan for a in p.A]
    with pytest.raises(ValueError, match=r"all 2 clients hold NaN or Inf"):
        fedrot_ext.align_and_aggregate(A, p.B, ref_A=p.ref_A, on_invalid="skip")


def test_skip_when_remaining_clients_have_zero_weight_raises(device):
    p = problem(device, n_clients=2)
    with pytest.raises(ValueError, match=r"weights: every valid client has weight 0"):
        fedrot_ext.align_and_aggregate(poison(p, 0, 0), p.B, ref_A=p.ref_A, weights=[1.0, 0.0], on_invalid="skip")


def test_valid_input_reports_nothing_dropped(device):
    p = problem(device)
    assert fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, on_invalid="skip").dropped == ()


def test_update_norms_from_grams_match_dense(device):
    p = make_problem([(4, 37, 29), (8, 50, 41)], n_clients=3, dtype=torch.float64, seed=1)
    norms = client_update_norms(p.to(device).A, p.to(device).B, torch.float64).cpu()
    dense = torch.stack([sum((b[i] @ a[i]).norm() ** 2 for a, b in zip(p.A, p.B)).sqrt() for i in range(3)])
    assert torch.allclose(norms, dense, rtol=1e-12), f"seed={p.seed}"


def test_clip_norm_bounds_each_client_update(device):
    p = make_problem([(4, 37, 29), (8, 50, 41)], n_clients=1, dtype=torch.float64, seed=2).to(device)
    norm = float(client_update_norms(p.A, p.B, torch.float64)[0])
    clipped = fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, clip_norm=norm / 4)
    dense = sum((b @ a).norm() ** 2 for a, b in zip(clipped.A, clipped.B)).sqrt()
    assert math.isclose(float(dense), norm / 4, rel_tol=1e-10)


def test_clip_norm_above_every_norm_changes_nothing_and_rotations_are_unaffected(device):
    p = problem(device, seed=3)
    kw = dict(ref_A=p.ref_A, weights=p.weights, return_rotations=True)
    plain = fedrot_ext.align_and_aggregate(p.A, p.B, **kw)
    loose = fedrot_ext.align_and_aggregate(p.A, p.B, clip_norm=1e9, **kw)
    tight = fedrot_ext.align_and_aggregate(p.A, p.B, clip_norm=1e-3, **kw)
    for x, y in zip(plain.A + plain.B + plain.rotations, loose.A + loose.B + loose.rotations):
        assert torch.equal(x, y)
    for R, R_tight in zip(plain.rotations, tight.rotations):
        assert torch.equal(R, R_tight)
    assert float(tight.A[0].norm()) < float(plain.A[0].norm())


def test_noise_is_seeded_and_calibrated(device):
    p = make_problem([(16, 400, 300)], n_clients=4, seed=4).to(device)
    generator = lambda seed: torch.Generator(device=device).manual_seed(seed)  # noqa: E731
    kw = dict(ref_A=p.ref_A, weights=[1.0, 1.0, 1.0, 1.0], clip_norm=2.0)
    clean = fedrot_ext.align_and_aggregate(p.A, p.B, **kw)
    noisy1 = fedrot_ext.align_and_aggregate(p.A, p.B, noise_multiplier=0.5,
                                            generator=generator(7), **kw)
    noisy2 = fedrot_ext.align_and_aggregate(p.A, p.B, noise_multiplier=0.5,
                                            generator=generator(7), **kw)
    noisy3 = fedrot_ext.align_and_aggregate(p.A, p.B, noise_multiplier=0.5,
                                            generator=generator(8), **kw)
    assert torch.equal(noisy1.A[0], noisy2.A[0]) and not torch.equal(noisy1.A[0], noisy3.A[0])
    sigma = 0.5 * 2.0 * 0.25
    for got, base in ((noisy1.A[0], clean.A[0]), (noisy1.B[0], clean.B[0])):
        residual = (got - base).double()
        assert abs(float(residual.std()) / sigma - 1) < 0.05
        assert abs(float(residual.mean())) < 4 * sigma / residual.numel() ** 0.5


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(on_invalid="ignore"), r"on_invalid: expected 'raise' or 'skip'"),
        (dict(clip_norm=-1.0), r"clip_norm: expected a positive finite number"),
        (dict(clip_norm=math.inf), r"clip_norm: expected a positive finite number"),
        (dict(noise_multiplier=0.1), r"noise_multiplier: requires clip_norm"),
        (dict(noise_multiplier=-0.1, clip_norm=1.0), r"noise_multiplier: expected a finite number >= 0"),
    ],
)
def test_policy_arguments_are_checked(kw, pattern, device):
    p = problem(device)
    with pytest.raises(ValueError, match=pattern):
        fedrot_ext.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, **kw)


def test_clip_norm_catches_updates_whose_norm_overflows_float32(device):
    """Finite fp32 factors of 1e20 have ‖B A‖ ~ 1e40 > float32 max: they must still be clipped."""
    p = make_problem([(4, 20, 16)], n_clients=2, seed=5).to(device)
    A = [p.A[0].clone()]
    B = [p.B[0].clone()]
    A[0][1] *= 1e20
    B[0][1] *= 1e20
    out = fedrot_ext.align_and_aggregate(A, B, ref_A=p.ref_A, weights=[1.0, 1.0], clip_norm=1.0)
    assert torch.isfinite(out.A[0]).all() and torch.isfinite(out.B[0]).all()
    assert float(out.A[0].norm()) < 10 and float(out.B[0].norm()) < 10


# (r, in, out) with d not a multiple of the vector width, a rank padded into its bucket, and one
# above the fused buckets (ATen fallback); the poisoned element sits in each view's vector tail.
STATUS_SHAPES = [(3, 37, 29), (16, 67, 45), (70, 21, 19)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_nonfinite_reference_sets_its_own_status_bit(dtype, transposed, device):
    """The op reports a NaN/Inf reference of an aligned layer as STATUS_REFERENCE_NONFINITE, on every
    kernel path (A and B views, contiguous or transposed storage, fused or fallback rank); a NaN in
    the reference of a layer that does not align is not read, and a clean call reports nothing."""
    from fedrot_ext._types import ALIGN_CODES, STATUS_REFERENCE_NONFINITE

    p = make_problem(STATUS_SHAPES, n_clients=3, dtype=dtype, seed=11).to(device)
    layout = (lambda t: t.t().contiguous().t()) if transposed else (lambda t: t)  # same values, other strides
    w = (p.weights / p.weights.sum()).to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    lam = torch.full((len(STATUS_SHAPES),), 0.5, dtype=w.dtype, device=device)

    def status(ref_A, ref_B, aligns):
        codes = [ALIGN_CODES[a] for a in aligns]
        out = torch.ops.fedrot_ext.align_and_aggregate(p.A, p.B, [layout(t) for t in ref_A], [layout(t) for t in ref_B],
                                                      w, codes, lam, False)
        return int(out[3].item())

    assert status(p.ref_A, p.ref_B, ["AB"] * 3) == 0, f"seed={p.seed}"
    for layer in range(len(STATUS_SHAPES)):
        for factor, value, where in (("A", math.nan, "first"), ("A", math.inf, "last"), ("B", math.inf, "first"),
                                     ("B", math.nan, "last")):
            refs = {"A": list(p.ref_A), "B": list(p.ref_B)}
            position = 1 if where == "first" else refs[factor][layer].numel() - 1  # in a vector, in the tail
            refs[factor][layer] = poisoned(refs[factor][layer], value, position=position)
            aligns = ["AB"] * 3
            got = status(refs["A"], refs["B"], aligns)
            assert got == STATUS_REFERENCE_NONFINITE, f"{factor} layer {layer} {where}: status {got} (seed={p.seed})"
            aligns[layer] = "B" if factor == "A" else "A"  # the poisoned reference is not read
            assert status(refs["A"], refs["B"], aligns) == 0, f"{factor} layer {layer} unread (seed={p.seed})"
