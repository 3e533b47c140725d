"""The import contract (pyproject.toml, [tool.importlinter]) holds for the checkout and catches an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def copied_tree(tmp_path_factory):
    if not LINT_IMPORTS.exists():
        pytest.skip("lint-imports is not installed (requirements.lock installs it)")
    tree = tmp_path_factory.mktemp("tree")
    for name in ("tinygpt", "quantize"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_layers_hold(copied_tree):
    result = lint(copied_tree)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "Contracts: 1 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_contract(copied_tree):
    model = copied_tree / "tinygpt" / "model" / "vision.py"
    original = model.read_text()
    model.write_text(original + "\nfrom tinygpt.train import loop  # noqa: E402,F401  (deliberately wrong)\n")
    try:
        result = lint(copied_tree)
    finally:
        model.write_text(original)
    assert result.returncode == 1
    assert "Contracts: 0 kept, 1 broken." in result.stdout
    assert "tinygpt.model is not allowed to import tinygpt.train" in result.stdout
    assert "tinygpt.model.vision -> tinygpt.train.loop" in result.stdout
