"""The tiny LLM's ceiling: its VQA and grounding accuracy when it reads the *true* scene code.

Stages 1-4 can at best make the projected image look like the scene code the LLM was pretrained to read
(``scene_code.py``), so the accuracy of the frozen LLM given the exact code bounds what the tiny recipe
can reach. Measured when the backbones are built, on held-out scenes in the stage-4 wording used by
``tinygpt.tiny.shapes``, and again whenever torch or transformers differ from the versions recorded with it
(``backbones.current_ceiling``); the recipe prints it under its table. A low ceiling means the LLM pretraining is the
bottleneck, not the stages; a ceiling under the floors (``tinygpt.evaluation.health``) means a broken install.

    python -m tinygpt.tiny.ceiling_check --check    # re-measure it under the installed versions; exit 1 if broken
"""

from __future__ import annotations

import torch

from tinygpt.tiny.synthetic import texts
from tinygpt.evaluation.health import installed_versions
from tinygpt.tiny.synthetic.scenes import sample_scene, scene_rng
from tinygpt.tiny.shapes import (IOU_THRESHOLD, MAX_NEW_TOKENS, REFER_INSTRUCTION, VQA_INSTRUCTION, grounding_iou,
                                       vqa_correct)
from tinygpt.model.sequence import PromptFormat, sample_ids
from tinygpt.tasks import IMAGE_PLACEHOLDER, wrap_instruction
from tinygpt.tiny.scene_code import (CODE_LENGTH, code_token_ids, padded_slots, slot_embeddings, slot_matrix,
                                    vocabulary_token_ids)

TEMPLATE, END_SYM = "[INST] {} [/INST]", "###"  # the stage-4 prompt format


def _answer(language_model, tokenizer, fmt: PromptFormat, code: list[tuple[int, ...]], instruction: str,
            task: str) -> str:
    turns = [{"user": wrap_instruction(instruction), "assistant": None}]
    ids, _, _ = sample_ids(turns, tokenizer, fmt, None, 1, where="ceiling prompt")
    slots = slot_matrix(ids, padded_slots(code))
    with torch.no_grad():
        embeds = slot_embeddings(slots, language_model.get_input_embeddings())[None]
        out = language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=MAX_NEW_TOKENS[task], do_sample=False,
                                      pad_token_id=language_model.config.pad_token_id)
    return tokenizer.decode(out[0]).split(END_SYM)[0].strip()


def llm_ceiling(language_model, tokenizer, scenes: int = 42, image_size: int = 224, seed: int = 0) -> dict:
    """VQA accuracy (one question per scene, the kinds in turn) and grounding accuracy (one object per scene) of the
    LLM alone, the true scene code standing where the image goes."""
    config = language_model.config
    fmt = PromptFormat(TEMPLATE, END_SYM, IMAGE_PLACEHOLDER, config.bos_token_id, config.pad_token_id, CODE_LENGTH)
    vocab = vocabulary_token_ids(tokenizer)
    was_training = language_model.training
    language_model.eval()
    vqa_hits, refer_hits = [], []
    per_kind: dict[str, list[bool]] = {}
    for i in range(scenes):
        scene = sample_scene(scene_rng(seed, "llm-ceiling", i), image_size)
        code = code_token_ids(scene, vocab)
        rng = scene_rng(seed, "text:llm-ceiling", i)
        qa = texts.question(scene, texts.VQA_KINDS[i % len(texts.VQA_KINDS)], rng)
        answer = _answer(language_model, tokenizer, fmt, code, VQA_INSTRUCTION.format(qa.question), "vqa")
        hit = vqa_correct(answer, [qa.answer])
        vqa_hits.append(hit)
        per_kind.setdefault(qa.kind, []).append(hit)
        obj = scene.objects[i % len(scene.objects)]
        answer = _answer(language_model, tokenizer, fmt, code, REFER_INSTRUCTION.format(texts.phrase(obj)), "refer")
        x1, y1, x2, y2 = obj.box
        overlap = grounding_iou(answer, [x1, y1, x2 - x1, y2 - y1], scene.width, scene.height)
        refer_hits.append(overlap is not None and overlap > IOU_THRESHOLD)
    language_model.train(was_training)
    return {"vqa_accuracy": sum(vqa_hits) / len(vqa_hits), "grounding_accuracy": sum(refer_hits) / len(refer_hits),
            "vqa_by_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())}, "scenes": scenes,
            "versions": installed_versions()}

