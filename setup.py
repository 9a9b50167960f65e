"""Builds fedrot_ext._C: a C++ CPU path everywhere, plus CUDA kernels when torch
is a CUDA build and a CUDA toolkit (nvcc) is found.

Environment:
  FEDROT_FORCE_CPU=1     build the CPU path only, even with a CUDA toolkit.
  CUDA_HOME              toolkit root; found next to nvcc when unset.
  TORCH_CUDA_ARCH_LIST   GPU architectures; "8.0;9.0" when no GPU is visible.
  FEDROT_CPU_FLAGS       extra host flags; default -mavx2 -mfma -mf16c (and AVX-512 F/VL/BW/DQ, and AMX-BF16) where
                         the build machine has them (the build targets the machine it runs on).
Build isolation (plain `pip install .`) works when pip's build torch equals the
environment's torch; otherwise the build stops with a message naming both (see
fedrot_ext/_build.py, which also writes the build record checked at import).
"""
import ast
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

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

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_rules():
    # By path: the package cannot be imported before it is built.
    spec = importlib.util.spec_from_file_location("_fedrot_build", os.path.join(HERE, "fedrot_ext", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_rules = _load_build_rules()

# Where the environment being installed into keeps torch, seen without pip's build-isolation
# overlay (-I drops PYTHONPATH, through which pip hides the target's site-packages), and its
# version, read from torch/version.py without importing torch.
_TARGET_TORCH_PROBE = """
import importlib.util, os
spec = importlib.util.find_spec("torch")
root = os.path.dirname(spec.origin) if spec and spec.origin else None
print(repr(root and os.path.realpath(root)))
"""


def _read_torch_version_file(root):
    values = {}
    with open(os.path.join(root, "version.py")) as f:
        for node in ast.parse(f.read()).body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            if isinstance(target, ast.Name) and isinstance(getattr(node, "value", None), ast.Constant):
                values[target.id] = node.value.value
    return values.get("__version__"), values.get("cuda")


def _check_target_torch():
    """Refuse to build against a torch other than the one the installed package will run with."""
    here_root = os.path.realpath(os.path.dirname(torch.__file__))
    try:
        out = subprocess.run([sys.executable, "-I", "-c", _TARGET_TORCH_PROBE], capture_output=True, text=True,
                             check=True, cwd=os.path.expanduser("~")).stdout
        target_root = ast.literal_eval(out.strip().splitlines()[-1])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError, SyntaxError):
        return  # no separate target interpreter to inspect: the import-time check still guards
    if target_root is None or target_root == here_root:
        return  # torch comes with this package's dependencies, or the build uses the target's own torch
    version, cuda = _read_torch_version_file(target_root)
    message = build_rules.mismatch_message(torch.__version__, torch.version.cuda, version, cuda,
                                           "that pip's isolated build environment would produce")
    if message:
        sys.exit(message)


def _nvcc_version():
    out = subprocess.run([os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


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
    if not {"avx2", "fma", "f16c"} <= flags:
        return []
    avx512 = ["avx512f", "avx512vl", "avx512bw", "avx512dq"]  # 32 vector registers and 16-float vectors
    if not set(avx512) <= flags:
        return ["-mavx2", "-mfma", "-mf16c"]
    amx = ["-mamx-tile", "-mamx-bf16"] if {"amx_tile", "amx_bf16"} <= flags else []  # csrc/cpu/amx.h
    return ["-mavx2", "-mfma", "-mf16c"] + ["-m" + f for f in avx512] + amx


def _sources(with_cuda):
    # Every .cpp under csrc/; csrc/cuda/ (kernels and their CUDA registrations)
    # only in the CUDA build. Each backend file registers its own kernels, so
    # no macro tells the C++ which backends exist.
    cuda_dir = os.path.join("csrc", "cuda") + os.sep
    files = glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
    if with_cuda:
        files += glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
    return sorted(f for f in files if with_cuda or not f.startswith(cuda_dir))


def _extension(info):
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"] + _cpu_flags()
    kwargs = dict(include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    info.update(cxx_flags=cxx, cuda_kernels=False, nvcc=None, cuda_arch_sass=[], cuda_arch_ptx=[])
    if _want_cuda():
        nvcc_version = _nvcc_version()
        message = nvcc_version and build_rules.nvcc_message(nvcc_version, torch.__version__, torch.version.cuda)
        if message:
            sys.exit(message)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sass, ptx = build_rules.parse_arch_flags(cpp_extension._get_cuda_arch_flags())
        info.update(cuda_kernels=True, nvcc=nvcc_version, cuda_arch_sass=sass, cuda_arch_ptx=ptx)
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


class BuildExtWithRecord(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """Writes the build record next to _C, in the build tree and (in-place/editable) in the source tree."""

    def run(self):
        super().run()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            for path in {regular_file} | ({inplace_file} if self.inplace else set()):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                build_rules.write_info(os.path.dirname(path), BUILD_INFO)


_check_target_torch()
BUILD_INFO = {"version": build_rules.package_version(torch.__version__, torch.version.cuda),
              "torch": torch.__version__, "torch_cuda": torch.version.cuda}
EXTENSION = _extension(BUILD_INFO)

setup(
    version=BUILD_INFO["version"],
    # The binary needs the torch release it is compiled against (the local label, +cu130 or +cpu,
    # is checked at build time and at import, since pins cannot name it portably).
    install_requires=[f"torch=={torch.__version__.split('+', 1)[0]}", "numpy>=1.26", "safetensors>=0.4"],
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildExtWithRecord},
)
