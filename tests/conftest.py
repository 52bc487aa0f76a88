"""Test configuration: float32 by default, float64 only where a test asks for it.

Users run JAX's default, float32 (``jax_enable_x64`` off), so the suite does too. A test that
needs float64 says so, and gets x64 mode for its own duration only:

- ``@pytest.mark.x64`` on the test (or ``pytestmark = pytest.mark.x64`` on a module);
- or a 64-bit dtype (float64, complex128, int64, uint64) among its parameters
  (``@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])``): the float64 case runs in
  x64 mode, the float32 case in the default mode.

Arrays made at import time are float32 (x64 is off while modules are collected); a float64 test
builds its float64 inputs inside the test.
"""

import contextlib
import gc
import os

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", False)

# "ci" (the default) draws the same examples on every run and machine, so a red suite is
# reproducible and a landing is never blocked by a draw; "dev" explores (random, 200 examples):
# HYPOTHESIS_PROFILE=dev, and pin what it finds with @example.
settings.register_profile(
    "ci",
    max_examples=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

def pytest_configure(config):
    config.addinivalue_line(
        "markers", "x64: run the test with jax_enable_x64 on (float64 arrays); off otherwise"
    )


# dtypes that exist in JAX only in x64 mode (without it they silently become 32-bit)
_X64_DTYPES = {np.dtype(t) for t in (np.float64, np.complex128, np.int64, np.uint64)}


def _is_x64_dtype(value) -> bool:
    """True for a 64-bit dtype given as a type (np.float64, jnp.complex128), a numpy dtype or its name."""
    if isinstance(value, (str, type, np.dtype)):
        try:
            return np.dtype(value) in _X64_DTYPES
        except (TypeError, ValueError):
            return False
    return False


def _wants_x64(item) -> bool:
    if item.get_closest_marker("x64") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return any(_is_x64_dtype(v) for v in callspec.params.values())


@contextlib.contextmanager
def _x64_on():
    """x64 mode on inside the block, back to what it was after."""
    before = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


@pytest.fixture(autouse=True, scope="module")
def _x64_module(request):
    """x64 mode for a whole module marked ``pytestmark = pytest.mark.x64``, its module-scoped
    fixtures included (they are built before any test's own fixtures)."""
    if request.node.get_closest_marker("x64") is None:
        yield
        return
    with _x64_on():
        yield


@pytest.fixture(autouse=True)
def _x64_mode(request, _x64_module):
    """Turn x64 mode on for tests that need float64, and back to what it was afterwards."""
    if not _wants_x64(request.node):
        # A test that leaked x64 mode would silently turn the following tests into float64 ones.
        assert not jax.config.jax_enable_x64, "x64 mode leaked from an earlier test"
        yield
        return
    with _x64_on():
        yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    Hundreds of modules' jitted programs would otherwise stay cached for the whole run; clearing
    between modules keeps the suite's memory flat on small machines.
    """
    yield
    jax.clear_caches()
    gc.collect()
