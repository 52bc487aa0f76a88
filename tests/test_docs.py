"""The examples in the public docstrings run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = [
    "mtsgd_jax.kernels",
    "mtsgd_jax.particles",
    "mtsgd_jax.qp",
    "mtsgd_jax.stein",
    "mtsgd_jax.targets",
    "mtsgd_jax.transforms",
    "mtsgd_jax.sampling",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"no docstring examples found in {name}"
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_every_public_name_is_documented():
    import mtsgd_jax

    undocumented = [n for n in mtsgd_jax.__all__ if not (getattr(mtsgd_jax, n).__doc__ or "").strip()]
    assert not undocumented, f"public names without a docstring: {undocumented}"
