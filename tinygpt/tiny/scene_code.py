"""The scene code: a fixed 32-token text listing what a synthetic shapes scene contains.

Both tiny backbones are pretrained around it, so that the four stages have something learnable to connect:

* the vision side (ViT + Q-Former) learns to make query ``k`` predict code token ``k`` (through a linear head that
  is thrown away afterwards), so every query output linearly encodes one attribute of one region;
* the LLM reads the code, as ordinary text, where the image will later be, and learns to caption the scene and to
  answer questions about it from that context.

Stage 1 then has to learn the projection that makes the 32 query outputs look like the code to the frozen LLM.

Layout (one entry per query, every entry is one token of the Phi-2 tokenizer)::

    for region in left, top, center, bottom, right:   colour  shape  x1  y1  x2  y2   (" none" x 6 if empty)
    count (" one" / " two" / " three")  "."

Coordinates are the box-text integers of ``tinygpt.tasks.format_box`` (0-100 grid), so a referring answer is a copy
of four code tokens.
"""

from __future__ import annotations

from tinygpt.data.synthetic.scenes import COLOURS, REGIONS, SHAPES, Scene
from tinygpt.errors import UserError
from tinygpt.tasks import BOX_GRID, parse_boxes, format_box

EMPTY = " none"
END = "."
COUNT_WORDS = {1: " one", 2: " two", 3: " three"}
SLOTS_PER_REGION = 6
CODE_LENGTH = len(REGIONS) * SLOTS_PER_REGION + 2  # 32: one token per Q-Former query
NUMBER_WORDS = tuple(str(v) for v in range(BOX_GRID + 1))
VOCABULARY: tuple[str, ...] = (
    EMPTY, END, *COUNT_WORDS.values(), *(f" {c}" for c in COLOURS), *(f" {s}" for s in SHAPES), *NUMBER_WORDS
)
INDEX = {word: i for i, word in enumerate(VOCABULARY)}
NUMBER_CLASSES = tuple(INDEX[w] for w in NUMBER_WORDS)  # class index of the number v is NUMBER_CLASSES[v]


def scene_code(scene: Scene) -> list[str]:
    """The 32 code words of a scene (see the module docstring)."""
    by_region = {obj.region: obj for obj in scene.objects}
    words: list[str] = []
    for region in REGIONS:
        obj = by_region.get(region)
        if obj is None:
            words += [EMPTY] * SLOTS_PER_REGION
            continue
        box = parse_boxes(format_box(obj.box, scene.width, scene.height))[0][1]
        words += [f" {obj.colour}", f" {obj.shape}", *(str(v) for v in box)]
    words += [COUNT_WORDS[len(scene.objects)], END]
    return words


def code_classes(scene: Scene) -> list[int]:
    """Class index (into VOCABULARY) of every code word: the targets of the vision pretraining head."""
    return [INDEX[w] for w in scene_code(scene)]


def slot_is_number(slot: int) -> bool:
    return slot < len(REGIONS) * SLOTS_PER_REGION and slot % SLOTS_PER_REGION >= 2


def vocabulary_token_ids(tokenizer) -> list[int]:
    """Token id of every vocabulary word; fails loudly if a word is not exactly one token of this tokenizer."""
    ids = []
    for word in VOCABULARY:
        got = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(got) != 1:
            raise UserError(f"tokenizer: scene-code word {word!r} is {len(got)} tokens, expected 1 (not a Phi-2 tokenizer?)")
        ids.append(got[0])
    return ids


def code_token_ids(scene: Scene, vocab_ids: list[int]) -> list[int]:
    return [vocab_ids[c] for c in code_classes(scene)]
