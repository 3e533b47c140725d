"""``versions.tinygpt`` of an evaluation summary is known when tinygpt runs from a clone without ``pip install``:
pyproject.toml's version (the commit is recorded beside it); an installed package's recorded version."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_clone_without_pip_install_has_a_version():
    from tinygpt.version import tinygpt_version

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    found = tinygpt_version()
    assert found == version, found


def test_the_version_is_read_from_tinygpt_pyproject_only(tmp_path):
    from tinygpt.version import _checkout_version

    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "tinygpt"\nversion = "1.2.3"\n\n[tool.x]\nversion = "9"\n')
    assert _checkout_version(path) == "1.2.3"
    path.write_text('[project]\nname = "other"\nversion = "1.2.3"\n')
    assert _checkout_version(path) is None
    assert _checkout_version(tmp_path / "missing.toml") is None


def test_an_evaluation_records_the_version_of_a_clone():
    from tinygpt.evaluation.runner import versions

    recorded = versions("torch")
    assert recorded["tinygpt"] is not None and recorded["tinygpt"] == __import__("tinygpt.version").version \
        .tinygpt_version()
