"""The scene code: 32 slots (one per Q-Former query) listing what a synthetic shapes scene contains.

Both tiny backbones are pretrained around it, so that the four stages have something learnable to connect:

* the vision side (ViT + Q-Former) learns to make query ``k`` predict the words of slot ``k`` (through a linear head
  that is thrown away afterwards), so every query output linearly encodes one slot;
* the LLM reads the code where the image will later be and learns to caption the scene and to answer questions
  about it from that context.

Stage 1 then has to learn the projection that makes the 32 query outputs look like the code to the frozen LLM.

A slot is one word or a few words. The LLM reads a slot as its first word's input embedding plus its other words'
at weight ``CONTEXT_WEIGHT``, divided by the root of the summed squared weights (``slot_embeddings``); the vision
head is trained towards the same weights. Every word is one token of the Phi-2 tokenizer. Layout::

    for region in left, top, center, bottom, right:
        object:  {colour | shape size region}  {shape | colour size region}  {region | colour shape size}
                 {size | colour shape region}  {x1 | colour shape}  {y1 | colour shape}
        empty:   {" none" | region}  " none" x 5
    count (" one" / " two" / " three")  "."

The first word of a slot is what a caption copies ("a large red circle ..." reads colour, then shape, in order). The
context words make every attribute of an object visible at each of its positions, so finding an object by one
attribute and reporting another is one attention step rather than a chain of them (the ceiling against one word
per slot: docs/tiny-twin-log.md).

Every attribute a question or a box needs is the *first* word of a slot of its object: colour, shape, region, size.
The tiny LLM does not learn to copy coordinate numbers in the minutes it trains (shifting the code's box numbers
left its teacher-forced box numbers unchanged): it predicts a box from the object's region and size, whose median box
has IoU > 0.5 with every held-out box of the synthetic scenes. With the region only a half-weight context word, that
prediction and "where is ...?" questions were what the LLM learnt least reliably; a region-first and a size-first
slot instead of the x2 / y2 slots fixed both, and one region-first slot alone did not (the probe's figures are in
docs/tiny-twin-log.md). The top-left
corner stays in the code (box-text integers of ``tinygpt.tasks.format_box``, 0-100 grid, with the object's colour
and shape as context), so the vision side still learns where an object is to the grid unit.
"""

from __future__ import annotations

import torch

from tinygpt.tiny.synthetic.scenes import COLOURS, REGIONS, SHAPES, SIZES, Scene
from tinygpt.errors import UserError
from tinygpt.model.sequence import IMAGE_SLOT
from tinygpt.tasks import BOX_GRID, format_box, parse_boxes

EMPTY = " none"
END = "."
COUNT_WORDS = {1: " one", 2: " two", 3: " three"}
SLOTS_PER_REGION = 6
CODE_LENGTH = len(REGIONS) * SLOTS_PER_REGION + 2  # 32: one slot per Q-Former query
MAX_WORDS = 4  # words in an object slot
NUMBER_WORDS = tuple(str(v) for v in range(BOX_GRID + 1))
VOCABULARY: tuple[str, ...] = (
    EMPTY, END, *COUNT_WORDS.values(), *(f" {c}" for c in COLOURS), *(f" {s}" for s in SHAPES),
    *(f" {s}" for s in SIZES), *(f" {r}" for r in REGIONS), *NUMBER_WORDS,
)
INDEX = {word: i for i, word in enumerate(VOCABULARY)}
NUMBER_CLASSES = tuple(INDEX[w] for w in NUMBER_WORDS)  # class index of the number v is NUMBER_CLASSES[v]
PAD_CLASS = -1  # pads a slot's word list, as class index and as token id alike
CONTEXT_WEIGHT = 0.5  # weight of a slot's context words against its first word


def scene_code(scene: Scene) -> list[tuple[str, ...]]:
    """The 32 slots of a scene, each a tuple of words (see the module docstring)."""
    by_region = {obj.region: obj for obj in scene.objects}
    slots: list[tuple[str, ...]] = []
    for region in REGIONS:
        obj = by_region.get(region)
        if obj is None:
            slots += [(EMPTY, f" {region}")] + [(EMPTY,)] * (SLOTS_PER_REGION - 1)
            continue
        box = parse_boxes(format_box(obj.box, scene.width, scene.height))[0][1]
        size, colour, shape, where = f" {obj.size}", f" {obj.colour}", f" {obj.shape}", f" {region}"
        slots += [(colour, shape, size, where), (shape, colour, size, where), (where, colour, shape, size),
                  (size, colour, shape, where), *((str(v), colour, shape) for v in box[:2])]
    slots += [(COUNT_WORDS[len(scene.objects)],), (END,)]
    return slots


def code_classes(scene: Scene) -> list[list[int]]:
    """[32][MAX_WORDS] class indices (into VOCABULARY) of every slot's words, padded with PAD_CLASS: the targets of
    the vision pretraining head."""
    return [[INDEX[w] for w in slot] + [PAD_CLASS] * (MAX_WORDS - len(slot)) for slot in scene_code(scene)]


def slot_is_number(slot: int) -> bool:
    return slot < len(REGIONS) * SLOTS_PER_REGION and slot % SLOTS_PER_REGION >= SLOTS_PER_REGION - 2


def vocabulary_token_ids(tokenizer) -> list[int]:
    """Token id of every vocabulary word; fails loudly if a word is not exactly one token of this tokenizer."""
    ids = []
    for word in VOCABULARY:
        got = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(got) != 1:
            raise UserError(f"tokenizer: scene-code word {word!r} is {len(got)} tokens, expected 1 "
                            "(not a Phi-2 tokenizer?)")
        ids.append(got[0])
    return ids


def code_token_ids(scene: Scene, vocab_ids: list[int]) -> list[tuple[int, ...]]:
    """The 32 slots as tuples of token ids."""
    return [tuple(vocab_ids[c] for c in classes if c != PAD_CLASS) for classes in code_classes(scene)]


def word_weights(present: torch.Tensor) -> torch.Tensor:
    """[..., MAX_WORDS] bool -> the weight of every word of a slot: 1 for its first, CONTEXT_WEIGHT for the rest."""
    weights = torch.full(present.shape, CONTEXT_WEIGHT)
    weights[..., 0] = 1.0
    return weights * present


def slot_embeddings(slots: torch.Tensor, embedding: torch.nn.Embedding, pad: int = PAD_CLASS) -> torch.Tensor:
    """[..., MAX_WORDS] token ids (``pad`` where a slot has fewer words) -> [..., hidden]: the words' embeddings
    summed with ``word_weights``, divided by the root of the summed squared weights (a one-word slot is that word's
    embedding)."""
    weights = word_weights(slots != pad)
    vectors = embedding(torch.where(slots != pad, slots, torch.zeros_like(slots))) * weights.unsqueeze(-1)
    return vectors.sum(-2) / weights.pow(2).sum(-1, keepdim=True).clamp(min=1e-6).sqrt()


def padded_slots(codes: list[tuple[int, ...]]) -> torch.Tensor:
    """Slots as tuples of token ids -> [n, MAX_WORDS], PAD_CLASS padded."""
    rows = [list(slot) + [PAD_CLASS] * (MAX_WORDS - len(slot)) for slot in codes]
    return torch.tensor(rows, dtype=torch.long).reshape(len(codes), MAX_WORDS)


def slot_matrix(ids: list[int], slots: torch.Tensor) -> torch.Tensor:
    """[len(ids), MAX_WORDS] token ids: one word per text position, the code slot's words at image positions."""
    ids_t = torch.tensor(ids)
    matrix = torch.full((len(ids), MAX_WORDS), PAD_CLASS, dtype=torch.long)
    matrix[:, 0] = ids_t
    matrix[ids_t == IMAGE_SLOT] = slots
    return matrix
