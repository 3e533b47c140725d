"""Export a trained tinygpt model directory to two GGUF files: `llm-<qtype>.gguf` and `vision.gguf`.

    python -m quantize export --model DIR --out DIR [--qtype q4_k|q4_0|q8_0|f16|f32]

LoRA is merged first. LLM: 2-D weights in the chosen type (rows that do not fill whole blocks widen as llama.cpp
does), norms and biases F32. Vision: Linear weights Q8_0 (F16 when rows do not divide by 32), the rest F32; an F16
export is the unquantised reference, so its vision Linear weights are F16 too (the PyTorch-vs-GGUF agreement check);
an F32 export keeps every weight F32 (the exact reference: ggml's F16 matmuls round activations to F16 as well).
The pair is one transaction: both files and `export.json` are written tensor by tensor to temporary names and
renamed only when all three are complete, so a failed (re-)export leaves the previous pair as it was. Both files
carry the same `model_id`, a sha256 of the exported model's content (not its shapes), which the runtime checks.
The output directory is checked before any work, and so are config.json's settings the runtimes would refuse (MoE
layers, a prompt template with two `{}`); a write failure is one UserError naming the directory, and a
directory the export created is removed again. A SIGTERM is handled as an error (temporaries removed); temporaries
left by an export that was killed outright are removed by the next export into the directory. In the same transaction,
every other `llm-*.gguf` there that is not of this model (it cannot pair with the new vision.gguf) is removed; a
vision.gguf of this model more precise than this export's (an f16/f32 reference) is kept, not replaced.
A model with MoE layers (model.moe) stacks each layer's experts into llama.cpp's ffn_*_exps tensors
(quantize.gguf_moe); a dense model's file is byte for byte what it was before MoE.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from gguf import GGMLQuantizationType

from tinygpt.errors import UserError
from tinygpt.io_utils import (
    atomic_paths,
    check_output_dir,
    dirs_removed_on_failure,
    remove_stale_temporaries,
    sigterm_raises,
    waiting_lock,
    writing,
)
from tinygpt.model.checkpoint_io import load_vlm, read_config
from tinygpt.model.lora import has_lora, merge_lora
from tinygpt.paths import is_training_checkpoint

from . import gguf_names as names
from .gguf_file import open_gguf
from .gguf_meta import LLMHyper, PromptInfo, TokenizerMeta, VisionHyper, llm_kv, tokenizer_metadata, vision_kv
from .gguf_moe import check_moe_config, expert_groups
from .gguf_stream import FileSummary, TensorPlan, plan_tensor, summarize, write_gguf_to
from .qtypes import FILE_TYPE_BY_NAME, parse_qtype

T = GGMLQuantizationType
VISION_LINEAR_TYPE = T.Q8_0
REFERENCE_TYPES = (T.F16, T.F32)  # unquantised exports: the vision Linear weights stay in the same type
PRECISION = {T.Q8_0: 1, T.F16: 2, T.F32: 3}  # of a vision file's Linear weights
OUTPUT_HEAD = "output.weight"
ROUTER = "ffn_gate_inp.weight"


@dataclass
class ExportSummary:
    out_dir: str
    qtype: str
    llm: FileSummary
    vision: FileSummary
    vision_type: str = "Q8_0"  # of the Linear weights of the directory's vision.gguf
    notes: list[str] = field(default_factory=list)  # a kept vision file, removed files of another model

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "qtype": self.qtype, "vision_type": self.vision_type,
                "llm": self.llm.to_dict(), "vision": self.vision.to_dict()}

    def lines(self) -> list[str]:
        return [f"exported to {self.out_dir} (LLM {self.qtype}, vision {self.vision_type})", *self.notes,
                *self.llm.lines(), *self.vision.lines()]


# ------------------------------------------------------------------------------------------------ plans
def llm_plans(shapes: Sequence[tuple[str, tuple[int, ...]]], qtype: GGMLQuantizationType) -> list[TensorPlan]:
    """(GGUF name, numpy shape) in file order -> plans: 2-D weights in qtype (with fallback), the rest F32.

    An F16 export keeps the output head (`output.weight`) F32: ggml's F16 matmul rounds its input (the final hidden
    state) to F16 as well, and the head is where near-ties between next tokens are decided. Measured on the tiny
    stage-4 model, 600 held-out conversations: the F16 export gave the PyTorch model's greedy answer on 98.3% with an
    F16 head and 99.7% with an F32 one (an all-F32 export: 100%). At full size the F32 head adds 262 MB to 5.6 GB.
    MoE layers: 3-D expert matrices in qtype, their 2-D bias tables F32, the router F32 (F16 in an f16 export)."""
    def kind(name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
        if name.endswith(ROUTER):  # MoE routers decide which experts run: F32 (F16 in an f16 export)
            return T.F16 if qtype == T.F16 else T.F32
        if len(shape) == 3:  # MoE expert matrices (quantize.gguf_moe), as the dense FFN
            return qtype
        if len(shape) != 2 or name.endswith(".bias") or (qtype == T.F16 and name == OUTPUT_HEAD):
            return T.F32  # (2-D biases: the MoE experts' bias rows)
        return qtype

    return [plan_tensor(n, s, kind(n, s)) for n, s in shapes]


def vision_plans(shapes: Sequence[tuple[str, tuple[int, ...]]], linear_type=VISION_LINEAR_TYPE) -> list[TensorPlan]:
    """Linear weights (2-D '.weight') in linear_type (Q8_0, with fallback); conv kernel, embeddings, norms, biases
    F32."""
    return [plan_tensor(n, s, linear_type if len(s) == 2 and n.endswith(".weight") else T.F32) for n, s in shapes]


def split_state_names(torch_names: Sequence[str], where: str) -> tuple[dict[str, str], dict[str, str]]:
    """VLM state-dict names -> ({gguf LLM name: torch name}, {gguf vision name: torch name}), in order."""
    llm, vision, unknown = {}, {}, []
    for name in torch_names:
        try:
            if name.startswith(names.LLM_PREFIX):
                llm[names.torch_to_gguf_llm(name)] = name
            elif names.is_vision_tensor(name):
                vision[names.torch_to_gguf_vision(name)] = name
            else:
                unknown.append(name)
        except KeyError:
            unknown.append(name)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UserError(f"{where}: tensors with no GGUF name (unmerged LoRA or a foreign model?): {shown}")
    return llm, vision


def order_llm(mapping: Mapping[str, str], hyper: LLMHyper, where: str) -> list[str]:
    """GGUF LLM names in the canonical order; the state dict must hold exactly the tensors the config implies."""
    expected = names.llm_tensor_names(hyper.num_layers, hyper.qk_layernorm, hyper.post_attention_rmsnorm,
                                      hyper.moe_layers)
    missing = [n for n in expected if n not in mapping]
    extra = [n for n in mapping if n not in set(expected)]
    if missing or extra:
        raise UserError(
            f"{where}: language model weights do not match its config "
            f"(missing {missing[:3] or 'none'}, unexpected {extra[:3] or 'none'})"
        )
    return expected


# ------------------------------------------------------------------------------------------- writing
def check_out_dir(out_dir: str | Path) -> Path:
    """Before any work: --out is a directory (or can be made as one) that we may write."""
    return check_output_dir(out_dir, "--out", "GGUF export")


def one_export_at_a_time(out: Path, progress: bool):
    """A lock on the output directory itself for the whole transaction: a second export into it waits, then sees the
    first one's files, so it removes an llm-*.gguf of the other model as it would afterwards."""
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda: print(f"waiting for another export into {out} to finish", flush=True)) if progress else None
    return waiting_lock(out, on_wait=say)


def content_id(tensors: Mapping[str, Any], extra: str = "") -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order, plus `extra`: the exported model's
    identity, shared by its two GGUF files."""
    sha = hashlib.sha256(extra.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        sha.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode("utf-8"))
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return sha.hexdigest()


def _opened(path: Path, arch: str):
    """The GGUFContents of path, or None when it is absent, damaged or not a file of arch."""
    try:
        return open_gguf(path, arch)
    except UserError:
        return None


def llm_files_by_model(out: Path, new_file: Path, model_id: str) -> tuple[list[Path], list[Path]]:
    """The llm-*.gguf in out other than new_file: (those of model_id, the rest: another, no or an unreadable id)."""
    same, other = [], []
    for path in sorted(out.glob("llm-*.gguf")):
        if path != new_file:
            llm = _opened(path, names.ARCH_LLM)
            (same if llm is not None and llm.metadata.get(names.MODEL_ID) == model_id else other).append(path)
    return same, other


def vision_type_of(path: Path, model_id: str) -> GGMLQuantizationType | None:
    """The Linear weight type of the vision file at path (its least precise 2-D weight) when it is of model_id."""
    vision = _opened(path, names.ARCH_VISION)
    if vision is None or vision.metadata.get(names.VISION_MODEL_ID) != model_id:
        return None
    types = [T(t.tensor_type) for n, t in vision.tensors.items() if len(t.shape) == 2 and n.endswith(".weight")]
    return min(types, key=lambda t: PRECISION.get(t, 0), default=None)


def write_pair(
    out_dir: str | Path,
    qtype_name: str,
    model_name: str,
    llm_hyper: LLMHyper,
    vision_hyper: VisionHyper,
    prompt: PromptInfo,
    tok: TokenizerMeta,
    llm_shapes: Sequence[tuple[str, tuple[int, ...]]],
    vision_shapes: Sequence[tuple[str, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    progress: bool = True,
    model_id: str = "",
) -> ExportSummary:
    """Write vision.gguf, llm-<qtype>.gguf and export.json into out_dir as one transaction; produce(gguf_name) gives
    one tensor; model_id (content_id of the model) goes into both files. The transaction also removes the other
    llm-*.gguf of another model; a more precise vision.gguf of this model is kept (see the module docstring)."""
    qtype = parse_qtype(qtype_name)
    out = check_out_dir(out_dir)
    if not model_id:
        raise ValueError("write_pair needs the model_id of the exported content")
    long = [n for n, _ in [*llm_shapes, *vision_shapes] if len(n.encode()) > names.MAX_NAME_LENGTH]
    if long:
        raise ValueError(f"GGUF tensor names over {names.MAX_NAME_LENGTH} bytes: {long}")

    vision_file, llm_file = out / names.VISION_FILE_NAME, out / names.llm_file_name(qtype_name.lower())
    files = [vision_file, llm_file, out / names.SUMMARY_FILE_NAME]
    llm_meta = llm_kv(llm_hyper, tok, prompt, vision_hyper.hash(), model_name, FILE_TYPE_BY_NAME[qtype_name.lower()],
                      model_id)
    vision_type = qtype if qtype in REFERENCE_TYPES else VISION_LINEAR_TYPE
    with sigterm_raises(), dirs_removed_on_failure(out), \
            writing(out, f"the GGUF export ({', '.join(f.name for f in files)})"), one_export_at_a_time(out, progress):
        for stale in remove_stale_temporaries(out, [f.name for f in files] + ["llm-*.gguf"]):
            if progress:
                print(f"removed {stale} (a temporary file of an export that is no longer running)")
        same, other = llm_files_by_model(out, llm_file, model_id)
        existing = vision_type_of(vision_file, model_id)
        notes = [f"removed {p} (of another model: it cannot pair with the new {vision_file.name})" for p in other]
        if existing is not None and PRECISION[existing] > PRECISION[vision_type]:
            files.remove(vision_file)
            notes.append(f"kept {vision_file} of this model ({existing.name}, more precise than the "
                         f"{vision_type.name} this export writes)")
            vision_type = existing
        elif existing is not None and existing != vision_type and same:
            notes.append(f"{', '.join(p.name for p in same)} now pair with this {vision_type.name} "
                         f"{vision_file.name} (it was {existing.name})")
        with atomic_paths(files, remove=other) as tmps:
            tmp = dict(zip(files, tmps))
            if vision_file in tmp:
                vision = write_gguf_to(
                    tmp[vision_file], vision_file, names.ARCH_VISION,
                    vision_kv(vision_hyper, f"{model_name} vision", model_id),
                    vision_plans(vision_shapes, vision_type), lambda p: produce(p.name), progress,
                )
            else:
                vision = summarize(vision_file, vision_plans(vision_shapes, vision_type), 0.0)
            llm = write_gguf_to(
                tmp[llm_file], llm_file, names.ARCH_LLM, llm_meta, llm_plans(llm_shapes, qtype),
                lambda p: produce(p.name), progress,
            )
            summary = ExportSummary(str(out), qtype_name.lower(), llm, vision, vision_type.name, notes)
            record = {**summary.to_dict(), "model_id": model_id}
            tmps[-1].write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if progress:
        print("\n".join(summary.lines()))
    return summary


# ----------------------------------------------------------------------------------------- the model
def model_content_id(model) -> str:
    """The model_id an export of `model` (as load_model_dir returns it: LoRA merged) writes into both files."""
    return content_id(model.state_dict(), extra=f"{type(model).__name__}|{model.config.to_json_string()}")


def model_path(model_dir: str | Path) -> Path:
    """--model as a Path; an empty one (Path("") is the current directory, e.g. an unset variable) is a UserError."""
    if not str(model_dir).strip():
        raise UserError("--model: the path is empty; give the saved model's directory")
    return Path(model_dir)


def check_model_config(config, config_file: Path) -> None:
    """UserError naming config_file and the field for settings the runtimes refuse in the exported files."""
    text = config.text_config
    check_moe_config(getattr(text, "moe", None), int(text.num_hidden_layers), str(config_file))
    if str(config.prompt_template).count("{}") > 1:
        raise UserError(f"--model: {config_file} field prompt_template {config.prompt_template!r} holds more than one "
                        "'{}' (the place of the user text); the runtimes take one")


def load_model_dir(model_dir: str | Path):
    """A TinyGPTVForConditionalGeneration (LoRA merged, tokenizer attached) from a saved model directory."""
    path = model_path(model_dir)
    if not path.is_dir():
        raise UserError(f"--model: {path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        if is_training_checkpoint(path):
            raise UserError(f"--model: {path} is a training checkpoint (the state a run resumes from), not a saved "
                            "model; export the stage's run.output_dir, which holds config.json and model.safetensors")
        raise UserError(f"--model: {path} has no config.json, so it is not a saved tinygpt model")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--model: {config_file} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"--model: {config_file} holds a JSON {type(raw).__name__}, not a model config object")
    if raw.get("model_type") != "tinygptv":
        raise UserError(f"--model: {config_file} field model_type is {raw.get('model_type')!r}, expected 'tinygptv'")
    check_model_config(read_config(path), config_file)  # before the weights: building the model would trip on them
    model = load_vlm(path)  # follows base_model chains, attaches the tokenizer saved with the model
    if has_lora(model):
        model = merge_lora(model)
    return model.eval()


def export_model(model_dir: str | Path, out_dir: str | Path, qtype: str = "q4_k",
                 progress: bool = True) -> ExportSummary:
    """Export the model saved in model_dir to out_dir/llm-<qtype>.gguf + out_dir/vision.gguf (+ export.json)."""
    parse_qtype(qtype)  # fail on a bad --qtype, --model or --out before loading anything
    model_path(model_dir)
    check_out_dir(out_dir)
    model = load_model_dir(model_dir)
    config = model.config
    llm_hyper = LLMHyper.from_config(config.text_config)
    vision_hyper = VisionHyper.from_config(config)
    text = config.text_config
    try:
        tok = tokenizer_metadata(model.tokenizer, llm_hyper.vocab_size, text.bos_token_id, text.eos_token_id,
                                 text.pad_token_id)
    except ValueError as exc:
        raise UserError(f"--model: tokenizer of {model_dir}: {exc}") from None

    state = model.state_dict()
    where = f"--model {model_dir}"
    broken = next((n for n, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:  # a diverged fine-tune: every answer of the export would be garbage
        raise UserError(f"{where}: tensor {broken} holds NaN or infinite values (did the training diverge?); "
                        "export an earlier checkpoint")
    experts = expert_groups(list(state), llm_hyper.moe_layers, llm_hyper.num_experts, where)  # MoE: stacked
    stacked = {t for group in experts.values() for t in group}
    llm_map, vision_map = split_state_names([n for n in state if n not in stacked], where=where)
    llm_order = order_llm({**llm_map, **experts}, llm_hyper, where=where)
    to_torch = {**llm_map, **vision_map}

    def produce(gguf_name: str) -> np.ndarray:
        if gguf_name in experts:  # expert e's tensor is slice e
            return torch.stack([state[t].detach().to("cpu").float() for t in experts[gguf_name]]).numpy()
        return state[to_torch[gguf_name]].detach().to("cpu").float().numpy()

    def shape(gguf_name: str) -> tuple[int, ...]:
        if gguf_name in experts:
            return (len(experts[gguf_name]), *state[experts[gguf_name][0]].shape)
        return tuple(state[llm_map[gguf_name]].shape)

    return write_pair(
        out_dir, qtype, Path(model_dir).resolve().name, llm_hyper, vision_hyper, PromptInfo.from_config(config), tok,
        [(n, shape(n)) for n in llm_order],
        [(n, tuple(state[t].shape)) for n, t in vision_map.items()],
        produce, progress, model_id=model_content_id(model),
    )
