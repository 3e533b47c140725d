"""Install and packaging metadata that a review found wrong (fast, offline): the Python versions pyproject.toml claims,
the torch build constraints.txt keeps, and pyproject metadata that setuptools has announced it will stop building."""

from __future__ import annotations

import importlib.util
import tomllib
import warnings
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


def _ci_lock():
    spec = importlib.util.spec_from_file_location("ci_lock_review", ROOT / ".ci" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_requires_python_starts_at_the_python_the_lock_and_canary_resolve_for():
    """transformers>=5.23 (and numpy, scikit-learn, matplotlib, pandas at the locked versions) need Python >= 3.11:
    with ``>=3.10`` pip on 3.10 accepted tinygpt and then failed with "No matching distribution found for
    transformers<6,>=5.23"; nothing resolves or tests 3.10 (the lock and the canary are 3.11)."""
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    locked = _ci_lock().PYTHON_VERSION
    assert requires.contains(f"{locked}.0"), f"requires-python {requires} excludes the locked Python {locked}"
    major, minor = (int(x) for x in locked.split("."))
    assert not requires.contains(f"{major}.{minor - 1}.99"), \
        f"requires-python {requires} admits Python {major}.{minor - 1}, which the supported ranges cannot install on"


def test_constraints_keep_torch_on_the_cpu_build():
    """``torch==2.13.0`` also matches PyPI's CUDA build (torch 2.13.0 with nvidia-* requirements), which is what
    ``pip install . -c constraints.txt`` resolved to without the CPU index; the constraint must name the +cpu build
    (the one .ci/lock.py and .ci/canary.py force) so such an install stops instead of pulling gigabytes."""
    lines = [line.split("#", 1)[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    torch = [Requirement(line) for line in lines if line and Requirement(line).name == "torch"]
    assert torch, "constraints.txt does not constrain torch"
    cpu = _ci_lock().TORCH_CPU.split("==")[1]
    for req in torch:
        assert req.specifier.contains(cpu), f"constraints.txt's {req} excludes {cpu}"
        assert not req.specifier.contains(cpu.split("+")[0]), f"constraints.txt's {req} admits PyPI's CUDA build"


def test_pyproject_uses_no_metadata_setuptools_will_stop_building():
    """``license = { text = ... }`` makes setuptools warn "`project.license` as a TOML table is deprecated ... By
    2027-Feb-18 ... your builds will no longer be supported"; ``pip install .`` builds with the newest setuptools
    (build isolation), so that release would break it. The SPDX string form needs setuptools >= 77."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution
    from setuptools.warnings import SetuptoolsDeprecationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", SetuptoolsDeprecationWarning)
        apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))
    (setuptools,) = [Requirement(r) for r in _pyproject()["build-system"]["requires"]
                     if Requirement(r).name == "setuptools"]
    assert not setuptools.specifier.contains("76.9"), f"{setuptools}: the SPDX license string needs setuptools>=77"


def _ci_canary(monkeypatch):
    """.ci/canary.py, which imports .ci/lock.py as ``lock`` from its own folder (both names restored afterwards)."""
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "lock", _ci_lock())  # what its `import lock` finds
    spec = importlib.util.spec_from_file_location("ci_canary_review", ROOT / ".ci" / "canary.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_canary_builds_ggml_python_as_the_lock_does(monkeypatch, tmp_path):
    """Both flavours install ggml-python from its sdist. Without the lock's ``--config-settings`` the canary tested
    another build (no -fno-dse) than the lock's, and pip's wheel cache (keyed by the sdist URL, not the settings) then
    handed that build to the next ``pip install -r requirements.lock``. The files the canary installs from carry the
    lock's setting (checked here without a venv, a resolution or an install)."""
    import subprocess

    canary = _ci_canary(monkeypatch)
    setting = canary.lock.BUILD_SETTINGS["ggml-python"]
    monkeypatch.setattr(canary.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0))
    monkeypatch.setattr(canary, "progress", lambda message: None)

    def lowest(out, resolution="highest", extra_constraints=None, quiet=False):
        out.write_text("ggml-python==0.0.45\n    # via -r requirements.txt\ntorch==2.13.0+cpu\n    # via -r x\n")
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(canary.lock, "uv_compile", lowest)
    installed = {}

    def run_logged(cmd, log, timeout, **kwargs):
        installed[cmd[cmd.index("-r") + 1]] = Path(cmd[cmd.index("-r") + 1]).read_text()
        return 1, "stopped by the test"

    monkeypatch.setattr(canary, "run_logged", run_logged)
    for flavour in canary.FLAVOURS:
        work = tmp_path / flavour
        work.mkdir()
        assert canary.install(canary.Report(flavour), work) is None  # stopped after the install command
    assert len(installed) == 2
    for path, text in installed.items():
        (line,) = [x for x in text.splitlines() if x.startswith("ggml-python==")]
        assert line == f"ggml-python==0.0.45 {setting}", f"{path}: {line!r} is built without the lock's {setting}"
        assert canary.lock.parse_pins(line) == {"ggml-python": "0.0.45"}


def test_the_quick_start_and_ci_first_install_the_pip_the_lock_needs():
    """The lock's per-line ``--config-settings`` needs pip >= 23.1; Debian 12's ``python3 -m venv`` brings pip 23.0.1,
    which refused the whole lock ("no such option: --config-settings"). The README's quick start and .ci/run install
    the same pinned pip first, then the lock."""
    pin = _ci_lock().PIP
    (exact,) = Requirement(pin).specifier
    assert Requirement(pin).name == "pip" and exact.operator == "==" and SpecifierSet(">=23.1").contains(exact.version)
    readme = (ROOT / "README.md").read_text()
    quick_start = next(line for line in readme.splitlines() if line.startswith("python3 -m venv .venv"))
    steps = [step.strip() for step in quick_start.split("&&")]
    assert steps[:3] == ["python3 -m venv .venv", f".venv/bin/python -m pip install -q {pin}",
                         ".venv/bin/pip install -r requirements.lock"]
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci.index("python3 -m venv .venv") + 1 == ci.index(f".venv/bin/python -m pip install -q {pin}")
    assert ci.index(f".venv/bin/python -m pip install -q {pin}") + 1 == ci.index(
        ".venv/bin/pip install -q -r requirements.lock")
