"""x64 mode as a context manager, for the float64 constants of test modules marked ``x64``.

Modules are imported with x64 mode off (tests/conftest.py); a module whose tests all run in x64
mode (``pytestmark = pytest.mark.x64``) builds its module-level float64 arrays inside
``with enable_x64():``.
"""

import jax


def enable_x64():
    """``jax.enable_x64(True)`` where JAX has it (>= 0.7), else ``jax.experimental.enable_x64()``."""
    ctx = getattr(jax, "enable_x64", None)
    if ctx is not None:
        return ctx(True)
    from jax.experimental import enable_x64 as legacy

    return legacy()
