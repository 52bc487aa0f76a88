"""The ``mtsgd`` command line, end to end on tiny configurations."""

import json
import subprocess
import sys

import pytest

from mtsgd_jax.cli import build_parser, main


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


def test_toy_end_to_end(tmp_path, capsys):
    out = tmp_path / "toy"
    code = main(
        ["toy", "--out", str(out), "--seeds", "0", "--num-particles", "8", "--mtsgd-steps", "40",
         "--moo-svgd-steps", "80", "--trace-every", "10", "--no-progress"]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "mtsgd" in text and "moo_svgd" in text
    payload = json.loads((out / "toy_comparison.json").read_text())
    assert payload["methods"]["mtsgd"]["steps"][-1] == 40
    assert payload["methods"]["moo_svgd"]["steps"][-1] == 80
    share = payload["methods"]["mtsgd"]["share_in_joint_region"]
    assert len(share) == 1 and len(share[0]) == 5 and all(0.0 <= s <= 1.0 for s in share[0])
    assert (out / "toy_comparison.png").stat().st_size > 10_000


def test_scaling_end_to_end(tmp_path, capsys):
    out = tmp_path / "scaling"
    code = main(
        ["scaling", "--out", str(out), "--sizes", "3", "6", "--steps", "5", "--repeats", "1",
         "--methods", "mtsgd", "moo_svgd", "floor", "--no-network", "--no-progress"]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "mtsgd/moo_svgd" in text and "mtsgd/floor" in text
    payload = json.loads((out / "scaling.json").read_text())
    assert set(payload["results"]) == {"3", "6"}
    for rows in payload["results"].values():
        assert set(rows) == {"mtsgd", "moo_svgd", "floor"}
        for row in rows.values():
            assert row["compile_s"] > 0 and len(row["run_s"]) == 1 and row["final_finite"]
    r = payload["ratios"]["6"]
    assert r["mtsgd/floor"] == pytest.approx(payload["results"]["6"]["mtsgd"]["median_s"] / payload["results"]["6"]["floor"]["median_s"])
    assert (out / "scaling.png").stat().st_size > 10_000


@pytest.mark.slow
def test_console_script_module_runs():
    """``python -m mtsgd_jax.cli`` is what the installed ``mtsgd`` script calls."""
    proc = subprocess.run([sys.executable, "-m", "mtsgd_jax.cli", "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "mtsgd_jax" in proc.stdout
