"""The ``mtsgd`` command line: experiments and benchmarks as subcommands.

Each subcommand lives in its own module here, exposing ``register(subparsers)``
which adds its parser, sets ``func`` to a callable taking the parsed arguments
and declares the optional modules it imports
(:func:`mtsgd_jax.cli._common.set_requires`). ``mtsgd --help`` lists them.

:func:`main` checks those modules before anything is computed (exit status 2
with the ``pip install`` line when one is missing). A figure that fails after
the results were written exits with status 1, naming the result files kept.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mtsgd_jax.cli._common import HelpFormatter, missing_modules, missing_modules_message

__all__ = ["main", "build_parser"]

# Module names under mtsgd_jax.cli, in the order ``--help`` lists them.
_COMMANDS: tuple[str, ...] = ("toy", "scaling", "zdt", "train", "multimnist")


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
    # One help style for every subcommand: defaults shown where they inform (never "(default: True)"
    # after a flag such as --resume or --no-progress).
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mtsgd`` console script; returns the exit status.

    0: done; 1: the results were written but a figure failed (the message names
    the files kept); 2: usage error, or an optional module the subcommand needs
    is not installed (checked before computing).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    missing = missing_modules(args)
    if missing:
        print(missing_modules_message(args.command, missing), file=sys.stderr)
        return 2
    from mtsgd_jax.report import PlotError

    try:
        result = args.func(args)
    except PlotError as e:
        print(f"mtsgd {args.command}: {e}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
