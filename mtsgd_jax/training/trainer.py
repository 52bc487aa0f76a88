"""Training a particle set of networks on a multi-task problem, with one jitted step.

:class:`Trainer` ties a :class:`~mtsgd_jax.training.Task`, a
:class:`~mtsgd_jax.training.Method` and an optimiser together:

* **the step** (:meth:`Trainer.step`, ONE ``jax.jit``-compiled function): the
  forward pass of every network on the batch (all networks in one batched
  computation, :meth:`Task.ensemble_forward`), the K per-task losses and their
  gradients (the pass's VJP applied to the K cotangents; one cotangent of
  the scalarisation weights for linear scalarisation / single-task; the
  function-space and split kernels' features from the same pass, and the
  kernels' cotangent on the whole-network features pulled back in the same
  VJP computation as the K task cotangents, see :meth:`Trainer._forward_and_grads`), the method's
  transformation (which also receives ``losses=`` (K, P), ``inputs=`` and
  ``model_state=`` as extra arguments), the optimiser, the parameter update,
  and the new batch-norm statistics (ResNet);
* **evaluation** (:meth:`Trainer.evaluate`): per-particle and ensemble
  (mean of the particles' probabilities) metrics per task: accuracy, Brier
  score, ECE (10 bins) and NLL for classification; MSE for regression.
  Single-task training evaluates each task's own particle set on that task;
* **the loop** (:meth:`Trainer.fit`): epochs of deterministic shuffled
  mini-batches (order from ``(seed, epoch)``; the last partial batch is dropped
  so the step compiles once), a tqdm bar per epoch, one JSON line per epoch
  (epoch, train loss per task, evaluation metrics, seconds), and orbax
  checkpoints at epoch ends; ``resume=True`` continues from the newest intact
  one (damaged ones are skipped with a warning, see
  :mod:`~mtsgd_jax.training.checkpoint`) and reproduces the uninterrupted run.
  Every setting that changes the run is recorded in the checkpoints
  (:meth:`Trainer.config` plus the seed and the parameter dtypes); resuming
  with other settings raises :class:`ResumeMismatchError` listing each
  difference, unless ``allow_changed=`` names them (the number of epochs can
  always change).

The epoch bar counts steps that have finished on the device, not steps
dispatched (JAX dispatches asynchronously): before advancing it waits for the
previous step's (K, P) loss values, keeping one step in flight.

:func:`train` builds everything from names (what ``mtsgd train`` calls).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtsgd_jax.metrics.calibration import brier_score, expected_calibration_error
from mtsgd_jax.models import init_ensemble
from mtsgd_jax.training import checkpoint as _ckpt
from mtsgd_jax.training import recipe as _recipe
from mtsgd_jax.training.methods import Method, make_method, make_optimizer
from mtsgd_jax.training.tasks import Task, make_task

__all__ = [
    "ResumeMismatchError",
    "TrainState",
    "TrainResult",
    "Trainer",
    "build_method",
    "function_features",
    "summary_rows",
    "summary_table",
    "train",
]

PyTree = Any


class TrainState(NamedTuple):
    """Everything that changes during training: ``params`` (leaves (P, ...)), the
    non-parameter collections ``model_state`` (e.g. ``{"batch_stats": ...}``,
    leaves (P, ...); ``{}`` without batch norm) and the optimiser state."""

    params: PyTree
    model_state: dict
    opt_state: PyTree


class TrainResult(NamedTuple):
    """What :meth:`Trainer.fit` returns.

    Attributes:
      state: the final :class:`TrainState`.
      history: one dict per epoch (what the JSON-lines log holds).
      metrics: the final evaluation (see :meth:`Trainer.evaluate`).
      outputs: the final evaluation outputs (``probs`` (P, N, K, C) or
        ``predictions`` (P, N, K), and ``targets`` (N, K)) when requested, else None.
      config: the settings the run used (:meth:`Trainer.config`, ``seed``,
        ``param_dtypes``, ``jax_enable_x64``), ``epochs`` (completed) and
        ``setting_changes``: one ``{"epoch": e, "changed": {name: {"saved": a,
        "requested": b}}}`` per resume that changed settings (``allow_changed``).
    """

    state: TrainState
    history: list
    metrics: dict
    outputs: dict | None
    config: dict | None = None


class ResumeMismatchError(ValueError):
    """Resuming with settings other than the checkpoint's; ``differences`` maps each
    setting to ``(saved, requested)``."""

    def __init__(self, message: str, differences: dict):
        super().__init__(message)
        self.differences = differences


# Settings that never change the run (recorded, never compared).
_NOT_COMPARED = ("epochs",)
# What a setting absent from an older checkpoint's config stood for.
_CONFIG_DEFAULTS = {"warmup_epochs": 0, "recipe": None}
# make_method options that each method uses (the others are ignored by it and not recorded).
_METHOD_OPTIONS = {
    "mtsgd": ("weighting", "solver"),
    "moo_svgd": ("repulsion", "normalize_grads", "solver"),
    "mgda": ("normalize_grads", "solver"),
    "pareto_mtl": ("preferences", "pareto_warmup_steps", "normalize_grads", "solver"),
    "linear_scalarization": ("ls_weights",),
    "single_task": (),
}
# make_task options that do not change the data (where caches go, how many reader threads).
_TASK_OPTIONS_IGNORED = ("cache_dir", "num_threads")


def _jsonable(value):
    """``value`` as plain JSON (arrays -> lists, tuples -> lists)."""
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return json.loads(json.dumps(value))


_precomputed = _recipe._precomputed


# Features whose pullback runs through the whole network (the step batches their VJP with the
# per-task gradients'); the split kernels' head features only reach their head.
_WHOLE_NETWORK_FEATURES = ("outputs", "latent")
# At most this many cotangents are pulled back one after another (lax.map) through a fast ensemble pass.
_SEQUENTIAL_PULLBACKS = 8


def _pull_each(vjp: Callable, *cts, sequential: bool):
    """``vjp`` applied to each cotangent along the leading axis of ``cts`` (C of them); leaves stacked (C, ...).

    With ``sequential`` (the trainer passes whether the registered fast ensemble
    pass runs) and at most 8 cotangents, they go one after another through
    ``lax.map``: each pass is then a plain backward pass, where a vmapped one
    puts the cotangent axis outermost on every intermediate and XLA's CPU
    backend transposes the activations' gradients for each weight-gradient GEMM
    (one thread, interleaved: the LeNet MT-SGD step 354 -> 332 ms, K = 2; the
    SARCOS step 141 -> 110 ms, K = 7). Otherwise they are vmapped: through the
    vmapped flax module (grouped convolutions) sequential passes took twice as
    long on LeNet, and with many cotangents and small per-network batches (the
    ResNet case, K = 40, 4 images) one batched pass is several times faster.
    """
    if sequential and jax.tree_util.tree_leaves(cts)[0].shape[0] <= _SEQUENTIAL_PULLBACKS:
        return jax.lax.map(lambda c: vjp(*c), cts)
    return jax.vmap(vjp)(*cts)


def _cached(feature_cache, name="outputs"):
    """The ``(features, pullback)`` pair ``name`` of a feature cache (a dict of named pairs, or one pair)."""
    if isinstance(feature_cache, dict):
        return feature_cache.get(name)
    return feature_cache


def function_features(task: Task, num_examples: int | None = None, *, fast: bool = True) -> Callable:
    """Feature map of the function-space kernel: each network's outputs on the current batch.

    Returns ``features(params, *, inputs, model_state=None, feature_cache=None, **_) -> (P, p)``:
    row p is network p's log-probabilities (classification) or predictions
    (regression) on ``inputs`` (the batch, passed by the trainer as an extra
    argument), flattened; with ``num_examples`` only the batch's first
    ``num_examples`` inputs are used (cheaper). Batch-norm networks run in
    training mode (batch statistics), like the loss. ``feature_cache``, passed
    by :class:`Trainer` (full batch only), is ``{"outputs": (features (P, p), pullback)}``
    from the step's own forward pass (a bare pair is accepted too): the features
    are then not computed again and their VJP reuses that pass. ``fast``: use the task's fast ensemble
    forward pass when it has one (:meth:`Task.ensemble_forward`).
    """

    def features(params, *, inputs=None, model_state=None, feature_cache=None, **_):
        cached = _cached(feature_cache)
        if cached is not None and num_examples is None:
            feats, pullback = cached
            return _precomputed(params, feats, pullback)
        if inputs is None:
            raise ValueError("function-space kernel: the update needs the batch, extra argument inputs=x.")
        x = inputs if num_examples is None else inputs[:num_examples]
        out, _ = task.ensemble_forward(params, model_state or {}, x, train=True, fast=fast)
        return jax.vmap(task.function_outputs)(out)

    return features


def build_method(
    task: Task,
    name: str,
    num_particles: int,
    *,
    kernel_space: str = "parameter",
    feature_examples: int | None = None,
    fast: bool = True,
    **options,
) -> Method:
    """:func:`~mtsgd_jax.training.make_method` for ``task``, with the function-space features built in.

    ``kernel_space="split"`` (``mtsgd`` only): the heads are found in
    ``task.model``'s parameters (:func:`~mtsgd_jax.training.recipe.head_layout`;
    ``heads=`` overrides) and checked now, and the latent / head features come
    from :func:`~mtsgd_jax.training.recipe.split_features`. ``feature_examples``:
    the kernels see only the batch's first this many examples (the features are
    then computed again instead of reused from the step's forward pass).
    ``fast`` (default True): the features use the task's fast ensemble forward pass.

    Raises:
      ValueError: ``"split"`` with another method than ``mtsgd``, or a model
        without recognisable heads or without ``return_features=``.
    """
    if kernel_space == "split":
        if name == "mtsgd":
            _recipe.check_latent_features(task.model)
            layout = options.pop("heads", None) or _recipe.head_layout(task.model)
            shapes = _param_shapes(task)
            labels = _recipe.head_labels(layout, shapes, task.num_tasks)
            options.update(heads=labels, reuse_cache=feature_examples is None)
        feats = _recipe.split_features(task, feature_examples, fast=fast)
    else:
        feats = function_features(task, feature_examples, fast=fast) if kernel_space == "function" else None
    return make_method(name, task.num_tasks, num_particles, kernel_space=kernel_space, features=feats, **options)


def _param_shapes(task: Task):
    """ONE network's parameter shapes (``jax.ShapeDtypeStruct`` leaves), without computing anything."""
    variables = jax.eval_shape(
        lambda k: task.model.init(k, jnp.asarray(task.sample_input), **task.init_kwargs()), jax.random.key(0)
    )
    return variables["params"]


def _task_weights(method: Method) -> np.ndarray:
    """(K, P) rows averaging over the particles that serve each task."""
    k, p = method.num_tasks, method.num_particles
    if method.assignment is None:
        return np.full((k, p), 1.0 / p)
    a = (np.asarray(method.assignment)[None, :] == np.arange(k)[:, None]).astype(float)
    return a / a.sum(axis=1, keepdims=True)


class Trainer:
    """Train a particle set of ``task.model`` networks with ``method`` (see the module docstring).

    Args:
      task: a :class:`~mtsgd_jax.training.Task`.
      method: a :class:`~mtsgd_jax.training.Method` (P networks).
      optimizer: an optax transformation descending the method's direction
        (e.g. :func:`~mtsgd_jax.training.make_optimizer`); default the task's.
      batch_size: training batch size (default the task's).
      eval_batch_size: evaluation batch size (default ``max(batch_size, 256)``).
      key_impl: PRNG implementation of the initialisation key (e.g. ``"rbg"``,
        which compiles faster on CPU); default JAX's.
      settings: JSON-serialisable ``{name: value}`` of what built ``method`` and
        ``optimizer`` that the trainer cannot see (e.g. ``{"optimizer": "adam",
        "lr": 1e-3, "weighting": "stein"}``; :func:`train` fills it). Part of
        :meth:`config`: recorded in checkpoints and compared on resume.
      fast: run the P networks through the task's fast ensemble forward pass
        when its model has one (:func:`mtsgd_jax.models.ensemble_forward`);
        ``False`` always vmaps the flax module (same results up to
        floating-point reassociation).
      warmup_epochs: the first this many epochs (default 0) descend the linear
        scalarisation ``sum_k w_ik L_k`` on network i, with the preferences ``w``
        (P, K) of :func:`~mtsgd_jax.training.recipe.warmup_preferences` (K = 2:
        ``(i / (P - 1), 1 - i / (P - 1))``); then ``method``. The warm-up step
        (:meth:`warmup_step`) moves the optimiser's state but not the method's.
        Part of :meth:`config`, so a resumed run knows whether it is still in
        the warm-up. Not for ``single_task`` (its networks serve one task each).
    """

    def __init__(
        self,
        task: Task,
        method: Method,
        optimizer: optax.GradientTransformation | None = None,
        *,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        key_impl: str | None = None,
        settings: dict | None = None,
        fast: bool = True,
        warmup_epochs: int = 0,
    ):
        if method.num_tasks != task.num_tasks:
            raise ValueError(f"method has K={method.num_tasks} tasks but task {task.name!r} has K={task.num_tasks}.")
        self.task = task
        self.method = method
        if optimizer is None:
            optimizer = make_optimizer(task.defaults.optimizer, task.defaults.lr)
        self.optimizer = optimizer
        self.tx = optax.chain(method.transform, optimizer)
        self.batch_size = int(batch_size or task.defaults.batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if len(task.train_data) < self.batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} exceeds the {len(task.train_data)} training examples "
                "(the last partial batch is dropped, so an epoch would be empty)."
            )
        self.eval_batch_size = int(eval_batch_size or max(self.batch_size, 256))
        self.key_impl = key_impl
        self.fast = bool(fast)
        try:
            self.settings = _jsonable(dict(settings or {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"settings must be a JSON-serialisable dict, got {settings!r} ({e}).") from None
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, np.integer)) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be a non-negative int, got {warmup_epochs!r}.")
        self.warmup_epochs = int(warmup_epochs)
        if self.warmup_epochs and method.assignment is not None:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs}: a linear-scalarisation warm-up does not apply to "
                f"{method.name!r} (each of its networks serves one task); use warmup_epochs=0."
            )
        self.warmup_weights = _recipe.warmup_preferences(method.num_particles, method.num_tasks)
        self._task_weights = _task_weights(method)
        self.step = jax.jit(self._step)
        self.warmup_step = jax.jit(self._warmup_step)
        self._predict = jax.jit(self._predict_fn)

    # ------------------------------------------------------------------ state

    def init(self, seed: int = 0) -> TrainState:
        """Initialise P networks (keys split from ``seed``) and the optimiser state."""
        key = jax.random.key(int(seed)) if self.key_impl is None else jax.random.key(int(seed), impl=self.key_impl)
        ens = init_ensemble(
            self.task.model, key, self.method.num_particles, self.task.sample_input, **self.task.init_kwargs()
        )
        return TrainState(ens.params, dict(ens.state), self.tx.init(ens.params))

    # ------------------------------------------------------------------ the step

    def _losses_and_grads(self, params, model_state, x, y):
        """``(losses (K, P), gradients, new model state)``: :meth:`_forward_and_grads` without the feature cache."""
        return self._forward_and_grads(params, model_state, x, y)[:3]

    def _feature_names(self) -> tuple[str, ...]:
        """Names of the features the method's kernels take from the step's forward pass."""
        if self.method.kernel_space == "function":
            return ("outputs",)
        if self.method.kernel_space == "split":
            return ("latent",) + tuple(f"head_{k}" for k in range(self.task.num_tasks))
        return ()

    def _forward_and_grads(self, params, model_state, x, y, scalarization=None, *, method_state=None):
        """Per-task losses (K, P), their gradients and the new model state, from ONE forward pass.

        All P networks run in one forward pass (the task's fast ensemble pass when
        it has one, else the flax module vmapped over networks); its VJP is applied
        to the K cotangents in one computation (:func:`_pull_each`), giving leaves (K, P, ...), or to the
        (P, K) scalarisation weights (``scalarization``, default the method's),
        giving leaves (P, ...). The features the method's kernels need are further
        outputs of the same pass; the fourth result is then the feature cache
        ``{name: (features (P, p), pullback)}`` (else None): ``"outputs"`` (the
        function-space kernel: each network's outputs) or ``"latent"`` and
        ``"head_0"`` ... ``"head_{K-1}"`` (the split kernels: encoder outputs and
        each head's outputs). ``pullback`` maps a (P, p) cotangent to one shaped
        like ``params`` through the same pass.

        ``method_state`` (the method's transformation state; :meth:`step` passes
        it): the kernels' cotangents on the features whose pullback runs through
        the whole network (``"outputs"``, ``"latent"``) are found first, by the
        method's update on the features with placeholder gradients (everything
        else of it is dead code), and join the K task cotangents in the SAME
        VJP: K + 1 backward passes in one computation instead of a batch of K
        and a separate one. Their ``pullback`` then returns that
        result when the update asks for exactly that cotangent, which it does
        whenever every particle's gradients are finite (the placeholder's
        finiteness); otherwise (a particle left out of the kernel) it runs its
        own VJP, so the update is the one without ``method_state`` either way.
        """
        task, k = self.task, self.task.num_tasks
        scal = self.method.scalarization if scalarization is None else scalarization
        names = self._feature_names() if scalarization is None else ()
        split = "latent" in names

        def f(q):
            if split:
                out, latent, new_s = _recipe.forward_with_latent(task, q, model_state, x, train=True, fast=self.fast)
            else:
                out, new_s = task.ensemble_forward(q, model_state, x, train=True, fast=self.fast)
            values = jax.vmap(lambda o: task.per_task_losses(o, y))(out)  # (P, K)
            if split:
                return (values, _recipe.named_outputs(task, out, latent)), new_s
            if names:
                return (values, {"outputs": jax.vmap(task.function_outputs)(out)}), new_s
            return (values, {}), new_s

        (values, feats), vjp, new_state = jax.vjp(f, params, has_aux=True)
        fast_fn = task.fast_forward(self.fast)  # the pass f runs: through it, cotangents go one by one
        sequential = fast_fn is not None and (not split or _recipe._accepts_return_features(fast_fn))
        p = values.shape[0]
        zeros = {n: jnp.zeros_like(v) for n, v in feats.items()}
        task_cts = jnp.broadcast_to(jnp.eye(k, dtype=values.dtype)[:, None, :], (k, p, k))

        if scal is not None:
            grads = vjp((jnp.asarray(scal, values.dtype), zeros))[0]  # leaves (P, ...)
            return values.T, grads, new_state, None
        if not names:
            grads = _pull_each(lambda c: vjp((c, zeros))[0], task_cts, sequential=sequential)  # leaves (K, P, ...)
            return values.T, grads, new_state, None

        def own_vjp(name):
            return lambda c: vjp((jnp.zeros_like(values), {**zeros, name: c.astype(feats[name].dtype)}))[0]

        guessed = {}
        if method_state is not None:
            guessed = self._kernel_cotangents(params, method_state, values.T, feats, x, model_state)
        batched = [n for n in _WHOLE_NETWORK_FEATURES if n in guessed]
        # ONE VJP: the K task cotangents, then the guessed feature cotangents.
        value_cts = jnp.concatenate([task_cts, jnp.zeros((len(batched), p, k), values.dtype)])
        feat_cts = {
            n: jnp.stack([jnp.zeros_like(z)] * k + [
                guessed[m].astype(z.dtype) if m == n else jnp.zeros_like(z) for m in batched
            ]) for n, z in feats.items()
        }
        pulled = _pull_each(lambda cv, cf: vjp((cv, cf))[0], value_cts, feat_cts, sequential=sequential)
        grads = jax.tree_util.tree_map(lambda g: g[:k], pulled)  # leaves (K, P, ...)

        def pullback(name):
            if name not in batched:
                return own_vjp(name)
            i = k + batched.index(name)
            ready = jax.tree_util.tree_map(lambda g: g[i], pulled)

            def fresh(c):
                # Its own forward pass too: a second backward pass that shares the step's intermediate
                # values lets XLA's CPU fusion re-evaluate the convolutions' input gradients inside
                # broadcasts (measured: the LeNet step 3x slower), so the branch shares none.
                (v, z), back, _ = jax.vjp(f, params, has_aux=True)
                return back((jnp.zeros_like(v), {**zeros, name: c.astype(z[name].dtype)}))[0]

            def pb(c):
                # NaN at the same places is the same cotangent (each row only reaches its own network).
                same = jnp.array_equal(c, guessed[name], equal_nan=True)
                return jax.lax.cond(same, lambda c: ready, fresh, c)

            return pb

        cache = {n: (feats[n], pullback(n)) for n in names}
        return values.T, grads, new_state, cache

    def _kernel_cotangents(self, params, method_state, values, feats, x, model_state) -> dict:
        """``{name: (P, p) cotangent}`` that the method's update pulls back through each feature.

        Runs the method's update with placeholder per-task gradients (ones, finite)
        and a feature cache whose pullbacks record their cotangent (and return
        zeros); under ``jit`` only the kernels' cotangents are computed from it. A
        feature whose pullback is not called exactly once is left out.
        """
        k = self.task.num_tasks
        seen = {n: [] for n in feats}

        def record(name):
            def pb(c):
                seen[name].append(c)
                return jax.tree_util.tree_map(jnp.zeros_like, params)

            return pb

        cache = {n: (jax.lax.stop_gradient(z), record(n)) for n, z in feats.items()}
        # A 1 that XLA cannot see as a constant: otherwise it folds the update's reductions over the
        # placeholder gradients at compile time, element by element (SARCOS, d = 139,015: 5 s of compiling).
        one = jax.lax.optimization_barrier(jnp.ones((), values.dtype))
        ones = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(one.astype(a.dtype), (k,) + a.shape), params)
        self.method.transform.update(
            ones, method_state, params, losses=values, inputs=x, model_state=model_state, feature_cache=cache
        )
        return {n: cs[0] for n, cs in seen.items() if len(cs) == 1}

    def _step(self, state: TrainState, x, y):
        """One training step: ``(state, x, y) -> (new_state, per-task losses (K, P) before the step)``."""
        values, grads, new_model_state, cache = self._forward_and_grads(
            state.params, state.model_state, x, y, method_state=state.opt_state[0]
        )
        extra = {} if cache is None else {"feature_cache": cache}
        updates, opt_state = self.tx.update(
            grads, state.opt_state, state.params, losses=values, inputs=x, model_state=state.model_state, **extra
        )
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, new_model_state, opt_state), values

    def _warmup_step(self, state: TrainState, x, y):
        """One warm-up step (linear scalarisation with :attr:`warmup_weights`): the optimiser descends
        ``sum_k w_ik L_k`` on network i; the method's state is left as it is."""
        w = jnp.asarray(self.warmup_weights, jnp.result_type(*jax.tree_util.tree_leaves(state.params)))
        values, grads, new_model_state, _ = self._forward_and_grads(
            state.params, state.model_state, x, y, scalarization=w
        )
        method_state, opt_inner = state.opt_state
        updates, opt_inner = self.optimizer.update(grads, opt_inner, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, new_model_state, (method_state, opt_inner)), values

    def train_epoch(self, state: TrainState, *, seed: int, epoch: int, progress: bool = False):
        """One epoch: ``(state, train loss per task (K,), seconds, steps)``.

        With ``progress``, a tqdm bar counts the steps that have finished.
        The training loss of task k is its mean over the epoch's batches and over
        the particles serving task k, measured before each step. Epochs before
        ``warmup_epochs`` take :meth:`warmup_step`, the others :meth:`step`.
        """
        data = self.task.train_data
        n_batches = len(data) // self.batch_size
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}", unit="batch", leave=False)
        start = time.perf_counter()
        acc = []
        step = self.warmup_step if epoch < self.warmup_epochs else self.step
        for x, y in data.batches(self.batch_size, seed=seed, epoch=epoch, drop_last=True):
            state, values = step(state, x, y)
            if bar is not None and acc:
                # The previous step has finished once its (K, P) losses are ready; waiting for it
                # (not for the step just dispatched) keeps one step in flight and copies nothing.
                acc[-1].block_until_ready()
                bar.update(1)
            acc.append(values)
        if bar is not None and acc:
            acc[-1].block_until_ready()
            bar.update(1)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        values = np.asarray(jnp.stack(acc)).astype(np.float64)  # (B, K, P)
        train_loss = np.einsum("bkp,kp->k", values, self._task_weights) / len(acc)
        return state, train_loss, seconds, len(acc)

    # ------------------------------------------------------------------ evaluation

    def _predict_fn(self, params, model_state, x):
        out, _ = self.task.ensemble_forward(params, model_state, x, train=False, fast=self.fast)
        return jax.vmap(self.task.predict)(out)

    def predict(self, state: TrainState, data=None) -> dict:
        """Every network's outputs on ``data`` (default the task's evaluation set), in order.

        Returns ``{"probs": (P, N, K, C), "targets": (N, K)}`` (classification) or
        ``{"predictions": (P, N, K), "targets": (N, K)}`` (regression), numpy.
        """
        data = self.task.eval_data if data is None else data
        outs, targets = [], []
        for x, y in data.batches(self.eval_batch_size, seed=0, epoch=0, shuffle=False):
            outs.append(np.asarray(self._predict(state.params, state.model_state, x)))
            targets.append(np.asarray(y))
        key = "probs" if self.task.kind == "classification" else "predictions"
        return {key: np.concatenate(outs, axis=1), "targets": np.concatenate(targets, axis=0)}

    def metrics_from_outputs(self, outputs: dict) -> dict:
        """Per-task and averaged metrics from :meth:`predict`'s outputs (see :meth:`evaluate`)."""
        task, method = self.task, self.method
        y = outputs["targets"]
        per_task = {}
        for t, name in enumerate(task.task_names):
            parts = np.arange(method.num_particles) if method.assignment is None else np.flatnonzero(method.assignment == t)
            if task.kind == "classification":
                probs = outputs["probs"][parts, :, t, :].astype(np.float64)  # (P_t, N, C)
                labels = y[:, t].astype(np.int64)
                particle_acc = np.mean(np.argmax(probs, -1) == labels[None, :], axis=1)
                ens = probs.mean(axis=0)
                nll = -np.mean(np.log(np.maximum(ens[np.arange(len(labels)), labels], 1e-12)))
                per_task[name] = {
                    "particle_accuracy": particle_acc.tolist(),
                    "mean_particle_accuracy": float(particle_acc.mean()),
                    "ensemble_accuracy": float(np.mean(np.argmax(ens, -1) == labels)),
                    "brier": float(brier_score(ens, labels)),
                    "ece": float(expected_calibration_error(ens, labels, 10)),
                    "nll": float(nll),
                }
            else:
                preds = outputs["predictions"][parts, :, t].astype(np.float64)  # (P_t, N)
                target = y[:, t].astype(np.float64)
                particle_mse = np.mean((preds - target[None, :]) ** 2, axis=1)
                per_task[name] = {
                    "particle_mse": particle_mse.tolist(),
                    "mean_particle_mse": float(particle_mse.mean()),
                    "ensemble_mse": float(np.mean((preds.mean(axis=0) - target) ** 2)),
                }
        keys = [k for k in next(iter(per_task.values())) if k not in ("particle_accuracy", "particle_mse")]
        summary = {k: float(np.mean([v[k] for v in per_task.values()])) for k in keys}
        return {"tasks": per_task, **summary}

    def evaluate(self, state: TrainState, *, return_outputs: bool = False):
        """Metrics on the evaluation set.

        Classification, per task: ``particle_accuracy`` (one per particle serving
        the task), ``mean_particle_accuracy``, and for the ensemble prediction
        (mean of those particles' probabilities) ``ensemble_accuracy``,
        ``brier``, ``ece`` (10 equal-width bins) and ``nll``. Regression:
        ``particle_mse``, ``mean_particle_mse`` and ``ensemble_mse`` (of the
        mean prediction). Returned as ``{"tasks": {name: {...}}, <metric>: mean
        over tasks, ...}``; with ``return_outputs`` also :meth:`predict`'s outputs.
        """
        outputs = self.predict(state)
        metrics = self.metrics_from_outputs(outputs)
        return (metrics, outputs) if return_outputs else metrics

    # ------------------------------------------------------------------ the loop

    def config(self) -> dict:
        """A JSON description of the run (stored with checkpoints, checked on resume).

        The task, method, number of networks and tasks, kernel space, batch size,
        data sizes, the initialisation key's PRNG implementation, the number of
        warm-up epochs, and ``settings``.
        """
        return {
            "task": self.task.name,
            "method": self.method.name,
            "num_particles": self.method.num_particles,
            "num_tasks": self.method.num_tasks,
            "kernel_space": self.method.kernel_space,
            "batch_size": self.batch_size,
            "num_train": len(self.task.train_data),
            "num_eval": len(self.task.eval_data),
            "key_impl": self.key_impl,
            "warmup_epochs": self.warmup_epochs,
            **self.settings,
        }

    def run_config(self, state: TrainState, *, seed: int) -> dict:
        """:meth:`config` plus the seed, the parameter dtypes of ``state`` and JAX's x64 flag."""
        dtypes = sorted({str(np.dtype(leaf.dtype)) for leaf in jax.tree_util.tree_leaves(state.params)})
        return {
            **self.config(),
            "seed": int(seed),
            "param_dtypes": dtypes,
            "jax_enable_x64": bool(jax.config.jax_enable_x64),
        }

    def fit(
        self,
        epochs: int,
        *,
        seed: int = 0,
        out_dir: str | os.PathLike | None = None,
        resume: bool = False,
        progress: bool = True,
        eval_every: int = 1,
        checkpoint: bool = True,
        return_outputs: bool = False,
        state: TrainState | None = None,
        log: Callable[[str], None] | None = None,
        allow_changed=(),
    ) -> TrainResult:
        """Train for ``epochs`` epochs (in all, counting those resumed from).

        Args:
          epochs: total number of epochs.
          seed: initialisation and mini-batch-order seed.
          out_dir: where ``metrics.jsonl`` (one JSON object per epoch) and
            ``checkpoints/`` (orbax, at every epoch end) go; None writes nothing.
          resume: continue from the newest intact checkpoint in ``out_dir``
            (damaged newer ones are skipped with a
            :class:`~mtsgd_jax.training.checkpoint.CheckpointDamagedWarning` and
            moved to ``checkpoints.damaged/``); without any checkpoint, start
            afresh. The run's settings (:meth:`run_config`) must equal the
            checkpoint's, except those named in ``allow_changed``. When False, an
            existing ``checkpoints/`` and ``metrics.jsonl`` in ``out_dir`` are replaced.
          progress: a tqdm bar per epoch.
          eval_every: evaluate every this many epochs (and always after the last).
          checkpoint: save checkpoints (needs ``out_dir``).
          return_outputs: keep the final evaluation outputs in the result.
          state: start from this state instead of a fresh :meth:`init` (seed).
          log: called with one line per epoch (e.g. ``print``); default silent.
          allow_changed: names of settings (keys of :meth:`run_config`) that may
            differ from the checkpoint's on resume; the requested values are used
            from the resumed epoch on and the change is recorded
            (``TrainResult.config["setting_changes"]``). ``"epochs"`` is accepted
            and never needed.

        Returns:
          :class:`TrainResult`.

        Raises:
          ResumeMismatchError: resuming with settings other than the checkpoint's
            (each listed, saved vs requested) that ``allow_changed`` does not name.
          mtsgd_jax.training.checkpoint.CheckpointError: checkpoints exist but none is intact.
          mtsgd_jax.training.checkpoint.StateMismatchError: the saved arrays do not
            fit this trainer's state (e.g. an allowed change of optimiser whose state
            has other arrays).
        """
        if epochs < 0:
            raise ValueError(f"epochs must be non-negative, got {epochs}.")
        if isinstance(allow_changed, str):
            allow_changed = [n for n in allow_changed.split(",") if n.strip()]
        allowed = {str(n).strip().replace("-", "_") for n in allow_changed}
        ckpt_dir = log_path = None
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            ckpt_dir = os.path.join(out_dir, "checkpoints")
            log_path = os.path.join(out_dir, "metrics.jsonl")
        state = self.init(seed) if state is None else state
        config = self.run_config(state, seed=seed)
        unknown = sorted(allowed - set(config) - set(_NOT_COMPARED))
        if unknown:
            raise ValueError(
                f"allow_changed names unknown settings {unknown}; the settings are {sorted(config)} "
                f"(and {list(_NOT_COMPARED)}, which may always change)."
            )
        history: list = []
        changes: list = []
        start_epoch = 0
        if resume and ckpt_dir is not None:
            accepted: dict = {}

            def check(saved_epoch, meta):
                diff = _config_diff(meta.get("config", {}), config)
                refused = {k: v for k, v in diff.items() if k not in allowed}
                if refused:
                    raise ResumeMismatchError(_mismatch_message(ckpt_dir, saved_epoch, refused), refused)
                accepted.clear()
                accepted.update(diff)

            found = _ckpt.restore_checkpoint(ckpt_dir, state._asdict(), check=check)
            if found is not None:
                saved_epoch, tree, meta = found
                state = TrainState(**tree)
                history = list(meta.get("history", []))
                changes = list(meta.get("setting_changes", []))
                start_epoch = int(saved_epoch)
                if accepted:
                    changed = {k: {"saved": a, "requested": b} for k, (a, b) in accepted.items()}
                    changes.append({"epoch": start_epoch, "changed": changed})
                if checkpoint:
                    _ckpt.move_aside(ckpt_dir, start_epoch)  # damaged newer epochs, to be saved again
        elif ckpt_dir is not None and checkpoint:
            _ckpt.clear_checkpoints(ckpt_dir)
        if log_path is not None:
            with open(log_path, "w") as f:  # the log always matches the state we continue from
                for rec in history:
                    f.write(json.dumps(rec) + "\n")
        metrics, outputs = (history[-1].get("eval") if history else None), None
        for epoch in range(start_epoch, epochs):
            state, train_loss, seconds, steps = self.train_epoch(state, seed=seed, epoch=epoch, progress=progress)
            rec = {
                "epoch": epoch + 1,
                "train_loss": dict(zip(self.task.task_names, map(float, train_loss))),
                "seconds": seconds,
                "steps": steps,
            }
            if epoch < self.warmup_epochs:
                rec["warmup"] = True
            last = epoch + 1 == epochs
            if last or (epoch + 1) % eval_every == 0:
                t0 = time.perf_counter()
                if last and return_outputs:
                    metrics, outputs = self.evaluate(state, return_outputs=True)
                else:
                    metrics = self.evaluate(state)
                rec["eval_seconds"] = time.perf_counter() - t0
                rec["eval"] = metrics
            history.append(rec)
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if ckpt_dir is not None and checkpoint:
                _ckpt.save_checkpoint(
                    ckpt_dir,
                    epoch + 1,
                    state._asdict(),
                    {"epoch": epoch + 1, "epochs": int(epochs), "config": config, "history": history,
                     "setting_changes": changes},
                )
            if log is not None:
                log(_epoch_line(self.task, rec))
        if return_outputs and outputs is None:
            metrics, outputs = self.evaluate(state, return_outputs=True)
        elif metrics is None:
            metrics = self.evaluate(state)
        used = {**config, "epochs": len(history), "setting_changes": changes}
        return TrainResult(state, history, metrics, outputs, used)


def _config_diff(saved: dict, requested: dict) -> dict:
    """``{name: (saved, requested)}`` of the compared settings that differ (absent reads as None)."""
    names = (set(saved) | set(requested)) - set(_NOT_COMPARED)
    saved = {**_CONFIG_DEFAULTS, **saved}
    requested = {**_CONFIG_DEFAULTS, **requested}
    return {k: (saved.get(k), requested.get(k)) for k in sorted(names) if saved.get(k) != requested.get(k)}


def _mismatch_message(ckpt_dir, epoch: int, diff: dict) -> str:
    rows = "\n".join(f"  {k}: saved {a!r}, requested {b!r}" for k, (a, b) in diff.items())
    return (
        f"cannot resume from {ckpt_dir} (epoch {epoch}): the checkpoint was written by another configuration; "
        f"these settings differ:\n{rows}\n"
        f"Request the saved values, or allow the change explicitly: allow_changed={sorted(diff)!r}."
    )


def _epoch_line(task: Task, rec: dict) -> str:
    losses = " ".join(f"{v:.4f}" for v in rec["train_loss"].values())
    line = f"epoch {rec['epoch']:4d}  train loss [{losses}]  {rec['seconds']:.1f}s"
    ev = rec.get("eval")
    if ev is not None:
        if task.kind == "classification":
            line += f"  ensemble acc {ev['ensemble_accuracy']:.4f}  particle acc {ev['mean_particle_accuracy']:.4f}"
        else:
            line += f"  ensemble mse {ev['ensemble_mse']:.4f}  particle mse {ev['mean_particle_mse']:.4f}"
    return line


def summary_rows(task: Task, metrics: dict) -> tuple[list[str], list[list]]:
    """Header and rows (one per task, then the mean) of the final metrics."""
    if task.kind == "classification":
        header = ["task", "particle acc", "ensemble acc", "brier", "ece", "nll"]
        keys = ["mean_particle_accuracy", "ensemble_accuracy", "brier", "ece", "nll"]
    else:
        header = ["task", "particle mse", "ensemble mse"]
        keys = ["mean_particle_mse", "ensemble_mse"]
    rows = [[name] + [float(m[k]) for k in keys] for name, m in metrics["tasks"].items()]
    rows.append(["mean"] + [float(metrics[k]) for k in keys])
    return header, rows


def summary_table(task: Task, metrics: dict) -> str:
    """Plain-text table of :func:`summary_rows`."""
    from mtsgd_jax.report import format_table

    return format_table(*summary_rows(task, metrics))


def train(
    task: str | Task = "multi-digits",
    method: str = "mtsgd",
    *,
    num_particles: int = 5,
    epochs: int | None = None,
    batch_size: int | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    momentum: float = 0.9,
    seed: int = 0,
    kernel_space: str | None = None,
    warmup_epochs: int | None = None,
    recipe: str | None = None,
    data_dir=None,
    num_train: int | None = None,
    num_eval: int | None = None,
    out_dir=None,
    resume: bool = False,
    progress: bool = True,
    eval_every: int = 1,
    key_impl: str | None = None,
    method_options: dict | None = None,
    task_options: dict | None = None,
    log: Callable[[str], None] | None = None,
    return_outputs: bool = False,
    allow_changed=(),
) -> tuple[Trainer, TrainResult]:
    """Build the task, method and optimiser from names and run :meth:`Trainer.fit`.

    ``None`` for ``epochs``, ``batch_size``, ``optimizer`` or ``lr`` takes the
    task's default (:class:`~mtsgd_jax.training.TaskDefaults`); ``momentum``
    is used by the ``"momentum"`` optimiser only. ``kernel_space`` (default
    ``"parameter"``) and ``warmup_epochs`` (default 0) are those of
    :func:`build_method` and :class:`Trainer`.

    ``recipe="published"``: the MT-SGD reference code's network recipe
    (:mod:`~mtsgd_jax.training.recipe`): ``kernel_space="split"``,
    ``warmup_epochs=1`` and SGD with momentum 0.9 (``optimizer="momentum"``)
    at learning rate 1e-3, as the reference code trains. Each of these applies
    only where the argument is None, so any of them can be overridden (e.g.
    ``recipe="published", lr=5e-3``).

    The optimiser's name, ``lr`` and ``momentum``, the method's options (those it
    uses, defaults filled in), ``feature_examples``, the recipe's name (when
    given) and the task's options are recorded as the trainer's settings
    (compared on resume; ``allow_changed`` as in :meth:`Trainer.fit`).
    Returns ``(trainer, result)``. Data errors (``FileNotFoundError``,
    :class:`~mtsgd_jax.data.DataFormatError`) propagate from :func:`make_task`.
    """
    task_options = dict(task_options or {})
    if isinstance(task, str):
        task = make_task(task, data_dir, num_train=num_train, num_eval=num_eval, **task_options)
    method_options = dict(method_options or {})
    preset = {} if recipe is None else _recipe.recipe_options(recipe, task)
    kernel_space = kernel_space if kernel_space is not None else preset.get("kernel_space", "parameter")
    warmup_epochs = warmup_epochs if warmup_epochs is not None else preset.get("warmup_epochs", 0)
    m = build_method(task, method, num_particles, kernel_space=kernel_space, **method_options)
    opt_name = optimizer or preset.get("optimizer") or task.defaults.optimizer
    lr = lr if lr is not None else preset.get("lr", task.defaults.lr)
    opt = make_optimizer(opt_name, lr, momentum=momentum)
    settings = {
        "optimizer": opt_name,
        "lr": float(lr),
        "momentum": float(momentum) if opt_name == "momentum" else None,
        **({"recipe": recipe} if recipe is not None else {}),
        **_method_settings(method, method_options),
        **{k: v for k, v in sorted(task_options.items()) if k not in _TASK_OPTIONS_IGNORED},
    }
    trainer = Trainer(
        task, m, opt, batch_size=batch_size, key_impl=key_impl, settings=settings, warmup_epochs=warmup_epochs
    )
    result = trainer.fit(
        task.defaults.epochs if epochs is None else epochs,
        seed=seed,
        out_dir=out_dir,
        resume=resume,
        progress=progress,
        eval_every=eval_every,
        return_outputs=return_outputs,
        log=log,
        allow_changed=allow_changed,
    )
    return trainer, result


def _method_settings(name: str, options: dict) -> dict:
    """The options ``name`` uses (``make_method``'s defaults filled in), plus ``feature_examples``."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(make_method).parameters.items()}
    used = {k: options.get(k, defaults[k]) for k in _METHOD_OPTIONS.get(name, ())}
    if "feature_examples" in options:
        used["feature_examples"] = options["feature_examples"]
    return used
