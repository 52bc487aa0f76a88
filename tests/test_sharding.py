"""Particles sharded over devices, and mixed precision.

The multi-device checks run in a separate process with 4 forced CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax
starts): ``tests/_sharded_check.py`` compares every sharded run with the
single-device run.
"""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtsgd_jax as mj

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_sharded_runs_equal_single_device_runs():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_sharded_check.py")], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("mtsgd", "mtsgd_score_blocked", "moo_svgd", "mgda", "svgd", "kernel_products", "nonfinite", "error"):
        assert f"{name} ok" in proc.stdout, proc.stdout


def test_mesh_axis_errors():
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("particles",))
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        mj.shard_particles(jnp.zeros((4, 2)), mesh, axis_name="p")


def test_single_device_mesh_equals_plain_sample():
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("particles",))
    prob = mj.toy_problem()
    x0 = prob.init_particles(jax.random.key(1), 10)
    a = mj.sample(prob.log_prob, optax.chain(mj.mtsgd(3), optax.adam(3e-2)), x0, 20)
    b = mj.sample(prob.log_prob, optax.chain(mj.mtsgd(3, axis_name="particles"), optax.adam(3e-2)), mj.shard_particles(x0, mesh), 20, mesh=mesh)
    chex.assert_trees_all_close(b.particles, a.particles, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------


def test_bfloat16_particles_accumulate_in_float32():
    x = jax.random.normal(jax.random.key(2), (12, 2)).astype(jnp.bfloat16)
    grads = jnp.stack([x - 1, x + 1, 0.5 * x]).astype(jnp.bfloat16)
    t = mj.mtsgd(3)
    state = t.init(x)
    assert state.weights.dtype == state.ksd.dtype == jnp.float32
    upd, state = jax.jit(t.update)(grads, state, x)
    assert upd.dtype == jnp.bfloat16
    # the same computation on the float32 values, cast at the end
    ref, ref_state = jax.jit(t.update)(grads.astype(jnp.float32), t.init(x.astype(jnp.float32)), x.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(upd), np.asarray(ref.astype(jnp.bfloat16)))
    np.testing.assert_allclose(np.asarray(state.weights), np.asarray(ref_state.weights), rtol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(state.weights)), 1.0, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("weighting,threshold", [("score", 0.9), ("stein", 0.85)])
def test_bfloat16_toy_problem_converges_with_a_float32_master_copy(weighting, threshold):
    prob = mj.toy_problem()
    x0 = prob.init_particles(jax.random.key(0), 50).astype(jnp.bfloat16)
    opt = optax.chain(mj.mtsgd(3, weighting=weighting), optax.adam(3e-2))
    res = mj.sample(prob.log_prob, opt, x0, 1000, trace_every=100, master_dtype=jnp.float32)
    assert res.particles.dtype == jnp.bfloat16 and res.trace.particles.dtype == jnp.bfloat16
    w = np.asarray(res.trace.weights[1:])
    assert w.dtype == np.float32 and (w >= 0).all()
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    share = float(prob.in_joint_region(res.particles.astype(jnp.float32)).mean())
    assert share >= threshold, share


def test_master_dtype_is_checked():
    prob = mj.toy_problem()
    with pytest.raises(ValueError, match="master_dtype"):
        mj.sample(prob.log_prob, optax.chain(mj.mtsgd(3), optax.adam(1e-2)), jnp.zeros((4, 2), jnp.bfloat16), 1, master_dtype=jnp.int32)
