"""The toy comparison behind the README's toy table (``mtsgd toy``), end to end on a tiny configuration."""

import json
import os

import numpy as np

from mtsgd_jax.cli import main


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


def _fake_toy_result(seeds, *, num_particles, mtsgd_steps, moo_svgd_steps, lr, trace_every, weighting, progress):
    methods = {}
    for i, (name, steps) in enumerate((("mtsgd", mtsgd_steps), ("moo_svgd", moo_svgd_steps))):
        t = np.arange(0, steps + 1, trace_every)
        methods[name] = {
            "steps": t,
            "particles": np.zeros((len(seeds), len(t), num_particles, 2)),
            "share": np.linspace(0.0, 1.0 - 0.5 * i, len(t))[None].repeat(len(seeds), 0),
            "ksd": np.ones((len(seeds), len(t), 3)),
            "wall_s": [0.5] * len(seeds),
        }
    return {"seeds": list(seeds), "weighting": weighting, "num_particles": num_particles, "lr": lr, "methods": methods}


def test_failing_figure_keeps_the_results_and_says_where(monkeypatch, capsys, tmp_path):
    from mtsgd_jax.experiments import toy_comparison

    def broken_plot(result, path, snapshots=None):
        raise RuntimeError("no usable backend")

    monkeypatch.setattr(toy_comparison, "run_toy_comparison", _fake_toy_result)
    monkeypatch.setattr(toy_comparison, "plot_toy_comparison", broken_plot)
    out = tmp_path / "toy"
    code = main(["toy", "--out", str(out), "--seeds", "0", "1", "--num-particles", "3", "--mtsgd-steps", "40",
                 "--moo-svgd-steps", "80", "--trace-every", "10", "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    js = out / "toy_comparison.json"
    assert f"wrote {js}" in captured.out and "final share in joint region" in captured.out  # table printed first
    assert f"{out / 'toy_comparison.png'}: RuntimeError: no usable backend" in captured.err
    assert f"the results are kept in {js}" in captured.err and captured.err.startswith("mtsgd toy: plotting failed")
    payload = json.loads(js.read_text())
    assert payload["methods"]["mtsgd"]["steps"] == list(range(0, 41, 10))
    assert payload["methods"]["moo_svgd"]["share_in_joint_region"][1][-1] == 0.5
    assert sorted(os.listdir(out)) == ["toy_comparison.json"]  # no figure, no temporary file
