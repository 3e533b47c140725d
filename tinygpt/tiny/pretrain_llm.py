"""Pretrain the tiny Phi on text: the shapes vocabulary in every conversation format the four stages use.

Each training document is a conversation about one or two synthetic scenes, laid out by the model's own sequence
builder (``tinygpt.model.sequence``: BOS, prompt template, end symbol, answer-only labels) under one of the three
stage templates. Where an image would go, the document carries the scene's 32-slot *scene code* (``scene_code.py``;
a slot is read as a weighted sum of its words' embeddings); the LLM learns to caption the scene, describe it, answer
questions, give and read boxes from it. Instruction documents lean on VQA (weight 14 of 32 tasks, up to three
follow-up questions), the skill that takes the LLM longest to learn. Text-only instructions and short generic
sentences about shapes and numbers are mixed in.

Speed: the documents use a few hundred distinct tokens, so training runs on a compact vocabulary (embedding rows and
output rows of those tokens only) and the loss is computed on answer positions only. At the end the rows are written
back into the full 51,200-token embedding and ``lm_head``; the output rows of tokens never seen get weight 0 and a
very low bias, so the model never emits them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from tinygpt.tiny.synthetic import texts
from tinygpt.tiny.synthetic.scenes import COLOURS, SHAPES, sample_scene, scene_rng
from tinygpt.tiny.synthetic.writers import unnatural_records
from tinygpt.errors import UserError
from tinygpt.model.sequence import IGNORE, IMAGE_SLOT, PromptFormat, sample_ids
from tinygpt.tasks import (CAPTION_PROMPTS, DETECTION_PROMPTS, GROUNDING_PROMPTS, IDENTIFY_PROMPTS, IMAGE_PLACEHOLDER,
                           REFER_PROMPTS, VQA_PROMPTS, format_phrase_box, wrap_instruction)
from tinygpt.tiny.llm_ceiling import llm_ceiling
from tinygpt.tiny.schedule import pretrain_lr
from tinygpt.tiny.scene_code import (CODE_LENGTH, MAX_WORDS, PAD_CLASS, code_token_ids, padded_slots, slot_embeddings,
                                    slot_matrix, vocabulary_token_ids)

# (template, end symbol) of stages 1-2, 3 and 4, with how often each frames an instruction document.
FORMATS = {"caption": ("{}", "\n"), "align": ("###Human: {} ###Assistant: ", "###"),
           "instruct": ("[INST] {} [/INST]", "###")}
UNUSED_LOGIT_BIAS = -30.0
# Token embeddings start at standard deviation 1 instead of Phi's 0.02: the extra post-attention RMSNorm (kept at
# weight 1 here) hands every layer's attention output at RMS 1, which drowns 0.02-sized embeddings until they have
# grown (the per-kind probe's comparison is in docs/tiny-twin-log.md).
EMBEDDING_INIT_STD = 1.0
# How often each kind of document is drawn. Captions and detailed descriptions are copied from the code and learnt
# early; every document spent on them is one fewer instruction document, where VQA and boxes are learnt. The per-kind
# probe chose this mix over the others it measured (docs/tiny-twin-log.md).
DOCUMENT_MIX = (("caption", 1.0), ("align", 0.5), ("instruct", 14.0), ("multi", 1.0), ("text", 0.5))


@dataclass(frozen=True)
class LLMPretrainSettings:
    # The tiny LLM is narrower than the "tiny" preset's 256: at 128 wide it learns as much per step in less time
    # (docs/tiny-twin-log.md). ``build_backbone_model`` applies it.
    hidden_size: int = 128
    intermediate_size: int = 512
    # Two layers, not the preset's four: per minute the shallow LLM learns more and more reliably (docs/benchmarks.md,
    # "Tiny LLM depth sweep", and docs/tiny-twin.md for the whole builds from three seeds).
    num_layers: int = 2
    steps: int = 2700
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    documents: int = 43200  # steps x batch_size: no document is seen twice
    document_mix: tuple[tuple[str, float], ...] = DOCUMENT_MIX
    max_length: int = 224
    ceiling_scenes: int = 42   # held-out scenes for the true-code ceiling (``llm_ceiling.py``; 0: skip)
    seed: int = 0

    def with_steps(self, steps: int) -> LLMPretrainSettings:
        """These settings trained for ``steps`` steps, with enough documents that none is seen twice (``python
        train.py --tiny-llm-steps``), as the default does."""
        if steps < 1:
            raise UserError(f"--tiny-llm-steps: must be at least 1, got {steps}")
        return replace(self, steps=steps, documents=max(self.documents, self.batch_size * steps))


# --- documents -------------------------------------------------------------------------------------------------------

def _alignment_prompts() -> list[str]:
    text = resources.files("tinygpt").joinpath("prompts/alignment.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if IMAGE_PLACEHOLDER in line]


def _single_image_turns(scene, rng: random.Random) -> list[tuple[str, str]]:
    """One stage-4 style task about a scene: (user, assistant) pairs, the image placeholder in the first user."""
    obj = rng.choice(scene.objects)
    phrase, box = texts.phrase(obj), texts.box_text(scene, obj)
    kind = rng.choices(["vqa", "refer", "identify", "caption", "grounding", "detect", "detect_one", "chat", "reason",
                        "detail"], weights=[14, 5, 3, 2, 1, 1, 1, 2, 1, 1])[0]
    if kind == "vqa":
        qa = texts.question(scene, rng.choice(texts.VQA_KINDS), rng)
        pairs = [(rng.choice(VQA_PROMPTS).format(qa.question), qa.answer)]
        for _ in range(rng.choice([0, 1, 2, 3])):  # multitask-style follow-ups
            qa = texts.question(scene, rng.choice(texts.VQA_KINDS), rng)
            pairs.append((f"[vqa] {qa.question}", qa.answer))
        return pairs
    if kind == "refer":
        return [(rng.choice(REFER_PROMPTS).format(phrase), box)]
    if kind == "identify":
        return [(rng.choice(IDENTIFY_PROMPTS).format(box), phrase)]
    if kind == "caption":
        return [(rng.choice(CAPTION_PROMPTS), texts.caption(scene))]
    if kind == "grounding":
        return [(rng.choice(GROUNDING_PROMPTS), texts.grounded_caption(scene))]
    if kind == "detect":
        return [(rng.choice(DETECTION_PROMPTS).format(texts.object_list(scene)), texts.detection_answer(scene))]
    if kind == "detect_one":
        return [(rng.choice(DETECTION_PROMPTS).format(phrase), format_phrase_box(phrase, box))]
    if kind == "chat":
        return [(qa.question.capitalize(), qa.sentence) for qa in texts.questions(scene, rng, rng.randint(1, 3))]
    if kind == "reason":
        return [texts.reasoning(scene, rng)]
    return [("Describe the image in detail.", texts.detailed_description(scene))]


def _multi_image_turns(pair, rng: random.Random) -> list[dict]:
    question, answer = texts.compare_counts(pair)
    turns = [{"user": f"Image 1: {IMAGE_PLACEHOLDER} Image 2: {IMAGE_PLACEHOLDER} {question}", "assistant": answer}]
    owner = texts.which_image_has(pair, rng)
    if owner:
        turns.append({"user": owner[0], "assistant": owner[1]})
    index = rng.randrange(2)
    turns.append({"user": texts.count_in_image(pair, index)[0], "assistant": texts.count_in_image(pair, index)[1]})
    return turns


def _generic_sentence(rng: random.Random) -> tuple[str, str]:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return rng.choice([
        ("Name a colour.", colour),
        ("Name a shape.", shape),
        (f"Write the number after {a}.", str(a + 1)),
        (f"Which is larger, {a} or {b}?", str(max(a, b))),
        (f"Describe a {colour} {shape}.", f"It is a {colour} {shape}."),
        (f"Repeat: {colour} {shape} {a}", f"{colour} {shape} {a}"),
    ])


def make_documents(count: int, seed: int, mix=DOCUMENT_MIX) -> list[tuple[list[dict], list, str]]:
    """``count`` documents: (turns, scenes, format name), their kinds drawn with the weights of ``mix``. Pure function
    of (count, seed, mix)."""
    kinds, weights = zip(*mix)
    unknown = set(kinds) - {"caption", "align", "instruct", "multi", "text"}
    if unknown:
        raise ValueError(f"document_mix: unknown document kinds {sorted(unknown)}")
    rng = random.Random(f"tiny-llm-documents:{seed}")
    align_prompts = _alignment_prompts()
    unnatural = [r["instances"][0] for r in unnatural_records(random.Random(f"tiny-llm-unnatural:{seed}"), 200)]
    docs = []
    for i in range(count):
        scene = sample_scene(scene_rng(seed, "tiny-llm", i), 112)
        kind = rng.choices(kinds, weights=weights)[0]
        if kind == "caption":
            docs.append(([{"user": IMAGE_PLACEHOLDER, "assistant": texts.caption(scene)}], [scene], "caption"))
        elif kind == "align":
            turns = [{"user": rng.choice(align_prompts), "assistant": texts.detailed_description(scene)}]
            docs.append((turns, [scene], "align"))
        elif kind == "instruct":  # several tasks about one image: more supervised tokens per code read
            pairs = []
            while len(pairs) < rng.randint(1, 5):
                pairs += _single_image_turns(scene, rng)
            turns = [{"user": wrap_instruction(pairs[0][0]), "assistant": pairs[0][1]}]
            turns += [{"user": user + " ", "assistant": answer} for user, answer in pairs[1:]]
            fmt = rng.choices(list(FORMATS), weights=[1, 1, 4])[0]
            docs.append((turns, [scene], fmt))
        elif kind == "multi":
            second = scene
            for attempt in range(20):
                second = sample_scene(scene_rng(seed, "tiny-llm-second", f"{i}:{attempt}"), 112)
                if len(second.objects) != len(scene.objects):
                    break
            if len(second.objects) != len(scene.objects):
                docs.append((_multi_image_turns([scene, second], rng), [scene, second], "instruct"))
        else:
            if rng.random() < 0.5:
                record = rng.choice(unnatural)
                user, answer = f"{record['instruction_with_input']} {record['constraints']}", record["output"]
            else:
                user, answer = _generic_sentence(rng)
            docs.append(([{"user": user, "assistant": answer}], [], rng.choice(list(FORMATS))))
    return docs


class _MemoTokenizer:
    """A tokenizer call with a memory: the documents repeat the same prompts and answers thousands of times."""

    def __init__(self, tokenizer):
        self._tokenizer, self._ids = tokenizer, {}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        key = (text, add_special_tokens)
        if key not in self._ids:
            self._ids[key] = self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": list(self._ids[key])}


def encode_documents(docs, tokenizer, vocab_ids: list[int], bos_id: int, pad_id: int, max_length: int):
    """Documents -> list of (ids, labels, slots): ``ids`` holds IMAGE_SLOT where an image goes, ``slots`` the scene
    code slots for those positions, in order ([n, MAX_WORDS] token ids, -1 padded)."""
    tokenizer = _MemoTokenizer(tokenizer)
    encoded = []
    for turns, scenes, fmt_name in docs:
        template, end_sym = FORMATS[fmt_name]
        fmt = PromptFormat(template, end_sym, IMAGE_PLACEHOLDER, bos_id, pad_id, CODE_LENGTH)
        ids, labels, _ = sample_ids(turns, tokenizer, fmt, None, len(scenes), where="tiny LLM document")
        ids, labels = ids[:max_length], labels[:max_length]
        codes = [slot for scene in scenes for slot in code_token_ids(scene, vocab_ids)][: ids.count(IMAGE_SLOT)]
        encoded.append((ids, labels, padded_slots(codes)))
    return encoded


# --- training on the compact vocabulary -------------------------------------------------------------------------------

def _batch(rows, index, to_compact: torch.Tensor):
    """[B, T, MAX_WORDS] compact ids (PAD_CLASS padded), labels [B, T] (compact), attention mask [B, T]."""
    width = max(len(rows[i][0]) for i in index)
    slots = torch.full((len(index), width, MAX_WORDS), PAD_CLASS, dtype=torch.long)
    labels = torch.full((len(index), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(index), width, dtype=torch.long)
    for r, i in enumerate(index):
        row_ids, row_labels, row_slots = rows[i]
        slots[r, : len(row_ids)] = slot_matrix(row_ids, row_slots)
        labels[r, : len(row_labels)] = torch.tensor(row_labels)
        mask[r, : len(row_ids)] = 1
    present = slots != PAD_CLASS
    slots[present] = to_compact[slots[present]]
    supervised = labels != IGNORE
    labels[supervised] = to_compact[labels[supervised]]
    return slots, labels, mask


def _length_bucketed(rows, batch_size: int, rng: random.Random):
    """Endless batches of row indices; rows of similar length share a batch (less padding), order seeded."""
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), batch_size * 16):
            group = sorted(order[start : start + batch_size * 16], key=lambda i: len(rows[i][0]))
            batches += [group[k : k + batch_size] for k in range(0, len(group) - batch_size + 1, batch_size)]
        rng.shuffle(batches)
        yield from batches


def pretrain_llm(language_model, tokenizer, settings: LLMPretrainSettings = LLMPretrainSettings(),
                 progress: bool = True, heldout_documents: int = 300,
                 before_step: Callable[[int], None] | None = None) -> dict:
    """Train a ``TinyGPTPhiForCausalLM`` in place; returns measured figures (loss, held-out answer accuracy).
    ``before_step(step)`` runs before every step (the backbone builder uses it to hand over a freed core)."""
    torch.manual_seed(settings.seed)
    start = time.monotonic()
    config = language_model.config
    vocab_ids = vocabulary_token_ids(tokenizer)
    docs = make_documents(settings.documents + heldout_documents, settings.seed, settings.document_mix)
    rows = encode_documents(docs, tokenizer, vocab_ids, config.bos_token_id, config.pad_token_id, settings.max_length)
    train_rows, held_rows = rows[:settings.documents], rows[settings.documents:]
    used = sorted({t for ids, labels, _ in rows for t in ids + labels if t >= 0} | set(vocab_ids)
                  | {config.bos_token_id})
    used_ids = torch.tensor(used)
    to_compact = torch.zeros(config.vocab_size, dtype=torch.long)
    to_compact[used_ids] = torch.arange(len(used))
    embed = nn.Embedding(len(used), config.hidden_size)
    head = nn.Linear(config.hidden_size, len(used))
    with torch.no_grad():
        scale = EMBEDDING_INIT_STD / config.initializer_range
        embed.weight.copy_(language_model.model.embed_tokens.weight[used_ids] * scale)
        head.weight.copy_(language_model.lm_head.weight[used_ids])
        head.bias.zero_()
    body = language_model.model
    # The extra norms stay at weight 1 / bias 0 (the stages train them, as TinyGPT-V does with Phi-2's new norms).
    params = [p for n, p in body.named_parameters() if not n.startswith("embed_tokens") and not _is_extra_norm(n)]
    params += [*embed.parameters(), *head.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    prep_s = time.monotonic() - start
    batches = _length_bucketed(train_rows, settings.batch_size, random.Random(settings.seed))
    # Length-bucketed batches hold documents of one kind (short captions, long multi-question documents); a per-batch
    # mean would weigh a caption token several times a question token. Every answer token weighs the same instead.
    tokens_per_batch = settings.batch_size * sum(_supervised(labels) for _, labels, _ in train_rows) / len(train_rows)
    body.train()
    loss_value = float("nan")
    for step in range(settings.steps):
        if before_step is not None:
            before_step(step)
        for group in optimizer.param_groups:
            group["lr"] = pretrain_lr(step, settings.lr, settings.warmup, settings.steps)
        slots, labels, mask = _batch(train_rows, next(batches), to_compact)
        loss = _loss(body, embed, head, slots, labels, mask, tokens_per_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        loss_value = 0.9 * loss_value + 0.1 * loss.item() if step else loss.item()
        if progress and (step % 25 == 0 or step == settings.steps - 1):
            print(f"  LLM pretrain step {step + 1}/{settings.steps} loss {loss_value:.3f} "
                  f"({time.monotonic() - start:.0f} s, cpu {time.process_time():.0f} s)", flush=True)
    body.eval()
    accuracy = _heldout_token_accuracy(body, embed, head, held_rows, to_compact)
    _write_back(language_model, embed, head, used_ids)
    figures = {"loss": loss_value, "heldout_answer_token_accuracy": accuracy, "steps": settings.steps,
               "used_tokens": len(used), "prep_s": prep_s}
    if settings.ceiling_scenes:
        figures["true_code_ceiling"] = llm_ceiling(language_model, tokenizer, settings.ceiling_scenes,
                                                   seed=settings.seed)
    figures["seconds"] = time.monotonic() - start
    return figures


def _is_extra_norm(name: str) -> bool:
    return any(key in name for key in ("q_layernorm", "k_layernorm", "post_layernorm"))


def _supervised(labels: list[int]) -> int:
    return sum(label != IGNORE for label in labels)


def _hidden(body, embed, slots, mask) -> torch.Tensor:
    return body(inputs_embeds=slot_embeddings(slots, embed), attention_mask=mask, use_cache=False).last_hidden_state


def _loss(body, embed, head, slots, labels, mask, tokens_per_batch: float) -> torch.Tensor:
    """Summed answer-token cross-entropy over the average answer tokens per batch."""
    hidden = _hidden(body, embed, slots, mask)
    shifted = labels[:, 1:]
    keep = shifted != IGNORE
    return F.cross_entropy(head(hidden[:, :-1][keep]), shifted[keep], reduction="sum") / tokens_per_batch


@torch.no_grad()
def _heldout_token_accuracy(body, embed, head, rows, to_compact, batch: int = 50) -> float:
    correct = total = 0
    for start in range(0, len(rows), batch):
        slots, labels, mask = _batch(rows, list(range(start, min(start + batch, len(rows)))), to_compact)
        hidden = _hidden(body, embed, slots, mask)
        shifted = labels[:, 1:]
        keep = shifted != IGNORE
        pred = head(hidden[:, :-1][keep]).argmax(-1)
        correct += int((pred == shifted[keep]).sum())
        total += int(keep.sum())
    return correct / max(1, total)


@torch.no_grad()
def _write_back(language_model, embed, head, used_ids) -> None:
    language_model.model.embed_tokens.weight[used_ids] = embed.weight
    lm_head = language_model.lm_head
    lm_head.weight.zero_()
    lm_head.bias.fill_(UNUSED_LOGIT_BIAS)
    lm_head.weight[used_ids] = head.weight
    lm_head.bias[used_ids] = head.bias
