"""What the build registered, checked against the build record (fedrot_ext.build_info()).

The record says whether CUDA kernels were compiled; the dispatcher must agree. CI also sets
FEDROT_EXPECT_CUDA_BUILD=1 where nvcc and a CUDA torch exist, so a build that silently fell back
to CPU only fails there. The CUDA contract itself is checked by every op test's `cuda` case.
"""
import os

import pytest
import torch

import fedrot_ext

OPS = ["fedrot_ext::align_and_aggregate", "fedrot_ext::procrustes_rotation"]


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert has_kernel(op, "CPU"), f"{op}: no CPU kernel registered"


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_match_the_build_record(op):
    recorded = fedrot_ext.build_info()["cuda_kernels"]
    assert has_kernel(op, "CUDA") == recorded, f"{op}: build_info() says cuda_kernels={recorded}"


def test_cuda_build_when_ci_expects_one():
    expected = os.environ.get("FEDROT_EXPECT_CUDA_BUILD")
    if expected is None:
        pytest.skip("FEDROT_EXPECT_CUDA_BUILD is not set (CI sets it to 1 where nvcc and a CUDA torch exist)")
    if expected not in ("0", "1"):
        pytest.fail(f"FEDROT_EXPECT_CUDA_BUILD: expected 1 or 0, got {expected!r}")
    assert fedrot_ext.build_info()["cuda_kernels"] == (expected == "1")
