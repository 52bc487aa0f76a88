"""Particle-set helpers: initialisation, flattening and particle-axis validation."""

import re

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import mtsgd_jax as mj


# ---------------------------------------------------------------------------
# init_particles
# ---------------------------------------------------------------------------


def _one_particle(key):
    k1, k2 = jax.random.split(key)
    return {"w": jax.random.normal(k1, (2, 3)), "b": jax.random.uniform(k2, (4,))}


def test_init_particles_array_shape_and_distinct():
    x = mj.init_particles(lambda k: jax.random.normal(k, (3,)), jax.random.key(0), 7)
    assert x.shape == (7, 3)
    # every pair of particles differs
    d = np.asarray(jnp.sum((x[:, None] - x[None]) ** 2, -1))
    off = d[~np.eye(7, dtype=bool)]
    assert np.all(off > 1e-6)


def test_init_particles_pytree_shapes():
    p = mj.init_particles(_one_particle, jax.random.key(1), 5)
    assert set(p) == {"w", "b"}
    assert p["w"].shape == (5, 2, 3)
    assert p["b"].shape == (5, 4)
    # particles are independent draws, not copies
    assert len({tuple(np.asarray(p["b"][m]).round(8)) for m in range(5)}) == 5
    assert len({tuple(np.asarray(p["w"][m]).ravel().round(8)) for m in range(5)}) == 5


def test_init_particles_deterministic_given_key():
    a = mj.init_particles(_one_particle, jax.random.key(3), 6)
    b = mj.init_particles(_one_particle, jax.random.key(3), 6)
    c = mj.init_particles(_one_particle, jax.random.key(4), 6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert not np.allclose(a["w"], c["w"])


def test_init_particles_matches_vmap_over_split_keys():
    key = jax.random.key(11)
    p = mj.init_particles(_one_particle, key, 4)
    keys = jax.random.split(key, 4)
    one = jax.jit(_one_particle)
    for m in range(4):
        ref = one(keys[m])
        np.testing.assert_array_equal(p["w"][m], ref["w"])
        np.testing.assert_array_equal(p["b"][m], ref["b"])


@pytest.mark.parametrize("m", [0, -2])
def test_init_particles_rejects_non_positive_count(m):
    with pytest.raises(ValueError, match="num_particles"):
        mj.init_particles(lambda k: jax.random.normal(k, (2,)), jax.random.key(0), m)


# ---------------------------------------------------------------------------
# init_flax_particles
# ---------------------------------------------------------------------------


class _MLP(nn.Module):
    hidden: int = 8

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)


def test_init_flax_particles_leading_axis_and_apply():
    module = _MLP()
    x = jnp.linspace(-1.0, 1.0, 15).reshape(5, 3)
    m = 4
    variables = jax.jit(lambda k: mj.init_flax_particles(module, k, m, x))(jax.random.key(0))
    single = jax.eval_shape(module.init, jax.random.key(0), x)
    # same tree as one init, with a leading axis M on every leaf
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(single)
    for leaf, ref in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(single)):
        assert leaf.shape == (m,) + ref.shape
        assert leaf.dtype == ref.dtype
    assert mj.num_particles(variables["params"]) == m

    out = jax.jit(jax.vmap(module.apply, in_axes=(0, None)))(variables, x)
    assert out.shape == (m, 5, 1)
    apply = jax.jit(module.apply)
    for i in range(m):
        one = jax.tree_util.tree_map(lambda leaf: leaf[i], variables)
        np.testing.assert_allclose(out[i], apply(one, x), rtol=1e-6, atol=1e-6)
    # distinct networks give distinct predictions
    assert not np.allclose(out[0], out[1])


def test_init_flax_particles_equals_init_per_key():
    module = _MLP(hidden=3)
    x = jnp.ones((2, 2))
    key = jax.random.key(5)
    variables = mj.init_flax_particles(module, key, 3, x)
    keys = jax.random.split(key, 3)
    init = jax.jit(module.init)
    for i in range(3):
        ref = init(keys[i], x)
        got = jax.tree_util.tree_map(lambda leaf: leaf[i], variables)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, ref)


# ---------------------------------------------------------------------------
# flatten / unflatten
# ---------------------------------------------------------------------------


def _mixed_tree(m=4):
    rng = np.random.default_rng(0)
    return {
        "a": jnp.asarray(rng.normal(size=(m, 2, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(m,)), jnp.float64),
        "c": {"d": jnp.asarray(rng.normal(size=(m, 4)), jnp.float32), "e": jnp.asarray(rng.normal(size=(m, 1, 1)), jnp.float64)},
    }


@pytest.mark.x64
def test_flatten_layout_and_dtype_promotion():
    tree = _mixed_tree()
    x, spec = mj.flatten_particles(tree)
    assert x.shape == (4, 6 + 1 + 4 + 1)
    assert x.dtype == jnp.float64  # promoted
    # layout: concatenation of the per-particle raveled leaves in tree-flatten order
    leaves = jax.tree_util.tree_leaves(tree)
    ref = np.concatenate([np.asarray(leaf, np.float64).reshape(4, -1) for leaf in leaves], axis=1)
    np.testing.assert_array_equal(np.asarray(x), ref)
    # per-particle row equals ravel_pytree of that particle
    for m in range(4):
        one = jax.tree_util.tree_map(lambda leaf: leaf[m].astype(jnp.float64), tree)
        flat, _ = jax.flatten_util.ravel_pytree(one)
        np.testing.assert_array_equal(np.asarray(x[m]), np.asarray(flat))
    assert spec.sizes == (6, 1, 4, 1)
    assert spec.shapes == ((2, 3), (), (4,), (1, 1))


@pytest.mark.x64
def test_flatten_unflatten_round_trip_restores_shapes_and_dtypes():
    tree = _mixed_tree()
    x, spec = mj.flatten_particles(tree)
    back = mj.unflatten_particles(x, spec)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for got, ref in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
        assert got.shape == ref.shape
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.x64
def test_flatten_explicit_dtype():
    tree = _mixed_tree()
    x, spec = mj.flatten_particles(tree, dtype=jnp.float32)
    assert x.dtype == jnp.float32
    back = mj.unflatten_particles(x, spec)
    assert back["b"].dtype == jnp.float64 and back["a"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(back["b"]), np.asarray(tree["b"]), rtol=1e-6)


@pytest.mark.x64
def test_unflatten_keeps_leading_batch_axes():
    tree = _mixed_tree()
    x, spec = mj.flatten_particles(tree)
    batch = jnp.stack([x, 2.0 * x, -x])  # (K=3, M, d)
    back = mj.unflatten_particles(batch, spec)
    assert back["a"].shape == (3, 4, 2, 3)
    assert back["c"]["e"].shape == (3, 4, 1, 1)
    np.testing.assert_allclose(np.asarray(back["a"][1]), 2.0 * np.asarray(tree["a"]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(back["b"][2]), -np.asarray(tree["b"]))
    assert back["a"].dtype == jnp.float32 and back["b"].dtype == jnp.float64


@pytest.mark.x64
def test_flatten_target_grads_consistent_with_flatten_particles():
    tree = _mixed_tree(m=5)
    k = 3
    grads = jax.tree_util.tree_map(
        lambda leaf: jnp.stack([(i + 1.0) * leaf + i for i in range(k)]).astype(leaf.dtype), tree
    )
    flat = mj.flatten_target_grads(grads)
    assert flat.shape == (3, 5, 12)
    assert flat.dtype == jnp.float64
    for i in range(k):
        gi = jax.tree_util.tree_map(lambda g: g[i], grads)
        ref, _ = mj.flatten_particles(gi)
        np.testing.assert_array_equal(np.asarray(flat[i]), np.asarray(ref))
    # round trip through unflatten with the particles' spec
    _, spec = mj.flatten_particles(tree)
    back = mj.unflatten_particles(flat, spec)
    for got, ref in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(grads)):
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert mj.flatten_target_grads(grads, dtype=jnp.float32).dtype == jnp.float32


@pytest.mark.x64
def test_target_grad_pieces_are_the_leaves_of_the_flat_grads():
    tree = _mixed_tree(m=5)
    grads = jax.tree_util.tree_map(lambda leaf: jnp.stack([leaf, 2.0 * leaf - 1.0]).astype(leaf.dtype), tree)
    pieces = mj.target_grad_pieces(grads, dtype=jnp.float32)
    leaves = jax.tree_util.tree_leaves(grads)
    assert isinstance(pieces, tuple) and len(pieces) == len(leaves)
    for piece, leaf in zip(pieces, leaves):
        assert piece.dtype == jnp.float32 and piece.shape == (2, 5, int(np.prod(leaf.shape[2:])))
        np.testing.assert_array_equal(np.asarray(piece), np.asarray(leaf, np.float32).reshape(piece.shape))
    np.testing.assert_array_equal(
        np.concatenate([np.asarray(p) for p in pieces], axis=2), np.asarray(mj.flatten_target_grads(grads, jnp.float32))
    )


# ---------------------------------------------------------------------------
# num_particles
# ---------------------------------------------------------------------------


@pytest.mark.x64
def test_num_particles_ok():
    assert mj.num_particles(jnp.zeros((3, 2))) == 3
    assert mj.num_particles(_mixed_tree(m=6)) == 6


def test_num_particles_disagreeing_leading_axes_names_leaves():
    tree = {"alpha": jnp.zeros((3, 2)), "beta": jnp.zeros((4,))}
    with pytest.raises(ValueError) as err:
        mj.num_particles(tree)
    msg = str(err.value)
    assert "alpha" in msg and "beta" in msg
    assert "3" in msg and "4" in msg


def test_num_particles_scalar_leaf():
    with pytest.raises(ValueError, match="scalar") as err:
        mj.num_particles({"ok": jnp.zeros((3, 2)), "bad": jnp.zeros(())})
    assert "bad" in str(err.value)


def test_num_particles_empty_pytree():
    for empty in ({}, [], None):
        with pytest.raises(ValueError, match="empty"):
            mj.num_particles(empty)


def test_num_particles_zero_particles():
    with pytest.raises(ValueError, match=re.compile("empty", re.I)):
        mj.num_particles(jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match=re.compile("empty", re.I)):
        mj.num_particles({"a": jnp.zeros((0,)), "b": jnp.zeros((0, 2))})


def test_flatten_particles_validates():
    with pytest.raises(ValueError, match="empty"):
        mj.flatten_particles(jnp.zeros((0, 2)))
    with pytest.raises(ValueError):
        mj.flatten_particles({"a": jnp.zeros((2, 2)), "b": jnp.zeros((3, 2))})


def test_num_particles_python_list_of_numbers_says_convert():
    with pytest.raises(TypeError) as err:
        mj.num_particles([[0.0, 1.0], [2.0, 3.0]], "params")
    msg = str(err.value)
    assert msg.startswith("params is a Python list of numbers (params[0][0] = 0.0);")
    assert "jnp.asarray(params, jnp.float32)" in msg
    with pytest.raises(TypeError, match=re.escape("particles['b'] is a Python tuple of numbers")):
        mj.num_particles({"a": jnp.zeros((2, 1), jnp.float32), "b": (1.0, 2.0)})
    # a list of arrays is a pytree of particles
    assert mj.num_particles([jnp.zeros((3,), jnp.float32), jnp.ones((3, 2), jnp.float32)]) == 3


def test_num_particles_number_leaf_in_a_dict_says_convert():
    with pytest.raises(ValueError, match=re.escape("particles['a'] is a scalar") + ".*jnp.asarray"):
        mj.num_particles({"a": 1.0})


@pytest.mark.parametrize("real", [jnp.float32, jnp.float64])
def test_flatten_refuses_to_drop_imaginary_parts(real):
    z = jnp.asarray([[1.0 + 2.0j], [3.0 - 1.0j]], jnp.complex64 if real == jnp.float32 else jnp.complex128)
    tree = {"r": jnp.ones((2, 2), real), "z": z}
    with pytest.raises(TypeError, match=re.escape(f"particles['z'] has dtype {z.dtype}; casting it to {jnp.dtype(real)}")):
        mj.flatten_particles(tree, dtype=real)
    with pytest.raises(TypeError, match=re.escape(f"grads['z'] has dtype {z.dtype}")):
        mj.flatten_target_grads(jax.tree_util.tree_map(lambda a: a[None], tree), dtype=real)
    # without a real dtype the matrix is complex and loses nothing
    x, spec = mj.flatten_particles(tree)
    assert jnp.issubdtype(x.dtype, jnp.complexfloating)
    back = mj.unflatten_particles(x, spec)
    np.testing.assert_array_equal(back["z"], z)
    assert back["r"].dtype == jnp.dtype(real)
