"""The multi-task trainer: the jitted step of every method, function-space kernels, single-task
training, scalarised gradients, checkpoint / resume. (The end-to-end run on Multi-Digits that must
beat chance is in test_cli_train.py: it goes through ``mtsgd train``.)

Compilation dominates the cost, so one Trainer per method is built once (module fixture) and
shared by the tests; the networks are tiny LeNets on 16 x 16 inputs with M = 2.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest

from mtsgd_jax.models import MultiHeadLeNet, SarcosMLP
from mtsgd_jax.training import (
    METHODS,
    ArrayDataset,
    Task,
    TaskDefaults,
    Trainer,
    build_method,
    function_features,
    make_method,
    make_optimizer,
    make_task,
    summary_table,
)

M = 2
BATCH = 4


def _tiny_lenet_task():
    rng = np.random.default_rng(0)
    x = rng.random((12, 16, 16, 1), dtype=np.float32)
    y = rng.integers(0, 10, (12, 2)).astype(np.int32)
    return Task(
        name="tiny-lenet",
        model=MultiHeadLeNet(num_tasks=2, num_classes=10),
        kind="classification",
        task_names=("a", "b"),
        num_classes=10,
        train_data=ArrayDataset(x[:8], y[:8]),
        eval_data=ArrayDataset(x[8:], y[8:]),
        sample_input=np.zeros((1, 16, 16, 1), np.float32),
        defaults=TaskDefaults("sgd", 1e-2, BATCH, 1),
    )


@pytest.fixture(scope="module")
def task():
    return _tiny_lenet_task()


_TRAINERS = {}


def _trainer(task, name, kernel_space="parameter", optimizer=None):
    key = (name, kernel_space)
    if key not in _TRAINERS:
        method = build_method(task, name, M, kernel_space=kernel_space)
        _TRAINERS[key] = Trainer(task, method, optimizer or make_optimizer("adam", 1e-2), batch_size=BATCH, key_impl="rbg")
    return _TRAINERS[key]


def _batch(task):
    return task.train_data.x[:BATCH], task.train_data.y[:BATCH]


# MOO-SVGD runs with the function-space kernel here, MT-SGD with both (see test_function_space_kernel).
KERNEL_SPACE = {"moo_svgd": "function"}


@pytest.mark.parametrize("name", METHODS)
def test_train_step_is_one_jitted_function_for_every_method(task, name):
    tr = _trainer(task, name, KERNEL_SPACE.get(name, "parameter"))
    p = tr.method.num_particles
    assert p == (2 * M if name == "single_task" else M)
    state = tr.init(0)
    x, y = _batch(task)
    new, values = tr.step(state, x, y)
    new, values2 = tr.step(new, x, y)
    assert tr.step._cache_size() == 1  # the second call reused the compiled step
    assert values.shape == (2, p)
    assert np.all(np.isfinite(np.asarray(values2)))
    # every network moved; nothing became non-finite; dtypes kept
    moved = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).reshape(p, -1).max(1), state.params, new.params)
    assert np.all(np.max(np.stack(jax.tree_util.tree_leaves(moved)), axis=0) > 0)
    for old, leaf in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(new.params)):
        assert leaf.dtype == old.dtype and bool(jnp.all(jnp.isfinite(leaf)))
    if name not in ("pareto_mtl", "moo_svgd"):
        # Two Adam steps on one batch lower the mean loss. Not asserted for Pareto MTL (its initial
        # phase descends the violated constraints only) nor for function-space MOO-SVGD (its
        # repulsion, pulled back from 80 outputs, outweighs the mean-loss gradients of 2 networks).
        assert float(values2.mean()) < float(values.mean())


def test_single_task_sets_train_only_their_own_task(task):
    tr = _trainer(task, "single_task")
    assert tr.method.assignment.tolist() == [0, 0, 1, 1]
    state = tr.init(0)
    new, _ = tr.step(state, *_batch(task))
    before = np.asarray(state.params["heads"]["kernel"])  # (P, 50, T, C)
    after = np.asarray(new.params["heads"]["kernel"])
    for p, t in enumerate(tr.method.assignment):
        assert np.any(after[p, :, t] != before[p, :, t])  # its own head moved
        np.testing.assert_array_equal(after[p, :, 1 - t], before[p, :, 1 - t])  # the other head did not
    metrics = tr.evaluate(new)
    for t, name in enumerate(task.task_names):
        assert len(metrics["tasks"][name]["particle_accuracy"]) == M  # each task: its own set only


def test_function_space_kernel(task):
    feats = function_features(task)
    tr = _trainer(task, "mtsgd", kernel_space="function")
    assert tr.method.kernel_space == "function"
    state = tr.init(0)
    x, y = _batch(task)
    f = feats(state.params, inputs=x, losses=jnp.zeros((2, M)))
    assert f.shape == (M, BATCH * 2 * 10)
    np.testing.assert_allclose(np.asarray(jnp.exp(f).reshape(M, BATCH, 2, 10).sum(-1)), 1.0, rtol=1e-5)  # log-probs
    new, values = tr.step(state, x, y)
    assert np.all(np.isfinite(np.asarray(values)))
    diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, new.params)
    assert max(jax.tree_util.tree_leaves(diff)) > 0
    for name in ("mtsgd", "moo_svgd"):
        with pytest.raises(ValueError, match="needs features"):
            make_method(name, 2, M, kernel_space="function")


def test_scalarised_gradient_equals_the_linear_scalarization_transform():
    """One VJP of sum_k w_k L_k (what linear scalarisation / single-task compute) equals the
    library's linear_scalarization transform applied to the K per-task gradients."""
    from mtsgd_jax.transforms import linear_scalarization, preference_vectors

    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = rng.normal(size=(8, 2)).astype(np.float32)
    task = Task("tiny-mlp", SarcosMLP(num_inputs=3, hidden=(4,), num_outputs=2), "regression", ("u", "v"), None,
                ArrayDataset(x, y), ArrayDataset(x, y), np.zeros((1, 3), np.float32))
    ls = Trainer(task, make_method("linear_scalarization", 2, 3, ls_weights="spread"), optax.sgd(0.1), batch_size=8, key_impl="rbg")
    per_task = Trainer(task, make_method("mgda", 2, 3), optax.sgd(0.1), batch_size=8, key_impl="rbg")
    state = ls.init(0)
    _, g_scal, _ = jax.jit(ls._losses_and_grads)(state.params, state.model_state, x, y)
    values, g_tasks, _ = jax.jit(per_task._losses_and_grads)(state.params, state.model_state, x, y)
    t = linear_scalarization(2, preference_vectors(3, 2))
    expected, _ = t.update(g_tasks, t.init(state.params), state.params)
    for a, b in zip(jax.tree_util.tree_leaves(g_scal), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # the regression metrics
    metrics = per_task.evaluate(state)
    assert set(metrics["tasks"]) == {"u", "v"} and len(metrics["tasks"]["u"]["particle_mse"]) == 3
    mean_pred = np.asarray(per_task.predict(state)["predictions"]).mean(0)
    np.testing.assert_allclose(metrics["tasks"]["v"]["ensemble_mse"], np.mean((mean_pred[:, 1] - y[:, 1]) ** 2), rtol=1e-5)
    assert "ensemble mse" in summary_table(task, metrics)


def test_checkpoint_resume_reproduces_the_uninterrupted_run(task, tmp_path):
    tr = _trainer(task, "pareto_mtl")  # Adam state + the method's own (bool, int) state
    straight = tr.fit(2, seed=3, out_dir=tmp_path / "a", progress=False)
    first = tr.fit(1, seed=3, out_dir=tmp_path / "b", progress=False)
    assert len(first.history) == 1
    resumed = tr.fit(2, seed=3, out_dir=tmp_path / "b", resume=True, progress=True)
    for a, b in zip(jax.tree_util.tree_leaves(straight.state), jax.tree_util.tree_leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = [json.loads(s) for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in lines] == [1, 2]
    assert set(lines[-1]) >= {"epoch", "train_loss", "eval", "seconds", "steps"}
    assert set(lines[-1]["train_loss"]) == {"a", "b"}
    ev = lines[-1]["eval"]
    for key in ("ensemble_accuracy", "mean_particle_accuracy", "brier", "ece", "nll"):
        assert key in ev and key in ev["tasks"]["a"]
    assert lines[-1]["eval"] == straight.history[-1]["eval"]
    # a checkpoint from another configuration is refused
    other = _trainer(task, "mgda")
    with pytest.raises(ValueError, match="another configuration"):
        other.fit(2, seed=3, out_dir=tmp_path / "b", resume=True, progress=False)


def test_registry_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        make_task("mnist-3")
    with pytest.raises(FileNotFoundError, match="sarcos_inv.mat"):
        make_task("sarcos", tmp_path)
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt"):
        make_task("celeba", tmp_path)
    with pytest.raises(FileNotFoundError, match="mnist"):
        make_task("multi-mnist", tmp_path)
    with pytest.raises(ValueError, match="unknown method"):
        make_method("gradnorm", 2, 3)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("rmsprop", 1e-3)


def _program(t, x, grads, losses):
    """The jaxpr (text and constants) of one init + update of ``t``: equal programs compute equal updates."""
    closed = jax.make_jaxpr(lambda x, g, l: t.update(g, t.init(x), x, losses=l))(x, grads, losses)
    return str(closed.jaxpr), [np.asarray(c) for c in closed.consts]


def _same_program(a, b):
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    return all(p.dtype == q.dtype and p.shape == q.shape and np.array_equal(p, q) for p, q in zip(a[1], b[1]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_make_method_builds_the_registered_transformation(dtype):
    """make_method's transformation is the factory's, with make_method's options and the
    pass-through ones (traced programs compared: no compilation)."""
    from mtsgd_jax.transforms import mgda, moo_svgd, mtsgd, pareto_mtl

    k, m = 3, 4
    x = jax.random.normal(jax.random.key(0), (m, 5), dtype)
    grads = x[None] - jnp.arange(k, dtype=dtype)[:, None, None]
    losses = 0.5 * jnp.sum(grads**2, axis=-1)
    cases = [
        (dict(name="mtsgd", weighting="score", warm_start=False, block_size=2), mtsgd(k, weighting="score", warm_start=False, block_size=2), mtsgd(k)),
        (dict(name="moo_svgd", repulsion=0.5, normalize_grads=True), moo_svgd(k, repulsion=0.5, normalize_grads=True), moo_svgd(k)),
        (dict(name="mgda", normalize_grads=True, solver="projected_gradient"), mgda(k, normalize_grads=True, solver="projected_gradient"), mgda(k)),
        (dict(name="pareto_mtl", pareto_warmup_steps=0, normalize_weights=True), pareto_mtl(k, warmup_steps=0, normalize_weights=True), pareto_mtl(k)),
    ]
    for kwargs, direct, default in cases:
        method = make_method(num_tasks=k, num_particles=m, **kwargs)
        got = _program(method.transform, x, grads, losses)
        assert _same_program(got, _program(direct, x, grads, losses)), kwargs
        assert not _same_program(got, _program(default, x, grads, losses)), kwargs  # the options changed the program
        assert method.scalarization is None and method.num_particles == m and method.num_tasks == k


def test_method_specs_and_option_errors():
    from mtsgd_jax.training import methods

    assert methods.parse_method("mtsgd") == ("mtsgd", {})
    assert methods.parse_method(" mtsgd:weighting=score, warm_start=0 ") == ("mtsgd", {"weighting": "score", "warm_start": False})
    assert methods.parse_method("moo_svgd:repulsion=2,normalize_grads=yes") == ("moo_svgd", {"repulsion": 2.0, "normalize_grads": True})
    assert methods.parse_method("pareto_mtl:warmup_steps=10,solver=enumerate") == ("pareto_mtl", {"pareto_warmup_steps": 10, "solver": "enumerate"})
    assert methods.parse_method("linear_scalarization:ls_weights=spread") == ("linear_scalarization", {"ls_weights": "spread"})
    assert methods.parse_method("single_task") == ("single_task", {})
    # every parsed spec is accepted by make_method
    for spec in ("mtsgd:weighting=normalized,block_size=8", "pareto_mtl:warmup_steps=0", "linear_scalarization:ls_weights=spread"):
        name, options = methods.parse_method(spec)
        assert make_method(name, 2, 3, **options).name == name
    bad = [
        ("svgd", r"unknown method 'svgd'.*choose one of \('mtsgd', 'moo_svgd', 'mgda', 'linear_scalarization', 'pareto_mtl', 'single_task'\)"),
        ("mtsgd:weighting=scores", r"option 'weighting' of mtsgd must be one of \('stein', 'normalized', 'score'\)"),
        ("mgda:ls_weights=spread", r"unknown option 'ls_weights' for mgda; valid options: solver, normalize_grads, warm_start"),
        ("linear_scalarization:ls_weights=even", r"option 'ls_weights': expected one of \('uniform', 'spread'\), got 'even'"),
        ("linear_scalarization:weights=1", r"unknown option 'weights' for linear_scalarization; valid options: ls_weights\."),
        ("single_task:ls_weights=spread", "single_task takes no options"),
        ("moo_svgd:repulsion=lots", r"option 'repulsion' of moo_svgd: expected a number, got 'lots'"),
    ]
    for spec, match in bad:
        with pytest.raises(ValueError, match=match):
            methods.parse_method(spec)
    with pytest.raises(ValueError, match="pass pareto_warmup_steps= instead"):
        make_method("pareto_mtl", 2, 3, warmup_steps=5)
    with pytest.raises(ValueError, match=r"mgda has no option\(s\) \['block_size'\]"):
        make_method("mgda", 2, 3, block_size=4)
    with pytest.raises(ValueError, match=r"no transformation options; got \['warm_start'\]"):
        make_method("linear_scalarization", 2, 3, warm_start=False)
    with pytest.raises(ValueError, match=r"ls_weights must be one of \('uniform', 'spread'\)"):
        make_method("linear_scalarization", 2, 3, ls_weights="even")


class _TinyBN(nn.Module):
    """Dense + batch norm + 2 two-way heads: the batch-norm path of the ResNet task, in miniature."""

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Dense(4)(x.reshape((x.shape[0], -1)))
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(h))
        return nn.Dense(2 * 2)(h).reshape((-1, 2, 2))


def test_batch_norm_statistics_are_trained_and_used_per_particle():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(8, 3)) * 3 + 5).astype(np.float32)
    y = rng.integers(0, 2, (8, 2)).astype(np.int32)
    task = Task("tiny-bn", _TinyBN(), "classification", ("a", "b"), 2, ArrayDataset(x, y), ArrayDataset(x, y),
                np.zeros((1, 3), np.float32), batch_norm=True)
    tr = Trainer(task, make_method("mgda", 2, 2), optax.sgd(0.1), batch_size=8, key_impl="rbg")
    state = tr.init(0)
    assert set(state.model_state) == {"batch_stats"}
    new, _ = tr.step(state, x, y)
    mean = np.asarray(new.model_state["batch_stats"]["BatchNorm_0"]["mean"])  # (P, 4)
    assert mean.shape == (2, 4) and not np.allclose(mean, 0.0)
    assert not np.allclose(mean[0], mean[1])  # each network keeps its own statistics
    # evaluation uses the running averages (train=False): equal to a manual apply
    probs = tr.predict(new)["probs"]
    p0 = jax.tree_util.tree_map(lambda a: a[0], new.params)
    s0 = jax.tree_util.tree_map(lambda a: a[0], new.model_state)
    manual = jax.nn.softmax(task.model.apply({"params": p0, **s0}, x, train=False), -1)
    np.testing.assert_allclose(probs[0], np.asarray(manual), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- resume you can trust, honest progress

import copy  # noqa: E402
import glob  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

from mtsgd_jax.training.checkpoint import CheckpointDamagedWarning, CheckpointError, StateMismatchError  # noqa: E402
from mtsgd_jax.training.trainer import ResumeMismatchError  # noqa: E402


def _assert_same_state(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _with_settings(tr, **settings):
    """The same trainer (same compiled step) described by other settings: what a run built with another
    learning rate or weighting records. Only the record matters to resume's comparison."""
    other = copy.copy(tr)
    other.settings = {**tr.settings, **settings}
    return other


def _flip_array_bytes(ckpt_dir, epoch):
    files = [f for f in glob.glob(os.path.join(ckpt_dir, str(epoch), "state", "**"), recursive=True) if os.path.isfile(f)]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_resume_from_a_damaged_checkpoint_falls_back_and_still_equals_the_uninterrupted_run(task, tmp_path):
    tr = _trainer(task, "pareto_mtl")
    straight = tr.fit(3, seed=3, out_dir=tmp_path / "a", progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ckpt_dir = str(tmp_path / "b" / "checkpoints")
    _flip_array_bytes(ckpt_dir, 3)
    with pytest.warns(CheckpointDamagedWarning, match=r"checkpoint epoch 3 in .* is damaged \(.+\); resuming from epoch 2"):
        resumed = tr.fit(3, seed=3, out_dir=tmp_path / "b", resume=True, progress=False)
    _assert_same_state(straight.state, resumed.state)
    lines = [json.loads(s) for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert lines[-1]["train_loss"] == straight.history[-1]["train_loss"]
    assert os.path.isdir(str(tmp_path / "b" / "checkpoints.damaged" / "3"))  # kept for inspection
    again = tr.fit(3, seed=3, out_dir=tmp_path / "b", resume=True, progress=False)  # epoch 3 saved again, intact
    _assert_same_state(straight.state, again.state)
    # every epoch damaged: a clear error, nothing trained
    _flip_array_bytes(ckpt_dir, 3)
    _flip_array_bytes(ckpt_dir, 2)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint(.|\n)*epoch 3: (.|\n)*epoch 2: "):
        tr.fit(3, seed=3, out_dir=tmp_path / "b", resume=True, progress=False)


def test_resume_after_an_interruption_mid_epoch_equals_the_uninterrupted_run(task, tmp_path):
    tr = _trainer(task, "pareto_mtl")
    straight = tr.fit(2, seed=5, out_dir=tmp_path / "a", progress=False)
    interrupted = copy.copy(tr)
    calls = []

    def step(state, x, y):
        calls.append(1)
        if len(calls) == 3:  # the second epoch's first step (2 steps per epoch)
            raise KeyboardInterrupt
        return tr.step(state, x, y)

    interrupted.step = step
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(2, seed=5, out_dir=tmp_path / "b", progress=False)
    resumed = tr.fit(2, seed=5, out_dir=tmp_path / "b", resume=True, progress=False)
    _assert_same_state(straight.state, resumed.state)
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_resume_refuses_changed_settings_unless_allowed(task, tmp_path):
    base = _with_settings(_trainer(task, "mtsgd"), optimizer="adam", lr=0.01, weighting="stein")
    out = tmp_path / "run"
    first = base.fit(1, seed=2, out_dir=out, progress=False)
    assert first.config["lr"] == 0.01 and first.config["param_dtypes"] == ["float32"]
    assert first.config["setting_changes"] == []
    saved = (out / "metrics.jsonl").read_text()

    changed = _with_settings(base, lr=0.001, weighting="normalized")
    with pytest.raises(ResumeMismatchError, match="another configuration") as exc:
        changed.fit(1, seed=2, out_dir=out, resume=True, progress=False)
    assert exc.value.differences == {"lr": (0.01, 0.001), "weighting": ("stein", "normalized")}
    assert "lr: saved 0.01, requested 0.001" in str(exc.value) and "weighting: saved 'stein'" in str(exc.value)
    assert (out / "metrics.jsonl").read_text() == saved  # nothing touched
    # the seed is a setting too; the number of epochs is not
    with pytest.raises(ResumeMismatchError) as exc:
        base.fit(1, seed=3, out_dir=out, resume=True, progress=False)
    assert exc.value.differences == {"seed": (2, 3)}
    # allowing only part of the changes still refuses, listing the rest
    with pytest.raises(ResumeMismatchError) as exc:
        changed.fit(1, seed=2, out_dir=out, resume=True, progress=False, allow_changed=["lr"])
    assert exc.value.differences == {"weighting": ("stein", "normalized")}
    with pytest.raises(ValueError, match=r"unknown settings \['learning_rate'\]"):
        changed.fit(1, seed=2, out_dir=out, resume=True, progress=False, allow_changed="lr,learning_rate")
    # allowed: continues, and the result reports the settings used and the change
    res = changed.fit(1, seed=2, out_dir=out, resume=True, progress=False, allow_changed="lr,weighting,epochs")
    assert res.config["lr"] == 0.001 and res.config["weighting"] == "normalized" and res.config["epochs"] == 1
    assert res.config["setting_changes"] == [
        {"epoch": 1, "changed": {"lr": {"saved": 0.01, "requested": 0.001},
                                 "weighting": {"saved": "stein", "requested": "normalized"}}}
    ]
    # another number of particles: a settings error listing it, not an orbax traceback
    with pytest.raises(ResumeMismatchError) as exc:
        _trainer(task, "single_task").fit(1, seed=2, out_dir=out, resume=True, progress=False)
    assert exc.value.differences["num_particles"] == (M, 2 * M) and exc.value.differences["method"] == ("mtsgd", "single_task")
    # a change whose state does not fit, even when allowed: the arrays that differ are named
    sgd = Trainer(task, base.method, make_optimizer("sgd", 0.01), batch_size=BATCH, key_impl="rbg",
                  settings={**base.settings, "optimizer": "sgd"})
    with pytest.raises(StateMismatchError, match=r"opt_state"):
        sgd.fit(1, seed=2, out_dir=out, resume=True, progress=False, allow_changed=["optimizer"])


class _RecordingBar:
    """Stands in for tqdm: checks at every update that the steps it counts have finished."""

    instances: list = []

    def __init__(self, total, **_):
        self.total, self.n, self.dispatched_at_update = total, 0, []
        _RecordingBar.instances.append(self)

    def update(self, k):
        self.n += k
        assert all(v.is_ready() for v in _DISPATCHED[: self.n]), "the bar counted a step that had not finished"
        self.dispatched_at_update.append(len(_DISPATCHED))

    def close(self):
        pass


_DISPATCHED: list = []


@jax.jit
def _slow_identity(values, a):
    """``values`` again (exactly), ready only after some milliseconds of matrix products."""
    for _ in range(4):
        a = jnp.tanh(a @ a)
    return values + 0.0 * jnp.sum(a).astype(values.dtype)


def test_progress_bar_counts_finished_steps_not_dispatched_ones(task, monkeypatch):
    import tqdm.auto

    tr = _trainer(task, "mgda")
    big = jnp.full((400, 400), 1e-3, jnp.float32)
    _slow_identity(jnp.zeros((2, M), jnp.float32), big).block_until_ready()  # compiled before timing matters
    slow = copy.copy(tr)

    def step(state, x, y):
        state, values = tr.step(state, x, y)
        values = _slow_identity(values, big)  # dispatched asynchronously: not ready on return
        _DISPATCHED.append(values)
        return state, values

    slow.step = step
    monkeypatch.setattr(tqdm.auto, "tqdm", _RecordingBar)
    _DISPATCHED.clear()
    _RecordingBar.instances.clear()
    state = tr.init(0)
    new, loss, _, steps = slow.train_epoch(state, seed=0, epoch=0, progress=True)
    (bar,) = _RecordingBar.instances
    assert steps == 2 and bar.total == 2 and bar.n == 2
    assert bar.dispatched_at_update == [2, 2]  # one step kept in flight while waiting for the previous one
    # the losses are the step's own (the slow identity is exact)
    ref, ref_loss, _, _ = tr.train_epoch(state, seed=0, epoch=0, progress=False)
    np.testing.assert_array_equal(loss, ref_loss)
    _assert_same_state(new, ref)
