"""Shared pieces of the data loaders: the format error and small file helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["DataFormatError", "find_first", "missing_file_error"]

PathLike = str | os.PathLike


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format.

    The message names the file, what was found and what was expected, e.g.
    ``train-images-idx3-ubyte.gz: bad magic number 0x1f8b0800 ...``. It is a
    ``ValueError`` so that generic handlers keep working.
    """


def find_first(candidates: Iterable[PathLike]) -> Path | None:
    """The first of ``candidates`` that is an existing file, or None."""
    for c in candidates:
        p = Path(c)
        if p.is_file():
            return p
    return None


def missing_file_error(what: str, candidates: Sequence[PathLike], fmt: str) -> FileNotFoundError:
    """A FileNotFoundError that lists every place that was looked at, and the expected format."""
    tried = "\n  ".join(str(c) for c in candidates)
    return FileNotFoundError(f"{what} not found; looked for:\n  {tried}\nexpected there: {fmt}.")
