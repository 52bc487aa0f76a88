"""The examples in the docstrings of every module run and print what they claim."""

import doctest
import importlib
import pkgutil

import pytest

import mtsgd_jax

# Every importable module of the package (private ones too: the public functions of
# ``mtsgd_jax.transforms`` are defined in its private submodules).
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(mtsgd_jax.__path__, prefix="mtsgd_jax.")
    if not m.name.endswith("__main__")
)

# Modules whose public API must come with at least one runnable example.
MUST_HAVE_EXAMPLES = [
    "mtsgd_jax.kernels",
    "mtsgd_jax.particles",
    "mtsgd_jax.qp",
    "mtsgd_jax.stein",
    "mtsgd_jax.targets",
    "mtsgd_jax.transforms._mtsgd",
    "mtsgd_jax.transforms._moo_svgd",
    "mtsgd_jax.transforms._mgda",
    "mtsgd_jax.transforms._scalarization",
    "mtsgd_jax.transforms._pareto_mtl",
    "mtsgd_jax.sampling",
]


def test_module_list_is_complete():
    assert set(MUST_HAVE_EXAMPLES) <= set(MODULES)
    assert "mtsgd_jax.data.idx" in MODULES and "mtsgd_jax.cli.toy" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    if name in MUST_HAVE_EXAMPLES:
        assert result.attempted > 0, f"no docstring examples found in {name}"
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


@pytest.mark.parametrize("package", ["mtsgd_jax", "mtsgd_jax.transforms", "mtsgd_jax.data", "mtsgd_jax.models", "mtsgd_jax.metrics", "mtsgd_jax.problems", "mtsgd_jax.training"])
def test_every_public_name_is_documented(package):
    mod = importlib.import_module(package)
    assert (mod.__doc__ or "").strip(), f"{package} has no module docstring"
    undocumented = [n for n in getattr(mod, "__all__", []) if callable(getattr(mod, n)) and not (getattr(mod, n).__doc__ or "").strip()]
    assert not undocumented, f"public names of {package} without a docstring: {undocumented}"
