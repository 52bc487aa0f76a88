"""The fast ensemble paths and the trainer's one-pass per-task gradients.

* ``ensemble_forward`` (tiled-GEMM convolutions, reshape+max pooling, einsum
  dense layers) equals the vmapped flax module: outputs and every per-task
  gradient, float32 and float64;
* the building blocks equal their lax / flax counterparts (property tests);
* one trainer step of every method gives the same parameters on the fast path
  as on the vmapped-flax path (``Trainer(fast=False)``);
* the function-space kernel reusing the step's forward pass equals recomputing
  the features;
* a user's own flax model (no fast path) trains through the public trainer.

Tolerances: the two paths sum the same products in different orders, so they
differ by round-off of the dtype: ``C * eps * scale`` where ``scale`` is the
largest magnitude of the quantity compared and ``C`` covers the depth of the
network's sums (contractions of up to 720 terms, errors growing like their
square root, over five layers and their backward passes).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtsgd_jax.models import (
    MultiHeadLeNet,
    MultiHeadResNet18,
    SarcosMLP,
    apply_ensemble,
    ensemble_conv2d,
    ensemble_forward,
    init_ensemble,
    max_pool_2x2,
    register_ensemble_forward,
)
from mtsgd_jax.training import ArrayDataset, Task, TaskDefaults, Trainer, build_method, make_task

DTYPES = [jnp.float32, jnp.float64]
C_ROUNDOFF = 512


def _tol(dtype, ref):
    scale = max(float(np.max(np.abs(np.asarray(ref)))), 1.0)
    return C_ROUNDOFF * float(jnp.finfo(dtype).eps) * scale


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def _per_task_losses(out, y, kind):
    if kind == "classification":
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(0)
    return ((out - y) ** 2).mean(0)


def _per_task_grads_fn(fwd, kind):
    """Jitted ``(params, x, y) -> (outputs, [K per-task gradients])``, one jax.grad per task (summed over the
    independent particles)."""

    @jax.jit
    def run(params, x, y):
        grads = [jax.grad(lambda p, t=t: jnp.sum(jax.vmap(lambda o: _per_task_losses(o, y, kind)[t])(fwd(p, x))))(params)
                 for t in range(y.shape[1])]
        return fwd(params, x), grads

    return run


_LENET, _MLP = MultiHeadLeNet(), SarcosMLP()
# one jitted function per (model, path): test cases of the same shapes and dtype share its compilation
_GRADS = {
    ("lenet", "flax"): _per_task_grads_fn(lambda p, xx: apply_ensemble(_LENET, p, xx), "classification"),
    ("lenet", "fast"): _per_task_grads_fn(ensemble_forward(_LENET), "classification"),
    ("mlp", "flax"): _per_task_grads_fn(lambda p, xx: apply_ensemble(_MLP, p, xx), "regression"),
    ("mlp", "fast"): _per_task_grads_fn(ensemble_forward(_MLP), "regression"),
}


def _lenet_inputs(dtype, n=6, background=False):
    x = jax.random.normal(jax.random.key(1), (n, 36, 36, 1), dtype)
    if background:  # a constant zero background: exact ties inside pooling windows
        x = x.at[:, :, 18:].set(0).at[:, 20:].set(0)
    y = jax.random.randint(jax.random.key(2), (n, 2), 0, 10)
    return x, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("background", [False, True])
def test_lenet_fast_forward_and_per_task_grads_equal_flax(dtype, background):
    model = _LENET
    x, y = _lenet_inputs(dtype, background=background)
    params = _cast(init_ensemble(model, jax.random.key(0), 3, x[:1]).params, dtype)
    assert ensemble_forward(model) is not None
    out_ref, g_ref = _GRADS["lenet", "flax"](params, x, y)
    out, g = _GRADS["lenet", "fast"](params, x, y)
    assert out.shape == (3, 6, 2, 10) and out.dtype == dtype
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=_tol(dtype, out_ref))
    for gt, gt_ref in zip(g, g_ref):
        for a, b in zip(jax.tree_util.tree_leaves(gt), jax.tree_util.tree_leaves(gt_ref)):
            assert a.dtype == dtype
            np.testing.assert_allclose(a, b, rtol=0, atol=_tol(dtype, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_fast_forward_and_per_task_grads_equal_flax(dtype):
    model = _MLP
    x = jax.random.normal(jax.random.key(1), (9, 21), dtype)
    y = jax.random.normal(jax.random.key(2), (9, 7), dtype)
    params = _cast(init_ensemble(model, jax.random.key(0), 4, x[:1]).params, dtype)
    out_ref, g_ref = _GRADS["mlp", "flax"](params, x, y)
    out, g = _GRADS["mlp", "fast"](params, x, y)
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=_tol(dtype, out_ref))
    for gt, gt_ref in zip(g, g_ref):
        for a, b in zip(jax.tree_util.tree_leaves(gt), jax.tree_util.tree_leaves(gt_ref)):
            np.testing.assert_allclose(a, b, rtol=0, atol=_tol(dtype, b))


_pool_pair = jax.jit(lambda x: (nn.max_pool(x, (2, 2), strides=(2, 2)), max_pool_2x2(x)))


@pytest.mark.x64
@given(
    shape=st.sampled_from([(1, 2, 2, 1), (2, 5, 4, 3), (3, 7, 9, 2), (2, 8, 8, 1)]),
    f64=st.booleans(), seed=st.integers(0, 2**16), ties=st.booleans(),
)
def test_max_pool_2x2_equals_flax_max_pool(shape, f64, seed, ties):
    dtype = jnp.float64 if f64 else jnp.float32
    x = np.random.default_rng(seed).normal(size=shape)  # numpy: no per-shape compilation of jax.random
    if ties:  # few distinct values: many tied maxima
        x = np.round(x)
    x = jnp.asarray(x, dtype)
    n, h, w, c = shape
    ref, out = _pool_pair(x)
    assert out.shape == ref.shape == (n, h // 2, w // 2, c)
    np.testing.assert_array_equal(out, ref)  # a max is exact


def _conv_pair(x, kern, bias, shared, tile_width=None):
    def one(xi, ki, bi):
        return jax.lax.conv_general_dilated(xi, ki, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) + bi

    ref = jax.vmap(one, in_axes=(None if shared else 0, 0, 0))(x, kern, bias)
    return ref, ensemble_conv2d(x, kern, bias, shared_input=shared, tile_width=tile_width)



@pytest.mark.x64
@given(
    dims=st.sampled_from([(1, 1, 1, 1, 1), (2, 3, 2, 3, 2), (3, 4, 4, 2, 3)]),
    shared=st.booleans(), f64=st.booleans(), seed=st.integers(0, 2**16),
    tile_width=st.sampled_from([None, 1, 2, 3, 100]),  # 2 and 3 leave a partial last tile at some widths
)
def test_ensemble_conv2d_equals_lax_conv(dims, shared, f64, seed, tile_width):
    m, kh, kw, c, o = dims
    dtype = jnp.float64 if f64 else jnp.float32
    rng = np.random.default_rng(seed)  # numpy: no per-shape compilation of jax.random
    shape = (2, 7, 6, c) if shared else (m, 2, 7, 6, c)
    x = jnp.asarray(rng.normal(size=shape), dtype)
    kern = jnp.asarray(rng.normal(size=(m, kh, kw, c, o)), dtype)
    bias = jnp.asarray(rng.normal(size=(m, o)), dtype)

    # run op by op: compiling this pair under jit costs ~10x more per shape, and the jitted
    # ensemble_conv2d is covered by the LeNet forward-pass tests above
    ref, out = _conv_pair(x, kern, bias, shared, tile_width)
    assert out.shape == ref.shape == (m, 2, 8 - kh, 7 - kw, o)
    # each entry is a sum of kh*kw*c <= 48 products of unit normals (and, with tiles, exact zeros)
    scale = float(jnp.sum(jnp.abs(kern))) + 1.0
    np.testing.assert_allclose(out, ref, rtol=0, atol=16 * float(jnp.finfo(dtype).eps) * scale * 8)


def test_ensemble_conv2d_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match=r"ensemble_conv2d: x must have shape \(M, N, H, W, C\) with C = 2"):
        ensemble_conv2d(jnp.zeros((4, 5, 5, 2)), jnp.zeros((3, 2, 2, 2, 1)), shared_input=False)
    with pytest.raises(ValueError, match=r"ensemble_conv2d: images \(3 x 5\) must be at least as large as the kernel \(4 x 4\)"):
        ensemble_conv2d(jnp.zeros((2, 3, 5, 1)), jnp.zeros((3, 4, 4, 1, 1)), shared_input=True)
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match=r"ensemble_conv2d: tile_width must be a positive int or None, got "):
            ensemble_conv2d(jnp.zeros((2, 6, 6, 1)), jnp.zeros((3, 2, 2, 1, 1)), shared_input=True, tile_width=bad)


@pytest.mark.parametrize(
    ("out_width", "out_channels", "shared", "want"),
    [
        (12, 20, False, 4),  # LeNet's second convolution: 4 pixels x 20 channels = 80 GEMM columns
        (12, 64, False, 1),  # wide channels: plain im2col
        (12, 7, False, 12),  # no divisor of 12 reaches 64 columns: the whole row
        (7, 10, False, 7),  # a prime width
        (32, 10, True, 1),  # a shared input (the first layer): im2col, whose patches all particles share
    ],
)
def test_default_tile_width_is_the_narrowest_divisor_giving_64_gemm_columns(out_width, out_channels, shared, want):
    from mtsgd_jax.models.fast import _default_tile_width

    assert _default_tile_width(out_width, out_channels, shared) == want


def test_ensemble_conv2d_tiles_are_the_same_convolution_under_jit_and_grad():
    """Every tile width gives the convolution and its gradients (of x, kernel and bias) of im2col, jitted."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 3, 9, 10, 3)), jnp.float32)
    kern = jnp.asarray(rng.normal(size=(2, 3, 4, 3, 5)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(2, 3, 7, 7, 5)), jnp.float32)

    @jax.jit
    def grads(x, kern, bias):
        return [
            jax.grad(lambda *a, tw=tw: jnp.vdot(ensemble_conv2d(*a, shared_input=False, tile_width=tw), cot), (0, 1, 2))(
                x, kern, bias
            )
            for tw in (1, 2, 3, 7)
        ]

    ref, *others = grads(x, kern, bias)
    for got in others:
        for a, b in zip(got, ref):
            # sums of at most 3*4*3*2*7*7 = 3,528 products of unit normals in float32
            np.testing.assert_allclose(a, b, rtol=0, atol=64 * float(jnp.finfo(jnp.float32).eps) * float(jnp.max(jnp.abs(b))))


def test_no_fast_path_for_unregistered_and_batch_norm_models():
    assert ensemble_forward(nn.Dense(3)) is None
    assert ensemble_forward(MultiHeadResNet18()) is None

    class Sub(MultiHeadLeNet):  # exact class match: a subclass may change the architecture
        pass

    assert ensemble_forward(Sub()) is None


def test_task_fast_forward_is_the_pass_the_trainer_runs(digits_task):
    """Task.fast_forward: the registered pass unless fast=False or batch norm (then the vmapped module)."""
    assert digits_task.fast_forward() is not None and digits_task.fast_forward(False) is None
    celeba_like = Task(
        name="bn", model=MultiHeadResNet18(num_tasks=2, num_classes=2), kind="classification",
        task_names=("a", "b"), num_classes=2, train_data=None, eval_data=None,
        sample_input=np.zeros((1, 8, 8, 3), np.float32), batch_norm=True,
    )
    assert celeba_like.fast_forward() is None
    user = _user_task()
    assert user.fast_forward() is None  # no registered pass for a user's own module


# ----------------------------------------------------------------------------- trainer


# The fast and the vmapped-flax paths differ only in how the trainer gets the losses, the per-task
# gradients and (function-space kernels) the features; the transformation after them is the same
# code. So the comparison covers each way a method consumes them: parameter-space kernel (grads),
# function-space kernel (grads + the cached forward pass, MT-SGD and MOO-SVGD), losses (Pareto MTL)
# and the plain sum (linear scalarisation). Every method's own step is checked in test_training.
TRAINER_CASES = [
    ("mtsgd", "parameter", jnp.float64),
    ("mtsgd", "parameter", jnp.float32),
    ("mtsgd", "function", jnp.float64),
    ("mtsgd", "function", jnp.float32),
    ("moo_svgd", "function", jnp.float64),
    ("pareto_mtl", "parameter", jnp.float32),
    ("linear_scalarization", "parameter", jnp.float32),
]


@pytest.fixture(scope="module")
def digits_task():
    return make_task("multi-digits", num_train=32, num_eval=16)


def _two_steps(task, method, dtype, fast):
    tr = Trainer(task, method, optax.sgd(0.05), batch_size=16, fast=fast)
    st0 = tr.init(0)
    params = _cast(st0.params, dtype)
    state = st0._replace(params=params, opt_state=tr.tx.init(params))
    losses = []
    for x, y in task.train_data.batches(16, seed=0, epoch=0, drop_last=True):
        state, values = tr.step(state, jnp.asarray(x, dtype), y)
        losses.append(values)
    return state.params, losses


@pytest.mark.parametrize("name,space,dtype", TRAINER_CASES)
def test_trainer_step_fast_equals_vmapped_flax(digits_task, name, space, dtype):
    method = build_method(digits_task, name, 2, kernel_space=space)
    p_fast, l_fast = _two_steps(digits_task, method, dtype, True)
    p_ref, l_ref = _two_steps(digits_task, method, dtype, False)
    for a, b in zip(l_fast, l_ref):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=0, atol=_tol(dtype, b))
    # The function-space features (predicted probabilities) and their pullback are formed in float32
    # whatever the parameters' dtype (tasks.py); the fast path pulls the cotangents back one after
    # another, the vmapped one in a batch, which round them differently: float32's epsilon bounds that.
    step_dtype = jnp.float32 if space == "function" else dtype
    for a, b in zip(jax.tree_util.tree_leaves(p_fast), jax.tree_util.tree_leaves(p_ref)):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=0, atol=_tol(step_dtype, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["mtsgd", "moo_svgd"])
def test_function_kernel_reusing_the_forward_pass_equals_recomputing(digits_task, name, dtype):
    method = build_method(digits_task, name, 3, kernel_space="function")
    tr = Trainer(digits_task, method, optax.sgd(0.1), batch_size=16)
    st0 = tr.init(1)
    params = _cast(st0.params, dtype)
    x, y = next(digits_task.train_data.batches(16, seed=0, epoch=0))
    x = jnp.asarray(x, dtype)
    opt = method.transform.init(params)

    @jax.jit
    def both(params, x, y):
        values, grads, _, cache = tr._forward_and_grads(params, {}, x, y)
        assert cache is not None and cache["outputs"][0].shape[0] == 3
        reused, _ = method.transform.update(grads, opt, params, losses=values, inputs=x, model_state={}, feature_cache=cache)
        recomputed, _ = method.transform.update(grads, opt, params, losses=values, inputs=x, model_state={})
        return reused, recomputed

    reused, recomputed = both(params, x, y)
    # The function-space features are the predicted probabilities, formed in float32 whatever the
    # parameters' dtype (tasks.py), and so is their pullback: the two programs may round them
    # differently, so float32's epsilon bounds the difference even for float64 parameters.
    for a, b in zip(jax.tree_util.tree_leaves(reused), jax.tree_util.tree_leaves(recomputed)):
        np.testing.assert_allclose(a, b, rtol=0, atol=_tol(jnp.float32, b))


@pytest.mark.x64
def test_per_task_gradients_equal_separate_grads(digits_task):
    """The VJP over K cotangents gives each task's own gradient (float64)."""
    method = build_method(digits_task, "mgda", 2)
    tr = Trainer(digits_task, method, optax.sgd(0.1), batch_size=16)
    params = _cast(tr.init(0).params, jnp.float64)
    x, y = next(digits_task.train_data.batches(16, seed=0, epoch=0))
    x = jnp.asarray(x, jnp.float64)
    values, grads, _, cache = jax.jit(tr._forward_and_grads)(params, {}, x, y)
    assert cache is None and values.shape == (2, 2)
    model = digits_task.model
    grads_by_task = jax.jit(lambda q: [jax.grad(lambda q: digits_task.per_task_losses(model.apply({"params": q}, x), y)[k])(q)
                                       for k in range(2)])  # one compilation for both tasks
    for p in range(2):
        refs = grads_by_task(jax.tree_util.tree_map(lambda a: a[p], params))
        for k in range(2):
            ref = refs[k]
            got = jax.tree_util.tree_map(lambda g: g[k, p], grads)
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
                np.testing.assert_allclose(a, b, rtol=0, atol=_tol(jnp.float64, b))


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("count", [1, 3, 8, 9, 12])
def test_pulling_back_several_cotangents_equals_one_vjp_each(count, sequential):
    """Up to 8 cotangents go one after another (lax.map) when asked, else they are vmapped: both are the
    VJP of each."""
    from mtsgd_jax.training.trainer import _SEQUENTIAL_PULLBACKS, _pull_each

    rng = np.random.default_rng(count)
    w = {"a": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    cts = jnp.asarray(rng.normal(size=(count, 5, 3)), jnp.float32)
    extra = jnp.asarray(rng.normal(size=(count, 5)), jnp.float32)
    out, vjp = jax.vjp(lambda q: (jnp.tanh(x @ q["a"] + q["b"]), jnp.sin(x @ q["a"]).sum(-1)), w)

    def pull(c, e):
        return _pull_each(lambda ci, ei: vjp((ci, ei))[0], c, e, sequential=sequential)

    got = jax.jit(pull)(cts, extra)
    for i in range(count):
        ref = vjp((cts[i], extra[i]))[0]
        for name in w:
            assert got[name].shape == (count,) + w[name].shape
            np.testing.assert_allclose(got[name][i], ref[name], rtol=0, atol=8 * float(jnp.finfo(jnp.float32).eps) * (1 + float(jnp.max(jnp.abs(ref[name])))))
    assert ("scan" in str(jax.make_jaxpr(pull)(cts, extra))) == (sequential and count <= _SEQUENTIAL_PULLBACKS)


class _UserNet(nn.Module):
    """A user's own two-task model: a conv, average pooling and two scalar outputs."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3))(x))
        h = nn.avg_pool(h, (2, 2), strides=(2, 2)).reshape((x.shape[0], -1))
        return nn.Dense(2)(h)


def _user_task(n=48):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32)
    y = np.stack([x.mean(axis=(1, 2, 3)), x[:, :3].mean(axis=(1, 2, 3))], axis=1).astype(np.float32)
    return Task(
        name="user", model=_UserNet(), kind="regression", task_names=("mean", "top"), num_classes=None,
        train_data=ArrayDataset(x, y), eval_data=ArrayDataset(x[:16], y[:16]),
        sample_input=np.zeros((1, 6, 6, 1), np.float32), defaults=TaskDefaults("adam", 1e-2, 16, 1),
    )


@pytest.mark.parametrize("name,space", [("mtsgd", "parameter"), ("mtsgd", "function"), ("linear_scalarization", "parameter")])
def test_user_flax_model_trains_through_the_trainer(name, space):
    task = _user_task()
    assert ensemble_forward(task.model) is None
    trainer = Trainer(task, build_method(task, name, 3, kernel_space=space), optax.adam(1e-2), batch_size=16)
    state = trainer.init(0)
    start = state.params
    before = trainer.evaluate(state)["mean_particle_mse"]
    for epoch in range(4):
        state, train_loss, _, steps = trainer.train_epoch(state, seed=0, epoch=epoch)
        assert steps == 3 and np.all(np.isfinite(train_loss))
    after = trainer.evaluate(state)["mean_particle_mse"]
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(start))]
    assert np.isfinite(after) and min(moved) > 0
    if space == "parameter":  # the function-space repulsion may trade some fit for spread in 4 epochs
        assert after < before


def test_registered_user_fast_path_is_used_by_the_trainer():
    class Affine(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x)

    calls = []

    def builder(module):
        def forward(params, x):
            calls.append(x.shape)
            return jnp.einsum("nd,mdo->mno", x, params["Dense_0"]["kernel"]) + params["Dense_0"]["bias"][:, None]

        return forward

    register_ensemble_forward(Affine, builder)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    y = (x[:, :2] * 2).astype(np.float32)
    task = Task(
        name="affine", model=Affine(), kind="regression", task_names=("a", "b"), num_classes=None,
        train_data=ArrayDataset(x, y), eval_data=ArrayDataset(x, y), sample_input=np.zeros((1, 3), np.float32),
    )
    method = build_method(task, "mgda", 2)
    fast = Trainer(task, method, optax.sgd(0.1), batch_size=16)
    plain = Trainer(task, method, optax.sgd(0.1), batch_size=16, fast=False)
    s0 = fast.init(0)
    s_fast, v_fast = fast.step(s0, x[:16], y[:16])
    s_plain, v_plain = plain.step(s0, x[:16], y[:16])
    assert calls  # traced through the registered forward pass
    for a, b in zip(jax.tree_util.tree_leaves(s_fast.params), jax.tree_util.tree_leaves(s_plain.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=_tol(jnp.float32, b))
    with pytest.raises(TypeError, match="builder must be callable"):
        register_ensemble_forward(Affine, None)
