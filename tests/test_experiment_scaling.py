"""The particle-count scaling benchmark behind the README's scaling table (``mtsgd scaling``)."""

import json

import numpy as np
import pytest

from mtsgd_jax.cli import main


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


def _program(t, x, grads):
    """The jaxpr (text and constants) of init + one update of ``t``: equal programs, equal updates."""
    closed = __import__("jax").make_jaxpr(lambda x, g: t.update(g, t.init(x), x))(x, grads)
    return str(closed.jaxpr), [np.asarray(c).tolist() for c in closed.consts]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scaling_methods_are_registry_specs(dtype):
    """The benchmark's method names build the registry's transformations (traced programs compared)."""
    import jax

    from mtsgd_jax.experiments import scaling
    from mtsgd_jax.transforms import linear_scalarization, mgda, moo_svgd, mtsgd

    k = scaling.K_TOY
    x = jax.random.normal(jax.random.key(0), (5, 2), dtype)
    grads = x[None] - jax.numpy.arange(k, dtype=dtype)[:, None, None]
    cases = [
        ("mtsgd", {}, mtsgd(k)),
        ("mtsgd[frank_wolfe]", {}, mtsgd(k, solver="frank_wolfe")),
        ("mtsgd:solver=osqp,warm_start=0", {}, mtsgd(k, solver="osqp", warm_start=False)),
        ("mtsgd", {"block_size": 2}, mtsgd(k, block_size=2)),
        ("moo_svgd", {"block_size": 2}, moo_svgd(k, block_size=2)),
        ("mgda", {"block_size": 2}, mgda(k)),  # mgda has no kernel: block_size does not apply
        ("linear_scalarization", {}, linear_scalarization(k)),
    ]
    for method, kw, direct in cases:
        got = _program(scaling.make_transformation(method, k, **kw), x, grads)
        assert got == _program(direct, x, grads), (method, kw)
    assert _program(scaling.make_transformation("mtsgd[frank_wolfe]", k), x, grads) != _program(mtsgd(k), x, grads)
    for method, match in [
        ("mtsgd:bogus=1", "unknown option 'bogus' for mtsgd"),
        ("sgd", r"unknown method 'sgd'.*Benchmark methods: \('mtsgd', 'mtsgd\[projected_gradient\]'"),
        ("mtsgd[newton]", r"option 'solver' of mtsgd must be one of \('auto',"),
        ("pareto_mtl", "needs the loss values"),
        ("svgd", r"svgd samples one target \(num_targets=1\), got 3"),
    ]:
        with pytest.raises(ValueError, match=match):
            scaling.make_transformation(method, k)
