"""``mtsgd train`` end to end on a tiny configuration, resume (refused settings, damaged checkpoints),
and the missing / malformed data messages."""

import argparse
import contextlib
import glob
import io
import json
import os
import shutil

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
                "--data-dir", "--out", "--seed", "--kernel-space", "--resume", "--allow-changed"):
        assert opt in out


class _Stop(Exception):
    pass


@pytest.fixture
def fake_train(monkeypatch):
    """``mtsgd train`` up to the call of ``train``: the task is a stand-in, ``train`` records its
    method and options and stops the run."""
    import types

    import mtsgd_jax.training as training

    calls = []
    task = types.SimpleNamespace(name="fake", num_tasks=2, train_data=[0] * 8, eval_data=[0] * 4, eval_name="test")
    monkeypatch.setattr(training, "make_task", lambda *a, **k: task)

    def train(task, method, **kwargs):
        calls.append((method, kwargs["method_options"]))
        raise _Stop

    monkeypatch.setattr(training, "train", train)
    return calls


@pytest.mark.parametrize(
    "argv, method, options",
    [
        ([], "mtsgd", {}),
        (["--weighting", "score"], "mtsgd", {"weighting": "score"}),
        (["--method", "mtsgd:weighting=normalized,solver=enumerate"], "mtsgd", {"weighting": "normalized", "solver": "enumerate"}),
        (["--method", "mtsgd:weighting=score", "--weighting", "score"], "mtsgd", {"weighting": "score"}),
        (["--method", "moo_svgd:repulsion=0.5,normalize_grads=1"], "moo_svgd", {"repulsion": 0.5, "normalize_grads": True}),
        (["--method", "pareto_mtl:warmup_steps=5"], "pareto_mtl", {"pareto_warmup_steps": 5}),
        (["--method", "linear_scalarization:ls_weights=spread", "--weighting", "normalized"], "linear_scalarization", {"ls_weights": "spread"}),
        (["--method", "single_task"], "single_task", {}),
    ],
)
def test_method_specs_reach_train(fake_train, argv, method, options):
    with pytest.raises(_Stop):
        _run(argv + ["--no-progress"])
    assert fake_train == [(method, options)]


def test_bad_method_specs_are_refused(fake_train, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["train", "--method", "mtsgd:weighting=scores"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --method" in err and "option 'weighting' of mtsgd must be one of ('stein', 'normalized', 'score')" in err
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--method", "gradnorm"])
    assert "unknown method 'gradnorm'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--method", "mgda:block_size=4"])
    assert "unknown option 'block_size' for mgda; valid options: solver, normalize_grads, warm_start" in capsys.readouterr().err
    # the weighting given twice, differently: exit status 2 before anything is loaded
    assert _run(["--method", "mtsgd:weighting=score", "--weighting", "stein", "--no-progress"]) == 2
    assert "--weighting stein contradicts --method mtsgd:weighting=score" in capsys.readouterr().err
    assert fake_train == []


COMMON = ["--task", "multi-digits", "--method", "linear_scalarization", "--num-particles", "3",
          "--batch-size", "32", "--num-train", "512", "--num-eval", "200", "--optimizer", "adam",
          "--lr", "2e-3", "--seed", "1", "--no-progress"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """One 2-epoch run of COMMON (checkpoints at epochs 1 and 2); tests resume from copies of it."""
    out = tmp_path_factory.mktemp("cli-train") / "run"
    args = _parser().parse_args(["train", *COMMON, "--out", str(out), "--epochs", "2"])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert args.func(args) == 0
    return out, stdout.getvalue()


def _copy(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    return out, COMMON + ["--out", str(out)]


def _flip_array_bytes(out, epoch):
    files = [f for f in glob.glob(os.path.join(out, "checkpoints", str(epoch), "state", "**"), recursive=True)
             if os.path.isfile(f)]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.slow
def test_train_multi_digits_end_to_end_beats_chance_and_resumes(two_epochs, tmp_path, capsys):
    """A short run on Multi-Digits (M = 3, 512 pairs, 2 epochs), then --resume for a third epoch;
    the ensemble must clearly beat chance (10%)."""
    out, common = _copy(two_epochs, tmp_path)
    text = two_epochs[1]
    assert "ensemble acc" in text and "top_left" in text and "bottom_right" in text
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "checkpoints").is_dir()
    capsys.readouterr()
    assert _run(common + ["--epochs", "3", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "epoch    3" in text and "epoch    1 " not in text  # continued, did not start over
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    losses = [list(r["train_loss"].values()) for r in lines]
    assert all(a > b for a, b in zip(losses[0], losses[-1]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["method"] == "linear_scalarization" and summary["config"]["epochs"] == 3
    assert summary["config"]["lr"] == 2e-3 and summary["config"]["optimizer"] == "adam"
    assert summary["config"]["setting_changes"] == []
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


@pytest.mark.slow
def test_resume_refuses_other_settings_unless_allowed(two_epochs, tmp_path, capsys):
    out, common = _copy(two_epochs, tmp_path)
    log = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    # another lr and optimiser: refused, each difference listed, nothing touched
    assert _run(common + ["--epochs", "3", "--resume", "--lr", "1e-3", "--optimizer", "sgd"]) == 2
    err = capsys.readouterr().err
    assert "lr: saved 0.002, requested 0.001" in err and "optimizer: saved 'adam', requested 'sgd'" in err
    assert "--allow-changed lr,optimizer" in err and "Traceback" not in err
    assert (out / "metrics.jsonl").read_text() == log
    # an option the method does not use changes nothing: accepted (MT-SGD's weighting, for linear scalarisation)
    assert _run(common + ["--epochs", "2", "--resume", "--weighting", "normalized"]) == 0
    capsys.readouterr()
    # allowed, but the saved optimiser state cannot serve SGD: a clear message naming the arrays
    assert _run(common + ["--epochs", "3", "--resume", "--optimizer", "sgd", "--allow-changed", "optimizer"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "opt_state" in err
    # unknown setting names are refused
    assert _run(common + ["--epochs", "3", "--resume", "--lr", "1e-3", "--allow-changed", "learning-rate"]) == 2
    assert "unknown settings ['learning_rate']" in capsys.readouterr().err
    # allowed: the summary reports the settings used and the change (--epochs may change without override)
    assert _run(common + ["--epochs", "2", "--resume", "--lr", "1e-3", "--allow-changed", "lr,epochs"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lr"] == 1e-3 and summary["config"]["epochs"] == 2
    assert summary["config"]["setting_changes"] == [
        {"epoch": 2, "changed": {"lr": {"saved": 2e-3, "requested": 1e-3}}}
    ]


@pytest.mark.slow
def test_resume_skips_a_damaged_checkpoint_and_stops_when_none_is_intact(two_epochs, tmp_path, capsys):
    out, common = _copy(two_epochs, tmp_path)
    capsys.readouterr()
    _flip_array_bytes(out, 2)
    assert _run(common + ["--epochs", "1", "--resume"]) == 0
    captured = capsys.readouterr()
    assert "mtsgd train: warning: checkpoint epoch 2 in" in captured.err
    assert "is damaged (" in captured.err and "); resuming from epoch 1" in captured.err
    assert "Traceback" not in captured.err and "Exception ignored" not in captured.err
    assert [json.loads(s)["epoch"] for s in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (out / "checkpoints.damaged" / "2").is_dir()
    _flip_array_bytes(out, 1)
    assert _run(common + ["--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "mtsgd train: cannot --resume: no intact checkpoint" in err and "epoch 1: " in err
    assert "Traceback" not in err


def test_task_choices_are_the_registry_of_tasks():
    # the CLI keeps its task names literal (fast --help); they must be exactly the trainer's registry
    from mtsgd_jax.cli import train as cli_train
    from mtsgd_jax.training.tasks import TASKS

    assert set(cli_train._TASKS) == set(TASKS)
