"""`pip install .` as users type it, in fresh virtual environments (slow: CI sets FEDROT_TEST_PIP_INSTALL=1).

- torch 2.14.1 installed first, then plain `pip install .`: pip's isolated build fetches the same
  torch, so the build works, and the installed package imports and runs the op.
- CPU torch 2.13.0 installed first, then plain `pip install .`: the isolated build would compile
  against torch 2.14.1, so setup.py stops with the message naming both, and nothing is installed;
  `pip wheel --no-build-isolation .` then builds against 2.13.0 a wheel labelled +torch2.13.0.cpu,
  which installs and works.
Both wheels lie on this machine's disk. Each venv and pip's build environment take GBs of disk: a test
skips, naming both figures, when its temp directory has less free than it needs, and removes its
venv when it ends, pass or fail. The extension is built CPU-only here (FEDROT_FORCE_CPU=1):
the CUDA compile is covered by the main build, this checks what pip does around it.
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FEDROT_TEST_PIP_INSTALL") != "1",
                       reason="builds fresh venvs (~8 min): set FEDROT_TEST_PIP_INSTALL=1 (CI does)"),
]

SMOKE = """
import torch, fedrot_ext
A, B = [torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))], [torch.randn(3, 4, 2)]
out = fedrot_ext.align_and_aggregate(A, B, ref_A=[A[0][0]], align="A", lam=0.5)
assert out.A[0].shape == (2, 5) and bool(torch.isfinite(out.A[0]).all())
info = fedrot_ext.build_info()
print("OK", fedrot_ext.__version__, info["torch"], info["cuda_kernels"])
"""
IGNORED = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.so", "_build_info.json", "*.egg-info",
                                 "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks", "results")


def run(cmd, env=None, check=True):
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path, which would import the checkout.
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=os.path.expanduser("~"))
    if check and out.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture
def source(tmp_path):
    """A copy of the working tree, so these builds never touch the checkout's build/ or .so."""
    dest = tmp_path / "src"
    shutil.copytree(ROOT, dest, ignore=IGNORED)
    return str(dest)


GB = 1 << 30
# Measured peaks: a torch 2.14.1 (CUDA build) venv is 5.4 GB and pip's isolated build env holds
# another; a torch 2.13.0 (CPU) venv is 0.9 GB.
NEEDS_GB = {"torch==2.14.1": 12, "torch==2.13.0": 7}


@pytest.fixture
def venv_dir(tmp_path):
    yield tmp_path / "venv"
    shutil.rmtree(tmp_path / "venv", ignore_errors=True)


def need_disk(path, torch_spec):
    free = shutil.disk_usage(path).free
    if free < NEEDS_GB[torch_spec] * GB:
        pytest.skip(f"needs {NEEDS_GB[torch_spec]} GB free under {path} for a {torch_spec} venv and pip's "
                    f"build environment; {free / GB:.1f} GB free")


def fresh_venv(path, torch_spec):
    need_disk(path.parent, torch_spec)
    run([sys.executable, "-m", "venv", str(path)])
    py = os.path.join(str(path), "bin", "python")
    run([py, "-m", "pip", "install", "-q", "--no-cache-dir", torch_spec, "numpy"])
    return py


def cpu_build_env():
    env = dict(os.environ, FEDROT_FORCE_CPU="1", MAX_JOBS="2", PIP_NO_CACHE_DIR="1")
    env.pop("PYTHONPATH", None)
    return env


def test_plain_pip_install_works_when_torch_matches(venv_dir, source):
    py = fresh_venv(venv_dir, "torch==2.14.1")
    run([py, "-m", "pip", "install", "-q", source], env=cpu_build_env())
    out = run([py, "-c", SMOKE], env=cpu_build_env())
    assert "OK 0.1.0+torch2.14.1.cu130 2.14.1+cu130 False" in out.stdout, out.stdout


def test_plain_pip_install_refuses_another_torch_and_the_no_isolation_wheel_works(tmp_path, venv_dir, source):
    py = fresh_venv(venv_dir, "torch==2.13.0")
    refused = run([py, "-m", "pip", "install", source], env=cpu_build_env(), check=False)
    assert refused.returncode != 0
    text = refused.stdout + refused.stderr
    assert "built against torch 2.14.1+cu130 (CUDA 13.0)" in text and "torch 2.13.0+cpu (CPU)" in text, text[-3000:]
    assert "pip install --no-build-isolation ." in text
    assert run([py, "-c", "import fedrot_ext"], check=False).returncode != 0, "a refused build left a package behind"
    run([py, "-m", "pip", "install", "-q", "setuptools>=64", "wheel", "ninja"])
    wheels = tmp_path / "wheels"
    run([py, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(wheels), source],
        env=cpu_build_env())
    built = [p.name for p in wheels.iterdir()]
    assert len(built) == 1 and built[0].startswith("fedrot_ext-0.1.0+torch2.13.0.cpu-"), built
    run([py, "-m", "pip", "install", "-q", str(wheels / built[0])])
    out = run([py, "-c", SMOKE], env=cpu_build_env())
    assert "OK 0.1.0+torch2.13.0.cpu 2.13.0+cpu False" in out.stdout, out.stdout
