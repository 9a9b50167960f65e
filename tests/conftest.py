"""Suite-wide setup: no model hub, seeded global RNGs per test, the `device` fixture.

Layout: op/ (the fused op and the rotation solver, on every device), peft/ (state dicts, baselines,
metrics, schedules), flower/ (the Flower strategy and a Ray simulation), examples/ (the demo),
bench/ (bench/torch_impls.py and bench/shapes.py). Shared factories live in helpers/; pyproject's
pytest ``pythonpath`` makes them, ``bench`` and the examples importable (no sys.path edits here).
"""
import os
import random
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from helpers.problems import DEVICES

# No model hub, ever: tests build models from configs or use packaged files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Hypothesis (tests/op/test_op_fuzz.py, tests/peft/test_state_dict_fuzz.py): "ci", the default, draws the
# same examples on every run (derandomized, no example database); "fuzz" explores fresh ones.
settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
                          derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck),
                          print_blob=True)
settings.load_profile(os.environ.get("FEDROT_FUZZ_PROFILE", "ci"))

_SEED = pytest.StashKey[int]()


def global_seed(nodeid: str) -> int:
    """The global seed of a test: a CRC-32 of its id (never hash(), the clock or the test order)."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def _seeded_global_rngs(request):
    """Seeds torch, NumPy and `random` before every test, so that a draw without an explicit
    generator (in a library, or in a test that does not pass one) is still reproducible."""
    seed = global_seed(request.node.nodeid)
    request.node.stash[_SEED] = seed
    torch.manual_seed(seed)  # all devices
    np.random.seed(seed)
    random.seed(seed)
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and _SEED in item.stash:
        report.sections.append(("seed", f"global RNG seed={item.stash[_SEED]} (torch, numpy, random; "
                                        f"CRC-32 of {item.nodeid!r})"))
    return report


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """"cpu", and "cuda" (marked `cuda`; skipped with the reason where no GPU is visible)."""
    return request.param
