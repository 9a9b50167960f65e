"""bench/timing.py's stopping rules (how many calls are timed, never how long they take)."""
import time

import torch

from bench.timing import time_calls, time_interleaved

CPU = torch.device("cpu")


def test_exactly_repeats_calls_without_min_time():
    calls = []
    times = time_calls(calls.append, CPU, warmup=2, repeats=5, min_repeats=3, max_s=1e9)
    assert len(times) == 5 and calls == [0, 1, 0, 1, 2, 3, 4]  # warm-up calls first, then the timed ones


def test_keeps_calling_until_min_time_has_passed():
    t0 = time.perf_counter()
    times = time_calls(lambda k: time.sleep(0.002), CPU, warmup=0, repeats=2, min_repeats=2, max_s=1e9, min_s=0.05)
    assert time.perf_counter() - t0 >= 0.05 and len(times) >= 2


def test_max_time_stops_after_min_repeats():
    times = time_calls(lambda k: None, CPU, warmup=0, repeats=10**9, min_repeats=3, max_s=0.0, min_s=1e9)
    assert len(times) == 3


def test_interleaved_functions_take_turns():
    calls = []
    times = time_interleaved({"a": lambda k: calls.append(("a", k)), "b": lambda k: calls.append(("b", k))}, CPU,
                             warmup=1, repeats=3, min_repeats=3, max_s=1e9)
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}
    assert calls == [("a", 0), ("b", 0)] + [(name, k) for k in range(3) for name in "ab"]
