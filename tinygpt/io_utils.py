"""Safe file output: check where we will write before any work, write atomically, turn write failures into one error.

* ``check_output_dir(path, where, what)``: before any work starts, the place a run will write into exists or can be
  made, is a directory (a user's file is never replaced by one) and is writable; a ``UserError`` otherwise.
* ``atomic_path`` / ``atomic_paths`` / ``atomic_dir`` / ``atomic_write_*``: write to temporary names in the same
  directory, then rename over the targets. A reader never sees a half-written file; on failure every temporary file
  is removed and the targets are untouched. Results get the usual permissions (0666/0777 minus the umask).
* ``writing(path, what)``: a full disk, a permission or an I/O error while writing becomes one ``UserError`` naming
  the path and what was being written (OSError, safetensors' SafetensorError, torch.save's RuntimeError).
* Temporary names are ``.<target name>.<pid>.<random>.tmp``: ``remove_stale_temporaries`` removes those of writers that
  are no longer running (killed by SIGKILL, a power cut). A folder ``atomic_dir`` moved aside while replacing it is
  ``.<target name>.<pid>.old.tmp``: when its writer died before the new folder took its place, the sweep puts it back.
  ``sigterm_raises()`` turns a SIGTERM into ``SystemExit`` so the temporaries are removed as on any error;
  ``dirs_removed_on_failure(path)`` removes the directories a failed write created.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import UserError

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: str | os.PathLike) -> None:
    """Give a file (0666) or a directory (0777) the usual permissions minus the umask (temporary names are 0600/0700,
    and safetensors writes 0600)."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


# ------------------------------------------------------------------------------------------------ checks
def check_output_dir(path: str | os.PathLike, where: str, what: str = "output") -> Path:
    """``path`` is a writable directory or can be made as one; returns it. Nothing is created.

    ``where`` prefixes the message (e.g. ``"stage1.yaml: run.output_dir"``), ``what`` names what goes there.
    """
    if not str(path).strip():  # Path("") is the current directory: an unset variable ($OUT) must not write there
        raise UserError(f"{where}: the path is empty; give the directory for the {what}")
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UserError(f"{where}: {target} exists and is a file, not a directory; refusing to replace it "
                        f"with the {what} (choose another path)")
    existing = target
    while not existing.exists():
        if existing.is_symlink():
            raise UserError(f"{where}: {existing} is a broken symbolic link; cannot write the {what} there")
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{where}: {existing} is a file, so {target} cannot be made as a directory for the {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{where}: cannot write the {what} under {existing} ({_reason(exc)})") from None
    return target


# ----------------------------------------------------------------------------------------------- failures
def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    text = str(exc).strip().splitlines()
    if isinstance(exc, OSError) and text and "requested and" in text[0] and "written" in text[0]:  # numpy's tofile
        return f"short write, the disk is full or a file size limit was reached: {text[0]}"
    for code, name in ((errno.ENOSPC, "No space left"), (errno.EFBIG, "File too large"),
                       (errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")):
        if any(name.lower() in line.lower() for line in text):
            return os.strerror(code)
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def is_write_failure(exc: BaseException) -> bool:
    """An error that writing a file can raise: OSError, safetensors' SafetensorError, torch.save's RuntimeError."""
    if isinstance(exc, OSError):
        return True
    if type(exc).__name__ == "SafetensorError":
        return True
    return isinstance(exc, RuntimeError) and any(
        word in str(exc) for word in ("PytorchStreamWriter", "file write failed", "unexpected pos"))


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a write failure inside the block into ``UserError("<path>: could not write <what> (<reason>)")``."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        raise UserError(f"{path}: could not write {what} ({_reason(exc)}); what was there before is unchanged"
                        ) from None


# ------------------------------------------------------------------------------------------------ atomic
def _temp_file(target: Path) -> Path:
    """``.<name>.<pid>.<random>.tmp``: the PID tells a live writer's temporary from a dead one's."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(name)


LEGACY_QUIET_SECONDS = 600  # temporaries named without a PID: stale when none of them changed for this long


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Remove the temporaries in ``directory`` of targets named like one of ``names`` (glob patterns) whose writer is
    no longer running: the PID in the name is no live process, or, for a name without a PID (older versions), no such
    temporary changed for ``LEGACY_QUIET_SECONDS`` (a live writer keeps writing one). A temporary folder
    (:func:`atomic_dir`'s) is removed with everything in it, except a folder atomic_dir moved aside whose target is
    missing (its writer died between the two renames): that one is put back. Returns the removed paths."""
    dead, legacy, aside = [], [], []
    for pattern in names:
        for tmp in sorted(Path(directory).glob(f".{pattern}.*.tmp")):
            head, pid, rest = (tmp.name[:-len(".tmp")].rsplit(".", 2) + ["", ""])[:3]
            if pid.isdigit() and fnmatch.fnmatchcase(head, f".{pattern}"):
                if not pid_alive(int(pid)):
                    (aside if rest == "old" else dead).append((tmp, head[1:]))
            elif fnmatch.fnmatchcase(tmp.name[:-len(".tmp")].rsplit(".", 1)[0], f".{pattern}"):  # .<name>.<random>
                legacy.append(tmp)
            # else another target's temporary whose name starts with this one's (".out.v2.<pid>...", a live writer's)
        for old in sorted(Path(directory).glob(f".{pattern}.old-*")):  # atomic_dir's aside name in older versions
            head, _, pid = old.name.rpartition(".old-")
            if pid.isdigit() and fnmatch.fnmatchcase(head, f".{pattern}") and not pid_alive(int(pid)):
                aside.append((old, head[1:]))
    dead = [tmp for tmp, _ in dead] + [old for old, name in aside if not _put_back(old, old.parent / name)]
    with contextlib.suppress(FileNotFoundError):
        if legacy and time.time() - max(p.stat().st_mtime for p in legacy) < LEGACY_QUIET_SECONDS:
            legacy = []
    removed = []
    for tmp in dead + legacy:
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir() and not tmp.is_symlink():  # atomic_dir's staging folder
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
    return removed


def _aside_name(target: Path) -> Path:
    """Where :func:`atomic_dir` moves the folder it replaces: a name the sweep of ``target``'s temporaries knows."""
    return target.parent / f".{target.name}.{os.getpid()}.old.tmp"


def _put_back(aside: Path, target: Path) -> bool:
    """A dead writer's folder that :func:`atomic_dir` moved aside goes back to ``target`` when the writer died before
    the new folder took its place (nothing is at ``target``), so what was there before is intact. True when put back."""
    if not aside.is_dir() or aside.is_symlink() or target.exists() or target.is_symlink():
        return False
    os.replace(aside, target)
    log.warning("%s: put back from %s (a run was killed while replacing it)", target, aside.name)
    return True


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block a SIGTERM raises ``SystemExit(143)``, so temporaries are removed as on any error; the previous
    handler is restored afterwards. Outside the main thread (where no handler can be set) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def dirs_removed_on_failure(path: str | os.PathLike) -> Iterator[None]:
    """The directories up to ``path`` that do not exist yet are removed again (when empty) if the block fails, so a
    failed write into a new directory leaves nothing behind."""
    missing, parent = [], Path(path).absolute()
    while not parent.exists() and not parent.is_symlink():
        missing.append(parent)
        parent = parent.parent
    try:
        yield
    except BaseException:
        for directory in missing:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike], remove: Sequence[str | os.PathLike] = ()) -> Iterator[list[Path]]:
    """Temporary paths next to each of ``paths``; on normal exit all are renamed onto their targets (in order) and
    the files in ``remove`` deleted, on error all temporaries are deleted and the targets untouched. Use it for files
    that only make sense together (``remove``: files that cannot go with the new ones)."""
    targets = [Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        for target in targets:
            if target.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a directory; refusing to replace it with a file",
                                        str(target))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmps.append(_temp_file(target))
        yield list(tmps)
        for tmp in tmps:
            make_readable(tmp)
        for tmp, target in zip(tmps, targets):
            os.replace(tmp, target)
        for old in remove:
            Path(old).unlink(missing_ok=True)
    except BaseException:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit rename it to ``path``, on error delete it."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory ``.<name>.<pid>.<random>.tmp`` next to ``path``; on success it replaces
    ``path`` (an old directory is moved aside as ``.<name>.<pid>.old.tmp``, then removed; a file there is refused,
    never replaced). Every file written inside gets the usual permissions. A killed writer's temporary is removed by
    :func:`remove_stale_temporaries`, which also puts its aside folder back when ``path`` is missing."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UserError(f"{target}: exists and is a file, not a directory; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for name in dirs + files:
                make_readable(os.path.join(root, name))
        make_readable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = _aside_name(target)  # a kill before the next rename leaves it for remove_stale_temporaries to put back
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def waiting_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An flock on ``path`` held for the block: a folder itself (no file is added), or a file made if missing. Held
    by another process, this waits for it (``on_wait`` is called once first, e.g. to say so). The kernel drops the
    lock however the process ends. ``exclusive_lock`` refuses instead of waiting."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: Callable[[str], str], note: str = "") -> Iterator[None]:
    """An flock on ``path`` (its folder made if missing) held for the block, with this process's id written in it
    (and ``note`` on the next line); the kernel drops it however the process ends, so a killed run leaves no stale
    lock. Held by another live process: a UserError at once, ``busy(the holder's file: its process id first)`` its
    message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy(os.pread(fd, 4096, 0).decode(errors="replace").strip() or "?")) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"{os.getpid()}\n{note}\n" if note else str(os.getpid())).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
