"""Reading a pickle that should hold only plain data (RefCOCO's ``refs(unc).p``), without running its code.

A pickle can name any importable callable and call it while loading. This reader resolves no global at all except
``set``, ``frozenset`` and ``_codecs.encode`` (bytes in old protocols); dicts, lists, tuples, strings, bytes,
numbers, booleans and None need no global, so a genuine annotation file loads and anything else is refused with a
UserError naming the file and the global.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

from tinygpt.errors import UserError

_ALLOWED_GLOBALS = {
    (module, name): kind
    for module in ("builtins", "__builtin__")  # Python 2 pickles name the module __builtin__
    for name, kind in (("set", set), ("frozenset", frozenset))
}
_ALLOWED_GLOBALS[("_codecs", "encode")] = codecs.encode  # how protocols 0-2 spell a bytes object


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id")


def load_plain_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` allowing only plain containers, strings and numbers (Python 2 pickles included:
    their byte strings are read as UTF-8, else Latin-1)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file does not exist") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    last_error: Exception | None = None
    for encoding in ("utf-8", "latin1"):
        try:
            return _PlainDataUnpickler(io.BytesIO(data), encoding=encoding).load()
        except UnicodeDecodeError as exc:
            last_error = exc
        except pickle.UnpicklingError as exc:
            if str(exc).startswith("refused"):
                raise UserError(f"{path}: {exc}; only plain data (lists, dicts, strings, numbers) is allowed") from None
            raise UserError(f"{path}: not a valid pickle ({exc})") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError) as exc:
            raise UserError(f"{path}: not a valid pickle ({type(exc).__name__}: {exc})") from None
    raise UserError(f"{path}: text in the pickle is neither UTF-8 nor Latin-1 ({last_error})")
