"""Early, clear errors for input the transformations would otherwise accept silently or fail on obscurely."""

import re

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given

import mtsgd_jax as mj
from mtsgd_jax.transforms import (
    MGDAState,
    MOOSVGDState,
    MTSGDState,
    ParetoMTLState,
    SVGDState,
    linear_scalarization,
    mgda,
    moo_svgd,
    mtsgd,
    pareto_mtl,
    project_box,
    svgd,
)

M, K, D = 4, 2, 3


def _x(dtype=jnp.float32, m=M, d=D):
    return jnp.asarray(np.linspace(-1.0, 1.0, m * d).reshape(m, d) ** 3 + np.arange(m * d).reshape(m, d) % 3, dtype)


def _grads(x, k=K):
    return jnp.stack([x - (i + 1.0) for i in range(k)]).astype(x.dtype)


def _losses(x, k=K):
    return jnp.stack([jnp.sum((x.astype(jnp.float32) - (i + 1.0)) ** 2, axis=-1) for i in range(k)])


# (name, factory, state type, whether update takes K stacked gradients)
TRANSFORMS = [
    ("mtsgd", lambda: mtsgd(K), MTSGDState, True),
    ("svgd", lambda: svgd(), SVGDState, False),
    ("moo_svgd", lambda: moo_svgd(K), MOOSVGDState, True),
    ("mgda", lambda: mgda(K), MGDAState, True),
    ("linear_scalarization", lambda: linear_scalarization(K), optax.EmptyState, True),
    ("pareto_mtl", lambda: pareto_mtl(K, warmup_steps=0), ParetoMTLState, True),
]
IDS = [t[0] for t in TRANSFORMS]


def _update(name, t, grads, state, params, stacked):
    """Call ``t.update`` with the arguments this transformation needs (pareto_mtl: losses=)."""
    g = grads if stacked else jax.tree_util.tree_map(lambda a: a[0], grads)
    if name == "pareto_mtl":
        return t.update(g, state, params, losses=_losses(params if not isinstance(params, dict) else params["w"]))
    return t.update(g, state, params)


# ---------------------------------------------------------------------------
# 1. integer / bool / complex particles and gradients
# ---------------------------------------------------------------------------

BAD_DTYPES = [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_, jnp.complex64, jnp.complex128]


@pytest.mark.parametrize("name,factory,state_type,stacked", TRANSFORMS, ids=IDS)
@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_init_rejects_non_float_particles(name, factory, state_type, stacked, dtype):
    params = {"w": _x(jnp.float32), "b": jnp.ones((M, 2), dtype)}
    with pytest.raises(TypeError) as err:
        factory().init(params)
    msg = str(err.value)
    assert msg.startswith(f"{name}.init: params['b'] has dtype {jnp.dtype(dtype).name};")
    assert "jnp.asarray(x, jnp.float32)" in msg
    if jnp.issubdtype(dtype, jnp.complexfloating):
        assert "imaginary part" in msg
    else:
        assert "truncated" in msg


@pytest.mark.parametrize("name,factory,state_type,stacked", TRANSFORMS, ids=IDS)
def test_update_rejects_integer_particles_even_with_a_float_state(name, factory, state_type, stacked):
    x = _x(jnp.float32)
    t = factory()
    state = t.init(x)
    xi = jnp.round(x).astype(jnp.int32)
    with pytest.raises(TypeError, match=re.escape(f"{name}.update: params has dtype int32;")):
        _update(name, t, _grads(x), state, xi, stacked)


@pytest.mark.parametrize("name,factory,state_type,stacked", TRANSFORMS, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64], ids=["int32", "complex64"])
def test_update_rejects_non_float_grads(name, factory, state_type, stacked, dtype):
    x = _x(jnp.float32)
    t = factory()
    state = t.init(x)
    with pytest.raises(TypeError) as err:
        _update(name, t, _grads(x).astype(dtype), state, x, stacked)
    msg = str(err.value)
    assert msg.startswith(f"{name}.update: grads has dtype {jnp.dtype(dtype).name};")
    assert "jnp.asarray(x, jnp.float32)" in msg


def test_non_float_errors_are_raised_while_tracing_under_jit():
    x = _x(jnp.float32)
    t = mtsgd(K)
    state = t.init(x)
    g = {"a": _grads(x), "b": _grads(x).astype(jnp.complex64)}
    p = {"a": x, "b": x}
    with pytest.raises(TypeError, match=re.escape("mtsgd.update: grads['b'] has dtype complex64")):
        jax.jit(t.update)(g, mtsgd(K).init(p), p)
    with pytest.raises(TypeError, match=re.escape("mtsgd.update: params has dtype int32")):
        jax.jit(t.update)(_grads(x), state, x.astype(jnp.int32))


@pytest.mark.parametrize("name,factory,state_type,stacked", TRANSFORMS, ids=IDS)
@pytest.mark.parametrize("half", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_half_precision_particles_still_work_and_match_float32(name, factory, state_type, stacked, half):
    # Values exactly representable in the half type, so float32 sees the same numbers.
    xh = _x(half)
    x32 = xh.astype(jnp.float32)
    gh = _grads(xh)
    t = factory()
    uh, _ = _update(name, t, gh, t.init(xh), xh, stacked)
    u32, _ = _update(name, t, gh.astype(jnp.float32), t.init(x32), x32, stacked)
    assert uh.dtype == jnp.dtype(half) and uh.shape == xh.shape
    # The half update is the float32 computation rounded once (linear_scalarization computes in
    # the half type: a two-term sum, a few roundings): a few half-precision ulps of the scale.
    eps = float(jnp.finfo(half).eps)
    scale = float(jnp.max(jnp.abs(u32)))
    np.testing.assert_allclose(np.asarray(uh, np.float32), np.asarray(u32), rtol=0, atol=4 * eps * scale)


# ---------------------------------------------------------------------------
# 2. Python lists of numbers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,factory,state_type,stacked", TRANSFORMS, ids=IDS)
def test_init_rejects_python_list_of_numbers(name, factory, state_type, stacked):
    with pytest.raises(TypeError) as err:
        factory().init([[0.0, 1.0], [2.0, 3.0]])
    msg = str(err.value)
    assert msg.startswith(f"{name}.init: params is a Python list of numbers (params[0][0] = 0.0);")
    assert "jnp.asarray(" in msg


def test_python_containers_are_named_by_their_path_and_kind():
    t = mgda(K)
    with pytest.raises(TypeError, match=re.escape("mgda.init: params['w'] is a Python tuple of numbers")):
        t.init({"w": ((0.0, 1.0), (2.0, 3.0)), "b": _x()})
    with pytest.raises(TypeError, match=re.escape("mgda.init: params is a Python list of numbers (params[1] = 2)")):
        t.init([jnp.zeros((2,), jnp.float32), 2])
    # num_particles says the same for any caller (sampling, targets, ...)
    with pytest.raises(TypeError, match=re.escape("particles is a Python list of numbers")):
        mj.num_particles([[0.0, 1.0], [2.0, 3.0]])


def test_update_rejects_python_list_grads():
    x = _x(jnp.float32, m=2, d=2)
    t = mtsgd(K)
    grads = np.asarray(_grads(x)).tolist()
    with pytest.raises(TypeError, match=re.escape("mtsgd.update: grads is a Python list of numbers")):
        t.update(grads, t.init(x), x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_list_of_arrays_is_a_valid_particle_set(dtype):
    # A list of arrays [a, b] is the same particle set as the concatenated (M, d_a + d_b) array.
    x = _x(dtype, m=5, d=3)
    a, b = x[:, :1], x[:, 1:]
    g = _grads(x)
    t = mtsgd(K)
    u_arr, s_arr = t.update(g, t.init(x), x)
    u_list, s_list = t.update([g[:, :, :1], g[:, :, 1:]], t.init([a, b]), [a, b])
    assert isinstance(u_list, list) and u_list[0].dtype == jnp.dtype(dtype)
    eps = float(jnp.finfo(dtype).eps)
    scale = float(jnp.max(jnp.abs(u_arr)))
    np.testing.assert_allclose(np.concatenate([np.asarray(u) for u in u_list], 1), u_arr, rtol=0, atol=64 * eps * scale)
    np.testing.assert_allclose(s_list.weights, s_arr.weights, rtol=0, atol=64 * eps)


# ---------------------------------------------------------------------------
# 3. another transformation's state
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,factory,state_type,stacked", TRANSFORMS[:4] + TRANSFORMS[5:], ids=IDS[:4] + IDS[5:])
def test_update_rejects_another_transformations_state(name, factory, state_type, stacked):
    x = _x(jnp.float32)
    t = factory()
    article = "an" if name != "pareto_mtl" else "a"
    expected = f"{name}.update: state must be {article} {state_type.__name__} from {name}(...).init, got "
    tail = "; pass the state that this transformation's init returned (inside optax.chain, the chain's own state)."
    with pytest.raises(TypeError) as err:
        _update(name, t, _grads(x), optax.scale_by_adam().init(x), x, stacked)
    assert str(err.value) == expected + "ScaleByAdamState" + tail
    other = mgda(K) if name != "mgda" else svgd()
    with pytest.raises(TypeError, match=re.escape(expected + type(other.init(x)).__name__ + tail)):
        _update(name, t, _grads(x), other.init(x), x, stacked)
    # optax.adam is a chain: its state is a tuple
    with pytest.raises(TypeError, match=re.escape(expected + "tuple (ScaleByAdamState, EmptyState)" + tail)):
        _update(name, t, _grads(x), optax.adam(1e-2).init(x), x, stacked)


def test_state_of_a_chain_points_at_the_element():
    x = _x(jnp.float32)
    chain = optax.chain(optax.scale_by_adam(), mtsgd(K))
    state = chain.init(x)
    with pytest.raises(TypeError, match=re.escape("got tuple (ScaleByAdamState, MTSGDState) (this looks like an optax.chain state")) as err:
        mtsgd(K).update(_grads(x), state, x)
    assert "element [1]" in str(err.value)
    wrapped = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    w_state = wrapped.init(x)._replace(inner_state=mtsgd(K).init(x))
    with pytest.raises(TypeError, match=re.escape("pass its .inner_state here")):
        mtsgd(K).update(_grads(x), w_state, x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_wrapped_and_jitted_states_still_work(dtype):
    # inject_hyperparams wraps at the chain level; jit and tree_map keep the state's type.
    x = _x(dtype)
    g = _grads(x)
    opt = optax.chain(mtsgd(K), optax.inject_hyperparams(optax.sgd)(learning_rate=0.5))
    state = opt.init(x)
    u1, state1 = jax.jit(opt.update)(g, state, x)
    u2, _ = opt.update(g, jax.tree_util.tree_map(lambda a: a, state), x)
    ref, _ = mtsgd(K).update(g, mtsgd(K).init(x), x)
    eps = float(jnp.finfo(dtype).eps)
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(u1, -0.5 * ref, rtol=0, atol=64 * eps * scale)
    np.testing.assert_allclose(u2, -0.5 * ref, rtol=0, atol=64 * eps * scale)
    assert isinstance(state1[0], MTSGDState)


@pytest.mark.parametrize("state", [optax.EmptyState(), (), None], ids=["EmptyState", "tuple", "None"])
def test_empty_state_transforms_accept_empty_states(state):
    x = _x(jnp.float32)
    w = jnp.asarray([0.25, 0.75], jnp.float32)
    u, out = linear_scalarization(K, weights=w).update(_grads(x), state, x)
    np.testing.assert_allclose(u, 0.25 * (x - 1.0) + 0.75 * (x - 2.0), rtol=0, atol=8 * float(jnp.finfo(jnp.float32).eps) * 4)
    assert out is state
    step = jnp.full_like(x, 10.0)
    v, _ = project_box(0.0, 1.0).update(step, state, x)
    np.testing.assert_array_equal(np.asarray(x + v) <= 1.0, True)


def test_empty_state_transforms_reject_states_with_arrays():
    x = _x(jnp.float32)
    with pytest.raises(TypeError, match=re.escape("linear_scalarization.update: state must be an empty state (EmptyState) from linear_scalarization(...).init, got MGDAState")):
        linear_scalarization(K).update(_grads(x), mgda(K).init(x), x)
    with pytest.raises(TypeError, match=re.escape("project_box.update: state must be an empty state (EmptyState) from project_box(...).init, got tuple (ScaleByAdamState, EmptyState)")):
        project_box(0.0, 1.0).update(x, optax.adam(1.0).init(x), x)


# ---------------------------------------------------------------------------
# 4. factory options
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory,error,message",
    [
        (lambda: mtsgd(K, warm_start="no"), TypeError, "mtsgd: warm_start must be True or False, got str 'no'"),
        (lambda: mgda(K, normalize_grads=None), TypeError, "mgda: normalize_grads must be True or False, got NoneType None"),
        (lambda: mgda(K, warm_start=2), TypeError, "mgda: warm_start must be True or False, got int 2"),
        (lambda: pareto_mtl(K, normalize_weights="yes"), TypeError, "pareto_mtl: normalize_weights must be True or False"),
        (lambda: moo_svgd(K, repulsion=True), TypeError, "moo_svgd: repulsion must be a non-negative number, got the bool True"),
        (lambda: moo_svgd(K, repulsion=float("inf")), ValueError, "moo_svgd: repulsion must be finite, got inf"),
        (lambda: pareto_mtl(K, constraint_tol=False), TypeError, "pareto_mtl: constraint_tol must be a non-negative number, got the bool False"),
        (lambda: pareto_mtl(K, constraint_tol=float("inf")), ValueError, "pareto_mtl: constraint_tol must be finite"),
    ],
)
def test_bad_factory_options_fail_at_init(factory, error, message):
    with pytest.raises(error, match=re.escape(message)):
        factory().init(_x(jnp.float32))


@pytest.mark.parametrize(
    "factory",
    [
        lambda: mtsgd(K, mj.imq(), warm_start=np.bool_(False)),
        lambda: mgda(K, normalize_grads=1, warm_start=0),
        lambda: moo_svgd(K, repulsion=0, normalize_grads=jnp.asarray(True)),
        lambda: pareto_mtl(K, constraint_tol=0.1, normalize_weights=True),
    ],
)
def test_valid_factory_options_are_accepted(factory):
    x = _x(jnp.float32)
    t = factory()
    state = t.init(x)
    kw = {"losses": _losses(x)} if isinstance(state, ParetoMTLState) else {}
    u, _ = t.update(_grads(x), state, x, **kw)
    assert u.shape == x.shape and bool(jnp.all(jnp.isfinite(u)))


def test_pareto_mtl_rejects_complex_or_bool_losses():
    x = _x(jnp.float32)
    t = pareto_mtl(K, warmup_steps=0)
    s = t.init(x)
    with pytest.raises(TypeError, match=re.escape("pareto_mtl.update: losses has dtype complex64; complex values are not supported")):
        t.update(_grads(x), s, x, losses=_losses(x).astype(jnp.complex64))
    with pytest.raises(TypeError, match=re.escape("pareto_mtl.update: losses must be a real-valued array")):
        t.update(_grads(x), s, x, losses=_losses(x) > 1.0)
    # integer loss values are exact in float32: accepted
    d_int, _ = t.update(_grads(x), s, x, losses=jnp.round(_losses(x)).astype(jnp.int32))
    d_ref, _ = t.update(_grads(x), s, x, losses=jnp.round(_losses(x)))
    np.testing.assert_array_equal(d_int, d_ref)


# ---------------------------------------------------------------------------
# Property: the error names exactly the offending leaf, wherever it is
# ---------------------------------------------------------------------------

_GOOD = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16]
_BAD = [jnp.int32, jnp.int64, jnp.uint8, jnp.bool_, jnp.complex64]


@pytest.mark.x64
@given(
    num_leaves=st.integers(1, 5),
    bad_index=st.integers(0, 4),
    bad_dtype=st.sampled_from(_BAD),
    good_dtype=st.sampled_from(_GOOD),
    nest=st.sampled_from(["dict", "list", "tuple"]),
)
def test_the_offending_leaf_path_is_named(num_leaves, bad_index, bad_dtype, good_dtype, nest):
    leaves = [jnp.zeros((3, i + 1), good_dtype) for i in range(num_leaves)]
    t = mgda(K)
    wrap = {"dict": lambda ls: {f"l{i}": leaf for i, leaf in enumerate(ls)}, "list": list, "tuple": tuple}[nest]
    t.init(wrap(leaves))  # all float: accepted
    bad = bad_index % num_leaves
    leaves[bad] = leaves[bad].astype(bad_dtype)
    path = f"['l{bad}']" if nest == "dict" else f"[{bad}]"
    with pytest.raises(TypeError, match=re.escape(f"mgda.init: params{path} has dtype {jnp.dtype(bad_dtype).name};")):
        t.init(wrap(leaves))
