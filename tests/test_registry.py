"""The registry of transformations: specs parsed and written, and make_transform equal to the factories."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtsgd_jax import kernels
from mtsgd_jax.transforms import (
    TRANSFORMS,
    WEIGHTINGS,
    TransformSpec,
    format_spec,
    linear_scalarization,
    make_transform,
    mgda,
    moo_svgd,
    mtsgd,
    pareto_mtl,
    parse_spec,
    preference_vectors,
    svgd,
    transform_options,
)
from mtsgd_jax.qp import SOLVERS

K, M, D = 3, 6, 4


def _problem(dtype, seed=0):
    """M particles in R^D and K Gaussian targets N(mu_k, I): loss gradients x - mu_k, losses |x - mu_k|^2 / 2."""
    kx, km = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (M, D), dtype)
    mu = 2.0 * jax.random.normal(km, (K, 1, D), dtype)
    grads = x[None] - mu
    losses = 0.5 * jnp.sum(grads**2, axis=-1)
    return x, grads, losses


def _two_steps(t, x, grads, losses=None):
    """Updates and states of two successive updates (the second sees the first's state: warm starts)."""
    extra = {} if losses is None else {"losses": losses}
    s0 = t.init(x)
    u1, s1 = t.update(grads, s0, x, **extra)
    u2, s2 = t.update(grads, s1, x - 0.1 * u1, **extra)
    return [u1, s1, u2, s2]


def _both(*transforms, x, grads, losses=None):
    """:func:`_two_steps` of every transformation, in one compiled function (one compilation, not
    several eager runs: the cost of these tests is compilation)."""
    return jax.jit(lambda x, g, l: [_two_steps(t, x, g, l) for t in transforms])(x, grads, losses)


def _assert_identical(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for p, q in zip(la, lb):
        assert p.dtype == q.dtype
        np.testing.assert_array_equal(np.asarray(p), np.asarray(q))


# (spec, overrides, the same transformation built by hand, whether it needs losses=, dtype). Every
# case runs in one dtype (the first eager run of a transformation compiles its operations); both
# dtypes are covered across the cases.
CASES = {
    "mtsgd-score": ("mtsgd:weighting=score,solver=enumerate", {}, lambda: mtsgd(K, weighting="score", solver="enumerate"), False, jnp.float32),
    "mtsgd-normalized": (
        "mtsgd:weighting=normalized,warm_start=false,block_size=4",
        {},
        lambda: mtsgd(K, weighting="normalized", warm_start=False, block_size=4),
        False,
        jnp.float64,
    ),
    "mtsgd-kernel": ("mtsgd", {"kernel": kernels.rbf(0.7)}, lambda: mtsgd(K, kernels.rbf(0.7)), False, jnp.float64),
    "moo_svgd": (
        " moo_svgd : repulsion=0.5, normalize_grads=yes ",
        {},
        lambda: moo_svgd(K, repulsion=0.5, normalize_grads=True),
        False,
        jnp.float32,
    ),
    "mgda": (
        "mgda:solver=projected_gradient,normalize_grads=1",
        {},
        lambda: mgda(K, solver="projected_gradient", normalize_grads=True),
        False,
        jnp.float64,
    ),
    "linear": (
        "linear_scalarization",
        {"weights": preference_vectors(M, K)},
        lambda: linear_scalarization(K, preference_vectors(M, K)),
        False,
        jnp.float32,
    ),
    "pareto_mtl": (
        "pareto_mtl:warmup_steps=0,normalize_weights=on,constraint_tol=0.01",
        {},
        lambda: pareto_mtl(K, warmup_steps=0, normalize_weights=True, constraint_tol=0.01),
        True,
        jnp.float32,
    ),
}


@pytest.mark.x64
@pytest.mark.parametrize("case", sorted(CASES))
def test_make_transform_equals_the_factory(case):
    spec, overrides, direct, needs_losses, dtype = CASES[case]
    x, grads, losses = _problem(dtype)
    extra = losses if needs_losses else None
    got, want = _both(make_transform(spec, K, **overrides), direct(), x=x, grads=grads, losses=extra)
    _assert_identical(got, want)
    assert got[0].dtype == dtype and got[0].shape == (M, D)


@pytest.mark.x64
def test_svgd_takes_one_target():
    x, grads, _ = _problem(jnp.float64)
    _assert_identical(*_both(make_transform("svgd:block_size=2", 1), svgd(block_size=2), x=x, grads=grads[0]))
    with pytest.raises(ValueError, match="one target"):
        make_transform("svgd", K)


def test_options_reach_the_factory_and_overrides_win():
    x, grads, _ = _problem(jnp.float32)
    # extras of a TransformSpec are the application's: not given to the factory
    spec = TransformSpec("mtsgd", {"weighting": "score"}, {"T": 0.1})
    stein, score, overridden, from_spec = _both(
        mtsgd(K),
        make_transform("mtsgd:weighting=score", K),
        make_transform("mtsgd:weighting=score", K, weighting="stein"),  # the keyword wins
        make_transform(spec, K),
        x=x,
        grads=grads,
    )
    # the two weightings differ on this problem, so the equalities here and above are not vacuous
    assert not np.array_equal(np.asarray(stein[1].weights), np.asarray(score[1].weights))
    _assert_identical(overridden, stein)
    _assert_identical(from_spec, score)


def test_registry_names_the_public_factories():
    import mtsgd_jax.transforms as tr

    assert set(TRANSFORMS) == {"mtsgd", "svgd", "moo_svgd", "mgda", "linear_scalarization", "pareto_mtl"}
    for name, factory in TRANSFORMS.items():
        assert getattr(tr, name) is factory
    with pytest.raises(TypeError):
        TRANSFORMS["mine"] = mtsgd  # read-only


def test_transform_options_are_the_factories_keywords():
    assert transform_options("mgda") == {"solver": "auto", "solver_options": None, "normalize_grads": False, "warm_start": True}
    assert transform_options("svgd") == {"kernel": None, "block_size": None, "axis_name": None}
    assert transform_options("linear_scalarization") == {"weights": None}
    for name, factory in TRANSFORMS.items():
        params = inspect.signature(factory).parameters
        opts = transform_options(name)
        assert "num_targets" not in opts and set(opts) <= set(params)
        assert all(params[k].default == v or params[k].default is inspect.Parameter.empty for k, v in opts.items())
    with pytest.raises(ValueError, match="unknown method 'sgvd'"):
        transform_options("sgvd")


def test_spec_values_are_converted_by_the_option_type():
    s = parse_spec("mtsgd:weighting=normalized,warm_start=off,block_size=128,solver=osqp,axis_name=p")
    assert s == TransformSpec("mtsgd", {"weighting": "normalized", "warm_start": False, "block_size": 128, "solver": "osqp", "axis_name": "p"}, {})
    assert type(s.options["block_size"]) is int and type(s.options["warm_start"]) is bool
    for text, value in [("1", True), ("TRUE", True), ("Yes", True), ("on", True), ("0", False), ("false", False), ("NO", False), ("off", False)]:
        assert parse_spec(f"mgda:normalize_grads={text}").options == {"normalize_grads": value}
    r = parse_spec("moo_svgd:repulsion=2").options["repulsion"]
    assert r == 2.0 and type(r) is float
    assert parse_spec("pareto_mtl:warmup_steps=7,constraint_tol=1e-3").options == {"warmup_steps": 7, "constraint_tol": 1e-3}
    # none for options that accept None; empty items and white space ignored
    assert parse_spec("mtsgd:block_size=None, axis_name=none,").options == {"block_size": None, "axis_name": None}
    assert parse_spec("  svgd  ") == TransformSpec("svgd", {}, {})
    assert parse_spec("mgda:") == TransformSpec("mgda", {}, {})


def test_extra_options():
    def temperature(text):
        value = float(text)
        if not value > 0:
            raise ValueError(f"expected a positive number, got {text!r}")
        return value

    s = parse_spec("moo_svgd:T=0.5,repulsion=0.1,flag=yes,space=objectives", extra_options={"T": temperature, "flag": bool, "space": str})
    assert s.options == {"repulsion": 0.1} and s.extras == {"T": 0.5, "flag": True, "space": "objectives"}
    with pytest.raises(ValueError, match=r"option 'T': expected a positive number, got '-1'"):
        parse_spec("mgda:T=-1", extra_options={"T": temperature})
    with pytest.raises(ValueError, match="shadow options of mgda"):
        parse_spec("mgda", extra_options={"solver": str})
    with pytest.raises(ValueError, match="valid options: solver, normalize_grads, warm_start, T"):
        parse_spec("mgda:t=1", extra_options={"T": float})


@pytest.mark.parametrize(
    "spec, match",
    [
        ("sgvd", r"unknown method 'sgvd'; choose one of \('mtsgd', 'svgd', 'moo_svgd', 'mgda', 'linear_scalarization', 'pareto_mtl'\)"),
        ("mtsgd:bogus=1", r"unknown option 'bogus' for mtsgd; valid options: solver, warm_start, weighting, block_size, axis_name \(not settable in a spec, only as keyword arguments: kernel, solver_options, features\)"),
        ("mgda:normalize=1", r"unknown option 'normalize' for mgda; valid options: solver, normalize_grads, warm_start"),
        ("linear_scalarization:weights=1", r"option 'weights' of linear_scalarization takes an object.*weights=\.\.\."),
        ("mtsgd:kernel=rbf", r"make_transform\('mtsgd', num_targets, kernel=\.\.\.\)"),
        ("mtsgd:block_size=1.5", r"option 'block_size' of mtsgd: expected an int or none, got '1.5'"),
        ("moo_svgd:repulsion=strong", r"option 'repulsion' of moo_svgd: expected a number, got 'strong'"),
        ("mgda:warm_start=maybe", r"option 'warm_start' of mgda: expected a bool .*, got 'maybe'"),
        ("mgda:warm_start=none", r"expected a bool .*got 'none'"),
        ("mtsgd:weighting=scores", r"option 'weighting' of mtsgd must be one of \('stein', 'normalized', 'score'\), got 'scores'"),
        ("mgda:solver=qp", r"option 'solver' of mgda must be one of \('auto', 'projected_gradient'"),
        ("mtsgd:weighting=score,weighting=stein", r"option 'weighting' is given twice"),
        ("mtsgd:weighting", r"'weighting' is not key=value"),
        ("mtsgd:=score", r"'=score' is not key=value"),
    ],
)
def test_spec_errors_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec)
    with pytest.raises(ValueError, match=match):
        make_transform(spec, K)


def test_methods_restriction_and_bad_arguments():
    assert parse_spec("mgda", methods=("mgda", "mtsgd")).name == "mgda"
    with pytest.raises(ValueError, match=r"unknown method 'svgd'; choose one of \('mgda', 'mtsgd'\)"):
        parse_spec("svgd", methods=("mgda", "mtsgd"))
    # options= narrows the factory options a spec may set
    assert parse_spec("mtsgd:weighting=score", options=("weighting",)).options == {"weighting": "score"}
    with pytest.raises(ValueError, match=r"unknown option 'axis_name' for mtsgd; valid options: weighting, T\.$"):
        parse_spec("mtsgd:axis_name=p", options=("weighting",), extra_options={"T": float})
    with pytest.raises(TypeError, match="spec must be a str"):
        parse_spec(3)
    with pytest.raises(ValueError, match=r"mgda has no option\(s\) \['kernel'\]; valid options: solver, solver_options, normalize_grads, warm_start"):
        make_transform("mgda", K, kernel=kernels.rbf())
    with pytest.raises(ValueError, match="num_targets must be a positive int"):
        make_transform("mtsgd", 0)
    with pytest.raises(ValueError, match="not a scalar"):
        format_spec("mtsgd", {"kernel": kernels.rbf()})
    with pytest.raises(ValueError, match="cannot be written in a spec"):
        format_spec("mtsgd", {"axis_name": "a,b"})


def _value(kind, allows_none, key):
    if key == "weighting":
        base = st.sampled_from(WEIGHTINGS)
    elif key == "solver":
        base = st.sampled_from(("auto",) + tuple(SOLVERS))
    elif kind is bool:
        base = st.booleans()
    elif kind is int:
        base = st.integers(-(2**40), 2**40)
    elif kind is float:
        base = st.floats(allow_nan=False, width=64)
    else:
        base = st.text("abcxyz_0123", min_size=1, max_size=8).filter(lambda s: s.lower() != "none")
    return st.one_of(st.none(), base) if allows_none else base


@st.composite
def _specs(draw):
    from mtsgd_jax.transforms._registry import _option_types

    name = draw(st.sampled_from(sorted(TRANSFORMS)))
    types_ = {k: v for k, v in _option_types(name).items() if v[0] is not None}
    keys = draw(st.lists(st.sampled_from(sorted(types_)), unique=True)) if types_ else []
    return name, {k: draw(_value(*types_[k], k)) for k in keys}


@given(_specs())
def test_format_then_parse_is_the_identity(spec):
    name, options = spec
    text = format_spec(name, options)
    parsed = parse_spec(text)
    assert parsed.name == name and parsed.extras == {}
    assert parsed.options == options
    assert [type(v) for v in parsed.options.values()] == [type(v) for v in options.values()]


def test_one_name_for_gradient_normalisation():
    """Unit-norm task gradients before the min-norm QP are called normalize_grads everywhere."""
    from mtsgd_jax.transforms._common import _per_particle_min_norm

    for name in ("moo_svgd", "mgda", "pareto_mtl"):
        assert "normalize_grads" in transform_options(name)
    assert "normalize_grads" in inspect.signature(_per_particle_min_norm).parameters
