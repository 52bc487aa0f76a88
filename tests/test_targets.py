"""Per-target values and gradients of K log-densities / losses at M particles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtsgd_jax as mj

M = 5


_FNS = (
    lambda t: -0.5 * jnp.sum((t - 1.0) ** 2),
    lambda t: jnp.sum(jnp.sin(t)) * jnp.cos(t[0]),
    lambda t: -jnp.log1p(jnp.sum(t**2)) + t[1] ** 3,
)


def _fns():
    return list(_FNS)


def _stacked(t):
    return jnp.stack([f(t) for f in _fns()])


def _particles():
    return jax.random.normal(jax.random.key(0), (M, 3), jnp.float64)


_JIT_CACHE = {}


def _jitted(f):
    if f not in _JIT_CACHE:
        _JIT_CACHE[f] = (jax.jit(f), jax.jit(jax.grad(f)))
    return _JIT_CACHE[f]


def _hand_loop(fns, particles):
    """values (K, M), grads leaves (K, M, ...) by an explicit loop with jax.grad."""
    k = len(fns)
    values = np.zeros((k, M))
    grads = []
    for i, f in enumerate(fns):
        per = []
        fi, gi = _jitted(f)
        for m in range(M):
            one = jax.tree_util.tree_map(lambda leaf: leaf[m], particles)
            values[i, m] = float(fi(one))
            per.append(gi(one))
        grads.append(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per))
    return values, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *grads)


def _assert_tree_close(a, b, rtol=1e-12, atol=1e-12):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.x64
@pytest.mark.parametrize("form", ["sequence", "vector"])
def test_value_and_grads_matches_hand_loop(form):
    x = _particles()
    fns = _fns() if form == "sequence" else _stacked
    values, grads = mj.value_and_grads(fns, x)
    ref_v, ref_g = _hand_loop(_fns(), x)
    assert values.shape == (3, M)
    assert grads.shape == (3, M, 3)
    np.testing.assert_allclose(np.asarray(values), ref_v, rtol=1e-12)
    _assert_tree_close(grads, ref_g)


@pytest.mark.x64
@pytest.mark.parametrize("form", ["sequence", "vector"])
def test_log_prob_and_loss_sign_conventions(form):
    x = _particles()
    fns = _fns() if form == "sequence" else _stacked
    ref_v, ref_g = _hand_loop(_fns(), x)

    lp, loss_g = mj.log_prob_value_and_loss_grads(fns, x)
    np.testing.assert_allclose(np.asarray(lp), ref_v, rtol=1e-12)
    # loss gradient = -grad log p
    np.testing.assert_allclose(np.asarray(loss_g), -np.asarray(ref_g), rtol=1e-12, atol=1e-12)

    lv, lg = mj.loss_value_and_grads(fns, x)
    np.testing.assert_allclose(np.asarray(lv), ref_v, rtol=1e-12)
    # losses are differentiated as given (no sign flip)
    np.testing.assert_allclose(np.asarray(lg), np.asarray(ref_g), rtol=1e-12, atol=1e-12)


def _dict_particles():
    k1, k2 = jax.random.split(jax.random.key(1))
    return {"w": jax.random.normal(k1, (M, 2, 2)), "b": jax.random.normal(k2, (M, 3))}


_DICT_FNS = (
    lambda p: -jnp.sum(p["w"] ** 2) - 0.5 * jnp.sum((p["b"] - 2.0) ** 2),
    lambda p: jnp.sum(jnp.tanh(p["w"] @ p["b"][:2])) + p["b"][2] * p["w"][0, 1],
)


def _dict_fns():
    return list(_DICT_FNS)


@pytest.mark.x64
@pytest.mark.parametrize("fn", [mj.value_and_grads, mj.log_prob_value_and_loss_grads, mj.loss_value_and_grads])
@pytest.mark.parametrize("form", ["sequence", "vector"])
def test_dict_particles(fn, form):
    p = _dict_particles()
    fns = _dict_fns() if form == "sequence" else (lambda t: jnp.stack([f(t) for f in _dict_fns()]))
    values, grads = fn(fns, p)
    ref_v, ref_g = _hand_loop(_dict_fns(), p)
    sign = -1.0 if fn is mj.log_prob_value_and_loss_grads else 1.0
    np.testing.assert_allclose(np.asarray(values), ref_v, rtol=1e-12)
    assert set(grads) == {"w", "b"}
    assert grads["w"].shape == (2, M, 2, 2)
    assert grads["b"].shape == (2, M, 3)
    _assert_tree_close(grads, jax.tree_util.tree_map(lambda g: sign * g, ref_g))


@pytest.mark.x64
@pytest.mark.parametrize("form", ["sequence", "vector"])
def test_extra_args_are_passed_through(form):
    x = _particles()
    data = jnp.array([0.5, -1.0, 2.0])
    scale = 3.0
    f1 = lambda t, d, s: -s * jnp.sum((t - d) ** 2)  # noqa: E731
    f2 = lambda t, d, s: jnp.dot(t, d) / s  # noqa: E731
    fns = [f1, f2] if form == "sequence" else (lambda t, d, s: jnp.stack([f1(t, d, s), f2(t, d, s)]))
    values, grads = mj.value_and_grads(fns, x, data, scale)
    ref_v, ref_g = _hand_loop([lambda t: f1(t, data, scale), lambda t: f2(t, data, scale)], x)
    np.testing.assert_allclose(np.asarray(values), ref_v, rtol=1e-12)
    _assert_tree_close(grads, ref_g)
    # the args really matter
    values2, _ = mj.value_and_grads(fns, x, 2.0 * data, scale)
    assert not np.allclose(np.asarray(values2), np.asarray(values))


@pytest.mark.x64
def test_works_under_jit():
    x = _particles()
    f = jax.jit(lambda x: mj.log_prob_value_and_loss_grads(_stacked, x))
    values, grads = f(x)
    ref_v, ref_g = _hand_loop(_fns(), x)
    np.testing.assert_allclose(np.asarray(values), ref_v, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grads), -np.asarray(ref_g), rtol=1e-12, atol=1e-12)


@pytest.mark.x64
def test_single_target_sequence_gives_k_equal_one():
    x = _particles()
    values, grads = mj.log_prob_value_and_loss_grads([_fns()[0]], x)
    assert values.shape == (1, M) and grads.shape == (1, M, 3)
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(x - 1.0), rtol=1e-12)


@pytest.mark.x64
@pytest.mark.parametrize(
    "bad",
    [
        lambda t: jnp.sum(t),  # scalar
        lambda t: jnp.outer(t, t),  # matrix
    ],
)
def test_non_vector_output_raises(bad):
    with pytest.raises(ValueError, match=r"\(K,\)"):
        mj.value_and_grads(bad, _particles())


@pytest.mark.x64
def test_invalid_target_sequences_raise():
    with pytest.raises(TypeError):
        mj.value_and_grads([], _particles())
    with pytest.raises(TypeError):
        mj.value_and_grads([_fns()[0], 3.0], _particles())


def test_invalid_particles_raise():
    with pytest.raises(ValueError, match="empty"):
        mj.value_and_grads(_fns(), jnp.zeros((0, 3)))


def test_stack_targets():
    f = mj.stack_targets(_fns())
    t = jnp.array([0.3, -0.2, 1.1])
    np.testing.assert_allclose(np.asarray(f(t)), np.asarray(_stacked(t)), rtol=1e-14)
    assert mj.stack_targets(_stacked) is _stacked
