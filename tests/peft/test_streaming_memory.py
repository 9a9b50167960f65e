"""Scale proof: 200 Llama-shaped clients (≥ 3 GB of factors in all) streamed through
StreamingAggregator in a fresh process; the peak extra RSS stays far below the stacked size."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.streaming_bench import client_bytes

REPO = Path(__file__).resolve().parents[2]
N_CLIENTS = 200


@pytest.mark.slow
def test_peak_extra_memory_is_a_small_fraction_of_the_stacked_clients():
    assert N_CLIENTS * client_bytes() >= 3e9
    code = ("import json, torch; torch.set_num_threads(1); from bench.streaming_bench import measure_streaming; "
            f"print(json.dumps(measure_streaming({N_CLIENTS})))")  # clients drawn from a fixed seed (bench.streaming_bench.SEED)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nstreaming {N_CLIENTS} clients: {result}")
    assert result["peak_extra_MB"] < 0.10 * result["stacked_total_MB"], result
