"""The atomic result writers and the write-results-then-plot helpers of experiments/report.py."""

import csv
import json
import os
import stat

import numpy as np
import pytest

from mtsgd_jax import report


def _siblings(path):
    return sorted(os.listdir(os.path.dirname(path)))


def test_atomic_open_replaces_only_on_success(tmp_path):
    path = tmp_path / "sub" / "result.txt"
    with report.atomic_open(path) as f:
        f.write("first")
        assert not path.exists()  # nothing at the destination until the block ends
    assert path.read_text() == "first" and _siblings(path) == ["result.txt"]
    with pytest.raises(RuntimeError, match="boom"):
        with report.atomic_open(path) as f:
            f.write("half of the second")
            raise RuntimeError("boom")
    assert path.read_text() == "first" and _siblings(path) == ["result.txt"]  # old content, no temporary left
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with report.atomic_open(path, "a"):
            pass


def test_interrupted_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "r.json")
    report.write_json(path, {"a": 1})

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        report.write_json(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(open(path).read()) == {"a": 1} and _siblings(path) == ["r.json"]


def test_data_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    path = str(tmp_path / "r.bin")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(report.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(report.os, "replace", lambda a, b: (events.append(("replace", os.path.dirname(a) == os.path.dirname(b))), real_replace(a, b))[1])
    report.write_bytes(path, b"\x00\x01")
    assert events[:2] == ["fsync", ("replace", True)]  # file fsync-ed, then renamed within its directory
    assert open(path, "rb").read() == b"\x00\x01"


def test_permissions_follow_the_umask_like_open(tmp_path):
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:
        f.write("x")
    atomic = report.write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(os.stat(atomic).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_write_json_values_round_trip_exactly(tmp_path, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4)).astype(dtype)
    x[1, 2] = np.nan
    x[2, 0] = np.inf
    payload = {"x": x, "n": np.int64(7), "flag": np.bool_(True), 3: [np.float32(0.1)]}
    path = report.write_json(tmp_path / "p.json", payload)
    got = json.loads(open(path).read())
    assert got["n"] == 7 and got["flag"] is True and got["3"] == [float(np.float32(0.1))]
    expect = [[None if not np.isfinite(v) else float(v) for v in row] for row in x]
    assert got["x"] == expect  # float(v) of a float32 / float64 is exact, and so is its JSON repr
    back = np.array([[np.nan if v is None else v for v in row] for row in got["x"]], dtype)
    finite = np.isfinite(x)
    np.testing.assert_array_equal(back[finite], x[finite])


def test_write_csv(tmp_path):
    rows = [["mtsgd", np.float32(0.25), np.int64(3)], ["moo_svgd", 1.5, 4]]
    path = report.write_csv(tmp_path / "t.csv", ["method", "hv", "steps"], rows)
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["method", "hv", "steps"], ["mtsgd", "0.25", "3"], ["moo_svgd", "1.5", "4"]]
    with pytest.raises(ValueError, match="every row needs 3 fields"):
        report.write_csv(tmp_path / "t.csv", ["method", "hv", "steps"], [["x", 1]])
    assert open(path).read().startswith("method,hv,steps\n")  # the failed call left the file alone


def test_save_figure_is_atomic(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    path = report.save_figure(fig, tmp_path / "f.png", dpi=50)
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.save_figure(fig, tmp_path / "f.svg").endswith("f.svg")
    assert b"<svg" in open(tmp_path / "f.svg", "rb").read()
    with pytest.raises(ValueError):  # matplotlib does not know the format: the old PNG stays
        report.save_figure(fig, tmp_path / "f.png", format="nope")
    assert open(path, "rb").read() == data and sorted(os.listdir(tmp_path)) == ["f.png", "f.svg"]
    with pytest.raises(ValueError, match="has no suffix"):
        report.save_figure(fig, tmp_path / "figure")


def test_write_figures_runs_every_plot_and_names_the_results_kept(tmp_path):
    results = report.write_json(tmp_path / "r.json", {"hv": 1.0})
    drawn = []

    def good(path):
        drawn.append(path)
        report.write_text(path, "ok")

    def bad(path):
        raise RuntimeError("no display")

    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    with pytest.raises(report.PlotError) as exc:
        report.write_figures([(bad, a), (good, b)], results=[results])
    err = exc.value
    assert drawn == [b]  # the failure did not stop the next figure
    assert err.results == [results] and [p for p, _ in err.failures] == [a]
    assert f"{a}: RuntimeError: no display" in str(err) and f"the results are kept in {results}" in str(err)
    assert isinstance(err.__cause__, RuntimeError)
    assert json.loads(open(results).read()) == {"hv": 1.0} and not os.path.exists(a)
    assert report.write_figures([(good, a)], results=[results]) == [a]
