"""CUDA path: the same contract as the CPU path. Skipped cleanly without a GPU."""
import os

import pytest
import torch

import fedrot_ext
from fedrot_ext import reference
from factories import ROTATION_TOLERANCE, TOLERANCE, make_problem, rel_err


def test_cuda_kernels_compiled_when_toolkit_present():
    """CI sets FEDROT_EXPECT_CUDA_BUILD=1 where nvcc and a CUDA torch exist: the kernels must be there."""
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("fedrot_ext::align_and_aggregate", "CUDA")
    if os.environ.get("FEDROT_EXPECT_CUDA_BUILD") == "1":
        assert has_cuda_kernel, "built without CUDA although a toolkit and a CUDA torch were expected"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fedrot_ext::align_and_aggregate", "CPU")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("r", [1, 3, 8, 16, 33, 64, 70])
@pytest.mark.parametrize("align", ["none", "A", "B", "AB"])
def test_cuda_matches_reference(r, dtype, align):
    shapes = [(r, 2 * r + 13, 3 * r + 7), (r, 2 * r + 61, 2 * r + 3)]
    p = make_problem(shapes, n_clients=1 + r % 7, dtype=dtype, seed=r, device="cuda")
    kw = dict(ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align=align, lam=0.5, return_rotations=True)
    got = fedrot_ext.align_and_aggregate(p.A, p.B, **kw)
    want = reference.align_and_aggregate(p.A, p.B, **kw)
    for l in range(2):
        assert got.A[l].is_cuda and got.A[l].dtype == dtype
        assert rel_err(got.A[l], want.A[l]) < TOLERANCE[dtype]
        assert rel_err(got.B[l], want.B[l]) < TOLERANCE[dtype]
        assert rel_err(got.rotations[l], want.rotations[l]) < ROTATION_TOLERANCE[dtype]


@cuda
@pytest.mark.cuda
def test_cuda_many_layers_clients_deterministic_and_on_current_stream():
    shapes = [(4, 1024, 1024)] * 6 + [(16, 4096, 1024), (8, 333, 777)]
    p = make_problem(shapes, n_clients=50, seed=1, device="cuda")
    kw = dict(ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align="AB", lam=0.5, return_rotations=True)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        first = fedrot_ext.align_and_aggregate(p.A, p.B, **kw)
    stream.synchronize()
    second = fedrot_ext.align_and_aggregate(p.A, p.B, **kw)
    for x, y in zip(first.A + first.B + first.rotations, second.A + second.B + second.rotations):
        assert torch.equal(x, y)
    want = reference.align_and_aggregate(p.A, p.B, **kw)
    for l in range(len(shapes)):
        assert rel_err(first.A[l], want.A[l]) < TOLERANCE[torch.float32]


@cuda
@pytest.mark.cuda
def test_cuda_non_contiguous_and_cpu_weights():
    p = make_problem([(5, 43, 31), (8, 66, 52)], n_clients=4, seed=3, device="cuda")
    A = [torch.repeat_interleave(a, 2, dim=2)[:, :, ::2] for a in p.A]
    B = [b.transpose(1, 2).contiguous().transpose(1, 2) for b in p.B]
    got = fedrot_ext.align_and_aggregate(A, B, ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights.cpu(), align="AB")
    want = reference.align_and_aggregate(p.A, p.B, ref_A=p.ref_A, ref_B=p.ref_B, weights=p.weights, align="AB")
    for l in range(2):
        assert rel_err(got.A[l], want.A[l]) < TOLERANCE[torch.float32]


@cuda
@pytest.mark.cuda
def test_cuda_bad_input():
    p = make_problem([(4, 21, 19)], n_clients=3, seed=4, device="cuda")
    with pytest.raises(ValueError, match=r"B\[0\]: expected device cuda"):
        fedrot_ext.align_and_aggregate(p.A, [p.B[0].cpu()], ref_A=p.ref_A)
    A = [p.A[0].clone()]
    A[0][1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"A\[0\]\[1\]"):
        fedrot_ext.align_and_aggregate(A, p.B, ref_A=p.ref_A)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("r", [2, 8, 16, 32, 64])
def test_cuda_procrustes_rotation_matches_cpu(r):
    M = torch.randn(300, r, r, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-3)):
        gpu = fedrot_ext.procrustes_rotation(M.to("cuda", dtype), 0.5).cpu()
        cpu = fedrot_ext.procrustes_rotation(M.to(dtype), 0.5)
        assert (gpu.double() - cpu.double()).abs().max() < tol
