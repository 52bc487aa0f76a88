"""The ``mtsgd`` command line: experiments and benchmarks as subcommands.

Each subcommand lives in its own module here, exposing ``register(subparsers)``
which adds its parser and sets ``func`` to a callable taking the parsed
arguments. ``mtsgd --help`` lists them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser"]

# Module names under mtsgd_jax.cli, in the order ``--help`` lists them.
_COMMANDS: tuple[str, ...] = ("toy", "scaling", "zdt", "train")


def build_parser() -> argparse.ArgumentParser:
    """The top-level ``mtsgd`` parser with every subcommand registered."""
    from mtsgd_jax import __version__

    parser = argparse.ArgumentParser(
        prog="mtsgd",
        description="MT-SGD (multiple-target sampling gradient descent) experiments and benchmarks in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"mtsgd_jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"mtsgd_jax.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mtsgd`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
