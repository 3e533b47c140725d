"""Build a TinyGPT-V model directory from public checkpoints (and optionally a released TinyGPT-V stage).

    python -m tinygpt.weights.build --llm microsoft/phi-2 --vision Salesforce/blip2-opt-2.7b --out models/tinygptv-base
    python -m tinygpt.weights.build --llm DIR --eva eva_vit_g.pth --qformer blip2_pretrained_flant5xxl.pth \\
        [--image-size 448] [--minigpt4-proj pretrained_minigpt4_7b.pth] [--released TinyGPT-V_for_Stage3.pth] \\
        --out DIR [--dtype bf16|fp16|fp32]

Sizes come from the sources' ``config.json`` files (``--preset`` gives the defaults; for LAVIS files, which carry no
config, the widths come from the tensors and the depths and head counts from the preset). ``--tokenizer`` is resolved
before any weight file is opened, and every source is located (LAVIS, MiniGPT-4 and released files opened) before the
model is built; each source must provide every tensor of its part of the model, which is checked before its tensors
are read (one error naming the source and the first missing tensors; the MiniGPT-4 and released files, which hold
nothing but their part, are checked right after the model is built, before any weights are read, and may leave
nothing of their part fresh). The model is built on the meta device and materialised once in the target dtype,
then filled tensor by tensor from memory-mapped files, so peak memory is about the size of the output model. What no
file provides (the q/k LayerNorms and the post-attention RMSNorm that TinyGPT-V adds, the projections, LoRA) starts
fresh: norms at weight 1 / bias 0, Linear layers with PyTorch's default init, LoRA A kaiming-uniform and B zero. Any
other tensor left unfilled is an error.
The result is a ``tinygpt.model.save_vlm`` directory (config.json + model.safetensors + tokenizer files).
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError, report_errors
from ..io_utils import remove_stale_temporaries
from ..model import TinyGPTVConfig, TinyGPTVForConditionalGeneration, build_config, save_vlm
from ..model.checkpoint_io import check_model_out
from ..model.lora import lora_settings, merge_lora
from ..model.presets import PRESETS
from ..model.vision import check_image_size
from ..tokenizer import load_tokenizer
from . import (check_source, eva_scope, is_extra_norm, lavis_qformer_scope, load_weights, proj1_scope, released_scope,
               vision_scope)
from .blip2_hf import open_blip2, read_blip2
from .lavis import eva_tensors, lavis_config_overrides, lavis_qformer_tensors
from .minigpt4 import minigpt4_proj_tensors
from .phi2 import open_phi2, read_phi2
from .released import released_lora_rank, released_tensors
from .torch_file import read_checkpoint

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None, prog: str = "python -m tinygpt.weights.build") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", required=True, help="Phi-2 hub id (microsoft/phi-2) or a local directory")
    p.add_argument("--vision", help="Hugging Face BLIP-2 hub id (Salesforce/blip2-opt-2.7b) or directory")
    p.add_argument("--eva", help="LAVIS eva_vit_g.pth (instead of --vision)")
    p.add_argument("--qformer", help="LAVIS blip2_pretrained_flant5xxl.pth (with --eva)")
    p.add_argument("--image-size", type=int, help="image size in px (224 for stages 1-3, 448 for stage 4)")
    p.add_argument("--minigpt4-proj", help="MiniGPT-4 checkpoint whose llama_proj initialises proj1")
    p.add_argument("--released", help="a released TinyGPT-V_for_Stage{1..4}.pth to load on top")
    p.add_argument("--lora", action="store_true", help="add fresh LoRA layers (r=64, alpha=16) for stages 2-4")
    p.add_argument("--merge-lora", action="store_true", help="fold LoRA into the base weights before saving")
    p.add_argument("--no-extra-norms", action="store_true",
                   help="plain Phi-2: no q/k LayerNorm, no post-attention RMSNorm (exports to stock llama.cpp)")
    p.add_argument("--preset", default="tinygptv", choices=sorted(PRESETS), help="default sizes (default tinygptv)")
    p.add_argument("--tokenizer", help="tokenizer source (default: the --llm directory/hub id if it has one, "
                                       "else the builtin Phi-2 tokenizer)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weights dtype (default bf16)")
    p.add_argument("--out", required=True, help="output model directory (replaced if it is a model directory; "
                   "a file or another non-empty directory is refused)")
    args = p.parse_args(argv)
    if bool(args.vision) == bool(args.eva or args.qformer):
        p.error("give either --vision, or --eva together with --qformer")
    if args.eva and not args.qformer or args.qformer and not args.eva:
        p.error("--eva and --qformer go together")
    return args


class Steps:
    """Numbered progress lines with elapsed time."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.done += 1
        print(f"[build {self.done}/{self.total} {time.perf_counter() - self.start:6.1f}s] {message}", flush=True)


def make_config(preset: str, text: dict, vision: dict, image_size: int | None, extra_norms: bool,
                lora: dict | None, sources: dict[str, str] | None = None) -> TinyGPTVConfig:
    """The preset's config with the sizes read from the sources laid over it.

    ``sources`` names where the text / vision / qformer sizes came from, for the errors (e.g. the LAVIS file).
    """
    sources = {"text": "--llm config.json", "vision": "vision_config", "qformer": "qformer_config", **(sources or {})}
    base = build_config(preset, lora=lora, extra_norms=extra_norms).to_dict()
    base["text_config"].update(text)
    base["vision_config"].update(vision.get("vision", {}))
    base["qformer_config"].update(vision.get("qformer", {}))
    if "num_query_tokens" in vision:
        base["num_query_tokens"] = vision["num_query_tokens"]
    if image_size is not None:
        check_image_size(int(image_size), int(base["vision_config"]["patch_size"]), where=f"--image-size {image_size}")
        base["vision_config"]["image_size"] = int(image_size)
    for part, what in (("vision", "ViT"), ("qformer", "Q-Former")):
        width, heads = base[f"{part}_config"]["hidden_size"], base[f"{part}_config"]["num_attention_heads"]
        if width % heads:
            given = sources[part] if "num_attention_heads" in vision.get(part, {}) else f"--preset {preset}"
            raise UserError(f"{sources[part]}: the {what} is {width} wide, which does not split into the {heads} "
                            f"attention heads of {given}; choose the --preset the files were made for")
    config = TinyGPTVConfig.from_dict(base)
    try:
        config.text_config.validate_shapes()
    except ValueError as exc:
        raise UserError(f"{sources['text']}: {exc}") from None
    return config


def materialise(config: TinyGPTVConfig, dtype: torch.dtype) -> TinyGPTVForConditionalGeneration:
    """Build on the meta device (no memory, no init work), then allocate every tensor once in ``dtype``."""
    with torch.device("meta"):
        model = TinyGPTVForConditionalGeneration(config)
    model.to(dtype)
    return model.to_empty(device="cpu")


@torch.no_grad()
def initialise_fresh(model: nn.Module, names: list[str]) -> None:
    """Initialise the tensors no file provided; UserError for anything that must come from a checkpoint."""
    not_fresh = []
    for name in names:
        param = model.get_parameter(name)
        if is_extra_norm(name) and name.endswith(".weight"):
            param.fill_(1.0)
        elif is_extra_norm(name) or ".lora_B." in name:
            param.zero_()
        elif ".lora_A." in name:
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        elif name.startswith(("proj1.", "proj2.")):
            _linear_default_init(model.get_submodule(name.split(".")[0]), param)
        else:
            not_fresh.append(name)
    if not_fresh:
        raise UserError(f"no source provided {len(not_fresh)} tensors that cannot start fresh: "
                        f"{', '.join(not_fresh[:4])}{' ...' if len(not_fresh) > 4 else ''}")


def _linear_default_init(linear: nn.Linear, param: torch.Tensor) -> None:
    if param is linear.weight:
        nn.init.kaiming_uniform_(param, a=math.sqrt(5))
    else:
        bound = 1 / math.sqrt(linear.in_features)
        nn.init.uniform_(param, -bound, bound)


def _tokenizer(llm_dir):
    if any((llm_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return load_tokenizer(str(llm_dir))
    print(f"[build] {llm_dir} has no tokenizer files: using the builtin Phi-2 tokenizer", flush=True)
    return load_tokenizer("builtin")


def build(args: argparse.Namespace):
    out = Path(args.out)
    for stale in remove_stale_temporaries(out.parent, [glob.escape(out.name)]):  # a killed build's (gigabytes)
        print(f"[build] removed {stale} (a temporary of a build that was killed while writing {out})", flush=True)
    check_model_out(args.out, "--out")  # before reading gigabytes of weights
    steps = Steps(6)
    dtype = DTYPES[args.dtype]
    steps(f"locating sources (LLM {args.llm}, vision {args.vision or args.eva})")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None  # a hub id may fail: before any weight
    llm_dir, text = open_phi2(args.llm)
    if tokenizer is None:
        tokenizer = _tokenizer(llm_dir)
    if args.vision:
        vision_dir, vision = open_blip2(args.vision)
        sources = {"vision": str(vision_dir / "config.json"), "qformer": str(vision_dir / "config.json")}
    else:
        vision_dir, eva, qformer = None, read_checkpoint(args.eva), read_checkpoint(args.qformer)
        vision, sources = lavis_config_overrides(eva, qformer), {"vision": args.eva, "qformer": args.qformer}
    proj = minigpt4_proj_tensors(read_checkpoint(args.minigpt4_proj)) if args.minigpt4_proj else None
    released = read_checkpoint(args.released) if args.released else None
    rank = released_lora_rank(released) if released is not None else None
    lora = lora_settings({"r": rank}) if rank is not None else (lora_settings({}) if args.lora else None)
    sources["text"] = str(llm_dir / "config.json")
    config = make_config(args.preset, text, vision, args.image_size, not args.no_extra_norms, lora, sources)

    t, v = config.text_config, config.vision_config
    lora_text = f"r={lora['r']}" if lora else "off"
    steps(f"building the model on meta, materialising in {args.dtype} (LLM {t.hidden_size}x{t.num_hidden_layers}, "
          f"ViT {v.hidden_size}x{v.num_hidden_layers} at {v.image_size}px, LoRA {lora_text})")
    model = materialise(config, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    if proj is not None:  # these files hold nothing but their part: what they lack would start fresh (random)
        check_source(model, proj, proj1_scope, required="all")
    if released is not None:
        released = released_tensors(released, t.num_attention_heads, v.num_hidden_layers)
        check_source(model, released, released_scope(rank), required="all")

    steps("loading the language model")
    llm = read_phi2(llm_dir, t.num_attention_heads).with_prefix("language_model.")
    loaded = set(load_weights(model, llm, lambda k: k.startswith("language_model."), True, required=True).loaded)
    steps("loading the vision tower and Q-Former")
    if vision_dir is not None:
        loaded |= set(load_weights(model, read_blip2(vision_dir), vision_scope, True, required=True).loaded)
    else:
        eva_part = eva_tensors(eva, v.num_hidden_layers)
        loaded |= set(load_weights(model, eva_part, eva_scope, True, required=True).loaded)
        qformer_part = lavis_qformer_tensors(qformer)
        loaded |= set(load_weights(model, qformer_part, lavis_qformer_scope, True, required=True).loaded)
    steps("projections, released stage weights, fresh init of the rest")
    if proj is not None:
        loaded |= set(load_weights(model, proj, proj1_scope, required="all").loaded)
    if released is not None:
        loaded |= set(load_weights(model, released, released_scope(rank), progress=True, required="all").loaded)
    fresh = [name for name, _ in model.named_parameters() if name not in loaded]
    initialise_fresh(model, fresh)
    print(f"[build] fresh (not in any file): {len(fresh)} tensors, "
          f"{sum(model.get_parameter(n).numel() for n in fresh):,} parameters", flush=True)
    if args.merge_lora and lora is not None:
        merge_lora(model)
    model.eval()
    model.tokenizer = tokenizer
    steps(f"saving {n_params:,} parameters to {args.out}")
    save_vlm(model, args.out)
    print(f"[build] done in {time.perf_counter() - steps.start:.1f}s: {args.out}", flush=True)
    return model


def main(argv: list[str] | None = None, prog: str = "python -m tinygpt.weights.build") -> int:
    args = parse_args(argv, prog)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[weights] %(message)s"))
    logger = logging.getLogger("tinygpt.weights")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def run() -> int:
        build(args)
        return 0

    try:
        return report_errors(run)
    finally:
        logger.removeHandler(handler)  # a second main() in the same process prints each line once


if __name__ == "__main__":
    sys.exit(main())
