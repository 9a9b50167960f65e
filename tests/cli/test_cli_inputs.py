"""fedrot-aggregate on inputs that used to give a traceback or a silently wrong adapter: bad config
values, unreadable files, weights whose sum overflows, options --merge would ignore, a config whose
ranks disagree with the tensors. Each exits 2 with one line and writes nothing."""
import json
import shutil

import pytest
import torch
from peft import PeftModel

from fedrot_ext.cli import main
from helpers.peft_models import make_round, tiny_bert

from test_cli import _save


@pytest.fixture()
def tree(tmp_path):
    model = tiny_bert(torch.float32)
    reference, clients = make_round(model, 2, seed=22)
    return dict(root=tmp_path, model=model, ref=_save(model, reference, tmp_path / "global"),
                clients=[_save(model, c, tmp_path / f"c{i}") for i, c in enumerate(clients)])


def run(tree, *extra, clients=None, reference=True):
    argv = [str(d) for d in (clients or tree["clients"])] + (["--reference", str(tree["ref"])] if reference else [])
    return main(argv + ["--out", str(tree["root"] / "out"), "--no-progress", *extra])


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedrot-aggregate: error: "), err
    return err


@pytest.mark.parametrize("field, value, expected", [
    ("r", "four", "an int >= 1"),
    ("r", None, "an int >= 1"),
    ("r", 0, "an int >= 1"),
    ("lora_alpha", "16", "a number"),
    ("rank_pattern", ["value"], "a mapping of module names to ints >= 1"),
    ("rank_pattern", {"value": "2"}, "a mapping of module names to ints >= 1"),
    ("target_modules", [1, 2], "a string or a list of strings"),
    ("fan_in_fan_out", "no", "true or false"),
])
def test_bad_config_values_exit_2_naming_file_and_field(tree, capsys, field, value, expected):
    config_path = tree["clients"][1] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    assert run(tree, "--round", "1") == 2
    err = one_line(capsys)
    assert f"{config_path}: {field} = {value!r}, expected {expected}" in err
    assert not (tree["root"] / "out").exists()


def test_an_unreadable_weights_file_exits_2(tree, capsys):
    weights = tree["clients"][0] / "adapter_model.safetensors"
    weights.unlink()
    weights.mkdir()  # a directory where the file should be: unreadable whoever runs it
    assert run(tree, "--round", "1") == 2
    assert str(tree["clients"][0]) in one_line(capsys)


def test_weights_whose_sum_overflows_name_weights(tree, capsys):
    assert run(tree, "--round", "1", "--weights", "1e308,1e308") == 2
    assert "weights: expected a finite sum" in one_line(capsys)


@pytest.mark.parametrize("option", [["--clip-norm", "1"], ["--on-invalid", "skip"], ["--lam", "0.3"], ["--round", "1"],
                                    ["--schedule", "A"], ["--method", "fedit"]])
def test_merge_refuses_the_options_it_would_ignore(tree, capsys, option):
    assert run(tree, "--merge", *option, reference=False) == 2
    assert f"{option[0]}: does not apply to --merge" in one_line(capsys)
    assert not (tree["root"] / "out").exists()


def test_a_smaller_client_rank_than_the_reference_gives_a_loadable_adapter(tree, tmp_path):
    """Clients of rank 2 aligned to a rank-4 reference: the result has rank 4 (the clients are padded to
    the reference's rank), and its config says so; peft loads it."""
    low = tiny_bert(torch.float32, r=2, rank_pattern={})
    _, clients = make_round(low, 2, seed=23)
    dirs = [_save(low, c, tmp_path / f"low{i}") for i, c in enumerate(clients)]
    assert run(tree, "--round", "1", clients=dirs) == 0
    out = tree["root"] / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4
    PeftModel.from_pretrained(tiny_bert(torch.float32).get_base_model(), str(out))


def test_the_progress_bar_stays_off_a_log_file(tree, capfd):
    argv = [str(d) for d in tree["clients"]] + ["--reference", str(tree["ref"]), "--round", "1", "--out",
                                                str(tree["root"] / "out")]
    assert main(argv) == 0
    assert "loading adapters" not in capfd.readouterr().err  # stderr is not a terminal here


def test_hints_name_the_command_option(tree, capsys):
    from safetensors.torch import load_file, save_file

    path = tree["clients"][1] / "adapter_model.safetensors"
    state = load_file(str(path))
    key = next(k for k in state if "lora_A" in k)
    state[key][0, 0] = float("nan")
    save_file(state, str(path))
    assert run(tree, "--round", "1") == 2
    err = one_line(capsys)
    assert "(pass --on-invalid skip to drop this client)" in err and "on_invalid=" not in err
    shutil.rmtree(tree["root"] / "out", ignore_errors=True)


def test_a_padded_client_keeps_its_own_lora_scaling(tree, tmp_path):
    """fedit of a rank-2 client (weight 1) with a rank-4 one (weight 0): the written adapter, loaded at its
    config's scaling alpha / 4, applies the update the rank-2 client trained at alpha / 2."""
    from safetensors.torch import load_file

    low = tiny_bert(torch.float32, r=2, rank_pattern={})
    _, clients = make_round(low, 1, seed=24)
    low_dir = _save(low, clients[0], tmp_path / "low")
    assert run(tree, "--method", "fedit", "--weights", "1,0", clients=[low_dir, tree["clients"][0]], reference=False) == 0
    out = tree["root"] / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    got, trained = load_file(str(out / "adapter_model.safetensors")), load_file(str(low_dir / "adapter_model.safetensors"))
    key_A = next(k for k in got if k.endswith("layer.0.attention.self.query.lora_A.weight"))
    key_B = key_A.replace("lora_A", "lora_B")
    assert config["r"] == 4 and got[key_A].shape[0] == 4
    s_out, s_low = config["lora_alpha"] / 4, config["lora_alpha"] / 2
    torch.testing.assert_close(s_out * got[key_B] @ got[key_A], s_low * trained[key_B] @ trained[key_A], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, rank", [("svd", None), ("svd", 2), ("cat", None), ("ties", None), ("tsv", 3)])
def test_merge_methods_write_an_adapter_peft_loads(tree, method, rank):
    extra = ["--merge", "--merge-method", method] + (["--merge-rank", str(rank)] if rank else [])
    assert run(tree, *extra, reference=False) == 0
    out = tree["root"] / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    if rank:
        assert config["r"] == rank
    PeftModel.from_pretrained(tiny_bert(torch.float32).get_base_model(), str(out))


@pytest.mark.parametrize("extra, match", [
    (["--merge-method", "svd"], "--merge-method: applies to --merge only"),
    (["--merge", "--merge-method", "svd", "--reference", "REF"], "--reference: does not apply to --merge-method svd"),
    (["--merge", "--merge-method", "cat", "--merge-rank", "3"], "rank: method 'cat' is exact"),
    (["--merge", "--merge-method", "svd", "--merge-density", "0.5"], "density: an option of method 'ties'"),
])
def test_merge_options_that_do_not_apply_exit_2(tree, capsys, extra, match):
    extra = [str(tree["ref"]) if e == "REF" else e for e in extra]
    assert run(tree, *extra, reference=False) == 2
    assert match in one_line(capsys)
    assert not (tree["root"] / "out").exists()
