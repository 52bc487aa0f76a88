"""``mtsgd train`` end to end on a tiny configuration, resume, and the missing / malformed data messages."""

import argparse
import json

import pytest

from mtsgd_jax.cli import train as cli_train


def _parser():
    parser = argparse.ArgumentParser(prog="mtsgd")
    cli_train.register(parser.add_subparsers(dest="command"))
    return parser


def _run(argv):
    args = _parser().parse_args(["train", *argv])
    return args.func(args)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--task", "--method", "--num-particles", "--epochs", "--batch-size", "--lr", "--optimizer",
                "--data-dir", "--out", "--seed", "--kernel-space", "--resume"):
        assert opt in out


@pytest.mark.slow
def test_train_multi_digits_end_to_end_beats_chance_and_resumes(tmp_path, capsys):
    """A short run on Multi-Digits (M = 3, 512 pairs, 2 epochs), then --resume for a third epoch;
    the ensemble must clearly beat chance (10%)."""
    out = tmp_path / "run"
    common = ["--task", "multi-digits", "--method", "linear_scalarization", "--num-particles", "3",
              "--batch-size", "32", "--num-train", "512", "--num-eval", "200", "--optimizer", "adam",
              "--lr", "2e-3", "--out", str(out), "--seed", "1", "--no-progress"]
    assert _run(common + ["--epochs", "2"]) == 0
    text = capsys.readouterr().out
    assert "ensemble acc" in text and "top_left" in text and "bottom_right" in text
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "checkpoints").is_dir()
    assert _run(common + ["--epochs", "3", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "epoch    3" in text and "epoch    1 " not in text  # continued, did not start over
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    losses = [list(r["train_loss"].values()) for r in lines]
    assert all(a > b for a, b in zip(losses[0], losses[-1]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["method"] == "linear_scalarization" and summary["config"]["epochs"] == 3
    assert summary["metrics"]["ensemble_accuracy"] > 0.4, summary["metrics"]  # chance: 0.1
    for task in ("top_left", "bottom_right"):
        assert summary["metrics"]["tasks"][task]["ensemble_accuracy"] > 0.3


def test_missing_data_file_gives_a_clear_message(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = _run(["--task", "sarcos", "--data-dir", str(empty), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "not found" in err and "sarcos_inv.mat" in err and str(empty) in err
    assert not (tmp_path / "o").exists()


def test_malformed_data_file_gives_a_clear_message(tmp_path, capsys):
    (tmp_path / "sarcos_inv.mat").write_text("not a MATLAB file")
    (tmp_path / "sarcos_inv_test.mat").write_text("not a MATLAB file")
    code = _run(["--task", "sarcos", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "malformed" in err and "sarcos_inv.mat" in err


def test_missing_data_dir_for_a_file_based_task(capsys):
    assert _run(["--task", "celeba", "--no-progress"]) == 2
    assert "data directory" in capsys.readouterr().err
