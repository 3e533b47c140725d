"""LLaVA-Instruct JSON (stage 4): detail / reason (single turn), conversation and the multitask conversation set.

File: a JSON list of ``{"id": "000000215677", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}``; image ``COCO_train2014_{id}.jpg`` under ``image_root`` (the pattern is
the ``image_name`` param; LLaVA-1.5 style files with an ``"image"`` field can use ``image_name="{image}"``).

* detail / reason: user ``"<Img><ImageHere></Img> {blip_caption(first question without <image> and newlines)} "``,
  assistant = the first answer, raw.
* conversation / multitask: every turn. The first question loses ``<image>`` and newlines and is wrapped as above
  (not lower-cased); later questions are ``"{question} "``; answers raw.
"""

from __future__ import annotations

from typing import Optional

from tinygpt.data.bad_records import BadRecord, BadRecordPolicy
from tinygpt.data.formats.base import Record, RecordDataset, image_file_name, iter_json_list, require
from tinygpt.data.text import blip_caption
from tinygpt.tasks import wrap_instruction

HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


def parse_conversation(entry: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs of a LLaVA record (roles alternating human, gpt; no blank value); a trailing
    unanswered question is dropped."""
    turns = require(entry, "conversations", list)
    pairs = []
    for index in range(0, len(turns) - 1, 2):
        question, answer = turns[index], turns[index + 1]
        for position, turn, roles in ((index, question, HUMAN_ROLES), (index + 1, answer, ASSISTANT_ROLES)):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise BadRecord(f"conversations[{position}] must be an object with a string 'value'")
            if not turn["value"].strip():
                raise BadRecord(f"conversations[{position}] has an empty 'value'")
            if turn.get("from") not in roles:
                raise BadRecord(f"conversations[{position}] is from {turn.get('from')!r}, expected one of {roles}")
        pairs.append((question["value"], answer["value"]))
    if not pairs:
        raise BadRecord("conversations needs at least one question and one answer")
    return pairs


def _clean_first_question(text: str) -> str:
    return text.replace("<image>", "").replace("\n", "").strip()


class LlavaDataset(RecordDataset):
    """``multi_turn=False``: detail / reason; ``multi_turn=True``: conversation / multitask conversation."""

    def __init__(self, ann_path: str, image_root: str, *, image_size: int, seed: int,
                 bad_records: Optional[BadRecordPolicy] = None, name: str = "llava", multi_turn: bool = False,
                 image_name: str = "COCO_train2014_{id}.jpg", process_text: bool = True) -> None:
        super().__init__(name=name, source=ann_path, root=image_root, image_size=image_size, seed=seed,
                         bad_records=bad_records)
        self.multi_turn = multi_turn
        self.process_text = process_text
        for where, entry in iter_json_list(ann_path):
            self.add(where, lambda entry=entry: self._build(entry, image_name))
        self.finish()

    def _build(self, entry: dict, image_name: str) -> Record:
        pairs = parse_conversation(entry)
        first_question = _clean_first_question(pairs[0][0])
        if not (blip_caption(first_question) if self.process_text and not self.multi_turn else first_question):
            raise BadRecord("the first question is empty")
        if not self.multi_turn:
            pairs = pairs[:1]
        return Record([image_file_name(image_name, entry)], pairs)

    def make_turns(self, record, sizes, rng):
        pairs = record.data
        first_question = _clean_first_question(pairs[0][0])
        if not self.multi_turn:
            instruction = blip_caption(first_question) if self.process_text else first_question
            return [{"user": wrap_instruction(instruction), "assistant": pairs[0][1]}]
        turns = [{"user": wrap_instruction(first_question), "assistant": pairs[0][1]}]
        for question, answer in pairs[1:]:
            turns.append({"user": question.replace("<image>", "") + " ", "assistant": answer})
        return turns
