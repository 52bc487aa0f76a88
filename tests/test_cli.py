"""The ``mtsgd`` command line, end to end on tiny configurations."""

import argparse
import importlib.util
import pathlib
import subprocess
import sys
import tomllib

import pytest

from mtsgd_jax import cli
from mtsgd_jax.cli import _common, build_parser, main
from mtsgd_jax.transforms import WEIGHTINGS

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("toy", "scaling"):
        assert name in out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: mtsgd" in capsys.readouterr().err


def test_bad_option_values_are_rejected(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["scaling", "--sizes", "0"])
    assert "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="multiple of 4"):
        main(["toy", "--mtsgd-steps", "30", "--trace-every", "10"])


def test_scaling_cli_accepts_specs_and_rejects_bad_ones(capsys):
    parser = build_parser()
    args = parser.parse_args(["scaling", "--methods", "mtsgd:solver=enumerate", "mtsgd[osqp]", "linear_scalarization", "floor"])
    assert args.methods == ["mtsgd:solver=enumerate", "mtsgd[osqp]", "linear_scalarization", "floor"]
    with pytest.raises(SystemExit):
        parser.parse_args(["scaling", "--methods", "mtsgd:weighting=scores"])
    err = capsys.readouterr().err
    assert "argument --methods" in err and "option 'weighting' of mtsgd must be one of ('stein', 'normalized', 'score')" in err


def test_console_script_module_runs():
    """``python -m mtsgd_jax.cli`` is what the installed ``mtsgd`` script calls."""
    proc = subprocess.run([sys.executable, "-m", "mtsgd_jax.cli", "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "mtsgd_jax" in proc.stdout


# ------------------------------------------------------------------ optional modules


def _forbid(monkeypatch, module, name):
    monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail(f"{module.__name__}.{name} ran although a module is missing"))


@pytest.mark.parametrize("command", ["toy", "zdt", "scaling"])
def test_missing_matplotlib_stops_before_computing(monkeypatch, capsys, tmp_path, command):
    """sys.modules[name] = None is how Python marks a module as not importable: find_spec then returns None."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _forbid(monkeypatch, importlib.import_module(f"mtsgd_jax.cli.{command}"), "run")
    assert main([command, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mtsgd {command} needs matplotlib, which is not installed: pip install 'mtsgd-jax[experiments]'"
    )
    assert not (tmp_path / "out").exists()


def test_missing_modules_of_train_depend_on_the_task(monkeypatch, capsys):
    import mtsgd_jax.cli.train as train_cli

    real = importlib.util.find_spec
    absent = {"sklearn", "orbax"}
    monkeypatch.setattr(_common.importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    _forbid(monkeypatch, train_cli, "run")
    assert main(["train"]) == 2  # multi-digits: scikit-learn's digits, and orbax for the checkpoints
    assert capsys.readouterr().err.strip() == (
        "mtsgd train needs orbax-checkpoint and scikit-learn, which are not installed: pip install 'mtsgd-jax[experiments]'"
    )
    assert main(["train", "--task", "multi-mnist", "--data-dir", "x"]) == 2
    assert "mtsgd train needs orbax-checkpoint, which is not installed" in capsys.readouterr().err
    absent.clear()
    parser = build_parser()
    for task, needs in (("multi-digits", ["sklearn"]), ("sarcos", ["scipy"]), ("celeba", ["PIL"]), ("multi-fashion", [])):
        args = parser.parse_args(["train", "--task", task])
        assert list(args.requires(args)) == ["orbax.checkpoint", *needs]
        assert _common.missing_modules(args) == []  # all installed here


def test_every_subcommand_declares_known_optional_modules():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, p in sub.choices.items():
        args = p.parse_args([])
        requires = args.requires(args) if callable(args.requires) else args.requires
        assert set(requires) <= set(_common.OPTIONAL_MODULES), name
    with pytest.raises(ValueError, match="unknown optional module"):
        _common.set_requires(argparse.ArgumentParser(), ("matplotlib", "seaborn"))
    assert _common.module_available("json") and not _common.module_available("mtsgd_jax_no_such_module.sub")


# ------------------------------------------------------------------ --help of every subcommand


def _subparsers():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub.choices


def test_help_of_flags_reads_right():
    parser, choices = _subparsers()
    assert set(choices) == set(cli._COMMANDS)
    for name, p in choices.items():
        assert p.formatter_class is _common.HelpFormatter, name
        text = " ".join(p.format_help().split())
        assert "(default: None)" not in text, name
        fmt = p._get_formatter()
        for action in p._actions:
            if action.nargs == 0 and not isinstance(action, (argparse.BooleanOptionalAction, argparse._HelpAction)):
                # a flag that takes no value has nothing to show as a default ("--resume ... (default: False)")
                assert "(default" not in fmt._get_help_string(action), (name, action.option_strings)
    for name in ("toy", "zdt", "scaling"):
        text = " ".join(choices[name].format_help().split())
        assert "--progress, --no-progress show progress bars (--no-progress hides them) (default: True)" in text
        assert choices[name].parse_args(["--no-progress"]).progress is False
        assert choices[name].parse_args([]).progress is True
    text = " ".join(choices["scaling"].format_help().split())
    assert "--network, --no-network also time the network-sized case (--no-network skips it) (default: True)" in text
    assert choices["scaling"].parse_args(["--no-network"]).network is False
    train = " ".join(choices["train"].format_help().split())
    assert "--no-progress hide progress bars" in train and "hide progress bars (default" not in train
    assert "--epochs EPOCHS epochs in all (default: the task's)" in train
    assert "(default: 0.03)" in " ".join(choices["toy"].format_help().split())  # value defaults still shown
    assert "usage: mtsgd" in parser.format_help()


# ------------------------------------------------------------------ packaging


def test_pyproject_license_is_an_spdx_expression():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"  # a table here makes setuptools >= 77 warn on every build
    assert not any(c.startswith("License ::") for c in meta["project"].get("classifiers", []))  # PEP 639: not both
    assert "setuptools>=77" in meta["build-system"]["requires"]



def test_weighting_choices_are_the_library_s():
    choices = _subparsers()[1]
    for command in ("toy", "train"):
        (action,) = [a for a in choices[command]._actions if a.dest == "weighting"]
        assert tuple(action.choices) == WEIGHTINGS, command
