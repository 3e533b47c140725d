"""Launch configs (`eval_configs/*.yaml`): which model a demo, server or evaluation run talks to, and how.

    cfg = load_launch_config("eval_configs/tiny.yaml")      # LaunchConfig, every field checked
    engine = open_engine(cfg)                                # a ChatEngine over the chosen backend

A launch config has three sections; every key is optional except `model.backend` and `model.path`:

    model:       backend: torch | gguf       path: a saved model directory (torch) or an exported GGUF directory (gguf)
                 device: auto | cpu | cuda   bits: null | 8 | 4   (torch; 8/4-bit through bitsandbytes, GPU or CPU)
                 threads: 2   qtype: null (gguf: which llm-<qtype>.gguf when the directory holds several)
    generation:  the GenerationSettings defaults (max_new_tokens, temperature, top_p, top_k, num_beams,
                 repetition_penalty, stop, seed)
    limits:      max_images (per request / message), max_image_pixels, max_upload_bytes, queue_size,
                 image_cache_size

`eval_configs/NAME.yaml` that is not in the working directory is the copy shipped in the package (an installed
tinygpt run from anywhere). Values may use `${oc.env:NAME,default}` like the stage configs. Relative paths are
relative to the working directory (the quick start runs from the checkout). A misspelt or mistyped key is one
UserError naming the file and the key; a missing model path names the command that makes it. `listen(host, port)`
makes the listening socket the server serves on, and lets the demo check its port, before either loads a model.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from ..config.tree import merge, yaml_problem
from ..errors import UserError, did_you_mean
from ..paths import PACKAGE_ROOT, display_path, is_training_checkpoint, shipped_copy
from .engine import ChatEngine
from .settings import GenerationSettings

BACKENDS = ("torch", "gguf")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ModelChoice:
    backend: str = ""
    path: str = ""
    device: str = "auto"
    bits: int | None = None
    threads: int = 2
    qtype: str | None = None


@dataclass(frozen=True)
class Limits:
    max_images: int = 8  # images per request (server) / per message (demo)
    max_image_pixels: int = 16_000_000  # width x height of one decoded image
    max_upload_bytes: int = 20_000_000  # one request body (server) / one uploaded file (demo)
    queue_size: int = 8  # requests waiting for the engine; one more is refused (HTTP 429 / a UI message)
    image_cache_size: int = 64  # encoded images kept per engine (by content hash)


@dataclass(frozen=True)
class LaunchConfig:
    source: Path
    model: ModelChoice
    generation: GenerationSettings
    limits: Limits = field(default_factory=Limits)

    @property
    def name(self) -> str:
        """The model name the server lists and the demo shows: the config file's stem (``tiny``, ``stage4``)."""
        return self.source.stem


_SECTIONS: dict[str, type] = {"model": ModelChoice, "generation": GenerationSettings, "limits": Limits}
_TYPES = {"int": (int,), "float": (int, float), "str": (str,)}


def eval_configs_dir() -> Path:
    """The checkout's ``eval_configs/`` first, else the copy ``pip install`` puts in the package."""
    checkout = PACKAGE_ROOT.parent / "eval_configs"
    return checkout if checkout.is_dir() else PACKAGE_ROOT / "eval_configs"


def _check_value(where: str, key: str, value: Any, annotation: str) -> Any:
    if value is None:
        if "None" in annotation:
            return None
        raise UserError(f"{where}: {key} must not be empty")
    if key.endswith(".stop"):
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            raise UserError(f"{where}: {key} must be a string or a list of non-empty strings, got {value!r}")
        return tuple(stops)
    kind = annotation.split("|")[0].strip()
    accepted = _TYPES.get(kind)
    if accepted and (isinstance(value, bool) or not isinstance(value, accepted)):
        raise UserError(f"{where}: {key} must be {'an integer' if kind == 'int' else 'a ' + kind}, got {value!r}")
    return float(value) if kind == "float" else value


def check_section(path: Path, name: str, raw: Any, cls: type | None = None) -> Any:
    """Section ``name`` of the config at ``path`` as dataclass ``cls`` (default: the launch section of that name):
    unknown keys and mistyped values are UserErrors naming ``path`` and ``name.key``."""
    cls = cls or _SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: {name} must be a mapping of keys, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise UserError(f"{path}: unknown key {name}.{key}{did_you_mean(str(key), known)} "
                            f"(valid: {', '.join(known)})")
        f = known[key]
        values[key] = _check_value(str(path), f"{name}.{key}", value, str(f.type))
    try:
        return cls(**values)
    except UserError as exc:  # GenerationSettings' own checks ("temperature: must be >= 0 ...")
        raise UserError(f"{path}: {name}.{exc}") from None


def find_launch_config(path: str | os.PathLike) -> Path:
    """``path``, or for ``eval_configs/NAME.yaml`` missing here the copy shipped in the package; it must exist."""
    path = shipped_copy(path, "eval_configs", eval_configs_dir())
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a launch config file")
    if not path.is_file():
        hint = f" (shipped configs: {', '.join(sorted(p.name for p in eval_configs_dir().glob('*.yaml')))})" \
            if eval_configs_dir().is_dir() else ""
        raise UserError(f"{path}: launch config does not exist{hint}")
    return path


def read_config_tree(path: Path, overrides: Any = None) -> dict:
    """The YAML at ``path`` as plain containers, ``overrides`` (an OmegaConf tree, e.g. a dotlist) merged on top,
    interpolations resolved; a file that is not a mapping of sections is a UserError naming it."""
    try:
        loaded = OmegaConf.load(path)
        if overrides is not None and OmegaConf.is_dict(loaded):  # a list over a mapping: names the key
            loaded = merge(loaded, overrides, {"": str(path)}, {"": str(path)})
        tree = OmegaConf.to_container(loaded, resolve=True)
    except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: the top level must be a mapping with model, generation and limits")
    return tree


def load_launch_config(path: str | os.PathLike, check_model: bool = True) -> LaunchConfig:
    """Read and check a launch config. ``check_model``: the model path must exist (off for tests of the parsing)."""
    path = find_launch_config(path)
    return launch_config_from_tree(path, read_config_tree(path), check_model)


def launch_config_from_tree(path: Path, tree: dict, check_model: bool = True) -> LaunchConfig:
    """Check the sections of an already read config (``read_config_tree``); errors name ``path``. A caller with
    sections of its own (evaluation: benchmark, run) takes them out first."""
    for key in tree:
        if key not in _SECTIONS:
            raise UserError(f"{path}: unknown section {key!r}{did_you_mean(str(key), _SECTIONS)} "
                            f"(valid: {', '.join(_SECTIONS)})")
    model = check_section(path, "model", tree.get("model"))
    if model.backend not in BACKENDS:
        raise UserError(f"{path}: model.backend must be one of {', '.join(BACKENDS)}, got {model.backend!r}")
    if not model.path:
        raise UserError(f"{path}: model.path is required (a model directory or an exported GGUF directory)")
    if model.device not in DEVICES:
        raise UserError(f"{path}: model.device must be one of {', '.join(DEVICES)}, got {model.device!r}")
    if model.bits not in (None, 4, 8):
        raise UserError(f"{path}: model.bits must be empty, 8 or 4, got {model.bits!r}")
    if model.threads < 1:
        raise UserError(f"{path}: model.threads must be >= 1, got {model.threads}")
    limits = check_section(path, "limits", tree.get("limits"))
    for f in fields(Limits):
        if getattr(limits, f.name) < 1:
            raise UserError(f"{path}: limits.{f.name} must be >= 1, got {getattr(limits, f.name)}")
    cfg = LaunchConfig(path, model, check_section(path, "generation", tree.get("generation")), limits)
    if check_model:
        check_model_path(cfg)
    return cfg


def check_model_path(cfg: LaunchConfig) -> None:
    where = Path(cfg.model.path)
    if not where.exists():
        make = ("export one first (`python -m quantize export --model MODEL_DIR --out DIR`)"
                if cfg.model.backend == "gguf" else "train it first (`python train.py --cfg-path "
                "train_configs/stageN.yaml`; the quick start's `python train.py` makes outputs/tiny/stage4)")
        raise UserError(f"{cfg.source}: model.path {where} does not exist; {make}")
    if cfg.model.backend == "torch" and not (where / "config.json").is_file():
        if is_training_checkpoint(where):
            raise UserError(f"{cfg.source}: model.path {where} is a training checkpoint (the state a run resumes "
                            "from), not a saved model; give the stage's run.output_dir, which holds config.json and "
                            "model.safetensors")
        raise UserError(f"{cfg.source}: model.path {where} is not a saved model directory (no config.json); "
                        "train it first (`python train.py --cfg-path train_configs/stageN.yaml`; the quick start's "
                        "`python train.py` makes outputs/tiny/stage4)")
    if cfg.model.backend == "gguf" and not any(where.glob("llm-*.gguf")):
        raise UserError(f"{cfg.source}: model.path {where} holds no llm-*.gguf; export one first "
                        "(`python -m quantize export --model MODEL_DIR --out DIR`)")


def open_engine(cfg: LaunchConfig) -> ChatEngine:
    """The ChatEngine the config names, with its generation defaults and image cache size. The model is opened by its
    display path (tinygpt.paths.display_path), so the engine's name, logged by the server and shown in the demo's
    header, holds no chain of ``..``."""
    options = {"settings": cfg.generation, "image_cache_size": cfg.limits.image_cache_size}
    path = display_path(cfg.model.path)
    if cfg.model.backend == "torch":
        return ChatEngine.from_model_dir(path, device=cfg.model.device, bits=cfg.model.bits, **options)
    return ChatEngine.from_gguf(path, {"n_threads": cfg.model.threads, "qtype": cfg.model.qtype}, **options)


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: any free one); a taken port, a host that does not resolve ("cannot
    resolve host ...") or a port outside 0-65535 is one UserError naming --host/--port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)  # create_server hides gaierror in an OSError
    except socket.gaierror as exc:  # a name that does not resolve, or an address like 999.1.1.1
        raise UserError(f"--host: cannot resolve host {host} ({exc.strerror})") from None
    try:
        return socket.create_server((host, port), family=family)
    except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0-65535
        code = getattr(exc, "errno", None)  # "Address already in use", without create_server's "(while ...)" tail
        reason = os.strerror(code) if code else exc
        raise UserError(f"--host/--port: cannot listen on {host}:{port} ({reason})") from None


def sigterm_as_interrupt(body):
    """Run `body` with SIGTERM handled as SIGINT (a KeyboardInterrupt): the server (uvicorn) and the demo (gradio)
    stop the same way on both, where SIGTERM would kill the process with status 143, mid-answer."""
    if threading.current_thread() is not threading.main_thread():
        return body()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return body()
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_device(device: Any, where: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, else a UserError naming ``where`` (a number is refused too:
    lmms-eval reads ``device=0`` in --model_args as the int 0)."""
    if isinstance(device, str) and (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
        return device
    raise UserError(f"{where}: expected auto, cpu, cuda or cuda:N, got {device!r}")
