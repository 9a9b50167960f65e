"""fedrot-aggregate never deletes or overwrites what it did not create: OUT_DIR with --overwrite only when
it is an adapter directory that is none of the inputs, the report never over an input or an existing
file without --overwrite, an atomic swap, and nothing written when it exits 2."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedrot_ext.cli import main
from fedrot_ext.cli import output
from helpers.peft_models import make_round, tiny_bert

from test_cli import REPO, _copy_dir, _save

FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture()
def tree(tmp_path):
    """One folder holding a reference, 2 clients and an unrelated file (a user's work directory)."""
    model = tiny_bert(torch.float32)
    reference, clients = make_round(model, 2, seed=21)
    work = tmp_path / "work"
    work.mkdir()
    ref = _save(model, reference, work / "global")
    cdirs = [_save(model, c, work / f"c{i}") for i, c in enumerate(clients)]
    (work / "notes.txt").write_text("mine\n")
    return dict(work=work, ref=ref, clients=cdirs)


def snapshot(root: Path) -> dict:
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(tree, out, *extra):
    argv = [str(d) for d in tree["clients"]] + ["--reference", str(tree["ref"]), "--round", "1", "--out", str(out),
                                                "--no-progress", *extra]
    return main(argv)


def test_overwrite_refuses_the_folder_that_holds_the_inputs(tree, capsys):
    before = snapshot(tree["work"])
    assert run(tree, tree["work"], "--overwrite") == 2
    err = capsys.readouterr().err
    assert "holds the input" in err and err.count("\n") == 1
    assert snapshot(tree["work"]) == before


@pytest.mark.parametrize("which", ["client", "reference"])
def test_overwrite_refuses_an_input(tree, which, capsys):
    target = tree["clients"][1] if which == "client" else tree["ref"]
    before = snapshot(tree["work"])
    assert run(tree, target, "--overwrite") == 2
    assert "holds the input" in capsys.readouterr().err
    assert snapshot(tree["work"]) == before


def test_overwrite_refuses_a_directory_that_is_not_an_adapter(tree, capsys):
    out = tree["work"] / "out"
    _copy_dir(tree["clients"][0], out)
    (out / "train.log").write_text("keep me\n")
    before = snapshot(out)
    assert run(tree, out, "--overwrite") == 2
    assert "not an adapter directory (train.log)" in capsys.readouterr().err
    assert snapshot(out) == before
    empty = tree["work"] / "empty"
    empty.mkdir()
    assert run(tree, empty, "--overwrite") == 2
    assert "no adapter_model.safetensors" in capsys.readouterr().err


def test_overwrite_replaces_a_previous_output_atomically_with_the_umask(tree):
    out = tree["work"] / "out"
    assert run(tree, out) == 0
    first = snapshot(out)
    old = os.umask(0o022)
    try:
        assert run(tree, out, "--overwrite", "--lam", "0.9") == 0
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert snapshot(out) != first  # another λ: another adapter
    assert out.stat().st_mode & 0o777 == 0o755
    assert not [p for p in tree["work"].iterdir() if p.name.startswith(".out.")]  # no leftover


def test_report_never_overwrites_without_asking_nor_an_input(tree, capsys):
    report = tree["work"] / "notes.txt"
    before = snapshot(tree["work"])
    assert run(tree, tree["work"] / "out", "--report", str(report)) == 2
    assert "already exists" in capsys.readouterr().err
    adapter_file = tree["clients"][0] / "adapter_model.safetensors"
    assert run(tree, tree["work"] / "out", "--report", str(adapter_file), "--overwrite") == 2
    assert "write the report outside the input and output directories" in capsys.readouterr().err
    assert snapshot(tree["work"]) == before


def test_a_failed_report_write_writes_nothing(tree, monkeypatch, capsys):
    def fail(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sys.modules["fedrot_ext.cli.main"], "stage_text_file", fail)
    report = tree["work"].parent / "report.json"
    assert run(tree, tree["work"] / "out", "--report", str(report)) == 2
    assert "could not write the report" in capsys.readouterr().err
    assert not (tree["work"] / "out").exists() and not report.exists()


def test_a_leftover_of_an_interrupted_swap_is_put_back(tree, capsys):
    """Where the file system cannot exchange two directories, the old OUT_DIR is moved aside first; a
    kill right then leaves it in .OUT_DIR.old-*: the next run restores it and says so."""
    out = tree["work"] / "out"
    assert run(tree, out) == 0
    kept = snapshot(out)
    aside = tree["work"] / ".out.old-abc123"
    aside.mkdir()
    os.replace(out, aside / "out")
    assert run(tree, out) == 2  # restored, then refused: OUT_DIR exists and --overwrite was not given
    err = capsys.readouterr().err
    assert "restored the previous adapter from an interrupted run" in err and "already exists" in err
    assert snapshot(out) == kept and not aside.exists()


def test_the_swap_without_an_atomic_exchange(tree, monkeypatch):
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    out = tree["work"] / "out"
    assert run(tree, out) == 0
    assert run(tree, out, "--overwrite", "--lam", "0.9") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert not [p for p in tree["work"].iterdir() if p.name.startswith(".out.")]


KILLS = 50


def test_kills_at_random_points_never_leave_a_half_written_or_lost_adapter(tree):
    """50 SIGKILLs of the command at random moments (seeded), overwriting a previous output: after each,
    OUT_DIR holds the old adapter or the complete new one (after the next run's recovery), and no input
    changed. The moments are spread over a whole run, so some land in the write and the swap."""
    out = tree["work"] / "out"
    assert run(tree, out) == 0
    old = snapshot(out)
    inputs = {str(d): snapshot(d) for d in [tree["ref"], *tree["clients"]]}
    argv = [sys.executable, "-m", "fedrot_ext", "aggregate", *map(str, tree["clients"]), "--reference", str(tree["ref"]),
            "--round", "1", "--lam", "0.9", "--out", str(out), "--overwrite", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    whole = time.perf_counter() - start
    new = snapshot(out)
    assert new != old
    rng = random.Random(37)
    outcomes = {"old": 0, "new": 0}
    for k in range(KILLS):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.1) * whole)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        output.recover_interrupted_swap(out)  # what the next run does first
        got = snapshot(out)
        assert got in (old, new), (k, sorted(got))
        outcomes["old" if got == old else "new"] += 1
        for d, files in inputs.items():
            assert snapshot(Path(d)) == files, (k, d)
        for leftover in tree["work"].glob(".out.tmp-*"):  # a killed run's staging directory: never OUT_DIR itself
            assert leftover.is_dir()
        if got == new:  # back to the old adapter for the next kill
            _restore(out, old)
    assert outcomes["old"] and outcomes["new"], outcomes


def _restore(out: Path, files: dict) -> None:
    for p in out.iterdir():
        p.unlink()
    for name, data in files.items():
        (out / name).write_bytes(data)
