"""Finding a model's weight files: a local directory, or a Hugging Face Hub id the user named.

A directory's weights are, in this order: the shards an index names (``model.safetensors.index.json``, then
``pytorch_model.bin.index.json``); else ``model.safetensors``; else the shards ``model-0000N-of-0000M.safetensors``
(all M of them); else the same with ``pytorch_model.bin`` / ``pytorch_model-0000N-of-0000M.bin``. Any other weight
file in the folder (``model-old.safetensors``, ``adapter_model.safetensors``, ...) is ignored with one warning naming
it, and a tensor held by two files that are read is an error. A hub id is downloaded with
``huggingface_hub.snapshot_download`` (the only network access in tinygpt, and only because the user named the id);
``HF_HUB_OFFLINE=1`` is respected and a model that is neither cached nor reachable is one ``UserError`` line.
When ``wanted`` is given and the repo is sharded, only the shards holding wanted tensors are downloaded (the
vision tower of ``Salesforce/blip2-opt-2.7b`` without its 2.7B-parameter OPT).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import snapshot_download

from ..errors import UserError
from .torch_file import TensorSource, read_checkpoint

log = logging.getLogger("tinygpt.weights")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
META_FILES = ["config.json", "*.index.json", "tokenizer*", "vocab.json", "merges.txt", "added_tokens.json",
              "special_tokens_map.json", "generation_config.json"]
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
STANDARD = (("model", ".safetensors"), ("pytorch_model", ".bin"))  # in order of preference
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
_SHARD = re.compile(r"^(?:model|pytorch_model)-(\d{5})-of-(\d{5})\.(?:safetensors|bin)$")


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and ".." not in text


def resolve_model_dir(source: str, what: str, wanted: Callable[[str], bool] | None = None) -> Path:
    """A local directory holding the weights of ``source`` (a directory, or a hub id that gets downloaded)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{what} '{source}': is a file; expected a model directory or a Hugging Face hub id")
    if not looks_like_hub_id(source):
        raise UserError(f"{what} '{source}': no such directory (expected a model directory or a hub id like "
                        "microsoft/phi-2)")
    return _download(source, what, wanted)


def _download(repo: str, what: str, wanted: Callable[[str], bool] | None) -> Path:
    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id=repo, allow_patterns=patterns))
        except Exception as exc:  # offline, not cached, no such repo, gated, network errors
            raise UserError(
                f"{what} '{repo}': neither an existing local directory ({Path(repo).expanduser().absolute()} does "
                f"not exist) nor a model on the Hugging Face Hub or in its local cache "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}...); check the path, or download it "
                f"where there is network (hf download {repo}) and copy the cache, or pass a local directory"
            ) from None

    print(f"[weights] fetching {repo} (config and index first)", flush=True)
    directory = fetch(META_FILES)
    for index_name in INDEX_NAMES:
        index = directory / index_name
        if index.is_file():
            shards = sorted(_shards_from_index(index, wanted))
            print(f"[weights] fetching {repo}: {len(shards)} shard(s) {', '.join(shards)}", flush=True)
            return fetch(META_FILES + shards)
    directory = fetch(META_FILES + ["model.safetensors", "model-*-of-*.safetensors"])
    if not list(directory.glob("model*.safetensors")):
        directory = fetch(META_FILES + ["pytorch_model.bin", "pytorch_model-*-of-*.bin"])
    return directory


def _shards_from_index(index: Path, wanted: Callable[[str], bool] | None) -> set[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"{index}: not a valid weight index ({type(exc).__name__}: {exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise UserError(f"{index}: not a valid weight index (\"weight_map\" must map tensor names to shard file "
                        "names)")
    outside = next((v for v in weight_map.values() if "/" in v or "\\" in v or v in (".", "..")), None)
    if outside is not None:  # a shard is a file of this folder: "../x" would read (or fetch) a file elsewhere
        raise UserError(f"{index}: not a valid weight index (shard {outside!r} is not a file name in its folder)")
    shards = {shard for name, shard in weight_map.items() if wanted is None or wanted(name)}
    if not shards:
        raise UserError(f"{index}: none of the tensors this import needs is listed in the index")
    return shards


def weight_files(directory: Path, wanted: Callable[[str], bool] | None = None) -> list[Path]:
    """The weight files of a model directory (only shards holding wanted tensors when an index exists).

    Other weight files in the folder are ignored, with one warning naming them.
    """
    for index_name in INDEX_NAMES:
        index = directory / index_name
        if index.is_file():
            listed = _shards_from_index(index, None)
            shards = sorted(_shards_from_index(index, wanted))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise UserError(f"{index}: shard {missing[0]} is listed but not in the directory")
            _warn_ignored(directory, listed, f"not listed in {index_name}")
            return [directory / s for s in shards]
    for stem, suffix in STANDARD:
        single = directory / f"{stem}{suffix}"
        files = [single] if single.is_file() else _complete_shards(directory, stem, suffix)
        if files:
            _warn_ignored(directory, {f.name for f in files}, f"only {_names(files)} read")
            return files
    others = _other_weight_files(directory, set())
    found = (f" (found {', '.join(others)}: name the model's own weight file model.safetensors or pytorch_model.bin)"
             if others else "")
    raise UserError(f"{directory}: no model.safetensors, pytorch_model.bin or model-00001-of-0000N.safetensors "
                    f"shards in the directory{found}")


def _complete_shards(directory: Path, stem: str, suffix: str) -> list[Path]:
    """``stem-0000N-of-0000M{suffix}`` without an index: all M shards, or an error naming the first one missing."""
    shards = sorted(p for p in directory.glob(f"{stem}-*-of-*{suffix}") if _SHARD.match(p.name))
    if not shards:
        return []
    totals = sorted({_SHARD.match(p.name).group(2) for p in shards})
    if len(totals) > 1:
        raise UserError(f"{directory}: shards of different sets ({_names(shards)}); keep one set")
    total = int(totals[0])
    for number in range(1, total + 1):
        name = f"{stem}-{number:05d}-of-{total:05d}{suffix}"
        if not (directory / name).is_file():
            raise UserError(f"{directory}: shard {name} is missing (the folder has {_names(shards)})")
    return shards


def _warn_ignored(directory: Path, used: set[str], why: str) -> None:
    others = _other_weight_files(directory, used)
    if others:
        log.warning("%s: ignoring %s (%s)", directory, ", ".join(others), why)


def _other_weight_files(directory: Path, used: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.suffix in WEIGHT_SUFFIXES and p.name not in used and p.is_file())


def _names(files: list[Path]) -> str:
    return ", ".join(f.name for f in files)


def read_model_dir(directory: Path, wanted: Callable[[str], bool] | None = None) -> TensorSource:
    """All tensors of a model directory as one lazy source."""
    sources = [read_checkpoint(f) for f in weight_files(directory, wanted)]
    return TensorSource.merged(sources, str(directory))


def read_config_json(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return raw
