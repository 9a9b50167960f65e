"""Meta and fake tensors: the ops check shapes/dtypes and return outputs of the right shapes."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fedrot_ext

LAYERS = [(1, 7, 5), (3, 13, 9)]  # (r, in, out); r = 1 and odd feature sizes
N = 4


def factors(device, dtype=torch.float32):
    A = [torch.empty(N, r, d_in, device=device, dtype=dtype) for r, d_in, _ in LAYERS]
    B = [torch.empty(N, d_out, r, device=device, dtype=dtype) for r, _, d_out in LAYERS]
    return A, B, [a[0] for a in A], [b[0] for b in B]


def check_shapes(out, dtype, device_type):
    for l, (r, d_in, d_out) in enumerate(LAYERS):
        assert out.A[l].shape == (r, d_in) and out.B[l].shape == (d_out, r)
        assert out.A[l].dtype == out.B[l].dtype == dtype
        assert out.rotations[l].shape == (N, r, r)
        assert out.rotations[l].dtype == fedrot_ext.accumulate_dtype(dtype)
        assert out.A[l].device.type == device_type


@pytest.mark.parametrize("align", ["A", "B", "AB", "none"])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 3.0, 4.0], "meta tensor"])
def test_meta_inputs_give_meta_outputs_of_the_right_shapes(align, weights):
    A, B, ref_A, ref_B = factors("meta", torch.bfloat16)
    w = torch.ones(N, device="meta") if weights == "meta tensor" else weights
    out = fedrot_ext.align_and_aggregate(A, B, ref_A=ref_A, ref_B=ref_B, weights=w, align=align,
                                         return_rotations=True)
    check_shapes(out, torch.bfloat16, "meta")


def test_fake_tensor_mode():
    with FakeTensorMode():
        A, B, ref_A, ref_B = factors("cpu")
        out = fedrot_ext.align_and_aggregate(A, B, ref_A=ref_A, ref_B=ref_B, align="AB", return_rotations=True,
                                             weights=[1, 2, 3, 4])
        check_shapes(out, torch.float32, "cpu")
        assert fedrot_ext.procrustes_rotation(torch.empty(5, 3, 3)).shape == (5, 3, 3)


def test_meta_shape_errors_still_name_the_argument():
    A = [torch.empty(3, 2, 5, device="meta")]
    good_B = [torch.empty(3, 4, 2, device="meta")]
    with pytest.raises(ValueError, match=r"B\[0\]: expected shape \(3, out_features, 2\)"):
        fedrot_ext.align_and_aggregate(A, [torch.empty(3, 4, 3, device="meta")], ref_A=[A[0][0]])
    with pytest.raises(ValueError, match=r"weights: expected shape \(3,\)"):
        fedrot_ext.align_and_aggregate(A, good_B, ref_A=[A[0][0]], weights=[1, 2])
    with pytest.raises(ValueError, match=r"weights: expected non-negative values, got min -2"):
        fedrot_ext.align_and_aggregate(A, good_B, ref_A=[A[0][0]], weights=[1, -2, 1])


def test_procrustes_rotation_on_meta():
    R = fedrot_ext.procrustes_rotation(torch.empty(2, 4, 4, device="meta", dtype=torch.float64), lam=1.0)
    assert R.shape == (2, 4, 4) and R.dtype == torch.float64 and R.device.type == "meta"
