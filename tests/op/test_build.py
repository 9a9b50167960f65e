"""What the build registered: the CPU kernels always, the CUDA kernels where CI expects them.

CI sets FEDROT_EXPECT_CUDA_BUILD=1 where nvcc and a CUDA torch exist (and may set 0 where they do
not); the CUDA contract itself is checked by every op test's `cuda` case (tests/op/).
"""
import os

import pytest
import torch

import fedrot_ext  # noqa: F401  (loads fedrot_ext._C, which registers the ops)

OPS = ["fedrot_ext::align_and_aggregate", "fedrot_ext::procrustes_rotation"]


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert has_kernel(op, "CPU"), f"{op}: no CPU kernel registered"


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered_when_expected(op):
    expected = os.environ.get("FEDROT_EXPECT_CUDA_BUILD")
    if expected is None:
        pytest.skip("FEDROT_EXPECT_CUDA_BUILD is not set: nothing says whether this build should contain CUDA "
                    "kernels (CI sets it to 1 where nvcc and a CUDA torch exist)")
    if expected == "1":
        assert has_kernel(op, "CUDA"), f"{op}: built without CUDA although a toolkit and a CUDA torch were expected"
    elif expected == "0":
        assert not has_kernel(op, "CUDA"), f"{op}: CUDA kernels registered although a CPU-only build was expected"
    else:
        pytest.fail(f"FEDROT_EXPECT_CUDA_BUILD: expected 1 or 0, got {expected!r}")
