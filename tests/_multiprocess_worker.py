"""Launched by tests/test_multiprocess.py: one sharded sampling run over 4 CPU devices.

``python _multiprocess_worker.py single OUT``: one process with 4 host devices
(XLA_FLAGS set by the caller); also checks that the sharded, blocked and
unblocked median bandwidths are the same value.
``python _multiprocess_worker.py multi OUT PROCESS_ID PORT``: one of 2 processes
with 2 host devices each, joined by ``jax.distributed`` on 127.0.0.1:PORT with
CPU collectives (gloo). Process 0 writes the gathered result.

Writes OUT (.npz): final particles, traced particles, weights, ksd and bandwidths.
"""

import sys

import jax

jax.config.update("jax_enable_x64", True)
mode, out = sys.argv[1], sys.argv[2]
if mode == "multi":
    process_id, port = int(sys.argv[3]), int(sys.argv[4])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    assert jax.process_count() == 2 and len(jax.local_devices()) == 2, (jax.process_count(), jax.local_devices())

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mtsgd_jax as mj  # noqa: E402
from mtsgd_jax.kernels import kernel_products, rbf  # noqa: E402

assert len(jax.devices()) == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("particles",))
prob = mj.toy_problem()
x0 = prob.init_particles(jax.random.key(0), 24, dtype=jnp.float64)
# every process holds the same host copy; each places its own devices' rows
xs = jax.make_array_from_callback(x0.shape, NamedSharding(mesh, P("particles")), lambda idx: np.asarray(x0)[idx])
opt = optax.chain(mj.mtsgd(3, axis_name="particles", block_size=4), optax.adam(3e-2))
res = mj.sample(prob.log_prob, opt, xs, 40, trace_every=10, mesh=mesh)


def gather(a):
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


# the median bandwidth of a particle set with ties, sharded over the 4 devices
z = np.random.default_rng(1).integers(-2, 3, size=(40, 2)).astype(np.float64)
z[::3] = np.random.default_rng(2).normal(size=z[::3].shape)
shard_map = getattr(jax, "shard_map", None)
if shard_map is None:  # older jax
    from jax.experimental.shard_map import shard_map
zs = jax.make_array_from_callback(z.shape, NamedSharding(mesh, P("particles")), lambda idx: z[idx])
h_sharded = {}
for b in (None, 3):
    f = shard_map(
        lambda q, b=b: kernel_products(rbf(), q, q, axis_name="particles", block_size=b).bandwidth,
        mesh=mesh,
        in_specs=(P("particles"),),
        out_specs=P(),
    )
    h_sharded[b] = float(gather(jax.jit(f)(zs)))

payload = {
    "particles": gather(res.particles),
    "trace_particles": gather(res.trace.particles),
    "weights": gather(res.trace.weights),
    "ksd": gather(res.trace.ksd),
    "h_sharded": np.array([h_sharded[None], h_sharded[3]]),
}
if mode == "single":
    z32 = jnp.asarray(z)
    plain = [float(kernel_products(rbf(), z32, z32, block_size=b).bandwidth) for b in (None, 1, 7)]
    plain.append(float(mj.kernel_matrices(rbf(), z32).bandwidth))
    assert len(set(plain + list(h_sharded.values()))) == 1, (plain, h_sharded)
    ref = mj.sample(prob.log_prob, optax.chain(mj.mtsgd(3), optax.adam(3e-2)), x0, 40, trace_every=10)
    payload["unsharded_particles"] = np.asarray(ref.particles)
    payload["h_plain"] = np.array(plain)
    print("median identity ok", plain, h_sharded)
if jax.process_index() == 0:
    np.savez(out, **payload)
print("process", jax.process_index(), "done", flush=True)
if mode == "multi":
    jax.distributed.shutdown()
