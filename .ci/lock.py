"""Refresh requirements.lock, or check an environment against it (stdlib only; runs with any python3).

    python3 .ci/canary.py                 # first: newest and oldest allowed versions must both be green
    python3 .ci/lock.py                   # rewrite requirements.lock from requirements.txt + constraints.txt
    python3 .ci/lock.py --verify .venv/bin/python   # is that environment exactly the lock? (used by .ci/run)
    python3 .ci/lock.py --add             # lock a requirement new in requirements.txt, every locked version kept

``--add`` resolves with the lock's own pins as constraints, so it only adds packages (a new test tool and what it
needs); it refuses, writing nothing, if the new requirement would move a locked version. It needs no canary: nothing
that a fresh clone installed before changes.

The lock is made by ``uv pip compile`` at a pinned uv version (installed with pip into a tools venv under
``$TINYGPT_TOOLS``, default ~/.cache/tinygpt-tools, never into the project's venv) for CPython 3.11 on linux
x86_64, with ``--find-links /opt/wheels`` so torch resolves to the local 2.13.0+cpu wheel. ``.ci/canary.py`` uses the
same uv for its "oldest" resolution.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

UV_VERSION = "0.13.9"
ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
REQUIREMENTS = ROOT / "requirements.txt"
CONSTRAINTS = ROOT / "constraints.txt"
FIND_LINKS = "/opt/wheels"  # where this machine keeps torch 2.13.0+cpu (pip reads it from /etc/pip.conf too)
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
TORCH_CPU = "torch==2.13.0+cpu"  # forced in every resolution: a plain torch==2.13.0 may be PyPI's CUDA build
NOT_LOCKED = {"pip"}  # installed by venv itself; everything else in an environment must be in the lock
# the pip every install runs first (README quick start, .ci/run, the canary): the lock's per-line --config-settings
# needs pip >= 23.1, and Debian 12's `python3 -m venv` brings pip 23.0.1, which refuses the whole lock
PIP = "pip==23.2.1"
# per-requirement build settings that pip applies when it builds the package from its sdist (the lock's line carries
# them). ggml-python is source-only and built natively at install; GCC 12's AMX header lets dead-store elimination
# drop the tile configuration's stores, and the AMX tile kernels then fault: -fno-dse keeps them
# (quantize/ggml_amx.py, docs/gguf-runtime.md "AMX").
BUILD_SETTINGS = {"ggml-python": "--config-settings=cmake.define.CMAKE_CXX_FLAGS=-fno-dse"}

TORCH_VERSION = TORCH_CPU.split("==")[1]
HEADER = f"""\
# requirements.lock: the exact versions, direct and transitive, that the quick start and .ci/run install.
# Platform: CPython {PYTHON_VERSION} on linux x86_64 (manylinux_2_28). torch {TORCH_VERSION} is the CPU wheel,
# which pip takes from {FIND_LINKS} on this machine (elsewhere: --extra-index-url https://download.pytorch.org/whl/cpu).
# Made from requirements.txt + constraints.txt by `python3 .ci/lock.py` (uv {UV_VERSION}: uv pip compile
# --python-version {PYTHON_VERSION} --python-platform {PLATFORM} --find-links {FIND_LINKS}); do not edit by hand.
# Refresh only after `python3 .ci/canary.py` is green for the newest and the oldest allowed versions.
"""


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """``name==version`` lines of a lock or of ``pip freeze`` as {canonical name: version}; other lines ignored."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s-]\S*)(\s+--\S+)*", line)
        if m:
            pins[canonical(m.group(1))] = m.group(3)
    return pins


def parse_requirement_names(text: str) -> list[str]:
    """Canonical names of the requirements in a requirements file (ranges, pins or bare names)."""
    names = []
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
        if m and not line.lstrip().startswith("-"):
            names.append(canonical(m.group(1)))
    return names


def with_build_settings(body: str) -> str:
    """The lock's text with BUILD_SETTINGS appended to the pinned lines of those packages."""
    lines = []
    for line in body.splitlines():
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==\S+", line.strip())
        setting = BUILD_SETTINGS.get(canonical(m.group(1))) if m else None
        lines.append(f"{line.rstrip()} {setting}" if setting else line)
    return "\n".join(lines) + "\n"


def read_lock(path: Path = LOCK) -> dict[str, str]:
    return parse_pins(path.read_text())


def ensure_uv(progress=print) -> str:
    """Path of uv ``UV_VERSION``, installed with pip into its own venv under $TINYGPT_TOOLS on first use."""
    tools = Path(os.environ.get("TINYGPT_TOOLS", Path.home() / ".cache" / "tinygpt-tools")) / f"uv-{UV_VERSION}"
    uv = tools / "bin" / "uv"
    if not uv.exists():
        progress(f"installing uv {UV_VERSION} into {tools}")
        subprocess.run([sys.executable, "-m", "venv", str(tools)], check=True)
        subprocess.run([str(tools / "bin" / "pip"), "install", "-q", f"uv=={UV_VERSION}"], check=True)
    return str(uv)


def uv_compile(out: Path, resolution: str = "highest", extra_constraints: Path | None = None,
               quiet: bool = False) -> subprocess.CompletedProcess:
    """``uv pip compile`` of requirements.txt + constraints.txt (+ torch forced to the CPU wheel) into ``out``."""
    uv = ensure_uv(progress=(lambda *_: None) if quiet else print)
    torch_cpu = out.with_name(out.name + ".torch-cpu.txt")
    torch_cpu.write_text(TORCH_CPU + "\n")
    cmd = [uv, "pip", "compile", REQUIREMENTS.name, "-c", CONSTRAINTS.name, "-c", str(torch_cpu),
           "--find-links", FIND_LINKS, "--python-version", PYTHON_VERSION, "--python-platform", PLATFORM,
           "--resolution", resolution, "--no-header", "-o", str(out)]
    if extra_constraints:
        cmd += ["-c", str(extra_constraints)]
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    finally:
        torch_cpu.unlink(missing_ok=True)


def tidy(body: str) -> str:
    """uv's output less the "via" lines of the temporary constraint files (torch's CPU pin, the kept pins), a "via"
    left with one reason written on one line as uv writes it."""
    body = re.sub(r"\n\s*#\s+-c \S*(torch-cpu|pins)\.txt", "", body)
    return re.sub(r"# via\n\s*#   ([^\n]+)\n(?!\s*#   )", r"# via \1\n", body)


def moved_pins(old: dict[str, str], body: str) -> list[str]:
    """Names that ``old`` pins at another version than the lock text ``body`` (packages added or dropped: not moved)."""
    return sorted(n for n, v in parse_pins(body).items() if n in old and old[n] != v)


def refresh(keep_locked: bool = False) -> int:
    """Rewrite the lock; ``keep_locked``: with every locked version as a constraint (only additions)."""
    tmp = LOCK.with_name(LOCK.name + ".new")
    old = read_lock() if LOCK.exists() else {}
    pins = LOCK.with_name(LOCK.name + ".pins.txt")
    if keep_locked:
        pins.write_text("".join(f"{name}=={version}\n" for name, version in sorted(old.items())))
    try:
        result = uv_compile(tmp, extra_constraints=pins if keep_locked else None)
    finally:
        pins.unlink(missing_ok=True)
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        tmp.unlink(missing_ok=True)
        return 1
    body = tidy(tmp.read_text())
    tmp.unlink()
    moved = moved_pins(old, body)
    if keep_locked and moved:
        print(f"{LOCK.name}: unchanged; --add would move locked versions ({', '.join(moved)})", file=sys.stderr)
        return 1
    LOCK.write_text(HEADER + with_build_settings(body))
    new = read_lock()
    changes = [f"  {n}: {old.get(n, '-')} -> {new.get(n, '-')}" for n in sorted(set(old) | set(new))
               if old.get(n) != new.get(n)]
    print(f"{LOCK.name}: {len(new)} packages" + (", changed:" if changes else ", unchanged"))
    print("\n".join(changes))
    return 0


def freeze(python: str) -> dict[str, str]:
    """What ``python``'s environment holds, as {canonical name: version} (pip and setuptools included)."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    return parse_pins(out.stdout)


def diff(lock: dict[str, str], env: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, lock version or '-', environment version or '-') for every package where the two differ."""
    names = (set(lock) | set(env)) - NOT_LOCKED
    return [(n, lock.get(n, "-"), env.get(n, "-")) for n in sorted(names) if lock.get(n) != env.get(n)]


def verify(python: str) -> int:
    differences = diff(read_lock(), freeze(python))
    if not differences:
        print(f"{python}: exactly the {len(read_lock())} packages of {LOCK.name}")
        return 0
    print(f"{python}: differs from {LOCK.name} (name: lock -> environment):")
    for name, locked, found in differences:
        print(f"  {name}: {locked} -> {found}")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verify", metavar="PYTHON", help="compare that interpreter's environment with the lock")
    parser.add_argument("--add", action="store_true",
                        help="lock requirements new in requirements.txt, keeping every locked version")
    args = parser.parse_args(argv)
    return verify(args.verify) if args.verify else refresh(keep_locked=args.add)


if __name__ == "__main__":
    sys.exit(main())
