"""Containment of non-finite particles: a particle whose position or loss gradient is not finite
drops out of the kernel sums, and every other particle's update equals the update computed on the
set without it (the median bandwidth and the 1/M normalisation then use the finite count)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtsgd_jax as mj
from mtsgd_jax import kernel_products, rbf

M, D, K, BAD = 12, 2, 3, 5
TOL = {jnp.float64: 1e-12, jnp.float32: 64 * float(np.finfo(np.float32).eps)}


def _problem(dtype, m=M, d=D, k=K, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, d))
    g = np.stack([x - 1.0 - i * rng.normal(size=d) for i in range(k)]) + 0.1 * rng.normal(size=(k, m, d))
    return np.asarray(x, dtype), np.asarray(g, dtype)


def _corrupt(x, g, where):
    x, g = x.copy(), g.copy()
    if where == "grad_nan":
        g[1, BAD, 0] = np.nan
    elif where == "grad_inf":
        g[2, BAD, 1] = -np.inf
    else:  # position
        x[BAD, 1] = np.nan
    return x, g


def _keep(m=M):
    return np.array([i for i in range(m) if i != BAD])


_JITTED: dict = {}


def _run(t, g, x):
    """``jax.jit(t.update)`` on ``(g, t.init(x), x)``, jitted once per transformation: cases of the same
    shapes and dtype share its compilation."""
    if id(t) not in _JITTED:
        _JITTED[id(t)] = (t, jax.jit(t.update))  # t kept alive: its id is not reused
    return _JITTED[id(t)][1](jnp.asarray(g), t.init(jnp.asarray(x)), jnp.asarray(x))


def _check(u, s, u_ref, s_ref, tol, fields):
    u = np.asarray(u)
    assert np.all(np.isnan(u[BAD])), u[BAD]
    scale = np.max(np.abs(np.asarray(u_ref)))
    np.testing.assert_allclose(u[_keep(u.shape[0])], np.asarray(u_ref), rtol=tol, atol=tol * scale)
    for f in fields:
        np.testing.assert_allclose(np.asarray(getattr(s, f)), np.asarray(getattr(s_ref, f)), rtol=tol, atol=tol)
    assert int(s.nonfinite) == 1 and int(s_ref.nonfinite) == 0


TRANSFORMS = {
    "mtsgd": lambda: mj.mtsgd(K),
    "mtsgd_normalized_blocked": lambda: mj.mtsgd(K, weighting="normalized", block_size=5),
    "mtsgd_score_imq": lambda: mj.mtsgd(K, mj.imq(), weighting="score"),
    "mtsgd_fixed_h": lambda: mj.mtsgd(K, rbf(0.5)),
}
_SHARED = {name: make() for name, make in TRANSFORMS.items()}  # built once: one compilation per shape and dtype


CASES = [("mtsgd", w, dt) for w in ("grad_nan", "grad_inf", "position") for dt in (jnp.float64, jnp.float32)] + [
    (name, "grad_nan", dt) for name in list(TRANSFORMS)[1:] for dt in (jnp.float64, jnp.float32)
]


@pytest.mark.parametrize("name,where,dtype", CASES)
def test_mtsgd_containment(name, where, dtype):
    x, g = _problem(dtype)
    xb, gb = _corrupt(x, g, where)
    t = _SHARED[name]
    u, s = _run(t, gb, xb)
    u_ref, s_ref = _run(t, g[:, _keep()], x[_keep()])
    _check(u, s, u_ref, s_ref, TOL[dtype], ["weights", "ksd", "bandwidth"])


@pytest.mark.parametrize("dtype,block_size", [(jnp.float64, None), (jnp.float32, 4)])
def test_svgd_containment(dtype, block_size):
    x, g = _problem(dtype)
    xb, gb = _corrupt(x, g, "grad_nan")
    t = mj.svgd(block_size=block_size)
    u, s = _run(t, gb[1], xb)
    u_ref, s_ref = _run(t, g[1, _keep()], x[_keep()])
    _check(u, s, u_ref, s_ref, TOL[dtype], ["ksd", "bandwidth"])


@pytest.mark.parametrize(
    "where,dtype,block_size",
    [("grad_nan", jnp.float64, None), ("position", jnp.float64, 5), ("grad_nan", jnp.float32, 5), ("position", jnp.float32, None)],
)
def test_moo_svgd_containment(where, dtype, block_size):
    x, g = _problem(dtype)
    xb, gb = _corrupt(x, g, where)
    t = mj.moo_svgd(K, block_size=block_size)
    u, s = _run(t, gb, xb)
    u_ref, s_ref = _run(t, g[:, _keep()], x[_keep()])
    _check(u, s, u_ref, s_ref, TOL[dtype], ["bandwidth"])
    w = np.asarray(s.weights)
    np.testing.assert_allclose(w[_keep()], np.asarray(s_ref.weights), rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_allclose(w[BAD], 1.0 / K)


@pytest.mark.x64
def test_feature_space_containment():
    """mtsgd and moo_svgd with a function-space kernel: a NaN feature row counts as a bad particle."""
    x, g = _problem(jnp.float64, d=3)
    w_map = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)))

    def feats(p):
        return jnp.tanh(p @ w_map)

    xb, gb = _corrupt(x, g, "position")
    for t in (mj.mtsgd(K, features=feats), mj.moo_svgd(K, features=feats)):
        u, s = _run(t, gb, xb)
        u_ref, s_ref = _run(t, g[:, _keep()], x[_keep()])
        _check(u, s, u_ref, s_ref, 1e-12, ["bandwidth"])


@pytest.mark.x64
def test_inner_product_path_containment():
    """d >> K M: U from inner products (the network-particle path)."""
    x, g = _problem(jnp.float64, m=6, d=90, k=2)
    g[0, BAD, 17] = np.nan
    t = mj.mtsgd(2)
    u, s = _run(t, g, x)
    u_ref, s_ref = _run(t, g[:, _keep(6)], x[_keep(6)])
    _check(u, s, u_ref, s_ref, 1e-12, ["weights", "ksd", "bandwidth"])


@pytest.mark.x64
def test_vmap_and_single_device_shard_map():
    x, g = _problem(jnp.float64)
    xb, gb = _corrupt(x, g, "grad_nan")
    t = _SHARED["mtsgd"]  # mj.mtsgd(K)
    xs, gs = jnp.stack([x, xb]), jnp.stack([g, gb])
    u, s = jax.jit(jax.vmap(t.update))(gs, jax.vmap(t.init)(xs), xs)
    u_ref, s_ref = _run(t, g[:, _keep()], x[_keep()])
    np.testing.assert_array_equal(np.asarray(s.nonfinite), [0, 1])
    _check(u[1], jax.tree_util.tree_map(lambda a: a[1], s), u_ref, s_ref, 1e-12, ["weights", "ksd", "bandwidth"])
    u0, _ = _run(t, g, x)
    np.testing.assert_allclose(np.asarray(u[0]), np.asarray(u0), rtol=1e-12, atol=1e-14)

    # the axis_name code path (all-gathers, psums) on a one-device mesh
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # older jax
        from jax.experimental.shard_map import shard_map
    mesh = Mesh(np.array(jax.devices()[:1]), ("p",))
    ts = mj.mtsgd(K, axis_name="p", block_size=4)
    f = shard_map(
        lambda gg, xx: ts.update(gg, ts.init(xx), xx), mesh=mesh, in_specs=(P(None, "p"), P("p")), out_specs=(P("p"), P())
    )
    u_sh, s_sh = jax.jit(f)(jnp.asarray(gb), jnp.asarray(xb))
    _check(u_sh, s_sh, u_ref, s_ref, 1e-12, ["weights", "ksd", "bandwidth"])


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_all_nan(dtype):
    x, g = _problem(dtype)
    g[:] = np.nan
    for t in (_SHARED["mtsgd"], mj.mtsgd(K, weighting="normalized"), mj.mtsgd(K, block_size=5), mj.moo_svgd(K)):
        u, s = _run(t, g, x)
        assert np.all(np.isnan(np.asarray(u)))
        assert int(s.nonfinite) == M
        assert float(s.bandwidth) == 1.0
        np.testing.assert_allclose(np.asarray(s.weights), 1.0 / K)
    u, s = _run(mj.svgd(), g[0], x)
    assert np.all(np.isnan(np.asarray(u))) and int(s.nonfinite) == M and float(s.bandwidth) == 1.0


@pytest.mark.x64
def test_kernel_products_valid_mask_equals_subset():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(15, 3))
    v = rng.normal(size=(15, 4))
    valid = np.ones(15, bool)
    valid[[2, 9]] = False
    z[9] = np.inf  # excluded rows may hold anything
    keep = np.flatnonzero(valid)
    # jitted (one kernel object, static): op by op, the row blocks would compile again per call
    prod = jax.jit(kernel_products, static_argnums=0, static_argnames="block_size")
    kern = rbf()
    for block in (None, 4):
        out = prod(kern, jnp.asarray(z), jnp.asarray(v), valid=jnp.asarray(valid), block_size=block)
        ref = prod(kern, jnp.asarray(z[keep]), jnp.asarray(v[keep]), block_size=block)
        np.testing.assert_allclose(np.asarray(out.kv)[keep], np.asarray(ref.kv), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(out.repulsion)[keep], np.asarray(ref.repulsion), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(float(out.trace_sum), float(ref.trace_sum), rtol=1e-12)
        np.testing.assert_allclose(float(out.bandwidth), float(ref.bandwidth), rtol=1e-14)
        assert np.all(np.asarray(out.kv)[~valid] == 0) and np.all(np.asarray(out.repulsion)[~valid] == 0)


@pytest.mark.x64
def test_stein_quantities_contain_a_nan_score():
    x, g = _problem(jnp.float64)
    s = -g
    s[0, BAD, 1] = np.nan
    quantities = jax.jit(mj.stein_quantities)  # one compilation per shape instead of op by op
    q = quantities(jnp.asarray(x), jnp.asarray(s))
    ref = quantities(jnp.asarray(x[_keep()]), jnp.asarray(-g[:, _keep()]))
    np.testing.assert_allclose(np.asarray(q.gram), np.asarray(ref.gram), rtol=1e-12)
    phi = np.asarray(q.directions)
    assert np.all(np.isnan(phi[:, BAD]))
    np.testing.assert_allclose(phi[:, _keep()], np.asarray(ref.directions), rtol=1e-12, atol=1e-14)
