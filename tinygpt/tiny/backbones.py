"""The tiny backbones: a whole tiny TinyGPT-V model directory, made once per machine and cached.

Nothing can be downloaded, so the tiny twin of "Phi-2 + EVA ViT-g + BLIP-2 Q-Former" is made locally:

* the LLM (tiny Phi, real Phi-2 tokenizer) is pretrained on text (``pretrain_llm.py``);
* the ViT, ln_vision, Q-Former and query tokens are pretrained on synthetic scenes (``pretrain_vision.py``);
* proj1 / proj2 keep their default initialisation and the extra norms (q/k LayerNorm, post-attention RMSNorm) stay
  at weight 1 / bias 0: stage 1 trains them, exactly as the real recipe does.

The directory is a normal model directory (``tinygpt.model.save_vlm``) under ``$TINYGPT_CACHE`` (default
``~/.cache/tinygpt``), named by a version string and a hash of the pretraining settings and of the source files that
decide what the backbones learn (``BUILD_SOURCES``: scenes, texts, scene code, pretraining, model), so an updated
checkout never reuses a build made by older code (a caption wording change once did). It is built in a temporary
directory and renamed into place; a lock file makes a second process wait for the first instead of building again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from tinygpt.errors import UserError
from tinygpt.evaluation.health import installed_versions, versions_text
from tinygpt.io_utils import atomic_write_text, pid_alive, waiting_lock
from tinygpt.model import TinyGPTVForConditionalGeneration, build_config, load_vlm, save_vlm
from tinygpt.paths import cache_root
from tinygpt.tiny.llm_ceiling import llm_ceiling
from tinygpt.tiny.pretrain_llm import LLMPretrainSettings, pretrain_llm
from tinygpt.tiny.pretrain_vision import VisionPretrainSettings, pretrain_vision
from tinygpt.tokenizer import load_tokenizer

BACKBONES_VERSION = "6"
MARKER = "backbones.json"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# Package-relative files and folders (every ``.py`` inside) whose content is part of the cache key.
BUILD_SOURCES = ("tiny/pretrain_llm.py", "tiny/pretrain_vision.py", "tiny/scene_code.py", "tiny/schedule.py",
                 "tiny/synthetic", "tasks.py", "prompts/alignment.txt", "model")


def sources_digest(root: Path = PACKAGE_ROOT, sources: tuple[str, ...] = BUILD_SOURCES) -> str:
    """sha256 over the names and bytes of the build's source files (``BUILD_SOURCES`` under ``root``)."""
    digest = hashlib.sha256()
    for entry in sources:
        path = root / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def backbones_key(llm: LLMPretrainSettings, vision: VisionPretrainSettings) -> str:
    """Directory name: version + hash of every setting and of the build's sources, so neither a change of recipe nor
    updated code ever reuses a stale build."""
    settings = json.dumps({"llm": dataclasses.asdict(llm), "vision": dataclasses.asdict(vision),
                           "sources": sources_digest()}, sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
    return f"tiny-backbones-v{BACKBONES_VERSION}-{digest}"


def is_complete(directory: Path) -> bool:
    return (directory / MARKER).is_file() and (directory / "config.json").is_file()


def ensure_tiny_backbones(
    cache_dir: str | os.PathLike | None = None,
    llm: LLMPretrainSettings = LLMPretrainSettings(),
    vision: VisionPretrainSettings = VisionPretrainSettings(),
    progress: bool = True,
    build: bool = True,
) -> Path | None:
    """Path of the cached tiny backbone model directory; builds it the first time (about 6 minutes on 2 cores).
    ``build=False``: None when it is not built."""
    root = cache_root(cache_dir)
    target = root / backbones_key(llm, vision)
    if is_complete(target):
        return target
    if not build:
        return None
    try:
        with waiting_lock(root / f"{target.name}.lock"):
            if is_complete(target):  # another process built it while we waited
                return target
            _build(target, llm, vision, progress)
    except OSError as exc:
        raise UserError(f"{root}: cannot write the tiny backbone cache ({exc}); set TINYGPT_CACHE to a writable "
                        "directory") from None
    return target


VISION_PREFIXES = ("vision_model.", "qformer.", "query_tokens")


def _pretrain_in_parallel(model, tokenizer, llm: LLMPretrainSettings, vision: VisionPretrainSettings,
                          progress: bool, scratch: Path) -> dict:
    """LLM in this process and vision in a child process, one core each (no thread-sync overhead on 2 cores); when
    the vision process is done (it is the shorter of the two), the LLM takes every core for its remaining steps.

    The child is a fresh interpreter (``python -m tinygpt.tiny.pretrain_vision``), so nothing depends on how this
    process was started (no multiprocessing re-import of the caller's main module).
    """
    config_path, settings_path, out_path = scratch / "config.json", scratch / "settings.json", scratch / "vision.pt"
    config_path.write_text(json.dumps(model.config.to_dict()), encoding="utf-8")
    settings_path.write_text(json.dumps(dataclasses.asdict(vision)), encoding="utf-8")
    command = [sys.executable, "-m", "tinygpt.tiny.pretrain_vision", "--config", str(config_path),
               "--settings", str(settings_path), "--out", str(out_path)] + ([] if progress else ["--quiet"])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    child = subprocess.Popen(command, env=env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def take_freed_core(step: int) -> None:  # the vision side finishes first: the LLM then uses every core
        if torch.get_num_threads() == 1 and child.poll() is not None:
            torch.set_num_threads(threads)

    try:
        llm_figures = pretrain_llm(model.language_model, tokenizer, llm, progress=progress, before_step=take_freed_core)
        code = child.wait()
    except BaseException:
        child.kill()
        child.wait()
        raise
    finally:
        torch.set_num_threads(threads)
    if code != 0 or not out_path.is_file():
        raise RuntimeError(f"tiny backbones: the vision pretraining process failed (exit code {code})")
    saved = torch.load(out_path, weights_only=True)
    missing = [k for k in model.state_dict() if k.startswith(VISION_PREFIXES) and k not in saved["state"]]
    if missing:
        raise RuntimeError(f"tiny backbones: vision pretraining returned no tensor for {missing[:3]}")
    model.load_state_dict(saved["state"], strict=False)
    return {"llm": llm_figures, "vision": saved["figures"]}


def build_backbone_model(llm: LLMPretrainSettings, vision: VisionPretrainSettings, progress: bool = True,
                         scratch: Path | None = None):
    """A pretrained tiny model (in memory) and the measured figures of both pretrainings.

    With 2+ cores and a ``scratch`` directory the two pretrainings run side by side in two processes.
    """
    torch.manual_seed(llm.seed)
    tokenizer = load_tokenizer()
    config = build_config("tiny", tokenizer_source="builtin")
    text = config.text_config
    text.hidden_size, text.intermediate_size = llm.hidden_size, llm.intermediate_size
    text.num_hidden_layers = llm.num_layers
    model = TinyGPTVForConditionalGeneration(config)
    model.tokenizer = tokenizer
    if progress:
        print("tiny backbones: pretraining the LLM on text and the ViT + Q-Former on synthetic scenes", flush=True)
    if scratch is not None and (os.cpu_count() or 1) >= 2:
        figures = _pretrain_in_parallel(model, tokenizer, llm, vision, progress, scratch)
    else:
        figures = {"llm": pretrain_llm(model.language_model, tokenizer, llm, progress=progress),
                   "vision": pretrain_vision(model, vision, progress=progress)}
    for param in model.parameters():
        param.requires_grad_(False)
    return model, figures


def sweep_dead_builds(target: Path) -> list[Path]:
    """Remove the ``.NAME.building-PID`` / ``.NAME.scratch-PID`` folders that a killed build of ``target`` left (its
    process is gone; a live one's are kept). Called under the build lock; returns what it removed."""
    removed = []
    for leftover in sorted(target.parent.glob(f".{target.name}.*-*")):
        kind, _, pid = leftover.name[len(target.name) + 2:].partition("-")
        if kind in ("building", "scratch") and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def _build(target: Path, llm: LLMPretrainSettings, vision: VisionPretrainSettings, progress: bool) -> None:
    start = time.monotonic()
    sweep_dead_builds(target)
    building = target.parent / f".{target.name}.building-{os.getpid()}"
    scratch = target.parent / f".{target.name}.scratch-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        model, figures = build_backbone_model(llm, vision, progress, scratch)
        save_vlm(model, building)
        marker = {"version": BACKBONES_VERSION, "key": target.name, "seconds": round(time.monotonic() - start, 1),
                  "llm_settings": dataclasses.asdict(llm), "vision_settings": dataclasses.asdict(vision),
                  "figures": figures}
        (building / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # an incomplete leftover (no marker): replace it
            shutil.rmtree(target)
        os.replace(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if progress:
        print(f"tiny backbones: wrote {target} in {time.monotonic() - start:.0f} s", flush=True)


# --- the recorded ceiling, kept true to the installed versions -------------------------------------------------------

def recorded_ceiling(directory: Path) -> dict | None:
    """The true-code ceiling stored in the backbones' marker (None when it was not measured)."""
    try:
        return json.loads((directory / MARKER).read_text(encoding="utf-8"))["figures"]["llm"]["true_code_ceiling"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measure_ceiling(directory: Path, scenes: int | None = None) -> dict:
    """Load the backbones' LLM and measure its true-code ceiling under the installed versions."""
    model = load_vlm(directory)
    scenes = scenes or int((recorded_ceiling(directory) or {}).get("scenes", LLMPretrainSettings().ceiling_scenes))
    return llm_ceiling(model.language_model, model.tokenizer, scenes)


def current_ceiling(directory: Path, progress: bool = True) -> dict | None:
    """The recorded ceiling, re-measured (and recorded again) when torch or transformers differ from the versions it
    was measured with: a stale ceiling once showed 11.9% under a working stage 4 of 86.3%."""
    ceiling = recorded_ceiling(directory)
    if ceiling is None or ceiling.get("versions") == installed_versions():
        return ceiling
    if progress:
        print(f"[tiny] re-measuring the LLM ceiling under {versions_text()} (recorded under "
              f"{ceiling.get('versions', 'unrecorded versions')})", flush=True)
    ceiling = measure_ceiling(directory, ceiling.get("scenes"))
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
        marker["figures"]["llm"]["true_code_ceiling"] = ceiling
        atomic_write_text(directory / MARKER, json.dumps(marker, indent=2) + "\n")
    except OSError as exc:  # a read-only shared cache: use the new figure without recording it
        if progress:
            print(f"[tiny] could not record the re-measured ceiling in {directory / MARKER} ({exc})", flush=True)
    return ceiling


def resolve_builtin(cfg, build: bool = True) -> None:
    """Replace ``model.init_from: builtin:tiny`` in a loaded stage config by the cached tiny backbones (built once);
    the entry points call this before ``run_stage``, so training never imports the twin. ``build=False``: only when
    they are built already (what a finished run's checkpoint recorded: ``--check`` and the finished-run check compare
    with it, and build nothing)."""
    if cfg.model.init_from != "builtin:tiny":
        return
    built = ensure_tiny_backbones(build=build)
    if built is not None:
        cfg.model.init_from = str(built)
