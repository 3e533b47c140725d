"""Drift canary: do the newest and the oldest versions that the supported ranges allow still work?

    python3 .ci/canary.py [--only newest|oldest] [--keep] [--skip-tests] [--skip-ceiling]

For each flavour it builds a throwaway venv in a temp dir:

* newest: ``pip install --upgrade --upgrade-strategy eager -r requirements.txt -c constraints.txt``;
* oldest: the lowest version allowed by each direct requirement (``uv pip compile --resolution lowest-direct``,
  uv pinned in .ci/lock.py), installed with pip;

torch is forced to the local 2.13.0+cpu wheel in both (never a CUDA download), and ggml-python is built with the lock's
build settings (.ci/lock.py BUILD_SETTINGS: -fno-dse): else the canary would test another build than the lock's, and
pip's wheel cache, keyed by the sdist's URL and not by the settings, would hand that build to the next
``pip install -r requirements.lock`` on the machine. In each venv it runs the test suite
(``python -m pytest -q`` from the checkout, less the one test of the lock's content: the canary runs before a
refresh, when a new requirement is not in the lock yet) and the tiny LLM ceiling check
(``python -m tinygpt.tiny.ceiling_check --check``; $TINYGPT_CACHE is passed through, so every flavour reuses one
backbone build), then prints one screen: per flavour the versions that differ from requirements.lock, the test and
ceiling results, and a verdict. Exit status 0 only when everything passed. Run it before every lock refresh
(``python3 .ci/lock.py``). Stdlib only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lock  # noqa: E402  (.ci/lock.py: the lock's reader, uv and its pinned version)

ROOT = lock.ROOT
FLAVOURS = ("newest", "oldest")
INSTALL_TIMEOUT = 40 * 60
# the test that the lock pins every requirement: a canary runs before the refresh that adds a new requirement
LOCK_CONTENT_TEST = "tests/test_lock.py::test_lock_pins_every_requirement_inside_its_range"
TEST_TIMEOUT = 40 * 60
CEILING_TIMEOUT = 30 * 60  # the first run in a fresh $TINYGPT_CACHE builds the tiny backbones (~6 min)
CEILING_MODULE = "tinygpt.tiny.ceiling_check"
T0 = time.monotonic()


def progress(message: str) -> None:
    minutes, seconds = divmod(int(time.monotonic() - T0), 60)
    print(f"[canary {minutes:2d}:{seconds:02d}] {message}", flush=True)


@dataclass
class Report:
    flavour: str
    install: str = "not run"  # "ok" or what failed
    versions: list = field(default_factory=list)  # (name, lock, flavour) where they differ
    key_versions: str = ""
    tests: str = "not run"
    tests_ok: bool = False
    ceiling: str = "not run"
    ceiling_ok: bool = False
    workdir: str = ""

    def ok(self, args) -> bool:
        return self.install == "ok" and (args.skip_tests or self.tests_ok) and (args.skip_ceiling or self.ceiling_ok)


def run_logged(cmd: list[str], log: Path, timeout: int, **kwargs) -> tuple[int, str]:
    """Run ``cmd`` with stdout+stderr into ``log``; (exit status, output). 124 on timeout."""
    with open(log, "w") as out:
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                **kwargs).returncode
        except subprocess.TimeoutExpired:
            rc = 124
            out.write(f"\n[canary] timed out after {timeout} s\n")
    return rc, log.read_text(errors="replace")


def last_error(output: str) -> str:
    """The most telling line of a failed command's output."""
    lines = [ln.strip() for ln in output.splitlines()
             if ln.strip() and not ln.startswith("WARNING: Location") and "[notice]" not in ln]
    for ln in reversed(lines):
        if ln.startswith(("ERROR", "error", "×", "Traceback")) or "Error" in ln:
            return ln[:160]
    return lines[-1][:160] if lines else "(no output)"


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return env  # TINYGPT_CACHE (and the rest) pass through unchanged


def install(report: Report, work: Path) -> Path | None:
    venv = work / "venv"
    python = venv / "bin" / "python"
    progress(f"{report.flavour}: creating {venv}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", lock.PIP], check=True)  # as the quick start does
    torch_cpu = work / "torch-cpu.txt"
    torch_cpu.write_text(lock.TORCH_CPU + "\n")
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off", "-c", str(torch_cpu)]
    if report.flavour == "newest":
        requirements = work / "requirements.txt"  # requirements.txt with the lock's build settings (module docstring)
        requirements.write_text(lock.with_build_settings(lock.REQUIREMENTS.read_text()))
        cmd = pip + ["--upgrade", "--upgrade-strategy", "eager", "-r", str(requirements),
                     "-c", str(lock.CONSTRAINTS)]
    else:
        pins = work / "oldest.txt"
        progress("oldest: resolving the lowest allowed direct versions (uv pip compile --resolution lowest-direct)")
        resolved = lock.uv_compile(pins, resolution="lowest-direct", quiet=True)
        if resolved.returncode != 0:
            report.install = "resolve failed: " + last_error(resolved.stderr)
            (work / "resolve.log").write_text(resolved.stderr)
            return None
        pins.write_text(lock.with_build_settings(pins.read_text()))  # the lock's build settings (module docstring)
        cmd = pip + ["-r", str(pins), "-c", str(lock.CONSTRAINTS)]
    progress(f"{report.flavour}: installing (a few minutes; log {work / 'install.log'})")
    rc, output = run_logged(cmd, work / "install.log", INSTALL_TIMEOUT, cwd=work, env=clean_env())
    if rc != 0:
        report.install = f"install failed (exit {rc}): " + last_error(output)
        return None
    env = lock.freeze(str(python))
    cuda = sorted(n for n in env if n.startswith(("nvidia-", "triton", "cuda-")))
    if not env.get("torch", "").endswith("+cpu") or cuda:
        report.install = f"wrong torch: torch {env.get('torch', '-')} {' '.join(cuda)}"
        return None
    report.install = "ok"
    report.versions = lock.diff(lock.read_lock(), env)
    report.key_versions = ", ".join(f"{n} {env.get(n, '-')}" for n in ("torch", "transformers", "numpy"))
    progress(f"{report.flavour}: installed {len(env)} packages ({report.key_versions})")
    return python


def pytest_summary(junit: Path) -> tuple[str, str]:
    """(counts such as '1 failed, 200 passed, 2 skipped', first failure or '') from pytest's JUnit XML report
    (pyproject's addopts -q plus -q hide pytest's own counts line)."""
    if not junit.exists():
        return "", ""
    try:
        root = ElementTree.parse(junit).getroot()
    except ElementTree.ParseError:
        return "", ""
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    parts = [f"{n} {label}" for n, label in ((failed, "failed"), (errors, "errors"),
                                             (total - failed - errors - skipped, "passed"), (skipped, "skipped")) if n]
    first = ""
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            message = (bad.get("message") or "").splitlines()
            first = f"{case.get('classname')}::{case.get('name')}: {message[0] if message else bad.tag}"
            break
    return ", ".join(parts), first


def run_tests(report: Report, python: Path, work: Path) -> None:
    progress(f"{report.flavour}: running the test suite (python -m pytest -q; 12-20 min on 2 cores)")
    junit = work / "tests.xml"
    rc, output = run_logged([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                             "--deselect", LOCK_CONTENT_TEST],
                            work / "tests.log", TEST_TIMEOUT, cwd=ROOT, env=clean_env())
    counts, first = pytest_summary(junit)
    report.tests_ok = rc == 0
    if rc == 124:
        report.tests = f"timed out after {TEST_TIMEOUT // 60} min ({counts or 'no summary'})"
    elif rc == 0:
        report.tests = f"pass ({counts})"
    else:
        report.tests = f"FAIL, exit {rc} ({counts or last_error(output)})" + (f"\n      first: {first[:150]}"
                                                                             if first else "")
    progress(f"{report.flavour}: tests: {report.tests.splitlines()[0]}")


def run_ceiling(report: Report, python: Path, work: Path) -> None:
    progress(f"{report.flavour}: tiny LLM ceiling check (builds the backbones if $TINYGPT_CACHE lacks them)")
    rc, output = run_logged([str(python), "-m", CEILING_MODULE, "--check"], work / "ceiling.log",
                            CEILING_TIMEOUT, cwd=ROOT, env=clean_env())
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    result = lines[-1][:170] if lines else "(no output)"
    report.ceiling_ok = rc == 0
    if rc == 0:
        report.ceiling = f"pass: {result}"
    elif rc == 1:
        report.ceiling = f"BELOW FLOOR: {result}"
    else:
        report.ceiling = f"error (exit {rc}): {last_error(output)}"
    progress(f"{report.flavour}: ceiling: {report.ceiling}")


def check(flavour: str, args) -> Report:
    work = Path(tempfile.mkdtemp(prefix=f"tinygpt-canary-{flavour}-"))
    work.chmod(0o755)  # some tests run this venv's python as an unprivileged user (tests/test_write_safety.py)
    report = Report(flavour, workdir=str(work))
    try:
        python = install(report, work)
        if python is not None:
            if not args.skip_tests:
                run_tests(report, python, work)
            if not args.skip_ceiling:
                run_ceiling(report, python, work)
    finally:
        if not args.keep:
            shutil.rmtree(work / "venv", ignore_errors=True)  # the logs stay (small)
    return report


def render(reports: list[Report], args) -> str:
    lock_pins = lock.read_lock()
    out = [f"== tinygpt drift canary: requirements.txt ranges vs {lock.LOCK.name} ({len(lock_pins)} pins) =="]
    for r in reports:
        out.append(f"-- {r.flavour} {'ok' if r.ok(args) else 'FAILED'}"
                   + (f"  [{r.key_versions}]" if r.key_versions else ""))
        if r.install != "ok":
            out.append(f"   install: {r.install}")
        else:
            direct = set(lock.parse_requirement_names(lock.REQUIREMENTS.read_text()))
            rows = sorted(r.versions, key=lambda v: (v[0] not in direct, v[0]))
            differ = [f"{'*' if n in direct else ''}{n} {a} -> {b}" for n, a, b in rows]
            out.append(f"   differ from lock ({len(differ)}, lock -> {r.flavour}, *requirements.txt first):"
                       + ("" if differ else " none"))
            width = max((len(d) for d in differ), default=0) + 2
            per_line = max(1, 112 // width)
            for i in range(0, len(differ), per_line):
                out.append("     " + "".join(d.ljust(width) for d in differ[i:i + per_line]).rstrip())
        out.append(f"   tests:   {'skipped (--skip-tests)' if args.skip_tests else r.tests}")
        out.append(f"   ceiling: {'skipped (--skip-ceiling)' if args.skip_ceiling else r.ceiling}")
        out.append(f"   logs:    {r.workdir}" + ("" if args.keep else " (venv removed; --keep keeps it)"))
    green = all(r.ok(args) for r in reports)
    skipped = [what for what, flag in (("tests", args.skip_tests), ("ceiling", args.skip_ceiling)) if flag]
    names = "/".join(r.flavour for r in reports)
    failed = [r.flavour for r in reports if not r.ok(args)]
    if green and skipped:
        out.append(f"verdict: green ({names}) but partial ({' and '.join(skipped)} skipped): not enough to refresh")
    else:
        out.append(f"verdict: GREEN ({names}): safe to refresh the lock" if green
                   else f"verdict: RED ({', '.join(failed)} failed): do not refresh the lock")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=FLAVOURS, help="check one flavour")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway venvs")
    parser.add_argument("--skip-tests", action="store_true", help="no test suite (the verdict is then partial)")
    parser.add_argument("--skip-ceiling", action="store_true", help="no ceiling check (the verdict is then partial)")
    args = parser.parse_args(argv)
    flavours = [args.only] if args.only else list(FLAVOURS)
    progress(f"flavours {', '.join(flavours)}; TINYGPT_CACHE={os.environ.get('TINYGPT_CACHE', '(default)')}")
    reports = [check(f, args) for f in flavours]
    print("\n" + render(reports, args), flush=True)
    return 0 if all(r.ok(args) for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
