"""Reproducible experiments behind the ``mtsgd`` command line and the README's figures.

Each module runs one experiment end to end (configuration in, JSON + PNG out)
and is importable, so the same code serves ``examples/``, ``benchmarks/`` and
the installed ``mtsgd`` command.
"""
