"""FedRotLoRA on Flower's deployment engine: a SuperLink and two SuperNodes on 127.0.0.1, runs submitted with
``flwr run`` (the app in tests/flower/deploy_app). A server killed in a checkpoint write (SIGKILL, by itself at a
chosen point) and resumed by submitting the same run again ends bitwise equal to an uninterrupted run."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, what: str, logs) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {TIMEOUT_S} s; logs:\n" + "\n".join(p.read_text()[-3000:] for p in logs if p.exists()))
        time.sleep(0.5)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A SuperLink and two SuperNodes (partitions 0 and 1), stopped after the module's tests."""
    root = tmp_path_factory.mktemp("deployment")
    port = _free_port()
    env = dict(os.environ, FLWR_HOME=str(root / "flwr"), FLWR_TELEMETRY_ENABLED="0", FEDROT_TESTS_DIR=str(HERE.parent),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    (root / "flwr").mkdir()
    (root / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    logs, procs = [root / "superlink.log"], []

    def spawn(args, log):
        procs.append(subprocess.Popen(args, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))

    spawn([BIN / "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port), "--database", str(root / "state.db")], logs[0])
    _wait_for(lambda: "Uvicorn running" in logs[0].read_text(), "the SuperLink's start", logs)
    for partition in (0, 1):
        logs.append(root / f"supernode{partition}.log")
        spawn([BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(_free_port()),
               "--node-config", f"partition-id={partition} num-partitions=2"], logs[-1])
    for log in logs[1:]:
        _wait_for(lambda: "SuperNode ID" in log.read_text(), "a SuperNode's registration", logs)
    yield dict(root=root, env=env, logs=logs)
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _submit(deployment, **config) -> str:
    """``flwr run`` with run-config overrides; returns the run id (the run goes on in the SuperLink)."""
    overrides = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in config.items())
    done = subprocess.run([BIN / "flwr", "run", str(HERE / "deploy_app"), "local", "--run-config", overrides],
                          cwd=deployment["root"], env=deployment["env"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0 and "Successfully started run" in done.stdout, done.stdout + done.stderr
    return done.stdout.split("Successfully started run")[1].split()[0]


def _run_log(deployment, run_id: str) -> str:
    return subprocess.run([BIN / "flwr", "log", run_id, "local", "--show"], cwd=deployment["root"], env=deployment["env"],
                          capture_output=True, text=True, timeout=TIMEOUT_S).stdout


def test_a_server_killed_in_a_checkpoint_write_resumes_bitwise(deployment):
    root, logs = deployment["root"], deployment["logs"]
    whole, resumed, ckpt = root / "whole.safetensors", root / "resumed.safetensors", root / "checkpoints"
    _submit(deployment, **{"num-server-rounds": 3, "out-file": str(whole)})
    _wait_for(whole.exists, "the uninterrupted 3-round run", logs)

    _submit(deployment, **{"num-server-rounds": 3, "checkpoint-dir": str(ckpt), "kill-at": "2:global"})
    _wait_for(lambda: ckpt.is_dir() and any(p.name.startswith(".round-000002.partial") for p in ckpt.iterdir()),
              "the server's death in its second checkpoint write", logs)
    time.sleep(2)  # it killed itself right after the file it was writing: nothing else moves
    assert sorted(p.name for p in ckpt.iterdir())[1:] == ["round-000001"]  # the partial write, and round 1 complete

    run_id = _submit(deployment, **{"num-server-rounds": 3, "checkpoint-dir": str(ckpt), "out-file": str(resumed)})
    _wait_for(resumed.exists, "the resumed run", logs)
    assert "rounds 1-1 are done, 2 of 3 to run" in _run_log(deployment, run_id)
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in ckpt.iterdir()] == ["round-000003"]
