"""The build record, the import-time torch check, the CUDA device check and the wheel's version label."""
import importlib.metadata
import subprocess
import sys

import pytest
import torch

import fedrot_ext
from fedrot_ext import _build, _runtime


def test_build_info_describes_the_running_torch():
    info = fedrot_ext.build_info()
    assert (info["torch"], info["torch_cuda"]) == (torch.__version__, torch.version.cuda)
    assert info["version"] == fedrot_ext.__version__ == importlib.metadata.version("fedrot_ext")
    assert info["version"] == _build.package_version(torch.__version__, torch.version.cuda)
    if info["cuda_kernels"]:
        assert info["nvcc"] and (info["cuda_arch_sass"] or info["cuda_arch_ptx"])
    info["torch"] = "edited"
    assert fedrot_ext.build_info()["torch"] == torch.__version__, "build_info() must return a copy"


@pytest.mark.parametrize("version,cuda,tag", [("2.14.1+cu130", "13.0", "torch2.14.1.cu130"),
                                              ("2.13.0+cpu", None, "torch2.13.0.cpu"),
                                              ("2.14.1", "12.8", "torch2.14.1.cu128")])
def test_wheel_local_version_names_torch_and_cuda(version, cuda, tag):
    assert _build.torch_tag(version, cuda) == tag
    assert _build.package_version(version, cuda) == f"{_build.BASE_VERSION}+{tag}"


def test_mismatch_message_names_both_torches_and_the_command():
    assert _build.mismatch_message("2.14.1+cu130", "13.0", "2.14.1+cu130", "13.0", "x") is None
    for run in [("2.13.0+cpu", None), ("2.14.1+cpu", None), ("2.14.1+cu130", "12.8"), (None, None)]:
        message = _build.mismatch_message("2.14.1+cu130", "13.0", *run, "here")
        assert "torch 2.14.1+cu130 (CUDA 13.0)" in message and "pip install --no-build-isolation ." in message
        assert _build.describe_torch(*run) in message


IMPORT_WITH_OTHER_TORCH = """
import torch
torch.__version__, torch.version.cuda = "2.13.0+cpu", None  # what a CPU torch 2.13 reports
try:
    import fedrot_ext
except ImportError as e:
    print("IMPORT-ERROR:", e)
else:
    print("IMPORTED")
"""


def test_import_refuses_a_different_torch_with_the_clear_message():
    out = subprocess.run([sys.executable, "-c", IMPORT_WITH_OTHER_TORCH], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR:" in out.stdout, out.stdout
    assert "torch 2.13.0+cpu (CPU)" in out.stdout and f"torch {torch.__version__}" in out.stdout
    assert "--no-build-isolation" in out.stdout


def test_missing_build_record_is_an_import_error(tmp_path):
    with pytest.raises(ImportError, match=r"no readable build record .*--no-build-isolation"):
        _build.read_info(str(tmp_path))


@pytest.mark.parametrize("nvcc,torch_cuda,ok", [("13.0", "13.0", True), ("13.2", "13.0", True),
                                                ("13.0", "13.2", False), ("12.8", "13.0", False),
                                                ("14.0", "13.0", False)])
def test_nvcc_must_match_torch_cuda(nvcc, torch_cuda, ok):
    message = _build.nvcc_message(nvcc, "2.15.0+cu132", torch_cuda)
    assert (message is None) == ok
    if not ok:
        assert f"nvcc {nvcc}" in message and f"CUDA {torch_cuda}" in message and "FEDROT_FORCE_CPU=1" in message


def test_arch_flags_parse_as_nvcc_receives_them():
    flags = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=compute_90",
             "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_100,code=sm_100"]
    assert _build.parse_arch_flags(flags) == (["8.0", "9.0", "10.0"], ["9.0"])


@pytest.mark.parametrize("capability,sass,ptx,ok", [
    ((9, 0), ["8.0", "9.0"], [], True),
    ((8, 6), ["8.0"], [], True),      # SASS runs on a later minor of the same major
    ((9, 0), ["8.0"], [], False),     # but not on another major
    ((9, 0), [], ["8.0"], True),      # PTX is JIT-compiled for later GPUs
    ((7, 5), ["8.0", "9.0"], ["8.0"], False),
    ((10, 0), ["8.0", "9.0"], [], False),
])
def test_arch_support(capability, sass, ptx, ok):
    assert _build.arch_supported(capability, sass, ptx) == ok


@pytest.fixture
def fake_cuda_device(monkeypatch):
    """A CUDA device as the check sees it, on a machine without one."""
    def install(info, capability):
        monkeypatch.setattr(_runtime, "_record", lambda: info)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA Test GPU")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
        _runtime._device_message.cache_clear()
    yield install
    _runtime._device_message.cache_clear()


def test_first_cuda_call_names_torch_cuda_arch_list(fake_cuda_device):
    fake_cuda_device({"cuda_kernels": True, "cuda_arch_sass": ["8.0", "9.0"], "cuda_arch_ptx": []}, (10, 0))
    with pytest.raises(RuntimeError, match=r'compute capability 10\.0.*TORCH_CUDA_ARCH_LIST="10\.0"'):
        _runtime.check_device(torch.device("cuda", 0))
    fake_cuda_device({"cuda_kernels": True, "cuda_arch_sass": ["8.0", "9.0"], "cuda_arch_ptx": []}, (9, 0))
    _runtime.check_device(torch.device("cuda", 0))  # supported: no error


def test_cpu_only_build_on_a_cuda_device_says_so(fake_cuda_device):
    fake_cuda_device({"cuda_kernels": False}, (9, 0))
    with pytest.raises(RuntimeError, match=r"built without CUDA kernels.*NVIDIA Test GPU"):
        _runtime.check_device(torch.device("cuda", 0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_this_build_runs_on_the_visible_gpu():
    _runtime._device_message.cache_clear()
    _runtime.check_device(torch.device("cuda", 0))
