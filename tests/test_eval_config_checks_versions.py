"""``versions.tinygpt`` of an evaluation summary is known when tinygpt runs from a clone without ``pip install``:
pyproject.toml's version with the commit read from .git (no git needed); an installed package's recorded version."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"


def test_a_clone_without_pip_install_has_a_version():
    from tinygpt.version import tinygpt_version

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    found = tinygpt_version()
    assert found is not None and re.fullmatch(re.escape(version) + r"(\+g[0-9a-f]{7})?", found), found
    if (REPO / ".git" / "HEAD").is_file():
        assert found.startswith(f"{version}+g")


def test_the_version_is_read_from_tinygpt_pyproject_only(tmp_path):
    from tinygpt.version import _checkout_version

    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "tinygpt"\nversion = "1.2.3"\n\n[tool.x]\nversion = "9"\n')
    assert _checkout_version(path) == "1.2.3"
    path.write_text('[project]\nname = "other"\nversion = "1.2.3"\n')
    assert _checkout_version(path) is None
    assert _checkout_version(tmp_path / "missing.toml") is None


def test_the_commit_is_read_without_git(tmp_path):
    from tinygpt.version import _git_commit

    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    assert _git_commit(git) is None  # an empty repository: no commit yet
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{SHA} refs/heads/main\n")
    assert _git_commit(git) == SHA
    (git / "refs" / "heads" / "main").write_text(SHA.replace("0", "f") + "\n")
    assert _git_commit(git) == SHA.replace("0", "f")
    (git / "HEAD").write_text(SHA + "\n")  # detached
    assert _git_commit(git) == SHA
    link = tmp_path / "sub" / ".git"
    link.parent.mkdir()
    link.write_text(f"gitdir: {git}\n")
    assert _git_commit(link) == SHA
    assert _git_commit(tmp_path / "nothing") is None


def test_an_evaluation_records_the_version_of_a_clone():
    from tinygpt.evaluation.runner import versions

    recorded = versions("torch")
    assert recorded["tinygpt"] is not None and recorded["tinygpt"] == __import__("tinygpt.version").version \
        .tinygpt_version()
