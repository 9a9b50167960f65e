"""torch.library conformance (schema, fake kernels, autograd registration) and torch.compile."""
import pytest
import torch

import fedrot_ext
from helpers.problems import make_problem


def op_args(dtype=torch.float32, align=3, device="cpu", requires_grad=False):
    """The raw op's arguments; `align` an int code for every layer or a list of three (None refs where unread)."""
    p = make_problem([(4, 21, 19), (3, 10, 12), (16, 40, 33)], n_clients=3, dtype=dtype, seed=2, device=device)
    acc = fedrot_ext.accumulate_dtype(dtype)
    aligns = [align] * 3 if isinstance(align, int) else list(align)
    ref_A = [r if a in (1, 3) else None for r, a in zip(p.ref_A, aligns)]
    ref_B = [r if a in (2, 3) else None for r, a in zip(p.ref_B, aligns)]
    A = [a.detach().requires_grad_(requires_grad) for a in p.A]
    lam = torch.tensor([0.5, 0.25, 1.0], dtype=acc, device=device)
    return (A, p.B, ref_A if any(x is not None for x in ref_A) else [], ref_B if any(x is not None for x in ref_B) else [],
            (p.weights / p.weights.sum()).to(device, acc), aligns, lam, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("align", [0, 1, 2, 3, (1, 0, 2), (3, 2, 1)], ids=str)
def test_opcheck_align_and_aggregate(dtype, align, device):
    torch.library.opcheck(torch.ops.fedrot_ext.align_and_aggregate.default, op_args(dtype, align, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("align", [1, (1, 0, 2)], ids=str)
def test_opcheck_choose_lam(dtype, align, device):
    A, B, ref_A, ref_B, w, aligns, _, _ = op_args(dtype, align, device)
    torch.library.opcheck(torch.ops.fedrot_ext.choose_lam.default, (A, B, ref_A, ref_B, w, aligns, [0.0, 0.5, 1.0], False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("align", [0, 3])
def test_opcheck_autograd_registration_with_inputs_that_require_grad(align, device):
    """With an input that requires grad, opcheck checks that the op registered autograd (it did:
    a backward that raises). AOT dispatch would trace that backward, which is exactly what raises."""
    args = op_args(torch.float32, align, device, requires_grad=True)
    assert args[0][0].requires_grad
    torch.library.opcheck(torch.ops.fedrot_ext.align_and_aggregate.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_procrustes_rotation(dtype, device):
    M = torch.randn(5, 6, 6, dtype=dtype, generator=torch.Generator().manual_seed(3)).to(device)
    torch.library.opcheck(torch.ops.fedrot_ext.procrustes_rotation.default, (M, 0.5, False))
    torch.library.opcheck(torch.ops.fedrot_ext.procrustes_rotation.default, (M.requires_grad_(), 0.5, False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_fake_kernel_shapes_match_real_kernel(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = op_args(device=device)
    real = torch.ops.fedrot_ext.align_and_aggregate(*args)
    with FakeTensorMode() as mode:
        fake = lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x  # noqa: E731
        fake_args = [[fake(t) for t in a] if isinstance(a, list) else fake(a) for a in args]
        fake_out = torch.ops.fedrot_ext.align_and_aggregate(*fake_args)
    for r_list, f_list in zip(real[:3], fake_out[:3]):
        for r, f in zip(r_list, f_list):
            assert r.shape == f.shape and r.dtype == f.dtype and r.device == f.device
    assert real[3].shape == fake_out[3].shape and real[3].dtype == fake_out[3].dtype


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend, device):
    args = op_args(device=device)

    def aggregate(A, B, ref_A, ref_B, w, lam):
        out_A, out_B, rots, status = torch.ops.fedrot_ext.align_and_aggregate(A, B, ref_A, ref_B, w, [3, 3, 3], lam, False)
        return [a * 2 + 1 for a in out_A], [b.sin() for b in out_B], status  # ops around it for inductor to fuse

    torch._dynamo.reset()
    compiled = torch.compile(aggregate, fullgraph=True, backend=backend)
    got = compiled(*args[:5], args[6])
    want = aggregate(*args[:5], args[6])
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)  # inductor may reassociate the pointwise tail
    assert int(got[2]) == 0
