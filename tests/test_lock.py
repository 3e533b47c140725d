"""Keeps requirements.lock honest (fast, offline): it pins everything requirements.txt names, inside the supported
ranges, and pyproject.toml declares the same ranges as requirements.txt, so the three files can't drift apart."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def _requirements(lines) -> dict[str, Requirement]:
    reqs = {}
    for line in lines:
        line = line.split("#", 1)[0].split(" --", 1)[0].strip()  # less per-requirement options (--config-settings)
        if line:
            req = Requirement(line)
            reqs[canonicalize_name(req.name)] = req
    return reqs


def _lock() -> dict[str, Version]:
    pins = {}
    for name, req in _requirements((ROOT / "requirements.lock").read_text().splitlines()).items():
        (spec,) = req.specifier
        assert spec.operator == "==", f"requirements.lock: {req} is not an exact pin"
        pins[name] = Version(spec.version)
    return pins


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_lock_pins_every_requirement_inside_its_range():
    lock = _lock()
    for name, req in _requirements((ROOT / "requirements.txt").read_text().splitlines()).items():
        assert name in lock, f"{req.name} is in requirements.txt but not in requirements.lock (run python3 .ci/lock.py)"
        assert req.specifier.contains(lock[name], prereleases=True), \
            f"requirements.lock pins {name}=={lock[name]}, outside requirements.txt's {req}"


def test_lock_respects_constraints():
    lock = _lock()
    for name, req in _requirements((ROOT / "constraints.txt").read_text().splitlines()).items():
        if name in lock:
            assert req.specifier.contains(lock[name], prereleases=True), f"{name}=={lock[name]} breaks {req}"


def test_lock_keeps_torch_on_the_cpu_build():
    lock = _lock()
    assert lock["torch"].local == "cpu", f"torch=={lock['torch']}: not the local CPU build"
    assert not [n for n in lock if n.startswith(("nvidia-", "triton", "cuda-"))], "CUDA packages in the lock"


def test_pyproject_declares_requirements_txt_ranges():
    reqs = {name: str(req.specifier) for name, req in
            _requirements((ROOT / "requirements.txt").read_text().splitlines()).items()}
    project = _pyproject()
    runtime = {name: str(req.specifier) for name, req in _requirements(project["dependencies"]).items()}
    test = {name: str(req.specifier) for name, req in
            _requirements(project["optional-dependencies"]["test"]).items()}
    assert not set(runtime) & set(test), "a package is both a runtime dependency and a test extra"
    assert {**runtime, **test} == reqs, "pyproject.toml's dependencies + [test] extra differ from requirements.txt"
    assert "pytest" in test and "pytest" not in runtime


def test_the_lock_builds_ggml_python_with_its_amx_tile_configuration_kept():
    """ggml-python is built from its sdist at install; the lock's line passes -fno-dse so that GCC 12 does not drop the
    AMX tile configuration's stores (quantize/ggml_amx.py). .ci/lock.py writes the line, and reads it back."""
    ci_lock = _ci_lock()
    (line,) = [x for x in (ROOT / "requirements.lock").read_text().splitlines() if x.startswith("ggml-python==")]
    assert line.endswith(" --config-settings=cmake.define.CMAKE_CXX_FLAGS=-fno-dse")
    assert ci_lock.with_build_settings("ggml-python==0.0.45\n    # via -r requirements.txt\n").splitlines()[0] == line
    assert ci_lock.parse_pins(line) == {"ggml-python": "0.0.45"}


def _ci_lock():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ci_lock", ROOT / ".ci" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adding_a_requirement_keeps_the_lock_s_text_and_refuses_a_moved_version():
    """``python3 .ci/lock.py --add`` resolves with every locked version as a constraint; uv then names that temporary
    file under each package's "via". Those lines go, a single reason folds back onto the "via" line, and any locked
    version that moved is named (the lock is then left as it was)."""
    ci_lock = _ci_lock()
    compiled = ("execnet==2.1.2\n    # via\n    #   -c requirements.lock.pins.txt\n    #   pytest-xdist\n"
                "pytest==9.2.0\n    # via\n    #   -c requirements.lock.pins.txt\n    #   -r requirements.txt\n"
                "    #   pytest-xdist\n"
                "torch==2.13.0+cpu\n    # via\n    #   -c requirements.lock.pins.txt\n"
                "    #   -c requirements.lock.torch-cpu.txt\n    #   -r requirements.txt\n")
    assert ci_lock.tidy(compiled) == ("execnet==2.1.2\n    # via pytest-xdist\n"
                                      "pytest==9.2.0\n    # via\n    #   -r requirements.txt\n    #   pytest-xdist\n"
                                      "torch==2.13.0+cpu\n    # via -r requirements.txt\n")
    old = {"pytest": "9.2.0", "torch": "2.13.0+cpu", "gone": "1.0"}
    assert ci_lock.moved_pins(old, compiled) == []
    assert ci_lock.moved_pins(old, compiled.replace("pytest==9.2.0", "pytest==9.3.0")) == ["pytest"]
