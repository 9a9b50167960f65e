"""FedRotLoRA(checkpoint_dir=...): a checkpoint after every round, and a restart that resumes after the newest
one and ends bitwise equal to an uninterrupted run, also when the server was killed in a checkpoint write."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedrot_ext
from fedrot_ext.flower import arrayrecord_to_state_dict
from fedrot_ext.flower.checkpoint import latest_checkpoint, read_checkpoint
from flower_dp_app import run_in_process

HERE = Path(__file__).resolve().parent


def _run(tmp, rounds, dtype=torch.bfloat16, **kw):
    kw.setdefault("server_optimizer", fedrot_ext.ServerOptimizer("adam", 0.05))
    return run_in_process(dtype, lambda s: s, [], num_rounds=rounds, checkpoint_dir=tmp, **kw)


def _equal(a, b) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["fedrot", "flora"])
def test_a_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path, caplog, method):
    kw = dict(method=method, lora_config=fedrot_ext_config()) if method == "flora" else {}
    whole, _, want, _, _, _ = _run(tmp_path / "whole", 4, **kw)
    _run(tmp_path / "stopped", 2, **kw)  # the server stops after round 2
    assert latest_checkpoint(tmp_path / "stopped").name == "round-000002"
    with caplog.at_level(logging.INFO, logger="flwr"):
        resumed, _, got, _, _, _ = _run(tmp_path / "stopped", 4, **kw)  # the same command, restarted
    assert "resuming from checkpoint" in caplog.text and "rounds 1-2 are done, 2 of 4 to run" in caplog.text
    assert _equal(arrayrecord_to_state_dict(got.arrays), arrayrecord_to_state_dict(want.arrays))
    assert sorted(got.train_metrics_clientapp) == [1, 2, 3, 4]
    assert [h.server_round for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.server_optimizer.steps == whole.server_optimizer.steps == 4
    assert resumed.base_deltas.keys() == whole.base_deltas.keys()
    assert all(torch.equal(resumed.base_deltas[k], whole.base_deltas[k]) for k in whole.base_deltas)
    assert [p.name for p in (tmp_path / "stopped").iterdir()] == ["round-000004"]  # older ones removed


def fedrot_ext_config():
    from helpers.peft_models import bert_lora_config
    return bert_lora_config()


def test_a_finished_run_is_not_run_again_and_other_settings_are_refused(tmp_path):
    _run(tmp_path, 2)
    again, _, result, grid, _, _ = _run(tmp_path, 2)
    assert grid.sent == {} and sorted(result.train_metrics_clientapp) == [1, 2]
    with pytest.raises(ValueError, match=r"checkpoint_dir: .* holds a run with \{'lam': 0.5\}, this strategy has \{'lam': 0.7\}"):
        _run(tmp_path, 3, lam=0.7)
    state = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    assert state["server_round"] == 2 and len(state["history"]) == 2
    ckpt = read_checkpoint(latest_checkpoint(tmp_path))
    assert ckpt.optimizer["steps"] == 2 and set(ckpt.optimizer) >= {"m", "v", "master"}


@pytest.mark.parametrize("kill_at", ["2:global", "2:staged", "2:renamed", "3:global"])
def test_a_server_killed_in_a_checkpoint_write_resumes_and_ends_bitwise_equal(tmp_path, kill_at):
    """SIGKILL at three points of a checkpoint write; the restart resumes after the newest complete checkpoint."""
    script = HERE / "flower_checkpoint_run.py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    run = lambda *args: subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=600)  # noqa: E731
    want = run(tmp_path / "whole", 4, tmp_path / "whole.safetensors")
    assert want.returncode == 0, want.stderr[-2000:]
    killed = run(tmp_path / "run", 4, tmp_path / "out.safetensors", kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    write, step = kill_at.split(":")
    done = int(write) - (0 if step == "renamed" else 1)  # the newest complete checkpoint
    assert latest_checkpoint(tmp_path / "run").name == f"round-{done:06d}"
    resumed = run(tmp_path / "run", 4, tmp_path / "out.safetensors")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"rounds 1-{done} are done" in resumed.stdout + resumed.stderr
    assert _equal(load_file(str(tmp_path / "out.safetensors")), load_file(str(tmp_path / "whole.safetensors")))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["round-000004"]  # leftovers removed
