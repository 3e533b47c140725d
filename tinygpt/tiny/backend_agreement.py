"""Do the two chat backends give the same greedy answer to the same conversation? PyTorch vs the GGUF runtime.

    python -m tinygpt.tiny.backend_agreement --model outputs/tiny/stage4 --gguf DIR [--split data/synthetic/eval]
                                             [--limit 100] [--require 0.99]

Both sides are `tinygpt.chat.ChatEngine`s (the one engine of the demo, the server and evaluation): the PyTorch model
directory and its GGUF export (F16 for an exact comparison; the vision tower runs with float activations and the KV
cache in F32 unless `--kv-type f16`, so both sides compute as alike as the runtime allows). On the held-out
synthetic shapes, each of the first `limit` images gets three conversations: a `[vqa]` question, a `[refer]`
request, and the two as one two-turn conversation (the second turn follows the PyTorch side's first answer, so both
sides continue the same history). Answers are compared as text.

Prints the agreement per conversation kind and overall, and the first disagreements; exits 1 with one `error:` line
when the overall agreement is below `--require`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..chat import ChatEngine, GenerationSettings
from ..chat.gguf_backend import GGUFBackend
from ..chat.torch_backend import TorchBackend
from ..errors import UserError, report_errors
from ..paths import tiny_data_dir
from .shapes import MAX_NEW_TOKENS, REFER_INSTRUCTION, VQA_INSTRUCTION

KINDS = ("vqa", "refer", "two-turn")


@dataclass
class Agreement:
    same: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    asked: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    differences: list[tuple[str, str, str, str]] = field(default_factory=list)  # (kind, question, torch, gguf)

    def add(self, kind: str, question: str, torch_answer: str, gguf_answer: str) -> None:
        self.asked[kind] += 1
        if torch_answer.strip() == gguf_answer.strip():
            self.same[kind] += 1
        else:
            self.differences.append((kind, question, torch_answer, gguf_answer))

    @property
    def total(self) -> int:
        return sum(self.asked.values())

    @property
    def share(self) -> float:
        return sum(self.same.values()) / self.total if self.total else 0.0


def _user(image: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


def conversations(split: Path, limit: int) -> list[tuple[str, list[dict], list[str], list[int]]]:
    """(image, questions, kinds, max_new_tokens) per image: the vqa question and refer request of the image."""
    vqa = {r["image"]: r for r in json.loads((split / "vqa.json").read_text())}
    refer = {r["image"]: r for r in json.loads((split / "refer.json").read_text())}
    images = [image for image in vqa if image in refer][:limit]
    if not images:
        raise UserError(f"{split}: no image has both a vqa.json and a refer.json record (is it a synthetic split?)")
    return [(str(split / image), [VQA_INSTRUCTION.format(vqa[image]["question"]),
                                  REFER_INSTRUCTION.format(refer[image]["sents"])]) for image in images]


def compare(torch_engine: ChatEngine, gguf_engine: ChatEngine, split: Path, limit: int,
            progress: bool = True) -> Agreement:
    result = Agreement()
    settings = {task: GenerationSettings(max_new_tokens=MAX_NEW_TOKENS[task]) for task in ("vqa", "refer")}
    for image, (question, request) in tqdm(conversations(split, limit), desc="conversations", disable=not progress):
        answers = {}
        for kind, text in (("vqa", question), ("refer", request)):
            messages = [_user(image, text)]
            answers[kind] = torch_engine.chat(messages, settings[kind])
            result.add(kind, text, answers[kind], gguf_engine.chat(messages, settings[kind]))
        two_turn = [_user(image, question), {"role": "assistant", "content": answers["vqa"]},
                    {"role": "user", "content": request}]
        result.add("two-turn", f"{question} / {request}", torch_engine.chat(two_turn, settings["refer"]),
                   gguf_engine.chat(two_turn, settings["refer"]))
    return result


def report(result: Agreement, show: int = 5) -> str:
    lines = [f"{'conversation':12} {'asked':>6} {'same':>6} {'agreement':>10}"]
    for kind in KINDS:
        asked, same = result.asked[kind], result.same[kind]
        lines.append(f"{kind:12} {asked:6d} {same:6d} {same / asked if asked else 0:10.1%}")
    lines.append(f"{'all':12} {result.total:6d} {sum(result.same.values()):6d} {result.share:10.1%}")
    for kind, question, a, b in result.differences[:show]:
        lines.append(f"differs ({kind}) {question!r}: PyTorch {a!r} / GGUF {b!r}")
    return "\n".join(lines)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the trained model directory")
    p.add_argument("--gguf", required=True, help="its GGUF export directory; its llm-f32.gguf or llm-f16.gguf is "
                   "used when there is one (the exact comparison), else its default file")
    p.add_argument("--split", default=None, help="held-out synthetic split (default: the tiny data's eval/)")
    p.add_argument("--limit", type=int, default=100, help="images; three conversations each (default 100)")
    p.add_argument("--require", type=float, default=0.99, help="the least overall agreement (default 0.99)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-type", default="f32", choices=["f16", "f32"],
                   help="the GGUF runtime's KV cache precision (default f32, the runtime's own default and the "
                        "closest to PyTorch)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    return report_errors(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    split = Path(args.split) if args.split else tiny_data_dir() / "eval"
    torch_engine = ChatEngine(TorchBackend.load(args.model, device="cpu"))
    qtype = unquantised_qtype(args.gguf)
    gguf_engine = ChatEngine(GGUFBackend.load(args.gguf, n_threads=args.threads, vision_int8=False,
                                              kv_type=args.kv_type, qtype=qtype))
    result = compare(torch_engine, gguf_engine, split, args.limit)
    print(report(result))
    if result.share < args.require:
        hint = "" if qtype else ("; this compared a quantised llm-*.gguf, whose answers differ by design: export "
                                 f"with --qtype f16 (or f32) into {args.gguf} for the exact comparison")
        print(f"error: the backends agree on {result.share:.1%} of {result.total} conversations, below the "
              f"required {args.require:.0%} (first differences above){hint}", file=sys.stderr)
        return 1
    return 0


def unquantised_qtype(gguf_dir: str) -> str | None:
    """f32 or f16 when the export directory holds that LLM file (the exact comparison), else None (its default)."""
    from quantize.gguf_names import llm_file_name

    folder = Path(gguf_dir)
    return next((q for q in ("f32", "f16") if folder.is_dir() and (folder / llm_file_name(q)).is_file()), None)


if __name__ == "__main__":
    sys.exit(main())
