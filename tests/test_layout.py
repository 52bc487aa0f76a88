"""The tests mirror the package: every library module has a test module that exercises it.

Convention: ``mtsgd_jax/<mod>.py`` is tested in ``tests/test_<mod>.py`` and
``mtsgd_jax/<pkg>/<mod>.py`` in ``tests/test_<pkg>_<mod>.py`` (a leading underscore of a private
module is dropped: ``transforms/_mtsgd.py`` -> ``test_transforms_mtsgd.py``). Where one test module
covers several small modules, :data:`TESTED_IN` says which. Either way the test module must
really use the module: import it, or name one of its top-level functions or classes (for a
``cli`` subcommand module: run the subcommand by name).
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mtsgd_jax"
TESTS = ROOT / "tests"

# library module (path under mtsgd_jax/) -> the test module that covers it, where the name differs
TESTED_IN = {
    "transforms/_mtsgd.py": "test_transforms.py",  # mtsgd and svgd: the Stein transformations
    "transforms/_normalize.py": "test_transforms.py",  # normalize_target_grads, a stage before them
    "transforms/_common.py": "test_baselines.py",  # shared solver closure / per-particle MGDA
    "transforms/_mgda.py": "test_baselines.py",
    "transforms/_moo_svgd.py": "test_baselines.py",
    "transforms/_scalarization.py": "test_baselines.py",
    "transforms/_constraints.py": "test_constraints.py",
    "transforms/_pareto_mtl.py": "test_pareto_mtl.py",
    "transforms/_registry.py": "test_registry.py",
    "problems/toy.py": "test_problems.py",
    "data/_common.py": "test_data_idx.py",  # the format error and file helpers every loader shares
    "models/ensemble.py": "test_models.py",
    "models/heads.py": "test_models.py",
    "models/lenet.py": "test_models.py",
    "models/mlp.py": "test_models.py",
    "models/resnet.py": "test_models.py",
    "models/fast.py": "test_train_step.py",  # the fast ensemble paths == plain flax, inside the train step
    "training/checkpoint.py": "test_checkpoint.py",
    "training/methods.py": "test_training.py",
    "training/tasks.py": "test_training.py",
    "training/trainer.py": "test_training.py",
    "cli/_common.py": "test_cli.py",
    "cli/toy.py": "test_cli.py",
    "cli/scaling.py": "test_cli.py",
    "cli/zdt.py": "test_experiment_zdt.py",
    "cli/multimnist.py": "test_experiment_multimnist.py",
    "experiments/multitask.py": "test_experiment_multitask.py",
    "experiments/zdt.py": "test_experiment_zdt.py",
    "experiments/scaling.py": "test_experiment_scaling.py",
    "experiments/toy_comparison.py": "test_experiment_toy_comparison.py",
    "experiments/multimnist.py": "test_experiment_multimnist.py",
}


def _library_modules() -> list[str]:
    return sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    )


def _conventional_name(rel: str) -> str:
    parts = [part.removesuffix(".py").lstrip("_") for part in pathlib.PurePosixPath(rel).parts]
    return "test_" + "_".join(parts) + ".py"


def _test_module_for(rel: str) -> str:
    return TESTED_IN.get(rel, _conventional_name(rel))


def _top_level_names(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name) and t.id.isupper())
    return names


def _uses(test_source: str, rel: str) -> bool:
    dotted = "mtsgd_jax." + rel.removesuffix(".py").replace("/", ".")
    if dotted in test_source:
        return True
    parent, _, leaf = dotted.rpartition(".")
    if re.search(rf"from {re.escape(parent)} import [^\n]*\b{leaf}\b", test_source):
        return True
    if rel.startswith("cli/") and not leaf.startswith("_") and re.search(rf"""main\(\s*\[\s*["']{leaf}["']""", test_source):
        return True
    names = _top_level_names(PACKAGE / rel)
    return any(re.search(rf"\b{re.escape(n)}\b", test_source) for n in names)


@pytest.mark.parametrize("rel", _library_modules())
def test_every_module_has_a_test_module_that_uses_it(rel):
    name = _test_module_for(rel)
    path = TESTS / name
    assert path.exists(), (
        f"mtsgd_jax/{rel} has no test module: expected tests/{name} "
        f"(or an entry in TESTED_IN naming the test module that covers it)"
    )
    assert _uses(path.read_text(), rel), f"tests/{name} never imports or names anything from mtsgd_jax/{rel}"


def test_the_mapping_names_only_real_modules():
    modules = set(_library_modules())
    assert set(TESTED_IN) <= modules, sorted(set(TESTED_IN) - modules)
    for rel, name in TESTED_IN.items():
        assert name != _conventional_name(rel), f"{rel}: {name} is the conventional name; drop the entry"


def test_the_check_has_teeth(tmp_path):
    # a module nobody tests is found: a fresh name maps to a missing file
    assert _conventional_name("experiments/new_study.py") == "test_experiments_new_study.py"
    assert not (TESTS / _conventional_name("experiments/new_study.py")).exists()
    # and a test module that never touches the module does not count
    assert not _uses("import numpy as np\n\ndef test_x():\n    assert np.ones(1)[0] == 1\n", "kernels.py")
    assert _uses("from mtsgd_jax.kernels import rbf\n", "kernels.py")
