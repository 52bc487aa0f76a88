"""The trainer step's kernels on features: one VJP for the per-task gradients and the feature pullback.

With ``kernel_space="function"`` or ``"split"``, :meth:`Trainer.step` finds the
kernels' cotangent on the whole-network features (``"outputs"`` / ``"latent"``)
before the backward pass (the method's update run on placeholder gradients) and
pulls it back in the same VJP computation as the K per-task cotangents. These tests
check that the step's update is the one computed independently (per-task
``jax.grad``, the features recomputed and pulled back by the transformation's own
VJP), that the feature pullback returns the VJP for the guessed cotangent and for
any other one, and that a particle with non-finite gradients (the guess is then
wrong) gives the update of the plain path.

Tolerances: the paths sum the same products in different orders, so they differ
by round-off of the dtype, ``C * eps * scale`` (as in tests/test_train_step.py);
the kernel's weights and bandwidth are smooth functions of those sums.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtsgd_jax.models import SarcosMLP
from mtsgd_jax.training import ArrayDataset, Task, TaskDefaults, Trainer, build_method, make_task

C_ROUNDOFF = 512
LR = 0.1


def _tol(dtype, ref):
    ref = np.asarray(ref)
    finite = ref[np.isfinite(ref)]
    scale = max(float(np.max(np.abs(finite))) if finite.size else 0.0, 1.0)
    return C_ROUNDOFF * float(jnp.finfo(dtype).eps) * scale


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def _assert_trees_close(got, ref, dtype):
    got, ref = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=0, atol=_tol(dtype, b), equal_nan=True)


def _mlp_task(n=24):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = np.stack([x[:, 0] - x[:, 1], np.sin(x[:, 2]), x[:, 3] * x[:, 4]], axis=1).astype(np.float32)
    return Task(
        name="mlp", model=SarcosMLP(num_inputs=5, hidden=(12, 8), num_outputs=3), kind="regression",
        task_names=("a", "b", "c"), num_classes=None, train_data=ArrayDataset(x, y), eval_data=ArrayDataset(x, y),
        sample_input=np.zeros((1, 5), np.float32), defaults=TaskDefaults("sgd", LR, 12, 1),
    )


class _GatedNet(nn.Module):
    """Two scalar heads on a hidden layer scaled by ``sqrt(|b|)``: where ``b == 0`` the outputs and latent
    features are finite but the gradient with respect to ``b`` is NaN (``0 * inf``)."""

    @nn.compact
    def __call__(self, x, return_features: bool = False):
        b = self.param("b", nn.initializers.ones, (1,))
        h = nn.relu(nn.Dense(6)(x)) * jnp.sqrt(jnp.abs(b))
        out = jnp.concatenate([nn.Dense(1, name="head_0")(h), nn.Dense(1, name="head_1")(h)], axis=-1)
        return (out, h) if return_features else out


def _gated_task(n=16):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = np.stack([x.sum(1), x[:, 0] * x[:, 1]], axis=1).astype(np.float32)
    return Task(
        name="gated", model=_GatedNet(), kind="regression", task_names=("sum", "prod"), num_classes=None,
        train_data=ArrayDataset(x, y), eval_data=ArrayDataset(x, y), sample_input=np.zeros((1, 3), np.float32),
        defaults=TaskDefaults("sgd", LR, n, 1),
    )


@pytest.fixture(scope="module")
def tasks():
    return {"digits": make_task("multi-digits", num_train=16, num_eval=8), "mlp": _mlp_task(), "gated": _gated_task()}


def _setup(task, name, space, dtype, num_particles=3, seed=0):
    method = build_method(task, name, num_particles, kernel_space=space)
    tr = Trainer(task, method, optax.sgd(LR), batch_size=len(task.train_data))
    st0 = tr.init(seed)
    params = _cast(st0.params, dtype)
    state = st0._replace(params=params, opt_state=tr.tx.init(params))
    x, y = task.train_data.x, task.train_data.y
    return tr, method, state, jnp.asarray(x, dtype), jnp.asarray(y)


def _independent_update(task, method, params, opt, x, y):
    """The method's update from per-task ``jax.grad`` and features it recomputes and pulls back itself."""
    k = task.num_tasks

    def loss(q, t):
        out, _ = task.ensemble_forward(q, {}, x, train=True)
        return jnp.sum(jax.vmap(lambda o: task.per_task_losses(o, y))(out)[:, t])  # particles are independent

    per_task = [jax.grad(loss)(params, t) for t in range(k)]
    grads = jax.tree_util.tree_map(lambda *g: jnp.stack(g), *per_task)
    out, _ = task.ensemble_forward(params, {}, x, train=True)
    values = jax.vmap(lambda o: task.per_task_losses(o, y))(out).T
    return method.transform.update(grads, opt, params, losses=values, inputs=x, model_state={})[0]


def _recorded_update(tr, method, params, opt, x, y, *, method_state):
    """The update on the trainer's gradients and feature cache, and the cotangent each pullback was given."""
    values, grads, _, cache = tr._forward_and_grads(params, {}, x, y, method_state=method_state)
    seen = {}

    def recording(name, pb):
        def wrapped(c):
            seen[name] = c
            return pb(c)

        return wrapped

    cache = {n: (z, recording(n, pb)) for n, (z, pb) in cache.items()}
    extra = dict(losses=values, inputs=x, model_state={}, feature_cache=cache)
    update = method.transform.update(grads, opt, params, **extra)[0]
    return update, seen


@pytest.mark.parametrize(
    "task_name,name,space,dtype",
    [("digits", "mtsgd", "function", jnp.float32), ("mlp", "mtsgd", "split", jnp.float64),
     ("mlp", "moo_svgd", "function", jnp.float32)],
)
def test_step_equals_the_update_with_an_independent_feature_vjp(tasks, task_name, name, space, dtype):
    """The step's new parameters are those of the independent update; with finite gradients the
    placeholder run guessed exactly the cotangents the update pulls back (the step's one-VJP path)."""
    task = tasks[task_name]
    tr, method, state, x, y = _setup(task, name, space, dtype)
    opt = state.opt_state[0]

    @jax.jit
    def run(state):
        new_state, values = tr._step(state, x, y)
        _, seen = _recorded_update(tr, method, state.params, opt, x, y, method_state=opt)
        feats = {n: z for n, (z, _) in tr._forward_and_grads(state.params, {}, x, y)[3].items()}
        guessed = tr._kernel_cotangents(state.params, opt, values, feats, x, {})
        return new_state, values, seen, guessed, _independent_update(task, method, state.params, opt, x, y)

    new_state, values, seen, guessed, ref = run(state)
    assert values.dtype == dtype and bool(jnp.all(jnp.isfinite(values)))
    expected = optax.apply_updates(state.params, jax.tree_util.tree_map(lambda u: -LR * u, ref))
    _assert_trees_close(new_state.params, expected, dtype)
    assert set(guessed) == set(seen) and ("outputs" if space == "function" else "latent") in seen
    for n in seen:
        assert seen[n].shape == guessed[n].shape
        # the same expression compiled in two places: equal here, but XLA may round a fused copy
        # differently on another CPU (then the trainer takes its exact fallback: slower, same update)
        scale = float(np.max(np.abs(seen[n]))) or 1.0
        np.testing.assert_allclose(seen[n], guessed[n], rtol=0, atol=16 * float(jnp.finfo(dtype).eps) * scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_feature_pullback_is_the_vjp_for_any_cotangent(tasks, dtype):
    """Both branches of the guarded pullback: the guessed cotangent (batched VJP) and another (own VJP)."""
    task = tasks["mlp"]
    tr, method, state, x, y = _setup(task, "mtsgd", "function", dtype)
    opt = state.opt_state[0]
    other = jax.random.normal(jax.random.key(3), (3, len(x) * task.num_tasks), dtype)

    @jax.jit
    def run(params):
        values, _, _, cache = tr._forward_and_grads(params, {}, x, y, method_state=opt)
        feats, pullback = cache["outputs"]
        guess = tr._kernel_cotangents(params, opt, values, {"outputs": feats}, x, {})["outputs"]

        def outputs(q):
            out, _ = task.ensemble_forward(q, {}, x, train=True)
            return jax.vmap(task.function_outputs)(out)

        z, vjp = jax.vjp(outputs, params)
        return feats, z, [(pullback(c), vjp(c)[0]) for c in (guess, other)]

    feats, z, pairs = run(state.params)
    np.testing.assert_allclose(feats, z, rtol=0, atol=_tol(dtype, z))
    for got, ref in pairs:
        _assert_trees_close(got, ref, dtype)


@pytest.mark.parametrize(
    "name,space,dtype",
    [("mtsgd", "function", jnp.float64), ("moo_svgd", "function", jnp.float64), ("mtsgd", "split", jnp.float32)],
)
def test_nonfinite_gradient_falls_back_to_the_plain_update(tasks, name, space, dtype):
    """Particle 0's gradient is NaN (finite features): the kernels leave it out, the placeholder run did
    not, so the pullback must run its own VJP; the update equals the plain path's, NaN rows included."""
    task = tasks["gated"]
    tr, method, state, x, y = _setup(task, name, space, dtype)
    params = dict(state.params)
    params["b"] = params["b"].at[0].set(0.0)
    batched, plain, seen, guessed = _both_paths(tr, method, params, x, y)
    whole = "outputs" if space == "function" else "latent"
    assert not np.array_equal(seen[whole], guessed[whole], equal_nan=True)  # the guess is wrong: fallback exercised
    _assert_trees_close(batched, plain, dtype)
    row0 = np.concatenate([np.ravel(a[0]) for a in jax.tree_util.tree_leaves(batched["Dense_0"])])
    assert np.all(np.isnan(row0))  # particle 0 left out of the (encoder's) kernel
    rest = np.concatenate([np.ravel(a[1:]) for a in jax.tree_util.tree_leaves(batched)])
    assert np.all(np.isfinite(rest))


@pytest.mark.parametrize("dtype", [jnp.float32])
def test_diverged_network_keeps_the_batched_pullback(tasks, dtype):
    """Particle 0's parameters are NaN (a diverged network): the kernel leaves it out in the placeholder run
    too, so the guessed cotangent is the update's (the batched VJP is used) and the update is the plain one."""
    task = tasks["mlp"]
    tr, method, state, x, y = _setup(task, "mtsgd", "function", dtype)
    params = jax.tree_util.tree_map(lambda a: a.at[0].set(jnp.nan), state.params)
    batched, plain, seen, guessed = _both_paths(tr, method, params, x, y)
    assert np.all(seen["outputs"][0] == 0) and np.all(np.isfinite(seen["outputs"]))  # row 0 left out
    scale = float(np.max(np.abs(seen["outputs"]))) or 1.0
    np.testing.assert_allclose(seen["outputs"], guessed["outputs"], rtol=0, atol=16 * float(jnp.finfo(dtype).eps) * scale)
    row0 = np.concatenate([np.ravel(a[0]) for a in jax.tree_util.tree_leaves(batched)])
    assert np.all(np.isnan(row0))
    _assert_trees_close(batched, plain, dtype)
    rest = np.concatenate([np.ravel(a[1:]) for a in jax.tree_util.tree_leaves(batched)])
    assert np.all(np.isfinite(rest))


def _both_paths(tr, method, params, x, y):
    """Under one jit: the update with the batched feature VJP, the plain one, the cotangents the first
    pulled back and the ones the placeholder run guessed."""
    opt = method.transform.init(params)

    @jax.jit
    def run(params):
        batched, seen = _recorded_update(tr, method, params, opt, x, y, method_state=opt)
        plain, _ = _recorded_update(tr, method, params, opt, x, y, method_state=None)
        values, _, _, cache = tr._forward_and_grads(params, {}, x, y)
        guessed = tr._kernel_cotangents(params, opt, values, {n: z for n, (z, _) in cache.items()}, x, {})
        return batched, plain, seen, guessed

    return run(params)
