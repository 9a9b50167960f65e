"""Bad input to the op (stacked tensors), on every device: a Python exception that names the argument;
nothing is modified. (Bad state dicts: tests/peft/test_state_dict_bad_input.py.)"""
import math

import pytest
import torch

import fedrot_ext
from helpers.problems import make_problem, poisoned


def base_kwargs(device):
    p = make_problem([(4, 21, 19), (3, 17, 11)], n_clients=4, seed=0).to(device)
    return dict(A=list(p.A), B=list(p.B), ref_A=list(p.ref_A), ref_B=list(p.ref_B), weights=p.weights.clone(),
                align="AB", lam=0.5)


def with_nan(t, client, value):
    return poisoned(t, value, client=client, position=3)


def elsewhere(t):
    """The same tensor on another device than the call's: meta for a CPU call, the CPU for a GPU call."""
    return t.to("meta" if t.device.type == "cpu" else "cpu")


def edit(**changes):
    def apply(kw):
        for key, fn in changes.items():
            kw[key] = fn(kw)
        return kw
    return apply


CASES = {
    "empty A": (edit(A=lambda k: [], B=lambda k: []), ValueError, r"A: expected a non-empty list"),
    "A not a list": (edit(A=lambda k: k["A"][0]), TypeError, r"A: expected a list or tuple"),
    "A element not a tensor": (edit(A=lambda k: [k["A"][0], "x"]), TypeError, r"A\[1\]: expected a torch.Tensor"),
    "B layer count": (edit(B=lambda k: k["B"][:1]), ValueError, r"B: expected 2 layer tensors"),
    "A 2-D": (edit(A=lambda k: [k["A"][0], k["A"][1][0]]), ValueError, r"A\[1\]: expected a 3-D tensor"),
    "B rank mismatch": (edit(B=lambda k: [k["B"][0][:, :, :3], k["B"][1]]), ValueError, r"B\[0\]: expected shape \(4, out_features, 4\)"),
    "B 2-D": (edit(B=lambda k: [k["B"][0], k["B"][1][0]]), ValueError, r"B\[1\]: expected a 3-D tensor"),
    "zero rank": (edit(A=lambda k: [k["A"][0], k["A"][1][:, :0]], B=lambda k: [k["B"][0], k["B"][1][:, :, :0]]), ValueError, r"A\[1\]/B\[1\]: expected non-zero rank"),
    "zero out_features": (edit(B=lambda k: [k["B"][0][:, :0], k["B"][1]]), ValueError, r"A\[0\]/B\[0\]: expected non-zero rank and feature sizes"),
    "client count mismatch across layers": (edit(A=lambda k: [k["A"][0], k["A"][1][:3]], B=lambda k: [k["B"][0], k["B"][1][:3]]), ValueError, r"A\[1\]: expected 4 clients"),
    "client count mismatch A/B": (edit(B=lambda k: [k["B"][0][:3], k["B"][1]]), ValueError, r"B\[0\]: expected shape \(4,"),
    "no clients": (edit(A=lambda k: [a[:0] for a in k["A"]], B=lambda k: [b[:0] for b in k["B"]]), ValueError, r"empty client list"),
    "ref_A missing": (edit(ref_A=lambda k: None), ValueError, r"ref_A: required when align='AB'"),
    "ref_B missing": (edit(ref_B=lambda k: None), ValueError, r"ref_B: required when align='AB'"),
    "ref_A shape": (edit(ref_A=lambda k: [k["ref_A"][0][:, :20], k["ref_A"][1]]), ValueError, r"ref_A\[0\]: expected shape \(4, 21\)"),
    "ref_B shape": (edit(ref_B=lambda k: [k["ref_B"][0], k["ref_B"][1].t()]), ValueError, r"ref_B\[1\]: expected shape \(11, 3\)"),
    "ref_B unread but of the wrong shape": (edit(align=lambda k: "A", ref_B=lambda k: [k["ref_B"][0], k["ref_B"][1].t()]), ValueError, r"ref_B\[1\]: expected shape \(11, 3\)"),
    "ref_A not a list": (edit(ref_A=lambda k: k["ref_A"][0]), TypeError, r"ref_A: expected a list or tuple"),
    "ref_A entry not a tensor": (edit(ref_A=lambda k: [k["ref_A"][0], "x"]), TypeError, r"ref_A\[1\]: expected a torch.Tensor"),
    "ref_A layer count": (edit(ref_A=lambda k: k["ref_A"][:1]), ValueError, r"ref_A: expected 2 layer tensors"),
    "NaN in A": (edit(A=lambda k: [k["A"][0], with_nan(k["A"][1], 2, math.nan)]), ValueError, r"A\[1\]\[2\] \(layer 1, client 2\).*NaN or Inf"),
    "Inf in B": (edit(B=lambda k: [with_nan(k["B"][0], 1, math.inf), k["B"][1]]), ValueError, r"B\[0\]\[1\] \(layer 0, client 1\).*NaN or Inf"),
    "-Inf in unaligned B": (edit(align=lambda k: "A", B=lambda k: [k["B"][0], with_nan(k["B"][1], 3, -math.inf)]), ValueError, r"B\[1\]\[3\]"),
    "NaN in ref_A": (edit(ref_A=lambda k: [k["ref_A"][0], k["ref_A"][1] * math.nan]), ValueError, r"ref_A\[1\]: expected finite"),
    "negative weight": (edit(weights=lambda k: torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError, r"weights: expected non-negative"),
    "all-zero weights": (edit(weights=lambda k: torch.zeros(4)), ValueError, r"weights: expected a positive sum"),
    "NaN weight": (edit(weights=lambda k: torch.tensor([1.0, math.nan, 1.0, 1.0])), ValueError, r"weights: expected finite"),
    "weights length": (edit(weights=lambda k: torch.ones(3)), ValueError, r"weights: expected shape \(4,\)"),
    "lam below 0": (edit(lam=lambda k: -0.1), ValueError, r"lam: expected a value in \[0, 1\]"),
    "lam above 1": (edit(lam=lambda k: 1.5), ValueError, r"lam: expected a value in \[0, 1\]"),
    "lam NaN": (edit(lam=lambda k: math.nan), ValueError, r"lam: expected a value in \[0, 1\]"),
    "lam not a number": (edit(lam=lambda k: "half"), TypeError, r"lam: expected a float"),
    "lam per layer: wrong count": (edit(lam=lambda k: [0.5]), ValueError, r"lam: expected 2 values \(one per layer\), got 1"),
    "lam per layer: out of range": (edit(lam=lambda k: [0.5, 1.5]), ValueError, r"lam\[1\]: expected a value in \[0, 1\]"),
    "lam_grid without 0": (edit(lam=lambda k: "auto", lam_grid=lambda k: (0.5, 1.0)), ValueError, r"lam_grid: expected 0.0 among"),
    "lam_grid empty": (edit(lam=lambda k: "auto", lam_grid=lambda k: ()), ValueError, r"lam_grid: expected a non-empty"),
    "align per layer: wrong count": (edit(align=lambda k: ["A"]), ValueError, r"align: expected 2 modes \(one per layer\), got 1"),
    "align per layer: bad mode": (edit(align=lambda k: ["A", "C"]), ValueError, r"align\[1\]: expected one of"),
    "ref_A entry missing for a layer that aligns on A": (edit(align=lambda k: ["B", "A"], ref_A=lambda k: [k["ref_A"][0], None]), ValueError, r"ref_A\[1\]: required when align\[1\]='A'"),
    "unknown align": (edit(align=lambda k: "C"), ValueError, r"align: expected one of"),
    "mixed dtypes": (edit(B=lambda k: [k["B"][0].double(), k["B"][1]]), TypeError, r"B\[0\]: expected dtype torch.float32"),
    "mixed ref dtype": (edit(ref_B=lambda k: [k["ref_B"][0].half(), k["ref_B"][1]]), TypeError, r"ref_B\[0\]: expected dtype"),
    "integer dtype": (edit(A=lambda k: [a.long() for a in k["A"]], B=lambda k: [b.long() for b in k["B"]]), TypeError, r"A\[0\]: expected dtype in"),
    "mixed devices": (edit(B=lambda k: [k["B"][0], elsewhere(k["B"][1])]), ValueError, r"B\[1\]: expected device {device}"),
    "mixed ref device": (edit(ref_A=lambda k: [elsewhere(k["ref_A"][0]), k["ref_A"][1]]), ValueError, r"ref_A\[0\]: expected device {device}"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_raises_naming_the_argument(case, device):
    change, exc, pattern = CASES[case]
    pattern = pattern.replace("{device}", device)
    kw = change(base_kwargs(device))
    snapshot = {k: ([t.clone() if isinstance(t, torch.Tensor) else t for t in v] if isinstance(v, list)
                    else v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    A, B = kw.pop("A"), kw.pop("B")
    with pytest.raises(exc, match=pattern):
        fedrot_ext.align_and_aggregate(A, B, **kw)
    kw.update(A=A, B=B)
    for key, before in snapshot.items():  # no input is ever modified
        after = kw[key]
        pairs = zip(before, after) if isinstance(before, list) else [(before, after)]
        for b, a in pairs:
            if isinstance(b, torch.Tensor) and b.device.type != "meta":
                assert torch.equal(b.nan_to_num(), a.nan_to_num()) and a.dtype == b.dtype


def test_fp16_overflow_is_reported_not_returned(device):
    # A 45° rotation of [60000, 60000] has a component 60000·√2 > fp16 max.
    A = [torch.tensor([[[60000.0], [60000.0]]], device=device).half()]  # (N=1, r=2, in=1)
    B = [torch.ones(1, 3, 2, device=device).half()]
    ref_A = [torch.tensor([[0.0], [1.0]], device=device).half()]  # aligning puts all of |a| = 84853 on one entry
    with pytest.raises(ValueError, match=r"overflowed torch.float16"):
        fedrot_ext.align_and_aggregate(A, B, ref_A=ref_A, align="A", lam=1.0)


@pytest.mark.parametrize(
    "M, exc, pattern",
    [
        (torch.zeros(3, 4), ValueError, r"M: expected a tensor of shape \(\.\.\., r, r\)"),
        (torch.zeros(4), ValueError, r"M: expected a tensor of shape"),
        (torch.zeros(2, 3, 3, dtype=torch.int64), TypeError, r"M: expected dtype float32 or float64"),
        (torch.full((2, 3, 3), math.nan), ValueError, r"M: expected finite values"),
        (torch.zeros(2, 0, 0), ValueError, r"M: expected r >= 1"),
    ],
)
def test_procrustes_rotation_bad_input(M, exc, pattern, device):
    with pytest.raises(exc, match=pattern):
        fedrot_ext.procrustes_rotation(M.to(device))


def test_procrustes_rotation_bad_lambda(device):
    with pytest.raises(ValueError, match=r"lam: expected a value in \[0, 1\]"):
        fedrot_ext.procrustes_rotation(torch.eye(3, device=device), lam=2.0)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda a: a.update(B=[a["B"][0][:, :, :2]]), r"B\[0\]: expected shape"),
        (lambda a: a.update(ref_A=[]), r"ref_A\[0\]: expected a tensor of shape \[4, 21\] for align\[0\]=1, got None"),
        (lambda a: a.update(ref_A=[None, None]), r"ref_A: expected 1 entries"),
        (lambda a: a.update(align=[7]), r"align\[0\]: expected 0 \(none\), 1 \(A\), 2 \(B\) or 3 \(AB\)"),
        (lambda a: a.update(align=[1, 1]), r"align: expected 1 modes \(one per layer\), got 2"),
        (lambda a: a.update(lam=torch.full((2,), 0.5)), r"lam: expected shape \(1\)"),
        (lambda a: a.update(lam=torch.full((1,), 0.5, dtype=torch.float64)), r"lam: expected dtype Float"),
        (lambda a: a.update(weights=torch.ones(2)), r"weights: expected shape \(4\)"),
        (lambda a: a.update(weights=torch.ones(4, dtype=torch.float64)), r"weights: expected dtype Float"),
        (lambda a: a.update(A=[]), r"A: expected a non-empty list"),
    ],
)
def test_direct_op_calls_are_checked_in_cpp(mutate, pattern, device):
    p = make_problem([(4, 21, 19)], n_clients=4, seed=1).to(device)
    args = dict(A=p.A, B=p.B, ref_A=p.ref_A, ref_B=[], weights=torch.full((4,), 0.25), align=[1], lam=torch.full((1,), 0.5))
    mutate(args)
    for key in ("weights", "lam"):  # the raw op takes normalised weights and λ on the factors' device
        args[key] = args[key].to(device)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
        torch.ops.fedrot_ext.align_and_aggregate(args["A"], args["B"], args["ref_A"], args["ref_B"], args["weights"],
                                                 args["align"], args["lam"], False)
