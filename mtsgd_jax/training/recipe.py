"""The MT-SGD reference code's network recipe: split kernels, a linear-scalarisation warm-up, SGD.

Three pieces, each usable alone and together selected by ``train(...,
recipe="published")``:

* **split kernels** (:func:`split_mtsgd`, ``kernel_space="split"`` of
  :func:`~mtsgd_jax.training.make_method`): each network's parameters are
  split into the shared encoder and the K task heads (:func:`head_labels`).
  Head k takes its OWN task's SVGD step (only task k's loss gradient, with
  respect to head k's parameters), with an RBF kernel on each network's
  head-k outputs on the batch; the encoder takes the MT-SGD step (K Stein
  directions, their Gram matrix U, one simplex QP, the weighted direction)
  with an RBF kernel on each network's latent features (the encoder output on
  the batch). It is an :func:`optax.partition` of :func:`~mtsgd_jax.mtsgd`
  transformations (the heads' with ``num_targets=1``, which is SVGD) on a
  "split view" of the parameters, every one with ``features=``.
* **warm-up** (:func:`warmup_preferences`, ``Trainer(..., warmup_epochs=)``):
  the first epochs descend ``sum_k w_ik L_k`` on network i with fixed
  preferences, then the chosen method takes over.
* **the optimiser**: SGD with momentum 0.9, learning rate 1e-3 (see :data:`RECIPES`).

Where the heads are (:func:`head_labels`): a *label* per parameter leaf of ONE
network, either :data:`ENCODER` or a :class:`Head`. ``Head(axis=a)`` marks a
leaf that stacks the K heads along its axis ``a`` (e.g.
:class:`~mtsgd_jax.models.MultiHeadDense`'s kernel (D, K, C), ``axis=1``, and
bias (K, C), ``axis=0``; the SARCOS MLP's output layer, one column per task);
``Head(task=k)`` marks a leaf that belongs to head k alone (a model with one
head module per task). The models of :mod:`mtsgd_jax.models` are registered
(:func:`register_head_layout` adds others); any other model whose parameters
have a top-level ``"heads"`` :class:`~mtsgd_jax.models.MultiHeadDense`, or
top-level modules ``"head_0"``, ..., ``"head_{K-1}"``, is recognised too.

Latent features: the model's ``__call__`` must accept ``return_features=True``
and then return ``(outputs, features)``, features (N, ...) the encoder output
(:class:`~mtsgd_jax.models.MultiHeadLeNet`,
:class:`~mtsgd_jax.models.MultiHeadResNet18`,
:class:`~mtsgd_jax.models.SarcosMLP` do; so do their fast ensemble passes).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtsgd_jax.models import MultiHeadLeNet, MultiHeadResNet18, SarcosMLP
from mtsgd_jax.transforms import make_transform, preference_vectors

__all__ = [
    "ENCODER",
    "RECIPES",
    "Head",
    "forward_with_latent",
    "head_labels",
    "head_layout",
    "recipe_options",
    "register_head_layout",
    "split_features",
    "split_mtsgd",
    "warmup_preferences",
]

PyTree = Any
ENCODER = "encoder"
# The recipes train() knows: name -> settings (lr None: see recipe_options).
RECIPES = {
    # The reference code's optimiser: SGD with momentum 0.9, learning rate 1e-3 (its halving of the
    # rate every 15 of 100 epochs is not part of the recipe here; pass a schedule through optimizer=).
    "published": {"kernel_space": "split", "warmup_epochs": 1, "optimizer": "momentum", "lr": 1e-3},
}


@dataclasses.dataclass(frozen=True)
class Head:
    """Label of a parameter leaf of the task heads (see the module docstring).

    Exactly one of:

    Attributes:
      axis: the leaf (of ONE network, no particle axis) stacks the K heads along
        this axis; its size there is K.
      task: the leaf belongs to head ``task`` alone (0 <= task < K).
    """

    axis: int | None = None
    task: int | None = None

    def __post_init__(self):
        if (self.axis is None) == (self.task is None):
            raise ValueError(f"Head: give exactly one of axis= (stacked heads) and task= (one head), got {self!r}.")


HeadLayout = Callable[[PyTree, int], PyTree]
_LAYOUTS: dict[type, HeadLayout] = {}


def register_head_layout(cls: type, layout: HeadLayout) -> None:
    """Register where the task heads of instances of ``cls`` are.

    Args:
      cls: a ``flax.linen.Module`` subclass (exact class match).
      layout: ``layout(params, num_tasks) -> labels``: ``params`` is ONE
        network's ``"params"`` collection (arrays or ``jax.ShapeDtypeStruct``,
        no particle axis); ``labels`` has its structure, one :data:`ENCODER` or
        :class:`Head` per leaf.
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_head_layout: cls must be a class, got {type(cls).__name__}.")
    if not callable(layout):
        raise TypeError(f"register_head_layout: layout must be callable, got {type(layout).__name__}.")
    _LAYOUTS[cls] = layout


def _all_encoder(tree):
    return jax.tree_util.tree_map(lambda _: ENCODER, tree)


def _stacked_dense(params, key):
    """Labels with ``params[key]`` the heads: a layer whose kernel's axis 1 and bias's axis 0 index the
    tasks (MultiHeadDense: (D, K, C) and (K, C); a dense layer with one output per task: (D, K) and (K,))."""
    labels = {k: _all_encoder(v) for k, v in params.items() if k != key}
    labels[key] = {"kernel": Head(axis=1), "bias": Head(axis=0)}
    return labels


def _multi_head_dense_layout(params, num_tasks):
    """A top-level ``"heads"`` :class:`~mtsgd_jax.models.MultiHeadDense`: kernel (D, K, C), bias (K, C)."""
    return _stacked_dense(params, "heads")


def _mlp_layout(params, num_tasks):
    """:class:`~mtsgd_jax.models.SarcosMLP`: the output layer, kernel (H, K) and bias (K,), column k = task k."""
    return _stacked_dense(params, "out")


def _generic_layout(params, num_tasks):
    """A top-level MultiHeadDense named ``"heads"``, or top-level modules ``"head_0"`` ... ``"head_{K-1}"``; else None."""
    if not isinstance(params, dict):
        return None
    heads = params.get("heads")
    if isinstance(heads, dict) and set(heads) == {"kernel", "bias"}:
        ks, bs = np.shape(heads["kernel"]), np.shape(heads["bias"])
        if len(ks) == 3 and len(bs) == 2 and ks[1] == bs[0] == num_tasks:
            return _multi_head_dense_layout(params, num_tasks)
    names = [f"head_{k}" for k in range(num_tasks)]
    if all(n in params for n in names):
        labels = {k: _all_encoder(v) for k, v in params.items() if k not in names}
        for k, n in enumerate(names):
            labels[n] = jax.tree_util.tree_map(lambda _, k=k: Head(task=k), params[n])
        return labels
    return None


register_head_layout(MultiHeadLeNet, _multi_head_dense_layout)
register_head_layout(MultiHeadResNet18, _multi_head_dense_layout)
register_head_layout(SarcosMLP, _mlp_layout)


def head_layout(model) -> HeadLayout:
    """The head layout of ``model``: the registered one (exact class), else the generic rule (module docstring)."""
    return _LAYOUTS.get(type(model), _generic_layout)


def _is_label(x) -> bool:
    return isinstance(x, Head) or (isinstance(x, str) and x == ENCODER)


def head_labels(layout: HeadLayout | PyTree, params: PyTree, num_tasks: int, *, where: str = "kernel_space='split'") -> PyTree:
    """Validated labels of ONE network's parameters (see the module docstring).

    Args:
      layout: ``layout(params, num_tasks) -> labels`` (e.g. :func:`head_layout`),
        or the labels themselves.
      params: one network's parameters (arrays or shapes, no particle axis).
      num_tasks: K.

    Returns:
      The labels: a pytree of ``params``'s structure, one :data:`ENCODER` or
      :class:`Head` per leaf, with at least one encoder leaf and at least one
      leaf for every head.

    Raises:
      ValueError: no recognisable heads (the layout returns None), labels that
        do not match ``params``, a ``Head(axis=a)`` leaf whose axis ``a`` does not
        have size K, a ``Head(task=k)`` outside 0..K-1, a head without leaves or
        no encoder leaf. The message names the leaf and the fix.
    """
    labels = layout(params, num_tasks) if callable(layout) else layout
    fix = (
        "register where the heads are with mtsgd_jax.training.recipe.register_head_layout(ModelClass, "
        "layout) or pass heads= (labels, or layout(params, num_tasks) -> labels: 'encoder' or Head(axis=a) / "
        "Head(task=k) per leaf)"
    )
    if labels is None:
        top = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(
            f"{where}: the model has no recognisable task heads (top-level parameters {top}; expected a "
            f"MultiHeadDense named 'heads' with K = {num_tasks} heads, or modules 'head_0' ... "
            f"'head_{num_tasks - 1}'). Fix: {fix}."
        )
    p_def = jax.tree_util.tree_structure(params)
    try:
        flat = p_def.flatten_up_to(labels)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: the head labels do not match the parameters' structure {p_def} ({e}). Fix: {fix}.") from None
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    shapes = [tuple(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)]
    covered = set()
    for path, shape, lab in zip(paths, shapes, flat):
        if not _is_label(lab):
            raise ValueError(f"{where}: label of params{path} must be 'encoder' or a Head, got {lab!r}.")
        if isinstance(lab, Head) and lab.axis is not None:
            if not (0 <= lab.axis < len(shape)) or shape[lab.axis] != num_tasks:
                raise ValueError(
                    f"{where}: params{path} of shape {shape} is labelled Head(axis={lab.axis}) but that axis "
                    f"must exist and have size K = {num_tasks}. Fix: {fix}."
                )
            covered.update(range(num_tasks))
        elif isinstance(lab, Head):
            if not (isinstance(lab.task, int) and 0 <= lab.task < num_tasks):
                raise ValueError(f"{where}: params{path} is labelled Head(task={lab.task!r}); expected 0 <= task < K = {num_tasks}.")
            covered.add(lab.task)
    missing = sorted(set(range(num_tasks)) - covered)
    if missing:
        raise ValueError(f"{where}: no parameters are labelled as the head of task(s) {missing}. Fix: {fix}.")
    if not any(isinstance(lab, str) for lab in flat):
        raise ValueError(f"{where}: no parameters are labelled 'encoder': the split needs a shared encoder. Fix: {fix}.")
    return jax.tree_util.tree_unflatten(p_def, flat)


# ----------------------------------------------------------------------------- the split view


class _Split:
    """Maps a parameter pytree to its split view ``{"encoder": (leaves...), "head_k": (leaves...)}`` and back.

    ``lead`` is the number of leading axes before a network's own axes (1 for
    particles (P, ...), 2 for per-task gradients (K, P, ...)).
    """

    def __init__(self, labels, treedef, num_tasks):
        self.treedef = treedef
        self.labels = treedef.flatten_up_to(labels)
        self.k = num_tasks
        self.groups = [ENCODER] + [f"head_{k}" for k in range(num_tasks)]

    def view(self, tree, lead: int = 1, *, task_rows: bool = False):
        """The split view of ``tree``; with ``task_rows`` (gradients (K, P, ...)) head k keeps task k's row only."""
        leaves = self.treedef.flatten_up_to(tree)
        out = {g: [] for g in self.groups}
        for leaf, lab in zip(leaves, self.labels):
            if isinstance(lab, str):
                out[ENCODER].append(leaf)
                continue
            tasks = range(self.k) if lab.axis is not None else (lab.task,)
            for k in tasks:
                part = leaf[k : k + 1] if task_rows else leaf
                if lab.axis is not None:
                    part = jnp.take(part, k, axis=lab.axis + lead)
                out[f"head_{k}"].append(part)
        return {g: tuple(v) for g, v in out.items()}

    def merge(self, view, lead: int = 1):
        """The pytree whose split view is ``view`` (leaves (P, ...))."""
        pos = {g: 0 for g in self.groups}
        leaves = []

        def take(g):
            i = pos[g]
            pos[g] = i + 1
            return view[g][i]

        for lab in self.labels:
            if isinstance(lab, str):
                leaves.append(take(ENCODER))
            elif lab.axis is not None:
                leaves.append(jnp.stack([take(f"head_{k}") for k in range(self.k)], axis=lab.axis + lead))
            else:
                leaves.append(take(f"head_{lab.task}"))
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _precomputed(params, feats, pullback):
    """``feats`` as a function of ``params`` whose VJP is ``pullback``: the features and their pullback
    come from a forward pass already made (the trainer's step), so the kernel step reuses both."""

    @jax.custom_vjp
    def f(p):
        return feats

    def fwd(p):
        return feats, None

    def bwd(_, ct):
        return (pullback(ct),)

    f.defvjp(fwd, bwd)
    return f(params)


def _mask_like(masked, full):
    """``full`` with the leaves that ``masked`` (an :func:`optax.masked` tree) leaves out set to its ``MaskedNode``."""
    return jax.tree_util.tree_map(
        lambda m, f: m if isinstance(m, optax.MaskedNode) else f, masked, full,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )


def _group_features(name: str):
    """``features=`` of the group kernel: the named features and their pullback, passed as ``split_features=``."""

    def features(params, *, split_features=None, **_):
        if split_features is None:
            raise ValueError("split_mtsgd: its inner transformations need split_features= (run them through split_mtsgd).")
        feats, pullback = split_features[name]
        return _precomputed(params, feats, lambda c: _mask_like(params, pullback(c)))

    return features


def _feature_names(num_tasks: int) -> tuple[str, ...]:
    return ("latent",) + tuple(f"head_{k}" for k in range(num_tasks))


def split_mtsgd(
    num_tasks: int,
    heads,
    features: Callable[..., dict] | None,
    *,
    weighting: str = "stein",
    solver="auto",
    reuse_cache: bool = True,
    **mtsgd_options,
) -> optax.GradientTransformationExtraArgs:
    """MT-SGD on the shared encoder, each task's own SVGD on its head, each with its own function-space kernel.

    The parameters are cut into the encoder and the K heads (``heads``). The
    encoder takes :func:`~mtsgd_jax.mtsgd` (K targets: the K tasks' loss
    gradients with respect to the encoder, ``weighting``, ``solver``) with the
    RBF kernel (median bandwidth) on the ``"latent"`` features; head k takes
    :func:`~mtsgd_jax.mtsgd` with ONE target (SVGD: task k's loss gradient with
    respect to head k) with the RBF kernel on the ``"head_k"`` features. Each
    kernel's repulsion is pulled back through its features to its own group of
    parameters only. Built as :func:`optax.partition` over the split view.

    Args:
      num_tasks: K.
      heads: where the heads are: labels of one network's parameters, or a
        layout ``layout(params, num_tasks) -> labels`` (see :func:`head_labels`);
        resolved at ``init``.
      features: ``features(params, **extra_args) -> {"latent": (P, p), "head_0":
        (P, q_0), ..., "head_{K-1}": ...}`` (e.g. :func:`split_features`), used
        when the update gets no ``feature_cache=``; may be None when every update
        gets one.
      weighting, solver: the encoder's MT-SGD options (``weighting`` ``"stein"``
        or ``"score"``; a kernel on features does not give U's diagonal exactly).
      reuse_cache: take the features and their pullbacks from the extra
        argument ``feature_cache={"latent": (z, pullback), "head_k": ...}`` when
        given (the trainer's forward pass; ``pullback`` maps a (P, p) cotangent
        to one shaped like ``params``) instead of calling ``features``.
      **mtsgd_options: further options of every :func:`~mtsgd_jax.mtsgd` inside
        (``kernel``, ``warm_start``, ``block_size``, ``solver_options``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``: ``update(grads, state,
      params, **extra_args)`` takes per-task loss gradients (leaves (K, P, ...)),
      the particles (leaves (P, ...)) and returns the negative direction shaped
      like ``params``. The state is the :func:`optax.partition` state of the
      groups (``"encoder"``: :class:`~mtsgd_jax.MTSGDState` with the K weights;
      ``"head_k"``: one-target MTSGDState).
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"split_mtsgd: num_tasks must be a positive int (K), got {num_tasks!r}.")
    if features is not None and not callable(features):
        raise TypeError(f"split_mtsgd: features must be callable or None, got {type(features).__name__}.")
    names = _feature_names(num_tasks)
    groups = {ENCODER: make_transform(
        "mtsgd", num_tasks, weighting=weighting, solver=solver, features=_group_features("latent"), **mtsgd_options
    )}
    for k in range(num_tasks):
        groups[f"head_{k}"] = make_transform("mtsgd", 1, solver=solver, features=_group_features(f"head_{k}"), **mtsgd_options)
    inner = optax.partition(groups, lambda view: {g: jax.tree_util.tree_map(lambda _, g=g: g, sub) for g, sub in view.items()})

    def splitter(params):
        one = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype), params)
        labels = head_labels(heads, one, num_tasks, where="split_mtsgd")
        return _Split(labels, jax.tree_util.tree_structure(params), num_tasks)

    def init_fn(params):
        sp = splitter(params)
        return inner.init(sp.view(params))

    def named_features(params, feature_cache, extra_args):
        if reuse_cache and isinstance(feature_cache, dict) and all(n in feature_cache for n in names):
            return {n: feature_cache[n] for n in names}
        if features is None:
            raise ValueError(
                "split_mtsgd: no features: pass features= or call update with feature_cache={'latent': (z, pullback), "
                "'head_k': ...} (the Trainer does)."
            )
        feats, vjp = jax.vjp(lambda p: features(p, **extra_args), params)
        missing = [n for n in names if n not in feats]
        if missing:
            raise ValueError(f"split_mtsgd: features(params) must return a dict with keys {list(names)}; missing {missing}.")
        zeros = {n: jnp.zeros_like(v) for n, v in feats.items()}

        def pullback(name):
            return lambda c: vjp({**zeros, name: c.astype(feats[name].dtype)})[0]

        return {n: (jax.lax.stop_gradient(feats[n]), pullback(n)) for n in names}

    def update_fn(grads, state, params=None, *, feature_cache=None, **extra_args):
        if params is None:
            raise ValueError("split_mtsgd: update needs params (the particles, leaves (P, ...)).")
        sp = splitter(params)
        named = named_features(params, feature_cache, extra_args)
        # Each group's kernel gets its features, their pullback mapped into the split view.
        in_view = {n: (z, lambda c, pb=pb: sp.view(pb(c))) for n, (z, pb) in named.items()}
        view_updates, state = inner.update(
            sp.view(grads, 2, task_rows=True), state, sp.view(params), split_features=in_view, **extra_args
        )
        return sp.merge(view_updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- features


def _accepts_return_features(fn) -> bool:
    try:
        return "return_features" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def check_latent_features(model) -> None:
    """Raise a ValueError unless ``model``'s ``__call__`` takes ``return_features=``."""
    if not _accepts_return_features(model.__call__):
        raise ValueError(
            f"kernel_space='split' needs the latent features: {type(model).__name__}.__call__ must accept "
            "return_features=True and then return (outputs, features (N, ...)) with features the shared "
            "encoder's output (as MultiHeadLeNet, MultiHeadResNet18 and SarcosMLP do)."
        )


def forward_with_latent(task, params, state: dict, x, *, train: bool, fast: bool = True):
    """Outputs and latent features of ALL P networks from ONE forward pass.

    Returns ``(outputs (P, N, ...), latent (P, N, ...), new_state)``: what
    :meth:`~mtsgd_jax.training.Task.ensemble_forward` returns, plus the encoder
    output of every network (the model called with ``return_features=True``).
    The fast ensemble pass is used when it has ``return_features`` (the
    registered models' do), else the flax module vmapped over networks.
    """
    fn = task.fast_forward(fast)
    if fn is not None and _accepts_return_features(fn):
        out, latent = fn(params, x, return_features=True)
        return out, latent, state

    def one(p, s):
        variables = {"params": p, **s}
        if not task.batch_norm:
            return task.model.apply(variables, x, return_features=True), s
        if train:
            out, updated = task.model.apply(variables, x, train=True, mutable=["batch_stats"], return_features=True)
            return out, {**s, **updated}
        return task.model.apply(variables, x, train=False, return_features=True), s

    (out, latent), new_state = jax.vmap(one)(params, state)
    return out, latent, new_state


def named_outputs(task, outputs, latent) -> dict:
    """The split kernels' features of ALL networks: ``{"latent": (P, p), "head_k": (P, q)}``.

    ``latent`` (P, N, ...) flattened per network; head k's features are what the
    function-space kernel sees (:meth:`~mtsgd_jax.training.Task.function_outputs`)
    of task k's outputs ``outputs[:, :, k]``: log-probabilities (N, C)
    (classification) or predictions (N,) (regression), flattened.
    """
    p = latent.shape[0]
    named = {"latent": latent.reshape(p, -1)}
    for k in range(task.num_tasks):
        named[f"head_{k}"] = jax.vmap(lambda o, k=k: task.function_outputs(o[:, k]))(outputs)
    return named


def split_features(task, num_examples: int | None = None, *, fast: bool = True) -> Callable[..., dict]:
    """``features(params, *, inputs, model_state=None, **_) -> {"latent": (P, p), "head_k": (P, q)}`` for
    :func:`split_mtsgd`, from one forward pass of every network on the batch (its first
    ``num_examples`` inputs when given). Batch-norm networks run in training mode, like the loss."""

    def features(params, *, inputs=None, model_state=None, **_):
        if inputs is None:
            raise ValueError("kernel_space='split': the update needs the batch, extra argument inputs=x.")
        x = inputs if num_examples is None else inputs[:num_examples]
        out, latent, _ = forward_with_latent(task, params, model_state or {}, x, train=True, fast=fast)
        return named_outputs(task, out, latent)

    return features


# ----------------------------------------------------------------------------- warm-up and recipes


def warmup_preferences(num_particles: int, num_tasks: int) -> np.ndarray:
    """(M, K) preference vectors of the warm-up: network i descends ``sum_k w_ik L_k``.

    * K = 2: ``w_i = (i / (M - 1), 1 - i / (M - 1))``, the reference code's rule
      (:func:`~mtsgd_jax.transforms.preference_vectors`);
    * K > 2: ``w_ik = (1 + cos(2 pi (i / M - k / K))) / K``: points on a closed
      loop around the simplex's centre, so that every row sums to 1, every
      entry lies in [0, 2 / K], no two networks share a preference, and every
      task gets the same total weight (each column averages 1 / K), however M
      compares with K;
    * M = 1 (or K = 1): uniform ``1 / K``.
    """
    m, k = int(num_particles), int(num_tasks)
    if m < 1 or k < 1:
        raise ValueError(f"warmup_preferences: need num_particles >= 1 and num_tasks >= 1, got M={m}, K={k}.")
    if m == 1 or k <= 2:
        return np.asarray(preference_vectors(m, k), dtype=np.float64)
    i = np.arange(m)[:, None] / m
    t = np.arange(k)[None, :] / k
    return (1.0 + np.cos(2.0 * np.pi * (i - t))) / k


def recipe_options(name: str, task) -> dict:
    """The settings of recipe ``name`` for ``task``: ``kernel_space``, ``warmup_epochs``, ``optimizer``, ``lr``.

    ``"published"``: ``kernel_space="split"``, one warm-up epoch, SGD with
    momentum 0.9 and learning rate 1e-3 (the reference code's; ``task`` does not
    change them).
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)} (or None).")
    del task  # the published recipe is the same for every task
    return dict(RECIPES[name])
