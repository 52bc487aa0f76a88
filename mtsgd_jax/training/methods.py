"""Multi-task training methods as optax transformations, and the optimisers that follow them.

:func:`make_method` returns a :class:`Method`: the gradient transformation
plus how the trainer must feed it. Every method trains a particle set of
networks (leaves (P, ...)):

============================  ==========================================================  =========
name                          what each step does                                          networks
============================  ==========================================================  =========
``"mtsgd"``                   :func:`~mtsgd_jax.mtsgd`: K Stein directions, ONE QP          M
``"moo_svgd"``                :func:`~mtsgd_jax.moo_svgd`: M MGDA QPs + kernel smoothing    M
``"mgda"``                    :func:`~mtsgd_jax.mgda`: each network's min-norm direction    M
``"pareto_mtl"``              :func:`~mtsgd_jax.transforms.pareto_mtl`: one preference      M
                              region per network
``"linear_scalarization"``    descend ``sum_k w_k L_k`` (uniform ``w``, or spread           M
                              preference vectors with ``ls_weights="spread"``)
``"single_task"``             K independent sets of M networks; set k descends ``L_k``      K * M
                              only and is evaluated on task k only
============================  ==========================================================  =========

The first four take per-task gradients (K backward passes per network and
step). Linear scalarisation and single-task training need one backward pass
of one scalar loss per network: for them :attr:`Method.scalarization` holds
the (P, K) weights of that loss, the trainer differentiates
``sum_k w_pk L_k(theta_p)`` directly and the transformation is the identity
(mathematically the same as :func:`~mtsgd_jax.linear_scalarization` on the
per-task gradients, at 1/K of the cost).

The transformations come from the registry
(:func:`~mtsgd_jax.transforms.make_transform`); options of a transformation
that :func:`make_method` does not name (``warm_start``, ``block_size``,
``solver_options``, ``constraint_tol``, ...) pass through its
``**transform_options``. On the command line a method is a spec,
``NAME`` or ``NAME:key=value,...`` (:func:`parse_method`), e.g.
``"mtsgd:weighting=score"``.

Kernels (``kernel_space``, for ``mtsgd`` and ``moo_svgd``; ignored by the
others): ``"parameter"`` is the RBF kernel (median bandwidth) on the
flattened parameters; ``"function"`` is the RBF kernel on each network's
outputs on the current batch, through the transformations' ``features=``
option; pass ``features`` (e.g. :func:`mtsgd_jax.training.function_features`).
``"split"`` (``mtsgd`` only) is the MT-SGD reference code's choice: the
shared encoder takes MT-SGD with an RBF kernel on each network's latent
features, each task head its own task's SVGD step with an RBF kernel on its
outputs (:func:`~mtsgd_jax.training.recipe.split_mtsgd`); pass ``heads`` and
``features`` (:func:`mtsgd_jax.training.build_method` fills both from the task).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import optax

from mtsgd_jax.training.recipe import split_mtsgd
from mtsgd_jax.transforms import make_transform, parse_spec, preference_vectors

__all__ = ["METHODS", "KERNEL_SPACES", "OPTIMIZERS", "Method", "make_method", "make_optimizer", "parse_method"]

METHODS = ("mtsgd", "moo_svgd", "mgda", "linear_scalarization", "pareto_mtl", "single_task")
KERNEL_SPACES = ("parameter", "function", "split")
OPTIMIZERS = ("sgd", "momentum", "adam")
LS_WEIGHTS = ("uniform", "spread")

# Methods trained through a registered transformation, and the option of make_method that stands
# for a transformation's option of another name (make_method's keyword is recorded in checkpoints).
_TRANSFORM_METHODS = ("mtsgd", "moo_svgd", "mgda", "pareto_mtl")
_RENAMED = {"warmup_steps": "pareto_warmup_steps"}


class Method(NamedTuple):
    """A training method (see the module docstring).

    Attributes:
      name: one of :data:`METHODS`.
      transform: the optax transformation applied to the gradients before the
        optimiser. Its ``update`` gets per-task gradients (leaves (K, P, ...)) and
        the extra arguments ``losses=`` (K, P) values plus the batch, unless
        ``scalarization`` is set (then gradients shaped like the particles).
      num_particles: P, the number of networks trained (K * M for single-task).
      num_tasks: K.
      scalarization: None, or (P, K) weights: each network descends
        ``sum_k w_pk L_k`` and only that gradient is computed.
      assignment: None (every network predicts every task), or (P,) the one
        task each network is trained and evaluated on (single-task).
      kernel_space: ``"parameter"``, ``"function"`` or ``"split"`` (kernel methods), else None.
    """

    name: str
    transform: optax.GradientTransformation
    num_particles: int
    num_tasks: int
    scalarization: np.ndarray | None = None
    assignment: np.ndarray | None = None
    kernel_space: str | None = None


def make_method(
    name: str,
    num_tasks: int,
    num_particles: int,
    *,
    kernel_space: str = "parameter",
    features: Callable | None = None,
    heads=None,
    reuse_cache: bool = True,
    weighting: str = "stein",
    repulsion: float = 1.0,
    normalize_grads: bool = False,
    preferences=None,
    pareto_warmup_steps: int = 100,
    ls_weights: str = "uniform",
    solver: str = "auto",
    **transform_options,
) -> Method:
    """Build a :class:`Method`.

    Args:
      name: one of :data:`METHODS`.
      num_tasks: K.
      num_particles: M, networks per particle set (single-task trains K sets of M).
      kernel_space: ``"parameter"`` (default) or ``"function"`` for ``mtsgd`` /
        ``moo_svgd``; ``"function"`` needs ``features``. ``"split"`` for
        ``mtsgd`` only (a ValueError for the others): needs ``heads`` and
        ``features`` (see the module docstring).
      features: ``features(params, **extra_args) -> (M, p)`` for the
        function-space kernel (see :func:`mtsgd_jax.training.function_features`);
        for ``"split"``, ``-> {"latent": (M, p), "head_0": (M, q), ...}`` (see
        :func:`mtsgd_jax.training.recipe.split_features`).
      heads: for ``"split"``: where the task heads are in the parameters, labels
        or a layout (see :func:`mtsgd_jax.training.recipe.head_labels`).
      reuse_cache: for ``"split"``: take the features from the trainer's forward
        pass (``feature_cache=``) when it passes them.
      weighting: MT-SGD's ``weighting`` (``"stein"``, ``"normalized"``, ``"score"``).
      repulsion: MOO-SVGD's repulsion weight.
      normalize_grads: unit-norm task gradients in the QPs of ``moo_svgd``,
        ``mgda`` and ``pareto_mtl``.
      preferences: (M, K) preference vectors for ``pareto_mtl`` (default evenly
        spread, :func:`~mtsgd_jax.transforms.pareto_mtl_preferences`).
      pareto_warmup_steps: length of Pareto MTL's initial phase, in steps.
      ls_weights: ``"uniform"`` (every network descends the mean loss) or
        ``"spread"`` (network m descends with the preference vector m of
        :func:`~mtsgd_jax.transforms.preference_vectors`).
      solver: QP backend for the min-norm problems (``"auto"``: exact for small sizes).
      **transform_options: further keyword options of the method's
        transformation (:func:`~mtsgd_jax.transforms.transform_options`), e.g.
        ``warm_start=False`` or ``block_size=1024``; none for
        ``linear_scalarization`` and ``single_task``.

    Example:
      >>> m = make_method("mtsgd", num_tasks=2, num_particles=5, weighting="score")
      >>> m.name, m.num_particles, m.kernel_space
      ('mtsgd', 5, 'parameter')
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {METHODS}.")
    if kernel_space not in KERNEL_SPACES:
        raise ValueError(f"kernel_space must be one of {KERNEL_SPACES}, got {kernel_space!r}.")
    k, m = int(num_tasks), int(num_particles)
    if k < 1 or m < 1:
        raise ValueError(f"make_method: need num_tasks >= 1 and num_particles >= 1, got {k} and {m}.")
    if kernel_space == "split":
        if name != "mtsgd":
            others = "mgda, pareto_mtl, linear_scalarization and single_task have no kernel" if name != "moo_svgd" else (
                "moo_svgd takes kernel_space='parameter' or 'function'")
            raise ValueError(
                f"kernel_space='split' is for method 'mtsgd' only (encoder MT-SGD + per-head SVGD), got {name!r}; "
                f"{others}. Use kernel_space='parameter' or 'function' with {name!r}, or method 'mtsgd'."
            )
        if heads is None or features is None:
            raise ValueError(
                "mtsgd: kernel_space='split' needs heads= (where the task heads are) and features= "
                "(params, **extra_args) -> {'latent': ..., 'head_k': ...}; build_method(task, ...) fills both."
            )
        renamed = sorted(set(transform_options) & set(_RENAMED))
        if renamed:
            raise ValueError(f"make_method: pass {', '.join(_RENAMED[k] + '=' for k in renamed)} instead of {renamed}.")
        t = split_mtsgd(k, heads, features, weighting=weighting, solver=solver, reuse_cache=reuse_cache, **transform_options)
        return Method(name, t, m, k, kernel_space="split")
    kernel_method = name in ("mtsgd", "moo_svgd")
    feats = None
    if kernel_method and kernel_space == "function":
        if features is None:
            raise ValueError(f"{name}: kernel_space='function' needs features=(params, **extra_args) -> (M, p).")
        feats = features
    if name in _TRANSFORM_METHODS:
        renamed = sorted(set(transform_options) & set(_RENAMED))
        if renamed:
            raise ValueError(f"make_method: pass {', '.join(_RENAMED[k] + '=' for k in renamed)} instead of {renamed}.")
        named = {
            "mtsgd": dict(solver=solver, weighting=weighting, features=feats),
            "moo_svgd": dict(features=feats, repulsion=repulsion, solver=solver, normalize_grads=normalize_grads),
            "mgda": dict(solver=solver, normalize_grads=normalize_grads),
            "pareto_mtl": dict(
                preferences=preferences, warmup_steps=pareto_warmup_steps, normalize_grads=normalize_grads, solver=solver
            ),
        }[name]
        t = make_transform(name, k, **named, **transform_options)
        return Method(name, t, m, k, kernel_space=kernel_space if kernel_method else None)
    if transform_options:
        raise ValueError(
            f"make_method: {name} is trained through its scalarised loss and has no transformation options; "
            f"got {sorted(transform_options)}."
        )
    if name == "linear_scalarization":
        if ls_weights == "uniform":
            w = np.full((m, k), 1.0 / k)
        elif ls_weights == "spread":
            w = np.asarray(preference_vectors(m, k), dtype=float)
        else:
            raise ValueError(f"ls_weights must be one of {LS_WEIGHTS}, got {ls_weights!r}.")
        return Method(name, optax.identity(), m, k, scalarization=w)
    # single_task: K independent sets of M networks, set k on task k.
    assignment = np.repeat(np.arange(k), m)
    w = np.eye(k)[assignment]
    return Method(name, optax.identity(), k * m, k, scalarization=w, assignment=assignment)


def _ls_weights(text: str) -> str:
    if text not in LS_WEIGHTS:
        raise ValueError(f"expected one of {LS_WEIGHTS}, got {text!r}")
    return text


def parse_method(spec: str) -> tuple[str, dict]:
    """A method spec -> ``(name, options)``: :func:`make_method`'s name and keyword options.

    ``spec`` is ``NAME`` or ``NAME:key=value,...`` with ``NAME`` in
    :data:`METHODS`. For ``mtsgd``, ``moo_svgd``, ``mgda`` and ``pareto_mtl``
    the keys are the options of the transformation, converted by their types
    (:func:`~mtsgd_jax.transforms.parse_spec`; Pareto MTL's ``warmup_steps``
    is returned as ``pareto_warmup_steps``); ``linear_scalarization`` takes
    ``ls_weights=uniform|spread``; ``single_task`` takes none.

    Raises:
      ValueError: for an unknown method, option or value (the message lists
        the valid ones).

    Example:
      >>> parse_method("mtsgd:weighting=score,warm_start=0")
      ('mtsgd', {'weighting': 'score', 'warm_start': False})
      >>> parse_method("pareto_mtl:warmup_steps=10")
      ('pareto_mtl', {'pareto_warmup_steps': 10})
    """
    if not isinstance(spec, str):
        raise TypeError(f"parse_method: spec must be a str like 'mtsgd:weighting=score', got {type(spec).__name__}.")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} in {spec!r}; choose one of {METHODS}.")
    if name == "single_task":
        if rest.strip(" ,"):
            raise ValueError(f"{spec!r}: single_task takes no options.")
        return name, {}
    if name == "linear_scalarization":
        parsed = parse_spec(spec, options=(), extra_options={"ls_weights": _ls_weights})
        return name, parsed.extras
    parsed = parse_spec(spec, methods=_TRANSFORM_METHODS)
    return name, {_RENAMED.get(k, k): v for k, v in parsed.options.items()}


def make_optimizer(name: str, lr: float, *, momentum: float = 0.9) -> optax.GradientTransformation:
    """The optimiser that descends the method's direction.

    Args:
      name: ``"sgd"`` (plain), ``"momentum"`` (SGD with ``momentum``, heavy ball)
        or ``"adam"`` (default betas).
      lr: learning rate > 0.
    """
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"learning rate must be a positive number, got {lr!r}.")
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=momentum)
    if name == "adam":
        return optax.adam(lr)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")
