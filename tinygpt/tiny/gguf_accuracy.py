"""How much accuracy survives quantisation: the CPU runtime's greedy answers vs the PyTorch model's, on held-out scenes.

    python -m quantize accuracy --model DIR --gguf DIR --split DATA/eval [--limit 200]   (flags: gguf_accuracy_cli.py)

Both sides answer the same ``[vqa]`` and ``[refer]`` prompts of the synthetic shapes suite
(``tinygpt.tiny.shapes``) greedily, with the prompt format of the model's config / the GGUF file, and are
scored by the same metric functions. The report gives each accuracy and the retained share (GGUF / PyTorch).

No silent garbage (``tinygpt.evaluation.health``): when the PyTorch model fails the decoding self-check, or when most
answers of either side do not parse (VQA answers outside the split's answer set, grounding answers without a box),
the table is still printed, then one ``error:`` line says so and the command exits with status 3.
Before the (slow) PyTorch evaluation: the split's task files must hold records, the GGUF pair must open, and --model
must be the model it was exported from (its content id, quantize.export.model_content_id, is the files' model_id).
"""

from __future__ import annotations

from pathlib import Path

from quantize import gguf_names as names
from quantize.export import load_model_dir, model_content_id
from quantize.sampler import SamplingParams
from quantize.session import open_session
from tinygpt.errors import UserError
from tinygpt.evaluation.benchmarks.shapes import read_records
from tinygpt.evaluation.health import FLOORS, generation_problems
from tinygpt.model import load_vlm
from tinygpt.tasks import parse_boxes, wrap_instruction
from tinygpt.tiny.shapes import (IOU_THRESHOLD, MAX_NEW_TOKENS, REFER_INSTRUCTION, VQA_INSTRUCTION, evaluate_loaded,
                                 grounding_iou, normalize_answer, vqa_correct)

TASKS = ("vqa", "refer")


def gguf_answers(session, root: Path, items: list[tuple[str, str]], max_new_tokens: int) -> list[str]:
    """One fresh conversation per (image, user text): greedy, no repetition penalty (as the PyTorch evaluation)."""
    session.sampling.max_new_tokens = max_new_tokens
    answers = []
    for image, user in items:
        session.reset()
        answers.append(session.ask(user, images=[str(root / image)]))
    return answers


def unparsed(task: str, answers: list[str], all_records: list[dict]) -> float:
    """Share of answers that are no answer at all: outside the split's VQA answer set, or without a box."""
    if task == "vqa":
        known = {normalize_answer(a) for r in all_records for a in r["answer"]}
        misses = [normalize_answer(a) not in known for a in answers]
    else:
        misses = [not parse_boxes(a) for a in answers]
    return sum(misses) / len(misses) if misses else 0.0


def score(task: str, answers: list[str], records: list[dict]) -> float:
    if task == "vqa":
        hits = [vqa_correct(a, r["answer"]) for a, r in zip(answers, records)]
    else:
        ious = [grounding_iou(a, r["bbox"], r["width"], r["height"]) for a, r in zip(answers, records)]
        hits = [v is not None and v > IOU_THRESHOLD for v in ious]
    return sum(hits) / len(hits) if hits else 0.0


def task_records(root: Path, task: str) -> list[dict]:
    """The split's records of one task; UserError naming the file when it is missing, not a list, or empty."""
    path = root / f"{task}.json"
    records = read_records(path)
    if not records:
        raise UserError(f"{path}: has no records (expected a non-empty JSON list of {task} records)")
    return records


def check_exported_from(model_dir, llm_file) -> None:
    """UserError naming both paths when the GGUF's model_id is not the content id of the model in model_dir (the id
    `python -m quantize export` writes: of the model with its LoRA merged, a copy dropped once the id is known)."""
    model_id = model_content_id(load_model_dir(model_dir))
    gguf_id = llm_file.metadata.get(names.MODEL_ID)
    if gguf_id != model_id:
        raise UserError(f"--model {model_dir} is not the model --gguf {llm_file.path} was exported from (model_id "
                        f"{model_id[:12]}... vs {str(gguf_id)[:12]}...); give the model directory of that export")


def compare(model_dir, gguf_dir, split_dir, limit: int | None = 200, qtype: str | None = None,
            backend: str = "auto") -> dict:
    root = Path(split_dir)
    all_records = {task: task_records(root, task) for task in TASKS}
    # the GGUF side and the pair first: a wrong --gguf, --qtype or --model fails before the PyTorch evaluation
    session = open_session(gguf_dir, backend=backend, qtype=qtype, quiet=True,
                           sampling=SamplingParams(temperature=0.0, repetition_penalty=1.0))
    check_exported_from(model_dir, session.llm.file)
    model = load_vlm(model_dir)  # evaluated as trained (LoRA unmerged), as before
    problems = [f"PyTorch model: {p}" for p in generation_problems(model.language_model)]
    torch_scores = evaluate_loaded(model, root, limit=limit)
    report = {"limit": limit, "gguf": str(gguf_dir), "model": str(model_dir), "problems": problems}
    for task in TASKS:
        records = all_records[task][:limit]
        if task == "vqa":
            items = [(r["image"], wrap_instruction(VQA_INSTRUCTION.format(r["question"]))) for r in records]
        else:
            items = [(r["image"], wrap_instruction(REFER_INSTRUCTION.format(r["sents"]))) for r in records]
        answers = gguf_answers(session, root, items, MAX_NEW_TOKENS[task])
        quantized = score(task, answers, records)
        reference = torch_scores["vqa_accuracy" if task == "vqa" else "grounding_accuracy"]
        for side, share in (("PyTorch", torch_scores[f"{'vqa' if task == 'vqa' else 'grounding'}_unparsed"]),
                            ("GGUF", unparsed(task, answers, all_records[task]))):
            if share > FLOORS.unparsed:
                problems.append(f"{side} {task}: {100 * share:.0f}% of the answers do not parse")
        report[task] = {"pytorch": reference, "gguf": quantized,
                        "retained": quantized / reference if reference else float("nan")}
    return report
