"""What every benchmark loader shares: its options, its prompt, reading the official files, and breakdowns.

Options (``benchmark.options`` of an eval config, handed to ``load``), the same for every benchmark:

* ``limit``: only the first N samples (in file order);
* ``images``: the image directory, instead of the benchmark's default place under the root;
* ``prompt``: a template for the user text, with the benchmark's fields in braces (``"[vqa] {question}"``; which
  fields a benchmark offers is in its module docstring); a field it does not offer, or a template without the
  sample's question (e.g. ``{question}``), is a UserError;
* ``prompt_style``: ``"official"`` (default: the benchmark's own prompt, see its module) or ``"tinygpt-v"`` (exactly
  the prompt the original TinyGPT-V evaluation asked, for ``--scoring tinygpt-v-compat``); ``prompt`` wins over both.

Every problem with a file is one UserError naming the file and the record (line or key) and the field at fault.
"""

from __future__ import annotations

import json
import string
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Iterable, Optional, Sequence

from ...data.bad_records import BadRecord
from ...data.image import safe_join
from ...errors import UserError, did_you_mean
from ..benchmark import SCORINGS, Prediction, Sample
from ..metrics import binary_metrics, mean

OPTIONS = ("limit", "images", "prompt", "prompt_style")
PROMPT_STYLES = ("official", "tinygpt-v")
ORIGINAL_MAX_NEW_TOKENS = 20  # what the original evaluation allowed on every benchmark (benchmark_evaluation.yaml)
SAME_AS_OFFICIAL = "same as official"

VQA_PROMPT = "[vqa] Based on the image, respond to this question with a short answer: {question}"
"""MiniGPT-v2's evaluation prompt for short-answer VQA (OK-VQA, GQA, ...), which TinyGPT-V kept; one of the two VQA
wordings the model is trained with (tinygpt.tasks.VQA_PROMPTS)."""


PUBLISHED = {
    "TinyGPT-V (2.8B, paper v1)": {"gqa": 33.6, "vsr": 53.2, "iconqa": 43.3, "vizwiz": 24.8, "hateful_memes": 53.2},
    "InstructBLIP (13B)": {"gqa": 49.5, "vsr": 52.1, "iconqa": 44.8, "vizwiz": 33.4, "hateful_memes": 57.5},
    "BLIP-2 (13B)": {"gqa": 41.0, "vsr": 50.9, "iconqa": 40.6, "vizwiz": 19.6, "hateful_memes": 53.7},
    "MiniGPT-4 (13B)": {"gqa": 30.8, "vsr": 41.6, "iconqa": 37.6},
    "LLaVA (13B)": {"gqa": 41.3, "vsr": 51.2, "iconqa": 43.0},
    "Flamingo (9B)": {"vsr": 31.8, "vizwiz": 28.8, "hateful_memes": 57.0},
    "MiniGPT-v2 (7B)": {"gqa": 60.3, "vizwiz": 53.6},
    "LLaVA-1.5 (7B)": {"vqav2": 78.5, "gqa": 62.0, "vizwiz": 50.0, "pope": 85.9},
    "TinyLLaVA (Phi-2 + SigLIP)": {"vqav2": 80.1, "gqa": 62.1, "pope": 87.2},
    "MoE-LLaVA (Phi-2 2.7B x4)": {"vqav2": 77.6, "gqa": 61.4, "vizwiz": 43.9, "pope": 86.3},
    "MobileVLM V2 (3B)": {"gqa": 61.1, "pope": 84.7},
}
"""Published zero-shot figures (percent) by model, each scored by its own paper's scorer. The first six rows are the
TinyGPT-V paper's (arXiv 2312.16862v1) table: its own row and InstructBLIP's GQA, IconQA and HM from that paper, the
other cells as MiniGPT-v2's paper lists them (TinyGPT-V's figures come from the lenient scorers that tinygpt-v-compat
reproduces, and its HM figure is an accuracy; the peers' HM figures are AUROC as far as their papers say).
MiniGPT-v2's own two figures are from an aggregate of its paper, not re-checked. The last four rows are the LLaVA-
suite model cards (LLaVA docs/MODEL_ZOO.md, TinyLLaVA_Factory, MoE-LLaVA, MobileVLM READMEs): VQAv2 and VizWiz on
test-dev, GQA on testdev-balanced, POPE as F1."""


def published(benchmark: str) -> dict[str, float]:
    """The `PUBLISHED` figures of one benchmark, by model (TinyGPT-V first where it reported one)."""
    return {model: figures[benchmark] for model, figures in PUBLISHED.items() if benchmark in figures}


@dataclass(frozen=True)
class Options:
    limit: Optional[int]
    images: Optional[Path]
    prompt: Optional[str]
    style: str

    def max_new_tokens(self, official: int) -> int:
        """`official`, or the original's 20 with ``prompt_style: tinygpt-v``."""
        return ORIGINAL_MAX_NEW_TOKENS if self.style == "tinygpt-v" else official


def parse_options(name: str, options: Optional[dict]) -> Options:
    """Check ``options`` (unknown keys, types) for benchmark `name`."""
    options = dict(options or {})
    for key in options:
        if key not in OPTIONS:
            raise UserError(f"benchmark.options.{key}: unknown option for benchmark {name}; expected one of "
                            f"{', '.join(OPTIONS)}{did_you_mean(str(key), OPTIONS)}")
    limit = options.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"benchmark.options.limit: expected a whole number >= 1, got {limit!r}")
    images = options.get("images")
    if images is not None and (not isinstance(images, (str, Path)) or not str(images).strip()):
        raise UserError(f"benchmark.options.images: expected a directory, got {images!r}")
    prompt = options.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise UserError(f"benchmark.options.prompt: expected a template such as '[vqa] {{question}}', got {prompt!r}")
    style = options.get("prompt_style") or "official"
    if style not in PROMPT_STYLES:
        raise UserError(f"benchmark.options.prompt_style: expected one of {', '.join(PROMPT_STYLES)}, got {style!r}"
                        f"{did_you_mean(str(style), PROMPT_STYLES)}")
    return Options(limit, Path(images).expanduser() if images else None, prompt, style)


def image_dir(root: Path, options: Options, default: str | Path) -> Path:
    """``options.images`` or ``root / default``; a UserError when it is not a directory."""
    directory = options.images or Path(root) / default
    if not directory.is_dir():
        where = "benchmark.options.images" if options.images else f"{root}"
        raise UserError(f"{where}: image directory {directory} does not exist (set options.images=DIR)")
    return directory


def template(options: Options, official: str, tinygpt_v: str, fields: Sequence[str],
             needs: Sequence[str] | None = None) -> str:
    """The prompt template to use (``options.prompt``, else by ``prompt_style``), checked against `fields`: only
    those, and at least one of `needs` (default: `fields`, which then all carry the sample's question or statement),
    so that every sample is asked its own question."""
    chosen = options.prompt or (tinygpt_v if options.style == "tinygpt-v" else official)
    try:
        used = [field for _, field, _, _ in string.Formatter().parse(chosen) if field is not None]
    except ValueError as exc:
        raise UserError(f"benchmark.options.prompt: cannot read the template {chosen!r} ({exc})") from None
    offered = ", ".join("{" + f + "}" for f in fields)
    for field in used:
        if field not in fields:
            raise UserError(f"benchmark.options.prompt: unknown field {{{field}}} in {chosen!r}; this benchmark offers "
                            f"{offered}")
    needs = needs or fields
    if not any(field in used for field in needs):
        raise UserError(f"benchmark.options.prompt: {chosen!r} holds no {' or '.join('{' + f + '}' for f in needs)}, "
                        f"so every sample would be asked the same text (this benchmark offers {offered})")
    return chosen


def fill(prompt: str, **values: str) -> str:
    return prompt.format(**values).strip()


# --- reading records ---------------------------------------------------------------------------------------------

def find_file(candidates: Sequence[Path]) -> Path:
    """The first existing file of `candidates`; a UserError naming the first one otherwise."""
    for path in candidates:
        if path.is_file():
            return path
    also = f" (nor {', '.join(str(p) for p in candidates[1:])})" if len(candidates) > 1 else ""
    raise UserError(f"{candidates[0]}: file does not exist{also}")


def read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(where, record) per non-blank line; a line that is not JSON is a UserError naming file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return records


def need(record: Any, key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """``record[key]`` of type `kind` (a string must not be blank); a UserError naming `where` and the field."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise UserError(f"{where}: missing field {key!r}")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kind):
        raise UserError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    if isinstance(value, str) and not value.strip():
        raise UserError(f"{where}: field {key!r} is empty")
    return value


def need_label(record: Any, key: str, where: str, yes: Sequence[Any] = (1, True),
               no: Sequence[Any] = (0, False)) -> int:
    """A binary label field as 1 / 0 (strings compare lower-cased)."""
    value = need(record, key, where, (int, bool, str))
    probe = value.strip().lower() if isinstance(value, str) else value
    if probe in yes:
        return 1
    if probe in no:
        return 0
    raise UserError(f"{where}: field {key!r} must be one of {list(yes) + list(no)}, got {value!r}")


def answer_texts(record: Any, where: str) -> tuple[str, ...]:
    """The ``answer`` strings of a record's ``answers`` list of objects (VQA, OK-VQA, VizWiz): at least one."""
    answers = need(record, "answers", where, list)
    for index, answer in enumerate(answers):
        if not isinstance(answer, dict) or not isinstance(answer.get("answer"), str):
            raise UserError(f"{where}: field 'answers' item {index} has no 'answer' string")
    if not answers:
        raise UserError(f"{where}: field 'answers' is empty")
    return tuple(answer["answer"] for answer in answers)


def image_file(directory: Path, name: str, where: str) -> str:
    """The absolute path of image `name` under `directory`; a UserError when it leaves the directory or is missing."""
    try:
        path = safe_join(directory, name)
    except BadRecord as exc:
        raise UserError(f"{where}: field image: {exc}") from None
    if not path.is_file():
        raise UserError(f"{where}: image {path} does not exist")
    return str(path)


def take(samples: Iterable[Sample], options: Options) -> list[Sample]:
    """The first ``options.limit`` samples (all without a limit); the rest of the file is not read."""
    out: list[Sample] = []
    for sample in samples:
        out.append(sample)
        if options.limit is not None and len(out) >= options.limit:
            break
    return out


# --- scoring -------------------------------------------------------------------------------------------------------

def aligned(samples: Sequence[Sample], predictions: Sequence[Prediction]) -> list[Prediction]:
    """The prediction of each sample, by id; a sample without one raises ValueError."""
    by_id = {p.id: p for p in predictions}
    missing = [s.id for s in samples if s.id not in by_id]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} samples (first: {missing[0]!r})")
    return [by_id[s.id] for s in samples]


def text_of(prediction: Prediction) -> str:
    return prediction.text or ""


def breakdown(values: Sequence[float], groups: Sequence[Optional[Hashable]]) -> dict[str, float]:
    """The mean of `values` per group (groups that are None are left out), sorted by group name."""
    buckets: dict[str, list[float]] = defaultdict(list)
    for value, group in zip(values, groups):
        if group is not None:
            buckets[str(group)].append(value)
    return {group: mean(buckets[group]) for group in sorted(buckets)}


def yes_no_figures(parsed: Sequence[Optional[bool]], labels: Sequence[bool]) -> dict:
    """`metrics.binary_metrics` with ``unparsed`` as a share of n (as every benchmark here reports it)."""
    figures = binary_metrics(parsed, labels)
    figures["unparsed"] = figures["unparsed"] / figures["n"] if figures["n"] else 0.0
    return figures


def check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {', '.join(SCORINGS)}, got {scoring!r}")
