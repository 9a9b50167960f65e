"""What the extension was built against, and the checks that compare it with what runs.

setup.py loads this file by path (before the package exists) to name the wheel's local
version, to refuse a build whose torch differs from the environment's, and to write
_build_info.json next to the compiled _C. ``import fedrot_ext`` reads that record before
loading _C, so a torch mismatch is an ImportError that says what to do, never an
undefined-symbol traceback. Nothing here imports torch at module level.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

BASE_VERSION = "0.1.0"
INFO_FILE = "_build_info.json"
INSTALL_HINT = ("install the torch you want to run first, then build against it: "
                "pip install --no-build-isolation .")


def _version_tuple(version: str) -> tuple:
    """'13.0' -> (13, 0); an arch '9.0' -> (9, 0)."""
    return tuple(int(x) for x in version.split(".")[:2])


def describe_torch(version: Optional[str], cuda: Optional[str]) -> str:
    if version is None:
        return "no torch"
    return f"torch {version} ({'CUDA ' + cuda if cuda else 'CPU'})"


def torch_tag(version: str, cuda: Optional[str]) -> str:
    """The wheel's local-version label for a torch build, e.g. 'torch2.14.1.cu130' or 'torch2.13.0.cpu'."""
    public = version.split("+", 1)[0]
    return f"torch{public}." + ("cu" + cuda.replace(".", "") if cuda else "cpu")


def package_version(torch_version: str, cuda: Optional[str]) -> str:
    return f"{BASE_VERSION}+{torch_tag(torch_version, cuda)}"


def mismatch_message(built_version: str, built_cuda: Optional[str], run_version: Optional[str],
                     run_cuda: Optional[str], where: str) -> Optional[str]:
    """The one message for a build/run torch mismatch (None when they agree).

    The full version string is compared (2.14.1+cu130 and 2.14.1+cpu differ), and so is
    torch's CUDA version: a C++ extension only loads into the torch it was compiled against.
    """
    if (built_version, built_cuda) == (run_version, run_cuda):
        return None
    return (f"fedrot_ext: the extension {where} is built against {describe_torch(built_version, built_cuda)}, "
            f"but this environment has {describe_torch(run_version, run_cuda)}. A C++/CUDA extension only works "
            f"with the torch it was compiled against: {INSTALL_HINT}")


def nvcc_message(nvcc: str, torch_version: str, torch_cuda: str) -> Optional[str]:
    """Refuse a CUDA toolkit older than the CUDA release torch was built with: torch's headers need it."""
    have, need = _version_tuple(nvcc), _version_tuple(torch_cuda)
    if have >= need and have[0] == need[0]:
        return None
    return (f"fedrot_ext: the CUDA toolkit found (nvcc {nvcc}) does not match the CUDA {torch_cuda} that "
            f"torch {torch_version} was built with (same major release, minor >= torch's needed). Use a torch "
            f"built for CUDA {nvcc} ({INSTALL_HINT}), point CUDA_HOME at a matching toolkit, or set "
            "FEDROT_FORCE_CPU=1 to build the CPU path only.")


def parse_arch_flags(flags) -> tuple[list[str], list[str]]:
    """(SASS archs, PTX archs) from nvcc -gencode flags, e.g. code=sm_90 -> '9.0', code=compute_80 -> '8.0'."""
    sass, ptx = set(), set()
    for flag in flags:
        for kind, digits in re.findall(r"(sm|compute)_(\d+)a?", flag.rsplit(",code=", 1)[-1]):
            arch = f"{digits[:-1]}.{digits[-1]}"
            (sass if kind == "sm" else ptx).add(arch)
    return sorted(sass, key=_version_tuple), sorted(ptx, key=_version_tuple)


def arch_supported(capability: tuple[int, int], sass, ptx) -> bool:
    """SASS runs on the same major architecture at an equal or higher minor; PTX is JIT-compiled upward."""
    major, minor = capability
    return (any(_version_tuple(a)[0] == major and _version_tuple(a)[1] <= minor for a in sass)
            or any(_version_tuple(a) <= (major, minor) for a in ptx))


def cuda_device_message(info: dict, device_name: str, capability: tuple[int, int]) -> Optional[str]:
    """Why this build cannot run on a CUDA device (None when it can)."""
    if not info.get("cuda_kernels"):
        return (f"fedrot_ext was built without CUDA kernels (build_info()['cuda_kernels'] is False), so it cannot "
                f"run on {device_name}. Rebuild where torch is a CUDA build and nvcc is found: {INSTALL_HINT}")
    sass, ptx = info.get("cuda_arch_sass", []), info.get("cuda_arch_ptx", [])
    if arch_supported(capability, sass, ptx):
        return None
    cap = f"{capability[0]}.{capability[1]}"
    return (f"fedrot_ext's CUDA kernels were compiled for sm {', '.join(sass) or '-'} (PTX {', '.join(ptx) or '-'}), "
            f"which cannot run on {device_name} (compute capability {cap}). Rebuild with "
            f"TORCH_CUDA_ARCH_LIST=\"{cap}\" (or a list that includes it): {INSTALL_HINT}")


def write_info(directory: str, info: dict) -> None:
    """Write the record atomically, so an interrupted build never leaves half a file."""
    path = os.path.join(directory, INFO_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_info(directory: str) -> dict:
    path = os.path.join(directory, INFO_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        raise ImportError(f"fedrot_ext: no readable build record at {path}; the extension was not built by this "
                          f"package's setup.py or the install is incomplete: {INSTALL_HINT}") from None
