"""The multi-task experiment behind the README's Multi-Digits table, end to end on a tiny configuration."""

import json
import math

import numpy as np
import pytest

from mtsgd_jax.experiments import multitask

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

TINY = {
    "methods": ["mtsgd"],
    "seeds": [0, 1],
    "num_particles": 2,
    "epochs": 2,
    "num_train": 64,
    "num_eval": 32,
    "batch_size": 32,
}


@pytest.mark.slow
def test_multitask_experiment_end_to_end(tmp_path):
    payload = multitask.main(str(tmp_path), TINY, progress=False, timing_repeats=1)
    on_disk = json.loads((tmp_path / "multitask.json").read_text())
    assert (tmp_path / "multitask_reliability.png").stat().st_size > 0
    assert on_disk["config"]["methods"] == TINY["methods"]
    assert on_disk["task_names"] == payload["task_names"] and len(payload["task_names"]) == 2
    for name in TINY["methods"]:
        runs = on_disk["runs"][name]
        assert [r["seed"] for r in runs] == TINY["seeds"]
        for r in runs:
            m = r["metrics"]
            for key in ("ensemble_accuracy", "mean_particle_accuracy", "brier", "ece"):
                assert math.isfinite(m[key])
            assert 0.0 <= m["ensemble_accuracy"] <= 1.0 and 0.0 <= m["ece"] <= 1.0
            assert len(r["epoch_seconds"]) == TINY["epochs"]
        # The summary is the mean over seeds of the per-seed metrics (computed here independently).
        summary = on_disk["summary"][name]
        for key in ("ensemble_accuracy", "brier", "ece"):
            values = [r["metrics"][key] for r in runs]
            assert summary[key]["mean"] == pytest.approx(np.mean(values), rel=1e-12, abs=1e-15)
    # Every method appears as a row of the printed markdown table.
    table = on_disk["markdown_table"]
    assert all(multitask.LABELS[n] in table for n in TINY["methods"])
    timing = on_disk["step_timing"]
    assert set(timing) == set(TINY["methods"])
    assert all(len(timing[n]["times"]) == 1 and timing[n]["median_s"] > 0 for n in timing)


def test_multitask_rejects_bad_configuration():
    with pytest.raises(ValueError, match="unknown configuration keys"):
        multitask.run_multitask({"epoch": 3}, progress=False, log=None)
    with pytest.raises(ValueError, match="epochs must be >= 2"):
        multitask.run_multitask({"epochs": 1}, progress=False, log=None)
