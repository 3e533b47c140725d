"""Reading checkpoint files safely and lazily: ``.pth`` / ``.bin`` / ``.pt`` pickles and ``.safetensors``.

* Pickles load with ``torch.load(weights_only=True, mmap=True)``: a pickle that carries code (anything but tensors,
  containers and numbers) is refused, and the tensors stay on disk until used. Files in the legacy (non-zip) torch
  format cannot be memory-mapped and are read whole.
* A zip-format torch file (what ``torch.save`` writes) has its members' CRC-32 checked first, in one streaming read:
  ``torch.load`` does not check them, so a byte flipped inside a tensor's data (a bad copy or download) would load as
  a wrong value without a word. The read also fills the page cache the memory-mapped tensors are then read from.
  Members saved without a CRC (``torch.serialization.set_crc32_options(False)`` writes 0) are not checked; legacy
  files and ``.safetensors`` carry no checksum.
* ``{"model": ...}``, ``{"state_dict": ...}`` and ``{"module": ...}`` wrappers are unwrapped (LAVIS and TinyGPT-V save
  ``{"model": state_dict, "optimizer": ..., ...}``).
* Every failure is one ``UserError`` line naming the file.

A ``TensorSource`` is a read-only mapping name -> tensor whose values are produced on access, so an importer can rename,
fuse or split tensors while only one of them is in memory at a time. Importers also record the keys they
deliberately skipped and notes for the user (e.g. "dropped EVA block 39").
"""

from __future__ import annotations

import pickle
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError

WRAPPER_KEYS = ("model", "state_dict", "module")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
CRC_CHUNK = 8 << 20  # bytes per read of the CRC check


class TensorSource(Mapping):
    """Read-only ``name -> tensor`` mapping; each value is computed by its loader when accessed.

    ``file_keys`` are the names as stored in the file(s) (kept through renames), for messages about what was read.
    """

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]], origin: str,
                 skipped: list[str] | None = None, notes: list[str] | None = None,
                 file_keys: list[str] | None = None):
        self.loaders = dict(loaders)
        self.origin = origin
        self.skipped = list(skipped or [])
        self.notes = list(notes or [])
        self.file_keys = list(self.loaders) if file_keys is None else list(file_keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.loaders[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self.loaders)

    def __len__(self) -> int:
        return len(self.loaders)

    def derived(self, loaders: dict[str, Callable[[], torch.Tensor]], skipped=(), notes=()) -> "TensorSource":
        """A new source from the same origin (keeps this one's skipped keys, notes and file keys)."""
        return TensorSource(loaders, self.origin, [*self.skipped, *skipped], [*self.notes, *notes], self.file_keys)

    def with_prefix(self, prefix: str) -> "TensorSource":
        return self.derived({prefix + k: f for k, f in self.loaders.items()})

    @staticmethod
    def merged(sources: list["TensorSource"], origin: str) -> "TensorSource":
        """One source from several; a name held by two sources is an error naming both (never an overwrite)."""
        loaders, owner, shared, skipped, notes, file_keys = {}, {}, {}, [], [], {}
        for source in sources:
            for key, load in source.loaders.items():
                if key in owner and owner[key] != source.origin:
                    shared.setdefault(key, {owner[key]})
                    shared[key].add(source.origin)
                owner[key] = source.origin
                loaders[key] = load
            skipped += source.skipped
            notes += source.notes
            file_keys.update(dict.fromkeys(source.file_keys))
        if shared:
            key = next(iter(shared))
            files = sorted({Path(f).name for holders in shared.values() for f in holders})
            raise UserError(f"{origin}: {len(shared)} tensor(s) in more than one weight file ({', '.join(files)}), "
                            f"e.g. {key}; keep one copy of each weight file in the folder")
        return TensorSource(loaders, origin, skipped, notes, list(file_keys))


def claim(owners: dict[str, str], target: str, key: str, origin: str) -> str:
    """``target``, recorded as filled by the file's ``key``; a second key for the same target (two copies of a tensor
    under two layouts or prefixes) is an error naming both, never one of them silently chosen."""
    if owners.setdefault(target, key) != key:
        raise UserError(f"{origin}: {owners[target]} and {key} are both {target}; keep one copy of each tensor")
    return target


def read_checkpoint(path: str | Path) -> TensorSource:
    """Open a ``.safetensors`` file or a torch pickle (``.pth``/``.bin``/``.pt``); tensors are read on access."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected a checkpoint file (.pth, .bin or .safetensors)")
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_pickle(path)


def read_safetensors(path: str | Path) -> TensorSource:
    path = Path(path)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        names = list(handle.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError for truncated or foreign files
        raise UserError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from None
    return TensorSource({name: _safetensors_loader(handle, name, path) for name in names}, str(path))


def _safetensors_loader(handle, name: str, path: Path) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise UserError(f"{path}: cannot read tensor {name} ({_one_line(exc)})") from None

    return load


def read_torch_pickle(path: str | Path) -> TensorSource:
    """``torch.load(weights_only=True)`` with mmap where the format allows; unwraps ``{"model": ...}``."""
    path = Path(path)
    obj = _torch_load(path)
    state = unwrap_state_dict(obj, path)
    if bad := next((k for k in state if not isinstance(k, str)), None):
        raise UserError(f"{path}: key {bad!r} ({type(bad).__name__}) is not a string; a state dict maps tensor "
                        "names to tensors")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    others = sorted(str(k) for k in state if not isinstance(state[k], torch.Tensor))
    if not tensors:
        raise UserError(f"{path}: the checkpoint holds no tensors (keys: {', '.join(map(str, list(state)[:8]))})")
    notes = [f"ignored {len(others)} non-tensor entries ({', '.join(others[:3])})"] if others else []
    return TensorSource({k: (lambda v=v: v) for k, v in tensors.items()}, str(path), notes=notes)


def _torch_load(path: Path):
    mmap = zipfile.is_zipfile(path)  # only the zip format can be memory-mapped
    if mmap:
        check_zip_crc(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal below says what matters
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if found := re.search(r"GLOBAL (\S+)", str(exc)):
            raise UserError(
                f"{path}: refused to load: the pickle references {found.group(1)} (it could run code; only plain "
                "state dicts of tensors are accepted)"
            ) from None
        raise UserError(f"{path}: not a PyTorch checkpoint, or a pickle the safe (weights_only) loader refuses "
                        f"({_weights_only_reason(exc)})") from None
    except Exception as exc:  # the weights-only unpickler raises anything (IndexError, KeyError...) on garbage
        raise UserError(f"{path}: not a PyTorch checkpoint or truncated ({_one_line(exc)})") from None


def check_zip_crc(path: str | Path) -> None:
    """Every member of the zip ``path`` read once and checked against its CRC-32; a mismatch, or a member whose bytes
    cannot be found, is a ``UserError`` naming the file and the member (``archive/data/N``: a tensor's storage)."""
    path, member = Path(path), None
    view = memoryview(bytearray(CRC_CHUNK))
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            for info in archive.infolist():
                member = info.filename
                if info.CRC == 0 and info.file_size:
                    continue  # saved without CRCs (torch writes 0); an empty member's CRC is 0 anyway
                if info.compress_type != zipfile.ZIP_STORED:  # not what torch writes; zipfile checks the CRC itself
                    with archive.open(info) as stream:
                        while stream.read(CRC_CHUNK):
                            pass
                elif _stored_crc(raw, info, view) != info.CRC:
                    raise UserError(f"{path}: damaged: the bytes of member {member} do not match its CRC-32 (the "
                                    "file changed after it was saved: a bad copy, download or disk); fetch it again")
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        where = f"member {member}" if member else "the zip directory"
        raise UserError(f"{path}: damaged: {where} cannot be read back intact ({_one_line(exc)}); fetch the file "
                        "again") from None


def _stored_crc(raw, info: zipfile.ZipInfo, view: memoryview) -> int:
    """CRC-32 of an uncompressed member's bytes, read in ``len(view)`` chunks into one buffer."""
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("no local file header where the zip directory points")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    raw.seek(info.header_offset + 30 + name_len + extra_len)
    crc, left = 0, info.file_size
    while left:
        got = raw.readinto(view[:min(left, len(view))])
        if not got:
            raise EOFError(f"{left} of its {info.file_size} bytes are missing")
        crc = zlib.crc32(view[:got], crc)
        left -= got
    return crc


def unwrap_state_dict(obj, path: Path) -> dict:
    """The state dict inside ``obj``: itself, or under "model" / "state_dict" / "module" (nested wrappers too)."""
    for _ in range(3):
        if not isinstance(obj, dict):
            raise UserError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        obj = inner
    return obj


def _weights_only_reason(exc: BaseException) -> str:
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*Check the documentation", str(exc), re.S)
    return _one_line(found.group(1)) if found else _one_line(exc)[-160:]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:240]
