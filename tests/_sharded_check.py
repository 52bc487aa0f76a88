"""Run by tests/test_sharding.py in a fresh process with 4 CPU devices (XLA_FLAGS set by the caller).

Compares sharded runs with single-device runs and exits non-zero on any mismatch.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import mtsgd_jax as mj
from mtsgd_jax.kernels import kernel_products, rbf

jax.config.update("jax_enable_x64", True)
assert len(jax.devices()) == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("particles",))
prob = mj.toy_problem()
x0 = prob.init_particles(jax.random.key(0), 24, dtype=jnp.float64)
xs = mj.shard_particles(x0, mesh)
assert xs.sharding.spec == P("particles")

CASES = [
    ("mtsgd", mj.mtsgd(3), mj.mtsgd(3, axis_name="particles")),
    ("mtsgd_score_blocked", mj.mtsgd(3, weighting="score"), mj.mtsgd(3, weighting="score", axis_name="particles", block_size=4)),
    ("mtsgd_normalized_fixed_h", mj.mtsgd(3, rbf(0.8), weighting="normalized"), mj.mtsgd(3, rbf(0.8), weighting="normalized", axis_name="particles")),
    ("moo_svgd", mj.moo_svgd(3), mj.moo_svgd(3, axis_name="particles")),
    ("mgda", mj.mgda(3), mj.mgda(3)),
]
for name, single, sharded in CASES:
    a = mj.sample(prob.log_prob, optax.chain(single, optax.adam(3e-2)), x0, 60, trace_every=20)
    b = mj.sample(prob.log_prob, optax.chain(sharded, optax.adam(3e-2)), xs, 60, trace_every=20, mesh=mesh)
    np.testing.assert_allclose(np.asarray(b.particles), np.asarray(a.particles), rtol=1e-9, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(np.asarray(b.trace.particles), np.asarray(a.trace.particles), rtol=1e-9, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(np.asarray(b.trace.log_prob), np.asarray(a.trace.log_prob), rtol=1e-9, atol=1e-10, err_msg=name)
    if name.startswith("mtsgd"):
        np.testing.assert_allclose(np.asarray(b.trace.weights), np.asarray(a.trace.weights), rtol=1e-7, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(np.asarray(b.trace.ksd), np.asarray(a.trace.ksd), rtol=1e-9, atol=1e-12, err_msg=name)
    assert b.particles.sharding.spec == P("particles"), (name, b.particles.sharding)
    adam = b.opt_state[1][0]
    assert adam.mu.sharding.spec == P("particles"), (name, adam.mu.sharding)
    print(name, "ok", float(np.max(np.abs(np.asarray(b.particles) - np.asarray(a.particles)))))

# SVGD on the first target
lp = (lambda th: prob.log_prob(th)[0],)  # one target: K = 1
a = mj.sample(lp, optax.chain(mj.svgd(), optax.sgd(0.1)), x0, 30)
b = mj.sample(lp, optax.chain(mj.svgd(axis_name="particles"), optax.sgd(0.1)), xs, 30, mesh=mesh)
np.testing.assert_allclose(np.asarray(b.particles), np.asarray(a.particles), rtol=1e-9, atol=1e-10)
print("svgd ok")

# kernel_products inside a user's own shard_map, with the replication checker left on.
shard_map = getattr(jax, "shard_map", None)
z = jax.random.normal(jax.random.key(1), (40, 3))
v = jax.random.normal(jax.random.key(2), (40, 5))
full = kernel_products(rbf(), z, v)
kwargs = {}
if shard_map is None:  # older jax
    from jax.experimental.shard_map import shard_map
f = shard_map(
    lambda z, v: tuple(kernel_products(rbf(), z, v, axis_name="particles", block_size=3)),
    mesh=mesh,
    in_specs=(P("particles"), P("particles")),
    out_specs=(P("particles"), P("particles"), P(), P()),
    **kwargs,
)
out = jax.jit(f)(z, v)
for x, y in zip(full, out):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-10, atol=1e-12)
# Most particles coincide: the median pair distance is 0 and the mean fallback (a psum that runs
# only in that case, inside a lax.cond) decides; every device must take the same branch.
zc = jnp.concatenate([jnp.zeros((32, 3)), z[:8]])
h_full = kernel_products(rbf(), zc, zc[:, :1]).bandwidth
h_shard = jax.jit(
    shard_map(
        lambda q: kernel_products(rbf(), q, q[:, :1], axis_name="particles", block_size=3).bandwidth,
        mesh=mesh,
        in_specs=(P("particles"),),
        out_specs=P(),
    )
)(zc)
pairs = np.asarray(jnp.sum((zc[:, None] - zc[None]) ** 2, -1))[np.triu_indices(40, 1)]
assert np.median(pairs) == 0
np.testing.assert_allclose(float(h_shard), float(h_full), rtol=1e-12)
np.testing.assert_allclose(float(h_full), np.mean(pairs) / np.log(41.0), rtol=1e-12)
print("kernel_products ok")

# Non-finite particles: counted over all devices (a NaN region on one coordinate, no communication needed).
def nan_region(th):
    return jnp.where(th[0] > 1.0, jnp.nan, prob.log_prob(th))


nf_opt = optax.chain(mj.linear_scalarization(3), optax.sgd(0.05))
a = mj.sample(nan_region, nf_opt, x0, 20, trace_every=5, on_nonfinite="ignore")
b = mj.sample(nan_region, nf_opt, xs, 20, trace_every=5, mesh=mesh, on_nonfinite="ignore")
assert int(a.nonfinite.steps) > 0, a.nonfinite
for u, v in zip(a.nonfinite, b.nonfinite):
    assert int(u) == int(v), (a.nonfinite, b.nonfinite)
np.testing.assert_array_equal(np.asarray(b.trace.nonfinite), np.asarray(a.trace.nonfinite))
print("nonfinite ok", [int(u) for u in b.nonfinite])

# M not divisible by the number of devices: a clear error.
try:
    mj.sample(prob.log_prob, optax.chain(mj.mtsgd(3, axis_name="particles"), optax.adam(1e-2)), x0[:22], 2, mesh=mesh)
except ValueError as e:
    assert "cannot be split evenly over the 4 devices" in str(e), e
    print("error ok")
else:
    sys.exit("no error for M = 22 on 4 devices")
