"""torch.library conformance (schema, fake kernels, autograd registration) and torch.compile."""
import pytest
import torch

import fedrot_ext
from factories import make_problem


def op_args(dtype=torch.float32, align=3):
    p = make_problem([(4, 21, 19), (3, 10, 12), (16, 40, 33)], n_clients=3, dtype=dtype, seed=2)
    acc = fedrot_ext.accumulate_dtype(dtype)
    use_A, use_B = align in (1, 3), align in (2, 3)
    return (p.A, p.B, p.ref_A if use_A else [], p.ref_B if use_B else [], (p.weights / p.weights.sum()).to(acc),
            align, 0.5, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("align", [0, 1, 2, 3])
def test_opcheck_align_and_aggregate(dtype, align):
    torch.library.opcheck(torch.ops.fedrot_ext.align_and_aggregate.default, op_args(dtype, align))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_procrustes_rotation(dtype):
    M = torch.randn(5, 6, 6, dtype=dtype)
    torch.library.opcheck(torch.ops.fedrot_ext.procrustes_rotation.default, (M, 0.5, False))


def test_fake_kernel_shapes_match_real_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = op_args()
    real = torch.ops.fedrot_ext.align_and_aggregate(*args)
    with FakeTensorMode() as mode:
        fake_args = [[mode.from_tensor(t) for t in a] if isinstance(a, list) else
                     mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = torch.ops.fedrot_ext.align_and_aggregate(*fake_args)
    for r_list, f_list in zip(real[:3], fake[:3]):
        for r, f in zip(r_list, f_list):
            assert r.shape == f.shape and r.dtype == f.dtype
    assert real[3].shape == fake[3].shape and real[3].dtype == fake[3].dtype


def test_torch_compile_fullgraph_matches_eager():
    args = op_args()

    def aggregate(A, B, ref_A, ref_B, w):
        out_A, out_B, rots, status = torch.ops.fedrot_ext.align_and_aggregate(A, B, ref_A, ref_B, w, 3, 0.5, False)
        return [a * 2 for a in out_A], out_B, status

    compiled = torch.compile(aggregate, fullgraph=True, backend="aot_eager")
    got = compiled(*args[:5])
    want = aggregate(*args[:5])
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.equal(g, w)
    assert int(got[2]) == 0
