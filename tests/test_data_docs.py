"""The examples in the data modules' docstrings run, and every public data name is documented."""

import doctest
import importlib

import pytest

MODULES = [
    "mtsgd_jax.data.idx",
    "mtsgd_jax.data.multi",
    "mtsgd_jax.data.sarcos",
    "mtsgd_jax.data.celeba",
    "mtsgd_jax.data.batches",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_every_public_data_name_is_documented():
    import mtsgd_jax.data as data

    assert data.__doc__.strip()
    callables = [n for n in data.__all__ if callable(getattr(data, n))]
    undocumented = [n for n in callables if not (getattr(data, n).__doc__ or "").strip()]
    assert not undocumented, f"public names without a docstring: {undocumented}"
    for n in data.__all__:
        assert hasattr(data, n), n
