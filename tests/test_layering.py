"""The package's layering, checked over its import graph.

Layers, lowest first; a module may import from its own layer and the layers below, never
from a layer above:

0. core: kernels, stein, qp (+ its jaxopt seam), particles, targets, transforms, sampling,
   the blackjax-style sampler and private helpers. Everything a user needs to sample.
1. report: result files written atomically, tables, machine facts and timing, shared by
   every application layer.
2. applications' building blocks: problems, data, models, metrics. They use the layers below
   and never each other (each can be read, tested and replaced alone).
3. training: tasks, methods, the trainer.
4. experiments: the studies behind the README's tables.
5. cli: the ``mtsgd`` command.

Every import statement counts, including those inside functions (lazy imports are still
dependencies).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "mtsgd_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE

# First component under mtsgd_jax -> layer. Components not listed are core modules.
APPLICATION_LAYERS = {
    "report": 1,
    "problems": 2,
    "data": 2,
    "models": 2,
    "metrics": 2,
    "training": 3,
    "experiments": 4,
    "cli": 5,
}
# Layer-2 packages are siblings that must not depend on each other.
SIBLINGS_INDEPENDENT = 2


def _component(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else ""


def _layer(component: str) -> int:
    return APPLICATION_LAYERS.get(component, 0)


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            # ``from mtsgd_jax import training`` imports the sub-package itself.
            if mod == PACKAGE:
                found.extend((node.lineno, f"{PACKAGE}.{alias.name}") for alias in node.names)
    return found


def _sources():
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _violations():
    bad = []
    for path in _sources():
        src = _component(_module_name(path))
        if src == "":  # the top-level __init__ re-exports the public API of every layer
            continue
        src_layer = _layer(src)
        for line, mod in _imports(path):
            dst = _component(mod)
            if dst in (None, "", src):
                continue
            dst_layer = _layer(dst)
            upward = dst_layer > src_layer
            sibling = src_layer == dst_layer == SIBLINGS_INDEPENDENT
            if upward or sibling:
                rel = path.relative_to(ROOT.parent)
                kind = "imports a higher layer" if upward else "imports a sibling application package"
                bad.append(f"{rel}:{line}: {src} (layer {src_layer}) {kind}: {mod} (layer {dst_layer})")
    return bad


def test_layering_contract():
    bad = _violations()
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_the_check_sees_real_imports():
    # The contract is only meaningful if the scan finds the imports that do exist.
    sampling = ROOT / "sampling.py"
    mods = {m for _, m in _imports(sampling)}
    assert "mtsgd_jax.targets" in mods
    trainer = ROOT / "training" / "trainer.py"
    assert any(m.startswith("mtsgd_jax.models") for _, m in _imports(trainer))


@pytest.mark.parametrize(
    "src, dst, expect_violation",
    [
        ("kernels", "training", True),
        ("training", "experiments", True),
        ("metrics", "problems", True),
        ("experiments", "training", False),
        ("cli", "experiments", False),
        ("data", "report", False),
        ("report", "data", True),
        ("transforms", "kernels", False),
    ],
)
def test_layer_rule(src, dst, expect_violation):
    upward = _layer(dst) > _layer(src)
    sibling = _layer(src) == _layer(dst) == SIBLINGS_INDEPENDENT and src != dst
    assert (upward or sibling) == expect_violation
