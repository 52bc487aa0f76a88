"""Test configuration: float64 available everywhere, hypothesis tuned for CI."""

import gc
import os


import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Tests choose float32 or float64 explicitly; enabling x64 lets them do both
# (and checks that float32 inputs are not silently promoted).
jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    Hundreds of modules' jitted programs would otherwise stay cached for the whole run; clearing
    between modules keeps the suite's memory flat on small machines.
    """
    yield
    jax.clear_caches()
    gc.collect()
