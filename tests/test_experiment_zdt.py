"""The ZDT3 experiment (``mtsgd zdt``), end to end on a tiny configuration."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtsgd_jax import cli
from mtsgd_jax.experiments import zdt as exp


@pytest.fixture
def zdt_main(monkeypatch):
    """``mtsgd_jax.cli.main`` with the ``zdt`` subcommand registered (whether or not _COMMANDS lists it yet)."""
    monkeypatch.setattr(cli, "_COMMANDS", tuple(dict.fromkeys(cli._COMMANDS + ("zdt",))))
    return cli.main


def test_zdt_end_to_end(tmp_path, capsys, zdt_main):
    out = tmp_path / "zdt3"
    methods = ["mtsgd_obj:T=0.1,T_end=0.05,h=0.01,normalize_grads=1,momentum=0.5,box=0", "moo_svgd_obj:T=0.1,h=0.05"]
    code = zdt_main(
        ["zdt", "--out", str(out), "--seeds", "3", "--num-particles", "8", "--steps", "200", "--num-variables", "5",
         "--trace-every", "100", "--methods", *methods, "--no-progress"]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert all(m in text for m in methods) and "HV (1.1, 1.1)" in text
    payload = json.loads((out / "zdt3.json").read_text())
    cfg = payload["config"]
    assert cfg["num_variables"] == 5 and cfg["num_particles"] == 8 and cfg["steps"] == 200 and cfg["seeds"] == [3]
    assert cfg["reference_point"] == [1.1, 1.1] and cfg["published_reference_point"] == [0.99022638, 6.54635266]
    assert set(payload["summary"]) == set(methods) == set(payload["methods"])
    opt = payload["optimal"]
    assert 1.3 < opt["hv"] < 1.35 and 6.5 < opt["hv_published"] < 6.55
    for label, rec in payload["methods"].items():
        (final,) = rec["final"]
        for key in exp.METRICS:
            assert math.isfinite(final[key]), (label, key)
        assert 0.0 <= final["hv"] <= opt["hv"] + 1e-6
        assert 0.0 <= final["hv_published"] <= opt["hv_published"] + 1e-6
        assert final["igd"] >= final["igd_plus"] >= 0.0 and final["gd"] >= 0.0
        assert 0 <= final["segments"] <= 5 and 1 <= final["non_dominated"] <= 8
        (lo, hi), = rec["particle_range"]
        box = (0.0, 1.0) if label.endswith("box=0") else exp.BOX
        assert rec["box"] == list(box)
        assert box[0] - 1e-7 <= lo <= hi <= box[1] + 1e-7  # particles stayed in the box
        objs = jnp.asarray(rec["final_objectives"])
        assert objs.shape == (1, 8, 2) and bool(jnp.all(jnp.isfinite(objs)))
        assert bool(jnp.all((objs[..., 0] >= 0.0) & (objs[..., 0] <= 1.0)))  # f1 = theta_1
        assert rec["steps"] == [0, 100, 200]
        assert set(rec["curves"]) == {"hv", "hv_published", "igd"}
        for curve in rec["curves"].values():
            assert len(curve["mean"]) == 3 and all(math.isfinite(v) for v in curve["mean"]) and curve["std"] == [0.0] * 3
        assert rec["curves"]["hv"]["mean"][-1] == pytest.approx(final["hv"], abs=1e-5)
        assert rec["curves"]["igd"]["mean"][-1] == pytest.approx(final["igd"], abs=1e-5)
        assert len(rec["wall_s"]) == 1 and rec["wall_s"][0] > 0 and rec["compile_s"] > 0
        s = payload["summary"][label]
        assert s["hv"]["mean"] == pytest.approx(final["hv"]) and s["hv"]["std"] == 0.0
    assert payload["methods"]["moo_svgd_obj:T=0.1,h=0.05"]["temperature"] == 0.1
    for name in ("zdt3_fronts.png", "zdt3_hv.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    command = f"mtsgd zdt --config default --out {out} --seeds 3 --methods {' '.join(methods)} --steps 200 --num-particles 8 --num-variables 5"
    assert payload["config"]["command"] == command
    table = (out / "zdt3_table.md").read_text().splitlines()
    assert table[-1] == f"Command: `{command}`"
    rows = [line for line in table if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == methods
    hv = payload["summary"][methods[0]]["hv"]
    assert rows[0].split(" | ")[1] == f"{hv['mean']:.3f} ± {hv['std']:.3f}"


@pytest.mark.x64  # in float32 neighbouring front points on the flat segment ends tie, so some are weakly dominated
def test_point_set_metrics_on_the_true_front():
    front = exp.zdt("zdt3", 30).pareto_front(200)
    m = exp.point_set_metrics(front, front)
    assert m["igd"] == pytest.approx(0.0, abs=1e-12) and m["gd"] == pytest.approx(0.0, abs=1e-12)
    assert m["igd_plus"] == pytest.approx(0.0, abs=1e-12)
    assert m["segments"] == 5 and m["non_dominated"] == 200
    assert 1.32 < m["hv"] < 1.3318 + 1e-9


def test_method_specs():
    spec = exp.parse_method("moo_svgd_obj:T=0.01,h=0.03,normalize=1")
    assert spec.base == "moo_svgd" and spec.options == {"space": "objectives", "T": 0.01, "h": 0.03, "normalize_grads": True}
    assert exp.parse_method("moo_svgd:normalize_grads=true").options == {"normalize_grads": True}
    assert exp.parse_method("mtsgd:weighting=normalized").options == {"weighting": "normalized"}
    assert exp.parse_method("mtsgd:solver=enumerate,warm_start=0,h=median").options == {"solver": "enumerate", "warm_start": False, "h": "median"}
    assert exp.parse_method(" linear ") == exp.MethodSpec("linear", "linear_scalarization", {})
    assert exp.parse_method("mtsgd:normalize=1").options == {"normalize_grads": True}  # the experiment's option for mtsgd
    assert exp.parse_method(exp.TUNED_MTSGD).options == {"space": "objectives", "T": 0.1, "h": 0.001, "normalize_grads": True}
    assert exp.parse_method("linear:T_end=0.01,momentum=0.5,box=0").options == {"T_end": 0.01, "momentum": 0.5, "box": 0.0}
    for config in exp.CONFIGS.values():
        assert [exp.parse_method(m).label for m in config.methods] == list(config.methods)
    assert exp.TUNED_MTSGD in exp.DEFAULT_METHODS and exp.TUNED_MTSGD == exp.ABLATION_METHODS[0]
    assert exp.TUNED_MTSGD in exp.TUNING_METHODS and exp.CONFIGS["tuning"].seeds == exp.TUNING_SEEDS
    assert exp.parse_method("linear_scalarization:lr=0.01").options == {"lr": 0.01}
    for label in exp.DEFAULT_METHODS:
        assert exp.parse_method(label).label == label
    bad = [
        ("svgd", r"unknown method 'svgd' in 'svgd'; expected one of \('mtsgd', 'moo_svgd', 'mgda', 'linear_scalarization'"),
        ("mtsgd:T=0", r"method 'mtsgd:T=0': option 'T': expected a positive number, got '0'"),
        ("mtsgd:bogus=1", r"unknown option 'bogus' for mtsgd; valid options: solver, warm_start, weighting, block_size, T, lr, T_end, momentum, box, h, space, normalize_grads\.$"),
        ("linear:h=0.1", r"method 'linear:h=0.1': unknown option 'h' for linear_scalarization; valid options: T, lr, T_end, momentum, box\.$"),
        ("mtsgd:momentum=1", r"option 'momentum': expected a number in \[0, 1\), got '1'"),
        ("mgda:box=0.5", r"option 'box': expected a number in \[0, 0\.5\), got '0\.5'"),
        ("mtsgd:T_end=0", "option 'T_end': expected a positive number, got '0'"),
        ("mtsgd:normalize_grads=maybe", "option 'normalize_grads': expected a bool"),
        ("mtsgd_obj:weighting=normalized", "weighting=normalized is not available with space=objectives"),
        ("mgda:T", "'T' is not key=value"),
        ("mgda:axis_name=i", "unknown option 'axis_name' for mgda"),  # not a setting of this experiment
        ("mtsgd:kernel=rbf", "unknown option 'kernel' for mtsgd"),  # the experiment's h sets the kernel
        ("mtsgd:h=wide", "option 'h': expected median or a positive number, got 'wide'"),
        ("mtsgd:h=-1", "option 'h': expected median or a positive number, got '-1'"),
        ("moo_svgd:space=features", r"option 'space': expected theta or objectives, got 'features'"),
        ("moo_svgd_obj:space=theta", "option 'space' is given twice"),
        ("mtsgd:weighting=scores", r"option 'weighting' of mtsgd must be one of \('stein', 'normalized', 'score'\)"),
        ("moo_svgd:repulsion=-1", "repulsion must be a (finite )?non-negative number"),  # the factory's own check
        ("mtsgd:block_size=0", "block_size must be a positive int"),
    ]
    for spec, match in bad:
        with pytest.raises(ValueError, match=match):
            exp.parse_method(spec)
    f1, f2 = exp.tempered_log_probs("zdt3", 5, 0.1)
    theta = jnp.full((5,), 0.3)
    assert float(f1(theta)) == pytest.approx(-3.0, rel=1e-6)
    assert exp.tempered_log_probs("zdt3", 5, 1.0) == exp.zdt("zdt3", 5).log_probs


def _program(opt, x):
    """The jaxpr (text and constants) of init + one update of ``opt`` on ZDT3's two loss gradients."""
    prob = exp.zdt("zdt3", x.shape[1])

    def run(x):
        grads = jnp.stack([jax.vmap(jax.grad(lambda t, f=f: -f(t)))(x) for f in prob.log_probs])
        return opt.update(grads, opt.init(x), x)

    closed = jax.make_jaxpr(run)(x)
    return str(closed.jaxpr), [np.asarray(c).tolist() for c in closed.consts]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_build_optimizer_is_the_transformation_with_the_spec_options(dtype):
    """Each parsed spec builds the same program as the transformation called by hand (traced, not compiled)."""
    import optax

    from mtsgd_jax import kernels
    from mtsgd_jax.transforms import linear_scalarization, mgda, moo_svgd, mtsgd, normalize_target_grads, preference_vectors, project_box

    m, n, lr = 6, 4, 1e-3
    prob = exp.zdt("zdt3", n)
    x = prob.init_particles(jax.random.key(0), m).astype(dtype)
    feats = jax.vmap(prob.objectives)

    def chain(stage, rate=lr):
        return optax.chain(stage, optax.adam(rate), project_box(*exp.BOX))

    cases = [
        ("mtsgd_obj:T=0.03,h=0.01,weighting=score", chain(mtsgd(2, kernels.rbf(0.01), weighting="score", features=feats))),
        ("mtsgd:solver=projected_gradient,lr=0.01", chain(mtsgd(2, kernels.rbf("median"), solver="projected_gradient"), 0.01)),
        ("moo_svgd_obj:h=0.005,normalize=1,repulsion=0.5",
         chain(moo_svgd(2, kernels.rbf(0.005), features=feats, normalize_grads=True, repulsion=0.5))),
        ("mgda:normalize_grads=1", chain(mgda(2, normalize_grads=True))),
        ("linear", chain(linear_scalarization(2, preference_vectors(m, 2)))),
    ]
    steps = 40
    cases += [
        ("mtsgd_obj:T=0.1,h=0.001,normalize_grads=1",
         optax.chain(normalize_target_grads(), optax.scale(1 / 0.1), mtsgd(2, kernels.rbf(0.001), features=feats),
                     optax.adam(lr), project_box(*exp.BOX))),
        ("mtsgd:normalize_grads=1,T_end=0.01,momentum=0.5,box=0",  # T from the experiment's temperature (0.5)
         optax.chain(normalize_target_grads(), optax.scale(1 / 0.5), optax.scale_by_schedule(lambda c: (0.5 / 0.01) ** (c / 40.0)),
                     mtsgd(2, kernels.rbf("median")), optax.trace(decay=0.5), optax.adam(lr), project_box(0.0, 1.0))),
        ("mgda:T=0.2,T_end=0.1,box=0.25",  # T_end acts on every method; the target is tempered by run_zdt, not here
         optax.chain(optax.scale_by_schedule(lambda c: (0.2 / 0.1) ** (c / 40.0)), mgda(2), optax.adam(lr), project_box(0.25, 0.75))),
    ]
    programs = {}
    for label, direct in cases:
        got = _program(exp.build_optimizer(exp.parse_method(label), prob, m, lr, temperature=0.5, steps=steps), x)
        assert got == _program(direct, x), label
        programs[label] = got
    # the options matter: without them the program differs
    assert _program(exp.build_optimizer(exp.parse_method("mtsgd_obj"), prob, m, lr), x) != programs["mtsgd_obj:T=0.03,h=0.01,weighting=score"]
    assert _program(exp.build_optimizer(exp.parse_method("mgda"), prob, m, lr), x) != programs["mgda:normalize_grads=1"]
    plain = _program(exp.build_optimizer(exp.parse_method("mtsgd_obj:T=0.1,h=0.001"), prob, m, lr), x)
    assert plain != programs["mtsgd_obj:T=0.1,h=0.001,normalize_grads=1"]
    with pytest.raises(ValueError, match=r"method 'mgda:T_end=0\.1': T_end needs the number of steps"):
        exp.build_optimizer(exp.parse_method("mgda:T_end=0.1"), prob, m, lr)


def test_cli_rejects_bad_arguments(zdt_main, capsys):
    with pytest.raises(SystemExit):
        zdt_main(["zdt", "--methods", "mtsgd:bogus=1"])
    assert "method 'mtsgd:bogus=1': unknown option 'bogus' for mtsgd; valid options:" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="multiple of --trace-every"):
        zdt_main(["zdt", "--steps", "150", "--trace-every", "100"])


def _fake_run_zdt(seeds, methods, *, num_particles, num_variables, steps, lr, temperature, trace_every, progress):
    """A run_zdt result with the real structure and made-up numbers (no compilation)."""
    rng = np.random.default_rng(0)
    t = np.arange(0, steps + 1, trace_every)
    n = len(seeds)
    recs = {
        m: {
            "temperature": temperature, "lr": lr, "compile_s": 0.1, "wall_s": [0.2 + 0.1 * i for i in range(n)],
            "final": [{k: float(rng.uniform(0.1, 1.0)) for k in exp.METRICS} for _ in range(n)],
            "particle_range": [[0.1, 0.9]] * n, "steps": t,
            "curves": {k: rng.uniform(0.1, 1.0, size=(n, len(t))) for k in ("hv", "hv_published", "igd")},
            "objectives": rng.uniform(0.0, 1.0, size=(n, num_particles, 2)),
        }
        for m in methods
    }
    config = {"num_variables": num_variables, "num_particles": num_particles, "steps": steps, "lr": lr,
              "temperature": temperature, "trace_every": trace_every}
    return {"seeds": list(seeds), "methods": recs, "optimal": {"hv": 1.33, "hv_published": 6.5}, "config": config}


def test_failing_figure_keeps_zdt3_json(tmp_path, capsys, zdt_main, monkeypatch):
    """The results are written before the figures; a failing figure does not stop the other one; exit status 1."""
    runs = []

    def fake_run(*args, **kwargs):
        runs.append(_fake_run_zdt(*args, **kwargs))
        return runs[-1]

    def broken(result, path):
        raise MemoryError("figure too large")

    monkeypatch.setattr(exp, "run_zdt", fake_run)
    monkeypatch.setattr(exp, "plot_fronts", broken)
    out = tmp_path / "zdt3"
    code = zdt_main(
        ["zdt", "--out", str(out), "--seeds", "0", "1", "--num-particles", "4", "--steps", "20", "--num-variables", "3",
         "--trace-every", "10", "--methods", "linear", "mtsgd", "--no-progress"]
    )
    assert code == 1
    captured = capsys.readouterr()
    js = out / "zdt3.json"
    assert f"{out / 'zdt3_fronts.png'}: MemoryError: figure too large" in captured.err
    assert f"the results are kept in {js}" in captured.err
    assert "HV (1.1, 1.1)" in captured.out  # the table was printed before plotting
    payload = json.loads(js.read_text())
    (result,) = runs
    assert payload["config"]["steps"] == 20 and list(payload["methods"]) == ["linear", "mtsgd"]
    for label, rec in result["methods"].items():
        hv = [f["hv"] for f in rec["final"]]
        assert payload["summary"][label]["hv"]["mean"] == pytest.approx(float(np.mean(hv)), rel=1e-12)
        assert payload["summary"][label]["hv"]["std"] == pytest.approx(float(np.std(hv, ddof=1)), rel=1e-12)
        assert payload["methods"][label]["final"] == rec["final"] and payload["methods"][label]["steps"] == [0, 10, 20]
    assert (out / "zdt3_hv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the other figure was still drawn
    assert sorted(os.listdir(out)) == ["zdt3.json", "zdt3_hv.png", "zdt3_table.md"]


def test_config_selects_methods_and_seeds(tmp_path, capsys, zdt_main, monkeypatch):
    """--config NAME runs that configuration's methods and seeds; --seeds / --methods override them."""
    calls = []

    def fake_run(seeds, methods, **kwargs):
        calls.append((list(seeds), list(methods)))
        return _fake_run_zdt(seeds, methods, **kwargs)

    monkeypatch.setattr(exp, "run_zdt", fake_run)
    for plot in ("plot_fronts", "plot_hv"):  # the figures are tested above; here only the choice of methods matters
        monkeypatch.setattr(exp, plot, lambda result, path: path)
    common = ["--steps", "20", "--trace-every", "10", "--num-particles", "4", "--num-variables", "3", "--no-progress"]
    for name, config in exp.CONFIGS.items():
        out = tmp_path / name
        assert zdt_main(["zdt", "--config", name, "--out", str(out), *common]) == 0
        assert calls[-1] == (list(config.seeds), list(config.methods))
        payload = json.loads((out / "zdt3.json").read_text())
        command = f"mtsgd zdt --config {name} --out {out} --steps 20 --num-particles 4 --num-variables 3 --trace-every 10"
        assert payload["config"]["command"] == command
        table = (out / "zdt3_table.md").read_text()
        assert table.endswith(f"Command: `{command}`\n") and table.count("\n| `") == len(config.methods)
    out = tmp_path / "override"
    assert zdt_main(["zdt", "--config", "tuning", "--seeds", "7", "--methods", "linear", "--out", str(out), *common]) == 0
    assert calls[-1] == ([7], ["linear"])
    assert "--config tuning --out" in json.loads((out / "zdt3.json").read_text())["config"]["command"]
    with pytest.raises(SystemExit):
        zdt_main(["zdt", "--config", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
