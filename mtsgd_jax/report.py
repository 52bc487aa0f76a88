"""Result files, tables, machine facts and timing, shared by training, experiments, the CLI and benchmarks.

The application layers (data, training, experiments, cli) and ``benchmarks/``
write every result through this module; it depends on nothing but jax and numpy.

Every result file goes through the atomic writers here (:func:`atomic_open`,
:func:`write_bytes`, :func:`write_text`, :func:`write_json`, :func:`write_csv`,
:func:`save_figure`): the content goes to a temporary file in the destination's
directory, is flushed and fsync-ed, then renamed over the destination with
``os.replace``. A reader, or a run that is interrupted, sees either the old
file or the complete new one, never a partial file.

Experiments write their results (JSON) first and plot afterwards through
:func:`write_figures`, which raises :class:`PlotError` (naming the results that
were kept) when a figure fails.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import os
import platform
import secrets
import statistics
import sys
import time
from typing import IO, Any, Callable, Iterator, Sequence

import jax
import numpy as np


def machine_info() -> dict:
    """Versions, devices and CPU facts recorded next to every timing."""
    import optax

    import mtsgd_jax

    return {
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(__import__("jaxlib"), "__version__", None),
        "optax_version": optax.__version__,
        "mtsgd_jax_version": mtsgd_jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "x64": bool(jax.config.jax_enable_x64),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _jsonable(obj: Any):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(obj).tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path`` atomically.

    Args:
      path: destination; its directory is created if missing.
      mode: ``"w"`` (text) or ``"wb"`` (binary).
      encoding: text encoding (ignored for ``"wb"``).

    Yields:
      The open temporary file. When the ``with`` block exits normally, the file is
      flushed, fsync-ed and renamed to ``path`` (``os.replace``); when it raises,
      the temporary file is removed and ``path`` is left as it was.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with atomic_open(os.path.join(d, "a.txt")) as f:
    ...         _ = f.write("done")
    ...     open(os.path.join(d, "a.txt")).read(), os.listdir(d)
    ('done', ['a.txt'])
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}.")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with mode 0o666 lets the umask decide the permissions, as open(path, "w") would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": encoding, "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable where the platform allows it (POSIX); a no-op elsewhere."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`); returns ``path``."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_open`); returns ``path``."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return os.fspath(path)


def write_json(path: str | os.PathLike, payload: dict) -> str:
    """Write ``payload`` (numpy/jax arrays allowed; NaN/inf become null) as indented JSON, atomically."""
    return write_text(path, json.dumps(_jsonable(payload), indent=2) + "\n")


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Write a CSV file (one header line, then ``rows``; numpy scalars allowed) atomically; returns ``path``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(header))
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"write_csv: every row needs {len(header)} fields (the header's), got {len(r)}: {list(r)!r}.")
        writer.writerow([c.item() if isinstance(c, np.generic) else c for c in r])
    return write_text(path, buf.getvalue())


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> str:
    """``fig.savefig`` into ``path`` atomically; the format comes from the suffix (``.png``, ``.pdf``, ``.svg``).

    Args:
      fig: a matplotlib ``Figure``.
      path: destination, with a suffix matplotlib knows.
      **savefig_kwargs: passed to ``fig.savefig`` (``dpi``, ``bbox_inches``, ...).
    """
    path = os.fspath(path)
    fmt = savefig_kwargs.pop("format", None) or os.path.splitext(path)[1].lstrip(".").lower()
    if not fmt:
        raise ValueError(f"save_figure: {path!r} has no suffix; name the file .png, .pdf or .svg, or pass format=.")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=fmt, **savefig_kwargs)
    return path


class PlotError(RuntimeError):
    """A figure failed after the results were written; the results are kept.

    Attributes:
      results: paths of the result files that were written before plotting.
      failures: ``(figure path, exception)`` for every figure that failed.
    """

    def __init__(self, results: Sequence[str], failures: Sequence[tuple[str, BaseException]]):
        self.results = [os.fspath(r) for r in results]
        self.failures = list(failures)
        lines = [f"  {p}: {type(e).__name__}: {e}" for p, e in self.failures]
        kept = ", ".join(self.results) if self.results else "(none)"
        super().__init__(
            f"plotting failed for {len(self.failures)} figure(s):\n" + "\n".join(lines) + f"\nthe results are kept in {kept}"
        )


def write_figures(plots: Sequence[tuple[Callable[[str], Any], str]], *, results: Sequence[str]) -> list[str]:
    """Draw every figure after the results are on disk; a failing figure does not stop the others.

    Args:
      plots: ``(plot_fn, path)`` pairs; ``plot_fn(path)`` draws and saves one figure.
      results: the result files already written (named by :class:`PlotError`).

    Returns:
      The figure paths, in order, when all succeed.

    Raises:
      PlotError: one or more figures failed (each failure named); ``results`` are intact.
    """
    done, failures = [], []
    for plot_fn, path in plots:
        try:
            plot_fn(path)
            done.append(os.fspath(path))
        except Exception as e:  # noqa: BLE001 -- reported with the path in PlotError
            failures.append((os.fspath(path), e))
    if failures:
        raise PlotError(results, failures) from failures[0][1]
    return done


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (first column left-aligned)."""
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def time_compiled(fn: Callable, args: tuple, repeats: int) -> tuple[float, list[float], Any]:
    """AOT-compile ``jax.jit(fn)`` for ``args`` and run it ``repeats`` times.

    Returns (compile seconds, run seconds per repeat, the last run's output).
    """
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    runs, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - start)
    return compile_s, runs, out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))
