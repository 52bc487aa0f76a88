"""The published network recipe: split kernels, the linear-scalarisation warm-up, ``recipe="published"``.

* the split direction (``kernel_space="split"``) equals an independent computation: for each
  head k, SVGD with task k's gradient and an RBF kernel (median bandwidth) on every network's
  head-k outputs, written out here; for the encoder, the library's ``mtsgd`` with a kernel on the
  latent features computed here (float32 and float64);
* the recipe's train step under jit (multi-head LeNet on 16 x 16 images), fast ensemble pass
  equal to the vmapped flax module;
* warm-up preferences exactly ``i / (M - 1)``; the warm-up step descends ``sum_k w_ik L_k``
  and leaves the method's state alone; resume across the warm-up boundary;
* errors: a model without heads or without latent features, a method that cannot take the
  split kernels, bad head labels;
* ``train(recipe="published")`` and ``mtsgd train --recipe published``.

Tolerances: the library and the reference sum the same terms in different orders, so they
differ by round-off: ``C * eps * scale`` with ``scale`` the largest magnitude compared and ``C``
covering the kernel (exp of distances over the median bandwidth, relative error a few eps times
``r^2 / h``, about log(M + 1)) and the sums over a 16-example batch.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtsgd_jax import mtsgd
from mtsgd_jax.models import MultiHeadDense, MultiHeadLeNet, SarcosMLP
from mtsgd_jax.training import (
    ArrayDataset,
    Head,
    Task,
    TaskDefaults,
    Trainer,
    build_method,
    make_method,
    train,
    warmup_preferences,
)
from mtsgd_jax.training import recipe as recipe_mod
from mtsgd_jax.training.trainer import ResumeMismatchError, _config_diff

C_ROUNDOFF = 256
N, D_IN, HIDDEN, C = 16, 5, 4, 3


class TwoHead(nn.Module):
    """A tiny shared encoder (dense + tanh) and two 3-way heads (a MultiHeadDense named "heads")."""

    @nn.compact
    def __call__(self, x, return_features=False):
        h = jnp.tanh(nn.Dense(HIDDEN, name="enc")(x))
        out = MultiHeadDense(2, C, name="heads")(h)
        return (out, h) if return_features else out


class NoHeads(nn.Module):
    """Latent features but no recognisable heads: one dense layer to (N, 2, C)."""

    @nn.compact
    def __call__(self, x, return_features=False):
        h = jnp.tanh(nn.Dense(HIDDEN, name="enc")(x))
        out = nn.Dense(2 * C, name="top")(h).reshape(x.shape[0], 2, C)
        return (out, h) if return_features else out


class NoFeatures(nn.Module):
    """Heads but no ``return_features``."""

    @nn.compact
    def __call__(self, x):
        return MultiHeadDense(2, C, name="heads")(jnp.tanh(nn.Dense(HIDDEN, name="enc")(x)))


def _data(kind, n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_IN if kind != "regression" else 3)).astype(np.float32)
    if kind == "regression":
        y = rng.normal(size=(n, 2)).astype(np.float32)
    else:
        y = rng.integers(0, C, size=(n, 2)).astype(np.int32)
    return x, y


def _task(model, kind="classification", n=N):
    x, y = _data(kind, n)
    return Task(
        name="tiny",
        model=model,
        kind=kind,
        task_names=("a", "b"),
        num_classes=C if kind == "classification" else None,
        train_data=ArrayDataset(x, y),
        eval_data=ArrayDataset(x[:8], y[:8]),
        sample_input=x[:1],
        defaults=TaskDefaults("sgd", 0.05, 8, 2),
    )


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def _tol(dtype, ref):
    scale = max(float(np.max(np.abs(np.asarray(ref)))), 1.0)
    return C_ROUNDOFF * float(jnp.finfo(dtype).eps) * scale


# ----------------------------------------------------------------------------- references written out

# Each model: forward of ONE network written by hand -> (outputs (N, K, ...), latent (N, H)); head k's
# parameters; the encoder's parameters.
_CASES = {
    "classification": dict(
        model=TwoHead,
        forward=lambda p, x: _two_head_forward(p, x),
        head=lambda p, k: (p["heads"]["kernel"][..., k, :], p["heads"]["bias"][..., k, :]),
        encoder=lambda p: {"enc": p["enc"]},
    ),
    "regression": dict(
        model=lambda: SarcosMLP(num_inputs=3, hidden=(HIDDEN,), num_outputs=2),
        forward=lambda p, x: _mlp_forward(p, x),
        head=lambda p, k: (p["out"]["kernel"][..., k], p["out"]["bias"][..., k]),
        encoder=lambda p: {"dense0": p["dense0"]},
    ),
}


def _two_head_forward(p, x):
    h = jnp.tanh(x @ p["enc"]["kernel"] + p["enc"]["bias"])
    return jnp.einsum("nh,htc->ntc", h, p["heads"]["kernel"]) + p["heads"]["bias"], h


def _mlp_forward(p, x):
    h = jax.nn.relu(x @ p["dense0"]["kernel"] + p["dense0"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"], h


def _losses(out, y, kind):
    if kind == "classification":
        return optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), y).mean(0).astype(out.dtype)
    return ((out - y) ** 2).mean(0)


def _head_features(out_k, kind):
    """What the kernel of head k sees of one network: log-probabilities (N, C) or predictions (N,), flat."""
    if kind == "classification":
        out_k = jax.nn.log_softmax(out_k.astype(jnp.float32), axis=-1)
    return out_k.reshape(-1)


def _reference_split(case, kind, params, x, y):
    """The split direction's negative (what the transform returns) by hand: ``{"heads": [(kernel, bias)
    updates of head k (P, ...)], "encoder": encoder-subtree update}``."""
    fwd, m, k_tasks = case["forward"], jax.tree_util.tree_leaves(params)[0].shape[0], 2

    def losses(p):
        return _losses(fwd(p, x)[0], y, kind)

    # per-task gradients of every network: leaves (P, K, ...) -> (K, P, ...)
    jac = jax.vmap(jax.jacrev(losses))(params)
    grads = jax.tree_util.tree_map(lambda g: jnp.moveaxis(g, 1, 0), jac)
    heads = []
    for k in range(k_tasks):
        def z_of(p, k=k):
            return _head_features(fwd(p, x)[0][:, k], kind)

        z = jax.vmap(z_of)(params)  # (P, q)
        r2 = jnp.sum((z[:, None, :] - z[None, :, :]) ** 2, axis=-1)
        iu = np.triu_indices(m, 1)
        h = jnp.median(r2[iu]) / np.log(m + 1)
        kmat = jnp.exp(-r2 / h)
        zf = jax.lax.stop_gradient(z)

        def total_kernel(ps):  # sum_m sum_a k(z_a fixed, z(theta_m)): its gradient in theta_m is the repulsion's
            zm = jax.vmap(z_of)(ps)
            return jnp.sum(jnp.exp(-jnp.sum((zf[:, None, :] - zm[None, :, :]) ** 2, axis=-1) / h))

        rep = jax.tree_util.tree_map(lambda g: -g, jax.grad(total_kernel)(params))
        score = jax.tree_util.tree_map(lambda g: -g[k], grads)  # task k's score at every network
        phi = jax.tree_util.tree_map(
            lambda s, r: (jnp.einsum("ma,a...->m...", kmat.astype(s.dtype), s) + r) / m, score, rep
        )
        heads.append(tuple(-a for a in case["head"](phi, k)))
    # encoder: the library's MT-SGD with a kernel on the latent features computed here
    enc = case["encoder"](params)
    enc_grads = case["encoder"](grads)  # leaves (K, P, ...)

    def latent(e):
        full = {**params, **e}
        return jax.vmap(lambda p: fwd(p, x)[1].reshape(-1))(full)

    t = mtsgd(2, features=lambda e, **_: latent(e))
    enc_update, _ = t.update(enc_grads, t.init(enc), enc)
    return {"heads": heads, "encoder": enc_update}


_SPLIT_FNS = {}


def _split_fn(kind):
    """Jitted ``(params, x, y) -> (library update, reference)`` for ``kind`` (one compilation per shape and dtype)."""
    if kind not in _SPLIT_FNS:
        case = _CASES[kind]
        task = _task(case["model"](), kind)
        method = build_method(task, "mtsgd", 3, kernel_space="split")
        tr = Trainer(task, method, optax.sgd(1.0), batch_size=8)

        @jax.jit
        def run(params, x, y):
            values, grads, _, cache = tr._forward_and_grads(params, {}, x, y)
            update, state = method.transform.update(
                grads, method.transform.init(params), params, losses=values, inputs=x, model_state={}, feature_cache=cache
            )
            return update, state, _reference_split(case, kind, params, x, y)

        _SPLIT_FNS[kind] = (task, tr, run)
    return _SPLIT_FNS[kind]


@pytest.mark.parametrize(
    "kind, dtype",
    [("classification", jnp.float32), ("regression", jnp.float32), ("regression", jnp.float64)],
)
def test_split_direction_equals_per_head_svgd_and_encoder_mtsgd(kind, dtype):
    """Classification features are log-probabilities computed in float32 whatever the parameters'
    dtype (Task.function_outputs), so the float64 identity is checked on the regression model."""
    case = _CASES[kind]
    task, tr, run = _split_fn(kind)
    params = _cast(tr.init(3).params, dtype)
    x, y = _data(kind)
    x = jnp.asarray(x, dtype)
    update, state, ref = run(params, x, y)
    for k in range(2):
        got = case["head"](update, k)
        for a, b in zip(got, ref["heads"][k]):
            assert a.dtype == dtype
            np.testing.assert_allclose(a, b, rtol=0, atol=_tol(dtype, b))
    enc_got = case["encoder"](update)
    for a, b in zip(jax.tree_util.tree_leaves(enc_got), jax.tree_util.tree_leaves(ref["encoder"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=_tol(dtype, b))
    # the encoder combined both tasks (simplex weights), each head is one SVGD target
    w = np.asarray(state.inner_states["encoder"].inner_state.weights)
    assert w.shape == (2,) and abs(w.sum() - 1) < 1e-5 and np.all(w >= 0)
    assert state.inner_states["head_1"].inner_state.weights.shape == (1,)


def test_split_heads_move_only_with_their_own_task():
    """With task 1's loss gradient zeroed, head 1's update is SVGD with no score: the pure repulsion, which
    does not depend on task 0's gradient; head 0's update does."""
    task, tr, _ = _split_fn("classification")
    method = tr.method
    params = tr.init(5).params
    x, y = _data("classification")

    @jax.jit
    def updates(scale0):
        values, grads, _, cache = tr._forward_and_grads(params, {}, x, y)
        grads = jax.tree_util.tree_map(lambda g: g * jnp.array([scale0, 1.0])[(slice(None),) + (None,) * (g.ndim - 1)], grads)
        u, _ = method.transform.update(grads, method.transform.init(params), params, inputs=x, feature_cache=cache)
        return u

    a, b = updates(1.0), updates(3.0)
    head = _CASES["classification"]["head"]
    np.testing.assert_array_equal(head(a, 1)[0], head(b, 1)[0])
    np.testing.assert_array_equal(head(a, 1)[1], head(b, 1)[1])
    assert not np.allclose(head(a, 0)[0], head(b, 0)[0])


# ----------------------------------------------------------------------------- the train step under jit


@pytest.fixture(scope="module")
def lenet_task():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(16, 16, 16, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=(16, 2)).astype(np.int32)
    return Task(
        name="lenet16",
        model=MultiHeadLeNet(),
        kind="classification",
        task_names=("left", "right"),
        num_classes=10,
        train_data=ArrayDataset(x, y),
        eval_data=ArrayDataset(x[:8], y[:8]),
        sample_input=x[:1],
        defaults=TaskDefaults("sgd", 0.05, 8, 2),
    )


def test_recipe_train_step_under_jit(lenet_task):
    method = build_method(lenet_task, "mtsgd", 3, kernel_space="split")
    tr = Trainer(lenet_task, method, optax.sgd(0.05), batch_size=8, warmup_epochs=1)
    x, y = next(lenet_task.train_data.batches(8, seed=0, epoch=0))
    s0 = tr.init(0)
    s1, values = tr.step(s0, x, y)
    assert values.shape == (2, 3) and np.all(np.isfinite(np.asarray(values)))
    for a in jax.tree_util.tree_leaves(s1.params):
        assert np.all(np.isfinite(a))
    assert not np.array_equal(s1.params["heads"]["kernel"], s0.params["heads"]["kernel"])
    assert not np.array_equal(s1.params["encoder"]["fc"]["kernel"], s0.params["encoder"]["fc"]["kernel"])
    assert int(s1.opt_state[0].inner_states["encoder"].inner_state.count) == 1


def test_latent_features_fast_pass_equals_flax_module(lenet_task):
    """The split kernels' one forward pass (outputs and encoder output of every network): the fast
    ensemble pass equals the vmapped flax module, for the LeNet and the SARCOS MLP."""
    mlp_task = _task(SarcosMLP(num_inputs=3, hidden=(HIDDEN,), num_outputs=2), "regression")
    for task in (lenet_task, mlp_task):
        params = Trainer(task, build_method(task, "mtsgd", 2), optax.sgd(0.1), batch_size=8).init(0).params
        x = jnp.asarray(task.train_data.x[:8])
        run = jax.jit(lambda p, x, fast, task=task: recipe_mod.forward_with_latent(task, p, {}, x, train=True, fast=fast)[:2],
                      static_argnums=2)
        (out_f, lat_f), (out_v, lat_v) = run(params, x, True), run(params, x, False)
        assert lat_f.shape == lat_v.shape and lat_f.shape[:2] == (2, 8)
        np.testing.assert_allclose(out_f, out_v, rtol=0, atol=_tol(jnp.float32, out_v))
        np.testing.assert_allclose(lat_f, lat_v, rtol=0, atol=_tol(jnp.float32, lat_v))


# ----------------------------------------------------------------------------- warm-up


@pytest.mark.parametrize("m", [2, 3, 5, 8])
def test_warmup_preferences_k2_are_exactly_i_over_m_minus_1(m):
    w = warmup_preferences(m, 2)
    expected = np.array([[i / (m - 1), 1 - i / (m - 1)] for i in range(m)])
    np.testing.assert_array_equal(w, expected)


def test_warmup_preferences_single_network_is_uniform():
    np.testing.assert_array_equal(warmup_preferences(1, 2), [[0.5, 0.5]])
    np.testing.assert_array_equal(warmup_preferences(1, 4), [[0.25] * 4])
    np.testing.assert_array_equal(warmup_preferences(3, 1), [[1.0]] * 3)


@given(st.integers(2, 20), st.integers(3, 12))
def test_warmup_preferences_many_tasks_are_balanced_simplex_points(m, k):
    w = warmup_preferences(m, k)
    assert w.shape == (m, k)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(w >= -1e-15) and np.all(w <= 2.0 / k + 1e-15)
    np.testing.assert_allclose(w.mean(axis=0), 1.0 / k, atol=1e-12)  # every task gets the same total weight
    assert len({tuple(np.round(r, 12)) for r in w}) == m  # no two networks share a preference


def test_warmup_step_descends_the_preference_weighted_loss():
    task = _task(TwoHead())
    method = build_method(task, "mtsgd", 3, kernel_space="split")
    tr = Trainer(task, method, optax.sgd(1.0), batch_size=8, warmup_epochs=1)
    state = tr.init(1)
    x, y = next(task.train_data.batches(8, seed=0, epoch=0))
    new, _ = tr.warmup_step(state, x, y)
    _, grads, _ = jax.jit(tr._losses_and_grads)(state.params, {}, x, y)  # (K, P, ...)
    w = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]], np.float32)
    for p0, p1, g in zip(*(jax.tree_util.tree_leaves(t) for t in (state.params, new.params, grads))):
        expected = -np.einsum("pk,kp...->p...", w, np.asarray(g))
        np.testing.assert_allclose(np.asarray(p1) - np.asarray(p0), expected, rtol=0, atol=_tol(jnp.float32, expected))
    for a, b in zip(jax.tree_util.tree_leaves(new.opt_state[0]), jax.tree_util.tree_leaves(state.opt_state[0])):
        np.testing.assert_array_equal(a, b)


def test_resume_across_the_warmup_boundary(tmp_path):
    task = _task(TwoHead())

    def trainer(warmup=1):
        return Trainer(task, build_method(task, "mtsgd", 3, kernel_space="split"), optax.sgd(0.05),
                       batch_size=8, warmup_epochs=warmup, key_impl="rbg")

    tr = trainer()  # one trainer (its compiled steps) for the three runs
    full = tr.fit(3, seed=2, progress=False, checkpoint=False)
    assert [rec.get("warmup", False) for rec in full.history] == [True, False, False]
    assert full.config["warmup_epochs"] == 1 and full.config["kernel_space"] == "split"
    # method steps only after the warm-up: 2 epochs of 2 steps
    assert int(full.state.opt_state[0].inner_states["encoder"].inner_state.count) == 4
    out = tmp_path / "run"
    first = tr.fit(1, seed=2, out_dir=out, progress=False)
    assert int(first.state.opt_state[0].inner_states["encoder"].inner_state.count) == 0
    resumed = tr.fit(3, seed=2, out_dir=out, resume=True, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(resumed.state), jax.tree_util.tree_leaves(full.state)):
        np.testing.assert_array_equal(a, b)
    assert [rec.get("warmup", False) for rec in resumed.history] == [True, False, False]
    with pytest.raises(ResumeMismatchError, match="warmup_epochs") as exc:
        trainer(warmup=0).fit(3, seed=2, out_dir=out, resume=True, progress=False)
    assert exc.value.differences == {"warmup_epochs": (1, 0)}


def test_checkpoints_without_warmup_setting_read_as_no_warmup():
    assert _config_diff({"lr": 0.1}, {"lr": 0.1, "warmup_epochs": 0}) == {}
    assert _config_diff({"lr": 0.1}, {"lr": 0.1, "warmup_epochs": 1}) == {"warmup_epochs": (0, 1)}


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["moo_svgd", "mgda", "pareto_mtl", "linear_scalarization", "single_task"])
def test_split_with_a_method_that_cannot_take_it(name):
    with pytest.raises(ValueError, match=rf"kernel_space='split' is for method 'mtsgd' only.*{name}"):
        build_method(_task(TwoHead()), name, 3, kernel_space="split")
    with pytest.raises(ValueError, match="for method 'mtsgd' only"):
        make_method(name, 2, 3, kernel_space="split")


def test_split_with_a_model_without_heads():
    with pytest.raises(ValueError, match=r"no recognisable task heads.*\['enc', 'top'\].*register_head_layout"):
        build_method(_task(NoHeads()), "mtsgd", 3, kernel_space="split")


def test_split_with_a_model_without_latent_features():
    with pytest.raises(ValueError, match="NoFeatures.__call__ must accept return_features=True"):
        build_method(_task(NoFeatures()), "mtsgd", 3, kernel_space="split")


def test_split_without_heads_or_features_in_make_method():
    with pytest.raises(ValueError, match="needs heads="):
        make_method("mtsgd", 2, 3, kernel_space="split")


def test_head_labels_errors():
    shapes = {"enc": {"kernel": np.zeros((5, 4))}, "heads": {"kernel": np.zeros((4, 2, 3)), "bias": np.zeros((2, 3))}}
    enc = {"enc": {"kernel": "encoder"}}
    with pytest.raises(ValueError, match=r"labelled Head\(axis=2\) but that axis must exist and have size K = 2"):
        recipe_mod.head_labels({**enc, "heads": {"kernel": Head(axis=2), "bias": Head(axis=0)}}, shapes, 2)
    with pytest.raises(ValueError, match=r"head of task\(s\) \[1\]"):
        recipe_mod.head_labels({**enc, "heads": {"kernel": Head(task=0), "bias": Head(task=0)}}, shapes, 2)
    with pytest.raises(ValueError, match="no parameters are labelled 'encoder'"):
        recipe_mod.head_labels({"enc": {"kernel": Head(task=0)}, "heads": {"kernel": Head(axis=1), "bias": Head(axis=0)}}, shapes, 2)
    with pytest.raises(ValueError, match="do not match the parameters"):
        recipe_mod.head_labels({"heads": {"kernel": Head(axis=1), "bias": Head(axis=0)}}, shapes, 2)
    with pytest.raises(ValueError, match="exactly one of axis"):
        Head()
    labels = recipe_mod.head_labels(recipe_mod.head_layout(TwoHead()), shapes, 2)
    assert labels == {"enc": {"kernel": "encoder"}, "heads": {"kernel": Head(axis=1), "bias": Head(axis=0)}}


def test_per_task_head_modules_are_recognised():
    shapes = {"trunk": {"kernel": np.zeros((5, 4))}, "head_0": {"kernel": np.zeros((4, 3))}, "head_1": {"kernel": np.zeros((4, 3))}}
    labels = recipe_mod.head_labels(recipe_mod.head_layout(object()), shapes, 2)
    assert labels == {"trunk": {"kernel": "encoder"}, "head_0": {"kernel": Head(task=0)}, "head_1": {"kernel": Head(task=1)}}


def test_warmup_is_refused_for_single_task():
    task = _task(TwoHead())
    with pytest.raises(ValueError, match="warmup_epochs=1.*single_task"):
        Trainer(task, build_method(task, "single_task", 2), optax.sgd(0.1), batch_size=8, warmup_epochs=1)
    with pytest.raises(ValueError, match="warmup_epochs must be a non-negative int"):
        Trainer(task, build_method(task, "mtsgd", 2), optax.sgd(0.1), batch_size=8, warmup_epochs=-1)


# ----------------------------------------------------------------------------- the recipe switch


def test_train_recipe_published_and_overrides():
    task = _task(TwoHead())
    tr, res = train(task, "mtsgd", num_particles=2, epochs=0, batch_size=8, recipe="published", progress=False)
    assert tr.method.kernel_space == "split" and tr.warmup_epochs == 1
    assert res.config["optimizer"] == "momentum" and res.config["lr"] == 1e-3 and res.config["recipe"] == "published"
    tr2, res2 = train(task, "mtsgd", num_particles=2, epochs=0, batch_size=8, recipe="published",
                      lr=0.01, warmup_epochs=0, kernel_space="function", progress=False)
    assert tr2.method.kernel_space == "function" and tr2.warmup_epochs == 0 and res2.config["lr"] == 0.01
    tr3, _ = train(task, "mtsgd", num_particles=2, epochs=0, batch_size=8, progress=False)
    assert tr3.method.kernel_space == "parameter" and tr3.warmup_epochs == 0
    with pytest.raises(ValueError, match="unknown recipe 'paper'"):
        train(task, "mtsgd", num_particles=2, epochs=0, batch_size=8, recipe="paper", progress=False)


def test_recipe_optimizer_is_the_reference_codes_for_every_task():
    task = _task(TwoHead())
    adam = Task(**{**task.__dict__, "defaults": TaskDefaults("adam", 1e-4, 8, 2)})
    expected = {"kernel_space": "split", "warmup_epochs": 1, "optimizer": "momentum", "lr": 1e-3}
    assert recipe_mod.recipe_options("published", adam) == expected == recipe_mod.recipe_options("published", task)


def test_cli_recipe_reaches_train(monkeypatch):
    import types

    import mtsgd_jax.training as training
    from mtsgd_jax.cli import train as cli_train

    calls = []
    fake = types.SimpleNamespace(name="fake", num_tasks=2, train_data=[0] * 8, eval_data=[0] * 4, eval_name="test")
    monkeypatch.setattr(training, "make_task", lambda *a, **k: fake)

    class Stop(Exception):
        pass

    def fake_train(task, method, **kwargs):
        calls.append({k: kwargs[k] for k in ("recipe", "kernel_space", "warmup_epochs")})
        raise Stop

    monkeypatch.setattr(training, "train", fake_train)
    parser = argparse.ArgumentParser(prog="mtsgd")
    cli_train.register(parser.add_subparsers(dest="command"))
    for argv in (["--recipe", "published"], ["--recipe", "published", "--kernel-space", "parameter", "--warmup-epochs", "0"], []):
        args = parser.parse_args(["train", *argv, "--no-progress"])
        with pytest.raises(Stop):
            args.func(args)
    assert calls == [
        {"recipe": "published", "kernel_space": None, "warmup_epochs": None},
        {"recipe": "published", "kernel_space": "parameter", "warmup_epochs": 0},
        {"recipe": None, "kernel_space": None, "warmup_epochs": None},
    ]


@pytest.mark.parametrize("p", [3, 10])
def test_kernel_repulsion_on_long_feature_vectors(p):
    """The function-space kernels see long feature vectors (p > 4 takes the kernel's centred-GEMM
    path): the repulsion there is sum_a grad_{z_a} k(z_a, z_m) too, as for short ones."""
    from mtsgd_jax.kernels import kernel_products, rbf

    z = np.random.default_rng(p).normal(size=(5, p))
    h = 2.0
    got = np.asarray(jax.jit(lambda z: kernel_products(rbf(h), z, jnp.ones((5, 1))).repulsion)(jnp.asarray(z, jnp.float32)))
    diff = z[:, None, :] - z[None, :, :]  # [a, m] = z_a - z_m
    ref = np.einsum("am,amd->md", -2.0 / h * np.exp(-np.sum(diff**2, -1) / h), diff)
    np.testing.assert_allclose(got, ref, rtol=0, atol=C_ROUNDOFF * float(jnp.finfo(jnp.float32).eps) * np.abs(ref).max())
