"""Builds fedrot_ext._C: a C++ CPU path everywhere, plus CUDA kernels when torch
is a CUDA build and a CUDA toolkit (nvcc) is found.

Environment:
  FEDROT_FORCE_CPU=1     build the CPU path only, even with a CUDA toolkit.
  CUDA_HOME              toolkit root; found next to nvcc when unset.
  TORCH_CUDA_ARCH_LIST   GPU architectures; "8.0;9.0" when no GPU is visible.
  FEDROT_CPU_FLAGS       extra host flags; default -mavx2 -mfma where the build
                         machine has them (the build targets the machine it runs on).
Always build against the torch you run with: pip install --no-build-isolation .
"""
import glob
import os
import shutil

from setuptools import setup


def _locate_cuda_home():
    # nvcc on PATH may be a wrapper outside the toolkit (e.g. /usr/local/bin/nvcc):
    # torch would then guess /usr/local and fail to link cudart.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        prefix = os.path.dirname(os.path.dirname(nvcc))
        candidates += [os.path.join(prefix, "cuda"), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = root
            return


_locate_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda():
    if os.environ.get("FEDROT_FORCE_CPU", "0") not in ("", "0"):
        return False
    home = cpp_extension.CUDA_HOME
    return torch.version.cuda is not None and home is not None and os.path.isfile(os.path.join(home, "bin", "nvcc"))


def _cpu_flags():
    if "FEDROT_CPU_FLAGS" in os.environ:
        return os.environ["FEDROT_CPU_FLAGS"].split()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []


def _sources(with_cuda):
    # Every .cpp under csrc/; csrc/cuda/ (kernels and their CUDA registrations)
    # only in the CUDA build. Each backend file registers its own kernels, so
    # no macro tells the C++ which backends exist.
    cuda_dir = os.path.join("csrc", "cuda") + os.sep
    files = glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
    if with_cuda:
        files += glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
    return sorted(f for f in files if with_cuda or not f.startswith(cuda_dir))


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"] + _cpu_flags()
    kwargs = dict(include_dirs=[os.path.join(here, "csrc")], extra_link_args=["-fopenmp"])
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        return cpp_extension.CUDAExtension(
            "fedrot_ext._C",
            _sources(with_cuda=True),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **kwargs,
        )
    return cpp_extension.CppExtension(
        "fedrot_ext._C", _sources(with_cuda=False), extra_compile_args={"cxx": cxx}, **kwargs
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
