"""Argument helpers shared by the subcommands: value types, ``--help`` formatting, optional modules."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Callable, Sequence

# Import name -> the name pip installs it under; all of them come with the ``experiments`` extra.
OPTIONAL_MODULES = {
    "matplotlib": "matplotlib",
    "scipy": "scipy",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "orbax.checkpoint": "orbax-checkpoint",
}
INSTALL_HINT = "pip install 'mtsgd-jax[experiments]'"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that shows a default only where it informs.

    No default is appended to a flag that takes no value (``store_true`` /
    ``store_false``: "--no-progress ... (default: True)" would read as if the
    flag were on), to an option whose default is None (its help says what None
    means), or to a help text that already states its default. A
    ``--x / --no-x`` pair (``argparse.BooleanOptionalAction``) keeps its
    "(default: True)", which names the state of ``--x``.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default" in text:
            return text
        if action.default is None or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
            return text
        return super()._get_help_string(action)


def add_common(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", default=default_out, help="output directory (created if missing)")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True,
        help="show progress bars (--no-progress hides them)",
    )


def set_requires(parser: argparse.ArgumentParser, requires: Sequence[str] | Callable[[argparse.Namespace], Sequence[str]]) -> None:
    """Declare the optional modules a subcommand imports (keys of :data:`OPTIONAL_MODULES`).

    ``requires`` is a sequence of import names, or a function of the parsed
    arguments returning one (when the need depends on the options, e.g. the task).
    :func:`mtsgd_jax.cli.main` checks them before the subcommand computes anything.
    """
    names = [] if callable(requires) else list(requires)
    unknown = [n for n in names if n not in OPTIONAL_MODULES]
    if unknown:
        raise ValueError(f"set_requires: unknown optional module(s) {unknown}; known: {sorted(OPTIONAL_MODULES)}.")
    parser.set_defaults(requires=requires)


def module_available(name: str) -> bool:
    """Whether ``name`` (possibly dotted) can be imported, found without importing it."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        try:
            if importlib.util.find_spec(".".join(parts[:i])) is None:
                return False
        except (ImportError, ValueError):  # a parent that is missing or half-imported
            return False
    return True


def missing_modules(args: argparse.Namespace) -> list[str]:
    """The pip names of the optional modules the parsed subcommand needs but cannot import."""
    requires = getattr(args, "requires", None) or ()
    if callable(requires):
        requires = requires(args)
    return [OPTIONAL_MODULES.get(n, n) for n in requires if not module_available(n)]


def missing_modules_message(command: str, missing: Sequence[str]) -> str:
    """E.g. "mtsgd toy needs matplotlib, which is not installed: pip install 'mtsgd-jax[experiments]'"."""
    names = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
    verb = "is" if len(missing) == 1 else "are"
    return f"mtsgd {command} needs {names}, which {verb} not installed: {INSTALL_HINT}"


def spec_checked_by(module: str, parser: str = "parse_method") -> Callable[[str], str]:
    """An argparse ``type=`` that checks a method spec with ``module.parser`` (imported when used)
    and returns the text unchanged; a ValueError becomes argparse's usage error (exit 2)."""

    def check(text: str) -> str:
        parse = getattr(importlib.import_module(module), parser)
        try:
            parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    return check
