"""The align codes and status bits that fedrot_ext/_types.py mirrors from csrc/align_aggregate.h, checked
against what the op does with them: each code aligns as its name says (against the float64 reference), and
each status bit is the one the op sets for its cause."""
import math

import pytest
import torch

from fedrot_ext import reference
from fedrot_ext._types import ALIGN_CODES, STATUS_AGGREGATE_NONFINITE, STATUS_REFERENCE_NONFINITE
from helpers.problems import make_problem, poisoned

SHAPES = [(3, 21, 17), (8, 33, 29)]


def _raw(p, codes, A=None, ref_A=None):
    w = (p.weights / p.weights.sum()).to(torch.float64)
    lam = torch.full((len(SHAPES),), 0.5, dtype=torch.float64)
    return torch.ops.fedrot_ext.align_and_aggregate(A or p.A, p.B, ref_A or p.ref_A, p.ref_B, w, codes, lam, False)


@pytest.mark.parametrize("name", sorted(ALIGN_CODES))
def test_each_align_code_aligns_as_its_name_says(name):
    p = make_problem(SHAPES, n_clients=4, dtype=torch.float64, seed=31)
    out_A, out_B, _, status = _raw(p, [ALIGN_CODES[name]] * len(SHAPES))
    want = reference.align_and_aggregate_ref(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align=name, lam=0.5)
    assert int(status.item()) == 0
    for l in range(len(SHAPES)):
        torch.testing.assert_close(out_A[l], want.A[l], rtol=1e-9, atol=1e-10, msg=f"{name} layer {l} (seed={p.seed})")
        torch.testing.assert_close(out_B[l], want.B[l], rtol=1e-9, atol=1e-10, msg=f"{name} layer {l} (seed={p.seed})")


def test_each_status_bit_is_set_by_its_cause():
    p = make_problem(SHAPES, n_clients=4, dtype=torch.float64, seed=32)
    codes = [ALIGN_CODES["AB"]] * len(SHAPES)
    assert int(_raw(p, codes)[3].item()) == 0
    bad_client = [poisoned(p.A[0], math.nan, client=2)] + list(p.A[1:])
    assert int(_raw(p, codes, A=bad_client)[3].item()) == STATUS_AGGREGATE_NONFINITE
    bad_ref = [poisoned(p.ref_A[0], math.inf)] + list(p.ref_A[1:])
    assert int(_raw(p, codes, ref_A=bad_ref)[3].item()) & STATUS_REFERENCE_NONFINITE
    assert STATUS_AGGREGATE_NONFINITE != STATUS_REFERENCE_NONFINITE and STATUS_AGGREGATE_NONFINITE & STATUS_REFERENCE_NONFINITE == 0
