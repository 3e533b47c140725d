"""Image paths that cannot leave their dataset root, image decoding, and the one image transform.

The transform is the original ``blip2_image_train`` / ``blip2_image_eval`` processor: bicubic resize to S x S
(aspect ratio not kept), ToTensor, CLIP mean/std normalisation. No crop, no flip.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import torch
from PIL import Image

from tinygpt.data.bad_records import BadRecord
from tinygpt.pixels import to_rgb

_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")  # C:\x and C:x (drive-relative) alike; UNC paths start with a backslash
_COMPONENTS = re.compile(r"[\\/]")  # POSIX and Windows separators: a '..' between either kind is refused
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def safe_join(root: str | os.PathLike, relative: str) -> Path:
    """``root / relative`` resolved, or BadRecord when the result could lie outside ``root`` (:func:`checked_path`)."""
    return Path(checked_path(root, relative))


def checked_path(root: str | os.PathLike, relative: str, resolved_dirs: dict[str, str] | None = None) -> str:
    """``root / relative`` resolved (a string), or BadRecord when the result could lie outside ``root``.

    Refused: a non-string or empty path, an absolute path (POSIX or Windows, drive letters included), any ``..``
    component, a NUL byte, and a path whose resolution (symlinks followed) ends outside the resolved root.

    ``resolved_dirs`` (a dict the caller keeps while it indexes one dataset) remembers each directory's resolution,
    so that a dataset of N images under a few folders costs N ``lstat`` calls instead of N full resolutions (each
    one ``lstat`` per path component: minutes for a million-image dataset). The final component is always checked
    afresh. Without it every call resolves the whole path, as an image's open does (a symlink planted after the
    dataset was indexed is refused there).
    """
    if not isinstance(relative, str) or not relative.strip():
        raise BadRecord(f"image path must be a non-empty string, got {relative!r}")
    if "\x00" in relative:
        raise BadRecord("image path contains a NUL byte")
    if relative.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(relative):
        raise BadRecord(f"image path {relative!r} is absolute; it must be relative to the dataset root")
    if ".." in _COMPONENTS.split(relative):
        raise BadRecord(f"image path {relative!r} contains '..'")
    root_resolved = _resolved(os.fspath(root), resolved_dirs)
    joined = os.path.join(root_resolved, relative)
    if resolved_dirs is None:
        candidate = os.path.realpath(joined)
    else:
        directory, name = os.path.split(joined)
        candidate = os.path.join(_resolved(directory, resolved_dirs), name)
        if os.path.islink(candidate):
            candidate = os.path.realpath(candidate)
    inside = root_resolved.rstrip(os.sep) + os.sep
    if candidate != root_resolved and not candidate.startswith(inside):
        raise BadRecord(f"image path {relative!r} resolves outside the dataset root {root_resolved}")
    return candidate


def _resolved(directory: str, cache: dict[str, str] | None) -> str:
    """``os.path.realpath(directory)``, remembered in ``cache`` when one is given."""
    if cache is None:
        return os.path.realpath(directory)
    found = cache.get(directory)
    if found is None:
        found = cache[directory] = os.path.realpath(directory)
    return found


def _decode(opener, label: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with opener() as image:
                image.load()
                return to_rgb(image)
    except FileNotFoundError:
        raise BadRecord(f"image {label} does not exist") from None
    except IsADirectoryError:
        raise BadRecord(f"image {label} is a directory") from None
    except Image.DecompressionBombError:
        raise BadRecord(f"image {label} is too large to decode safely") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL's ways of saying "corrupt"
        raise BadRecord(f"image {label} cannot be decoded ({type(exc).__name__}: {exc})") from None


def load_image(root: str | os.PathLike, relative: str) -> Image.Image:
    """Open ``root / relative`` as an RGB image; BadRecord when it escapes the root, is missing or is corrupt.

    The containment check runs again at open time, so a symlink planted after the dataset was indexed is refused too.
    """
    path = safe_join(root, relative)
    return _decode(lambda: Image.open(path), relative)


def decode_image_bytes(data: bytes, label: str) -> Image.Image:
    """Decode image bytes (e.g. a tar member) as RGB; BadRecord when corrupt."""
    return _decode(lambda: Image.open(io.BytesIO(data)), label)


class ImageTransform:
    """PIL image -> FloatTensor [3, size, size]: bicubic resize (aspect not kept), /255, CLIP mean/std."""

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"image size must be a positive int, got {size!r}")
        self.size = size
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        tensor = pixels.view(self.size, self.size, 3).permute(2, 0, 1).float().div_(255.0)
        return (tensor - self.mean) / self.std

    def empty(self) -> torch.Tensor:
        """The images tensor of a text-only sample: [0, 3, size, size]."""
        return torch.zeros(0, 3, self.size, self.size)
