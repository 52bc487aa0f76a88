"""Models of the experiments as particle ensembles: counts, shapes, ensembles, batch norm, grads."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtsgd_jax.models import (
    STEMS,
    EnsembleVariables,
    LeNetEncoder,
    MultiHeadDense,
    MultiHeadLeNet,
    MultiHeadResNet18,
    ResNet18Encoder,
    SarcosMLP,
    apply_ensemble,
    init_ensemble,
    param_count,
)


def key(seed):
    # "rbg" keys: compiling a network's init with the default threefry generator
    # takes several times longer on CPU (its rounds are inlined for every kernel shape)
    return jax.random.key(seed, impl="rbg")


def data(seed, *shape):
    """float32 test inputs from numpy (no per-shape compilation of jax.random)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def zeros(*shape):
    return jnp.zeros(shape, jnp.float32)


def dense(n_in, n_out):
    return n_in * n_out + n_out


def conv(k, c_in, c_out, bias=True):
    return k * k * c_in * c_out + (c_out if bias else 0)


def bn(c):
    return 2 * c  # scale and bias (running mean / var are batch_stats, not params)


def abstract_count(module, x, **kwargs):
    """Parameter count of one network from shapes only (no compilation)."""
    variables = jax.eval_shape(lambda k: module.init(k, x, **kwargs), key(0))
    return param_count(variables["params"])


def tree_allclose(a, b, **kw):
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda u, v: np.allclose(u, v, **kw), a, b)))


def particle(tree, i):
    return jax.tree_util.tree_map(lambda leaf: leaf[i], tree)


def assert_particles_differ(params):
    """Every weight matrix / conv kernel differs between every pair of particles."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if jax.tree_util.keystr(path).endswith("['kernel']"):
            flat = np.asarray(leaf).reshape(leaf.shape[0], -1)
            for i in range(len(flat)):
                for j in range(i + 1, len(flat)):
                    assert not np.allclose(flat[i], flat[j]), f"particles {i}, {j} share {jax.tree_util.keystr(path)}"


# ---------------------------------------------------------------------------
# parameter counts


def test_sarcos_mlp_has_exactly_139015_parameters():
    expected = dense(21, 256) + 2 * dense(256, 256) + dense(256, 7)
    assert expected == 139_015
    assert abstract_count(SarcosMLP(), zeros(1, 21)) == 139_015
    ens = init_ensemble(SarcosMLP(), key(0), 5, zeros(1, 21))
    assert param_count(ens.params, stacked=True) == 139_015
    assert param_count(ens.params) == 5 * 139_015
    assert ens.state == {}


@pytest.mark.parametrize("num_tasks,num_classes", [(2, 10), (3, 5)])
def test_lenet_parameter_count_matches_architecture(num_tasks, num_classes):
    encoder = conv(5, 1, 10) + conv(5, 10, 20) + dense(6 * 6 * 20, 50)
    assert encoder == 41_330
    heads = num_tasks * dense(50, num_classes)
    x = zeros(1, 36, 36, 1)
    assert abstract_count(LeNetEncoder(), x) == encoder
    assert abstract_count(MultiHeadLeNet(num_tasks, num_classes), x) == encoder + heads
    if (num_tasks, num_classes) == (2, 10):
        assert encoder + heads == 42_350


def resnet18_encoder_count(stem):
    count = (conv(3, 3, 64, bias=False) if stem == "cifar" else conv(7, 3, 64, bias=False)) + bn(64)
    c_in = 64
    for width in (64, 128, 256, 512):
        for b in range(2):
            block = conv(3, c_in, width, bias=False) + bn(width) + conv(3, width, width, bias=False) + bn(width)
            if c_in != width:  # first block of stages 2-4: 1x1 projection shortcut
                block += conv(1, c_in, width, bias=False) + bn(width)
            count += block
            c_in = width
    return count


@pytest.mark.parametrize("stem", STEMS)
def test_resnet18_parameter_count_matches_architecture(stem):
    expected = resnet18_encoder_count(stem)
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in its FC layer.
    assert expected == {"cifar": 11_168_832, "imagenet": 11_689_512 - 513_000}[stem]
    x = zeros(2, 64, 64, 3)
    assert abstract_count(ResNet18Encoder(stem=stem), x, train=False) == expected
    full = abstract_count(MultiHeadResNet18(40, 2, stem=stem), x, train=False)
    assert full == expected + 40 * dense(512, 2)


def test_param_count_on_plain_trees():
    tree = {"a": zeros(4, 3, 2), "b": [zeros(4, 5)]}
    assert param_count(tree) == 4 * 6 + 4 * 5
    assert param_count(tree, stacked=True) == 11
    with pytest.raises(ValueError, match="particle axis"):
        param_count({"a": zeros(4, 3), "b": zeros(3,)}, stacked=True)


# ---------------------------------------------------------------------------
# output shapes (abstract for the 64 x 64 ResNet)


def shapes(module, x, **kwargs):
    """(outputs, variables) of ``module.init_with_output`` as shapes only (nothing compiled)."""
    return jax.eval_shape(lambda k: module.init_with_output(k, x, **kwargs), key(0))


def test_output_shapes():
    lenet = MultiHeadLeNet(num_tasks=2, num_classes=10)
    x = zeros(3, 36, 36, 1)
    logits, variables = shapes(lenet, x)
    assert logits.shape == (3, 2, 10) and set(variables) == {"params"}
    (logits, feats), _ = shapes(lenet, x, return_features=True)
    assert logits.shape == (3, 2, 10) and feats.shape == (3, 50)
    assert shapes(lenet, x, method="features")[0].shape == (3, 50)
    assert shapes(MultiHeadLeNet(3, 5), x)[0].shape == (3, 3, 5)
    # other image sizes work (the dense layer adapts)
    assert shapes(lenet, zeros(2, 28, 28, 1))[0].shape == (2, 2, 10)

    assert shapes(SarcosMLP(), zeros(4, 21))[0].shape == (4, 7)

    xr = zeros(2, 64, 64, 3)
    for stem in STEMS:
        model = MultiHeadResNet18(40, 2, stem=stem)
        (logits, feats), variables = shapes(model, xr, train=False, return_features=True)
        assert logits.shape == (2, 40, 2) and feats.shape == (2, 512)
        assert set(variables) == {"params", "batch_stats"}
        assert shapes(model, xr, train=True, method="features")[0].shape == (2, 512)


def test_multi_head_dense_heads_are_independent_linear_layers():
    head = MultiHeadDense(num_tasks=3, num_classes=4)
    h = data(1, 5, 6)
    v = head.init(key(0), h)
    v = jax.tree_util.tree_map(lambda a: a + data(2, *a.shape), v)  # non-zero biases too
    out = head.apply(v, h)
    k, b = v["params"]["kernel"], v["params"]["bias"]
    for t in range(3):
        np.testing.assert_allclose(out[:, t], h @ k[:, t] + b[t], rtol=1e-5, atol=1e-5)
    # head initialisation has fan-in D, like nn.Dense: std about 1/sqrt(D)
    big = MultiHeadDense(40, 2).init(key(0), zeros(1, 512))["params"]["kernel"]
    assert 0.7 / np.sqrt(512) < float(jnp.std(big)) < 1.3 / np.sqrt(512)


def test_bad_inputs_fail_early_with_clear_errors():
    with pytest.raises(ValueError, match=r"\(N, H, W, C\).*x\[\.\.\., None\]"):
        MultiHeadLeNet().init(key(0), zeros(2, 36, 36))
    with pytest.raises(ValueError, match="at least 16"):
        MultiHeadLeNet().init(key(0), zeros(2, 8, 8, 1))
    with pytest.raises(ValueError, match=r"\(N, 21\)"):
        SarcosMLP().init(key(0), zeros(2, 20))
    with pytest.raises(ValueError, match="stem"):
        jax.eval_shape(lambda k: ResNet18Encoder(stem="vgg").init(k, zeros(1, 8, 8, 3), train=False),
                       key(0))
    with pytest.raises(ValueError, match="num_particles"):
        init_ensemble(SarcosMLP(), key(0), 0, zeros(1, 21))


# ---------------------------------------------------------------------------
# ensembles: init, apply under jit / vmap, grads


@pytest.fixture(scope="module")
def lenet_ensemble():
    model = MultiHeadLeNet()
    return model, init_ensemble(model, key(0), 3, zeros(1, 36, 36, 1))


def test_ensemble_init_gives_distinct_reproducible_networks(lenet_ensemble):
    model, ens = lenet_ensemble
    assert isinstance(ens, EnsembleVariables)
    for leaf in jax.tree_util.tree_leaves(ens.params):
        assert leaf.shape[0] == 3
    assert_particles_differ(ens.params)
    again = init_ensemble(model, key(0), 3, jnp.ones((1, 36, 36, 1), jnp.float32))
    assert tree_allclose(ens.params, again.params, rtol=0, atol=0)
    other = init_ensemble(model, key(1), 3, zeros(1, 36, 36, 1))
    assert not tree_allclose(ens.params, other.params)

    mlp = init_ensemble(SarcosMLP(), key(0), 4, zeros(1, 21))
    assert_particles_differ(mlp.params)


def test_apply_ensemble_matches_per_particle_apply_and_jit(lenet_ensemble):
    model, ens = lenet_ensemble
    x = data(3, 4, 36, 36, 1)
    single = jax.jit(lambda p, x: model.apply({"params": p}, x))  # one network, the reference
    out = apply_ensemble(model, ens.params, x)
    assert out.shape == (3, 4, 2, 10)
    for i in range(3):
        np.testing.assert_allclose(out[i], single(particle(ens.params, i), x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[0], out[1])  # different networks, different predictions

    jitted = jax.jit(lambda p, x: apply_ensemble(model, p, x, return_features=True))
    logits, feats = jitted(ens.params, x)
    np.testing.assert_allclose(logits, out, rtol=1e-5, atol=1e-6)
    assert feats.shape == (3, 4, 50)
    np.testing.assert_allclose(apply_ensemble(model, ens.params, x, method="features"), feats, rtol=1e-5, atol=1e-6)

    # one batch per particle
    xs = data(4, 3, 4, 36, 36, 1)
    per = apply_ensemble(model, ens.params, xs, per_particle_inputs=True)
    np.testing.assert_allclose(per[2], single(particle(ens.params, 2), xs[2]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="per_particle_inputs"):
        apply_ensemble(model, ens.params, x, per_particle_inputs=True)

    # vmapped over a leading axis of several input batches
    many = jax.vmap(lambda xb: apply_ensemble(model, ens.params, xb))(xs)
    np.testing.assert_allclose(many[1], apply_ensemble(model, ens.params, xs[1]), rtol=1e-5, atol=1e-6)


def test_multi_task_loss_grads_are_finite(lenet_ensemble):
    model, ens = lenet_ensemble
    x = data(5, 6, 36, 36, 1)
    y = jnp.asarray(np.random.default_rng(6).integers(0, 10, (6, 2)))

    def task_losses(params):  # (M, T): one cross-entropy per particle and task
        logits = apply_ensemble(model, params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[None]).mean(axis=1)

    def total(params):
        losses = task_losses(params)
        return losses.sum(), losses

    (_, losses), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(ens.params)
    assert losses.shape == (3, 2) and np.all(np.isfinite(losses))
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(ens.params)
    for g in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(g))
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads))

    mlp = SarcosMLP()
    mens = init_ensemble(mlp, key(0), 2, zeros(1, 21))
    xs, ys = data(7, 8, 21), data(8, 8, 7)
    g = jax.jit(jax.grad(lambda p: ((apply_ensemble(mlp, p, xs) - ys) ** 2).mean()))(mens.params)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(g))


@pytest.mark.x64
def test_ensemble_works_in_float64(lenet_ensemble):
    model, ens = lenet_ensemble
    p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), ens.params)
    out = apply_ensemble(model, p64, jnp.ones((2, 36, 36, 1), jnp.float64))
    assert out.dtype == jnp.float64


# ---------------------------------------------------------------------------
# ResNet-18 ensemble with batch norm (small images to keep CPU tests quick)


@pytest.fixture(scope="module")
def resnet_ensemble():
    model = MultiHeadResNet18(num_tasks=4, num_classes=2)
    x = data(0, 4, 16, 16, 3)
    return model, init_ensemble(model, key(1), 2, x[:1], train=False), x


def test_resnet_ensemble_variables(resnet_ensemble):
    model, ens, x = resnet_ensemble
    assert set(ens.state) == {"batch_stats"}
    assert param_count(ens.params, stacked=True) == resnet18_encoder_count("cifar") + 4 * dense(512, 2)
    stats = jax.tree_util.tree_leaves_with_path(ens.state["batch_stats"])
    # one (mean, var) pair per batch-norm layer: stem + 8 blocks x 2 + 3 shortcuts = 20
    assert len(stats) == 2 * 20
    for path, leaf in stats:
        assert leaf.shape[0] == 2
        expected = 0.0 if jax.tree_util.keystr(path).endswith("['mean']") else 1.0
        np.testing.assert_array_equal(leaf, expected)
    assert_particles_differ(ens.params)


def test_resnet_batch_stats_train_and_eval(resnet_ensemble):
    model, ens, x = resnet_ensemble

    @jax.jit
    def train_step(params, state, x):
        def loss(p):
            logits, new_state = apply_ensemble(model, p, x, state=state, train=True, mutable=["batch_stats"])
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), (logits, new_state)

        (value, (logits, new_state)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, logits, new_state, grads

    value, logits, new_state, grads = train_step(ens.params, ens.state, x)
    assert logits.shape == (2, 4, 4, 2)
    assert np.isfinite(value)
    for g in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(g))
    assert set(new_state) == {"batch_stats"}
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(ens.state)
    # running averages moved (momentum 0.9) away from their (0, 1) initial values,
    # per particle: the two networks see different activations, so their stats differ
    stem_mean = new_state["batch_stats"]["encoder"]["stem_bn"]["mean"]
    assert stem_mean.shape == (2, 64)
    assert np.abs(stem_mean).max() > 0
    assert not np.allclose(stem_mean[0], stem_mean[1])
    # per particle: the stem's running mean is 0.9 * 0 + 0.1 * (batch mean of ITS stem conv output)
    kernels = ens.params["encoder"]["stem_conv"]["kernel"]  # (M, 3, 3, 3, 64)
    for i in range(2):
        h = jax.lax.conv_general_dilated(x, kernels[i], (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        np.testing.assert_allclose(stem_mean[i], 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)

    # evaluation uses the running statistics: each example's output depends on it alone
    eval_fn = jax.jit(lambda p, s, x: apply_ensemble(model, p, x, state=s, train=False))
    out_old = eval_fn(ens.params, ens.state, x)
    out_new = eval_fn(ens.params, new_state, x)
    assert out_old.shape == (2, 4, 4, 2)
    assert not np.allclose(out_old, out_new)
    x_other = x.at[1:].set(data(9, 3, 16, 16, 3))
    np.testing.assert_allclose(eval_fn(ens.params, new_state, x_other)[:, 0], out_new[:, 0], rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="mutable"):
        apply_ensemble(model, ens.params, x, state=ens.state, train=True)
    with pytest.raises(ValueError, match="state has 1 particles"):
        apply_ensemble(model, ens.params, x, state=jax.tree_util.tree_map(lambda a: a[:1], ens.state), train=False)
