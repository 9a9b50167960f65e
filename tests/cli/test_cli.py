"""fedrot-aggregate on real peft save_pretrained directories (tiny BERT): results, report, every refusal."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

import fedrot_ext
from fedrot_ext.cli import main
from helpers.peft_models import KA, assert_same_state, load_into, make_round, tiny_bert

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = [3.0, 5.0, 9.0]


def _save(model, state, path: Path) -> Path:
    load_into(model, state).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A reference and 3 client directories written by peft's save_pretrained, plus their state dicts."""
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_bert(torch.float32)
    reference, clients = make_round(model, 3, seed=3)
    ref_dir = _save(model, reference, root / "global")
    client_dirs = [_save(model, c, root / f"client{i}") for i, c in enumerate(clients)]
    # What peft wrote is what the CLI reads: compare against these, not the in-memory states.
    saved = [load_file(str(d / "adapter_model.safetensors")) for d in client_dirs]
    return dict(root=root, ref=ref_dir, clients=client_dirs, saved=saved, saved_ref=load_file(str(ref_dir / "adapter_model.safetensors")))


def _run(dirs, out, *extra, clients=None):
    argv = [str(d) for d in (clients or dirs["clients"])] + ["--reference", str(dirs["ref"]), "--out", str(out), "--no-progress", *extra]
    return main(argv)


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_fedrot_round_writes_a_loadable_adapter_and_a_report(dirs, tmp_path, capsys):
    out, report = tmp_path / "new_global", tmp_path / "report.json"
    rc = _run(dirs, out, "--round", "1", "--lam", "0.7", "--weights", "3,5,9", "--report", str(report))
    assert rc == 0, capsys.readouterr().err
    expected = fedrot_ext.aggregate_state_dicts(dirs["saved"], reference=dirs["saved_ref"], weights=WEIGHTS, round=1, lam=0.7)
    written = load_file(str(out / "adapter_model.safetensors"))
    assert_same_state(written, dict(expected))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
    loaded = PeftModel.from_pretrained(tiny_bert(torch.float32).get_base_model(), str(out))
    live = get_peft_model_state_dict(loaded)
    torch.testing.assert_close(live[KA], expected[KA], rtol=0, atol=0)
    rep = json.loads(report.read_text())
    assert rep["lam"] == 0.7 and rep["align"] == "A" and rep["dropped"] == []
    errors = fedrot_ext.state_dict_aggregation_error(dirs["saved"], expected, weights=WEIGHTS)
    assert set(rep["aggregation_error"]) == set(errors)
    for name, (absolute, relative) in errors.items():
        assert rep["aggregation_error"][name]["relative"] == pytest.approx(relative, rel=1e-9)
    # The clients are Haar-rotated copies of the reference: the rotations are far from the identity.
    assert rep["rotation_angles_deg"]["count"] == 3 * len(errors) and rep["rotation_angles_deg"]["max"] > 10.0


def test_python_dash_m_entry_point_reports_a_missing_config(dirs, tmp_path):
    broken = _copy_dir(dirs["clients"][1], tmp_path / "noconfig")
    (broken / "adapter_config.json").unlink()
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedrot_ext", "aggregate", str(dirs["clients"][0]), str(broken), "--reference", str(dirs["ref"]),
         "--out", str(out), "--no-progress"], cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(broken / "adapter_config.json") in lines[0] and "missing" in lines[0]
    assert not out.exists()


def test_mismatched_configs_are_refused(dirs, tmp_path, capsys):
    other = _copy_dir(dirs["clients"][2], tmp_path / "other_alpha")
    config = json.loads((other / "adapter_config.json").read_text())
    config["lora_alpha"] = 16
    (other / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert _run(dirs, out, "--round", "1", clients=[dirs["clients"][0], other]) == 2
    err = capsys.readouterr().err
    assert str(other / "adapter_config.json") in err and "lora_alpha" in err
    assert not out.exists()


def test_target_modules_mismatch_is_refused(dirs, tmp_path, capsys):
    other = _copy_dir(dirs["clients"][2], tmp_path / "other_targets")
    config = json.loads((other / "adapter_config.json").read_text())
    config["target_modules"] = ["query"]
    (other / "adapter_config.json").write_text(json.dumps(config))
    assert _run(dirs, tmp_path / "out", clients=[dirs["clients"][0], other]) == 2
    assert "target_modules" in capsys.readouterr().err


def test_pickle_only_directory_is_refused_and_nothing_written(dirs, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((dirs["clients"][0] / "adapter_config.json").read_bytes())
    torch.save(dirs["saved"][0], pickled / "adapter_model.bin")
    out = tmp_path / "out"
    assert _run(dirs, out, clients=[dirs["clients"][0], pickled]) == 2
    err = capsys.readouterr().err
    assert str(pickled / "adapter_model.bin") in err and "pickle" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pickled"]


def _nan_client(dirs, tmp_path) -> Path:
    state = dict(dirs["saved"][1])
    state[KA] = state[KA].clone()
    state[KA][0, 0] = float("nan")
    model = tiny_bert(torch.float32)
    return _save(model, state, tmp_path / "nan_client")


def test_nan_client_with_raise_fails_and_writes_nothing(dirs, tmp_path, capsys):
    bad = _nan_client(dirs, tmp_path)
    out = tmp_path / "out"
    assert _run(dirs, out, "--round", "1", clients=[dirs["clients"][0], bad, dirs["clients"][2]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad / "adapter_model.safetensors") in err and "NaN" in err
    assert not out.exists()


def test_nan_client_with_skip_is_dropped_and_reported(dirs, tmp_path):
    bad = _nan_client(dirs, tmp_path)
    out, report = tmp_path / "out", tmp_path / "r.json"
    clients = [dirs["clients"][0], bad, dirs["clients"][2]]
    assert _run(dirs, out, "--round", "1", "--on-invalid", "skip", "--weights", "3,5,9", "--report", str(report), clients=clients) == 0
    expected = fedrot_ext.aggregate_state_dicts([dirs["saved"][0], dirs["saved"][2]], reference=dirs["saved_ref"], weights=[3, 9], round=1)
    assert_same_state(load_file(str(out / "adapter_model.safetensors")), dict(expected), rtol=1e-6, atol=1e-7)
    rep = json.loads(report.read_text())
    assert [d["client"] for d in rep["dropped"]] == [1] and rep["dropped"][0]["dir"] == str(bad)


def test_existing_out_dir_is_refused_unless_overwrite(dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert _run(dirs, out, "--round", "1") == 2
    assert str(out) in capsys.readouterr().err and (out / "keep.txt").read_text() == "old"
    assert _run(dirs, out, "--round", "1", "--overwrite") == 2  # not an adapter directory: never removed
    assert "not an adapter directory (keep.txt)" in capsys.readouterr().err and (out / "keep.txt").read_text() == "old"
    fresh = tmp_path / "fresh"
    assert _run(dirs, fresh, "--round", "1") == 0
    assert _run(dirs, fresh, "--round", "1") == 2  # exists: refused without --overwrite
    assert _run(dirs, fresh, "--round", "1", "--overwrite", "--lam", "0.2") == 0  # a previous output: replaced
    out = fresh
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_out_dir_under_a_file_is_refused(dirs, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _run(dirs, blocker / "out") == 2
    assert str(blocker) in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_parent_is_refused(dirs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert _run(dirs, locked / "out") == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_interrupted_write_leaves_no_out_dir(dirs, tmp_path, monkeypatch):
    import fedrot_ext.cli.output as output

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(output.os, "rename", fail)
    out = tmp_path / "out"
    assert _run(dirs, out) == 2
    assert list(tmp_path.iterdir()) == []


def test_fedex_writes_base_deltas_next_to_the_adapter(dirs, tmp_path):
    out = tmp_path / "out"
    assert _run(dirs, out, "--method", "fedex", "--weights", "3,5,9") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    expected = fedrot_ext.aggregate_state_dicts(dirs["saved"], weights=WEIGHTS, method="fedex", lora_config=config)
    assert_same_state(load_file(str(out / "base_deltas.safetensors")), expected.base_deltas)
    assert_same_state(load_file(str(out / "adapter_model.safetensors")), dict(expected))


def test_bad_weights_and_lam_are_usage_errors(dirs, tmp_path, capsys):
    assert _run(dirs, tmp_path / "o", "--weights", "1,2") == 2
    assert "--weights: expected 3 values" in capsys.readouterr().err
    assert _run(dirs, tmp_path / "o", "--lam", "big") == 2
    assert _run(dirs, tmp_path / "o", "--round", "1", "--lam", "1.5") == 2
    assert "lam" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_lam_auto_reports_the_lambda_chosen_per_module(dirs, tmp_path):
    """--lam auto runs the library's lam="auto" for real: the written adapter equals aggregate_state_dicts
    with lam="auto", and the report carries the setting and the λ each module used."""
    out, report = tmp_path / "out", tmp_path / "r.json"
    assert _run(dirs, out, "--round", "1", "--lam", "auto", "--weights", "3,5,9", "--report", str(report)) == 0
    expected = fedrot_ext.aggregate_state_dicts(dirs["saved"], reference=dirs["saved_ref"], weights=WEIGHTS, round=1,
                                                lam="auto")
    rep = json.loads(report.read_text())
    assert rep["lam"] == "auto" and rep["lam_per_module"] == expected.lam and expected.lam
    assert set(expected.lam.values()) <= set(fedrot_ext.DEFAULT_LAM_GRID)
    assert_same_state(load_file(str(out / "adapter_model.safetensors")), dict(expected))


def test_merge_uses_merge_adapters_without_a_reference(dirs, tmp_path):
    from fedrot_ext.peft.merge import merge_adapters  # the alignment branch's function

    out = tmp_path / "merged"
    argv = [str(d) for d in dirs["clients"]] + ["--merge", "--weights", "3,5,9", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    expected = merge_adapters(dirs["saved"], weights=WEIGHTS, align="AB", reference=None)
    assert_same_state(load_file(str(out / "adapter_model.safetensors")), dict(expected))
