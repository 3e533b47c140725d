"""Image paths that cannot leave their dataset root, image decoding, and the one image transform.

The transform is the original ``blip2_image_train`` / ``blip2_image_eval`` processor: bicubic resize to S x S
(aspect ratio not kept), ToTensor, CLIP mean/std normalisation. No crop, no flip.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from PIL import Image

from tinygpt.data.bad_records import BadRecord

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def safe_join(root: str | os.PathLike, relative: str) -> Path:
    """``root / relative`` resolved, or BadRecord when the result could lie outside ``root``.

    Refused: a non-string or empty path, an absolute path (POSIX or Windows, drive letters included), any ``..``
    component, a NUL byte, and a path whose resolution (symlinks followed) ends outside the resolved root.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise BadRecord(f"image path must be a non-empty string, got {relative!r}")
    if "\x00" in relative:
        raise BadRecord("image path contains a NUL byte")
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or relative.startswith(("/", "\\")):
        raise BadRecord(f"image path {relative!r} is absolute; it must be relative to the dataset root")
    if ".." in posix.parts or ".." in windows.parts:
        raise BadRecord(f"image path {relative!r} contains '..'")
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / relative).resolve()
    if not candidate.is_relative_to(root_resolved):
        raise BadRecord(f"image path {relative!r} resolves outside the dataset root {root_resolved}")
    return candidate


def _decode(opener, label: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with opener() as image:
                image.load()
                return image.convert("RGB")
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
