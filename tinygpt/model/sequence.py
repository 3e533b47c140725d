"""The one place that turns conversations + image embeddings into LLM inputs (training, evaluation and chat alike).

Layout of one sample, as the original TinyGPT-V builds it (docs/training.md, "Sequence layout")::

    [BOS] template(user_0)  answer_0 end_sym  [BOS] template(user_1)  answer_1 end_sym ...

* every ``<ImageHere>`` in a user text becomes the image's ``num_query_tokens`` embeddings, in order;
* only answer tokens (and their end symbol) are supervised; everything else has label -100;
* the text after the first user prompt (later prompts and all answers) is cut to ``max_txt_len`` tokens;
* for generation the last turn has no answer and the sequence ends right after its prompt.
Samples are padded with the pad id (mask 0, label -100): on the right for training, on the left for generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

IGNORE = -100
IMAGE_SLOT = -1  # marks image-embedding positions in the id matrix before embedding


@dataclass(frozen=True)
class PromptFormat:
    template: str
    end_sym: str
    placeholder: str
    bos_id: int
    pad_id: int
    image_tokens: int

    def wrap(self, user: str) -> str:
        return self.template.replace("{}", user) if "{}" in self.template else self.template + user


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [B, T] token ids, IMAGE_SLOT at image positions, pad id at padding
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    image_used: torch.Tensor  # [sum N] bool: False for images of turns cut by max_txt_len

    @property
    def image_positions(self) -> torch.Tensor:
        return self.input_ids == IMAGE_SLOT


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _prompt_ids(tokenizer, fmt: PromptFormat, user: str) -> tuple[list[int], int]:
    """Token ids of one wrapped user prompt with IMAGE_SLOT runs for each placeholder, and the image count."""
    pieces = fmt.wrap(user).split(fmt.placeholder)
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if k:
            ids.extend([IMAGE_SLOT] * fmt.image_tokens)
        ids.extend(_tokenize(tokenizer, piece))
    return ids, len(pieces) - 1


def sample_ids(
    turns: list[dict], tokenizer, fmt: PromptFormat, max_txt_len: int | None, n_images: int, where: str
) -> tuple[list[int], list[int], int]:
    """Ids, labels and the number of images used (turns cut by ``max_txt_len`` drop their images).

    The last turn's ``assistant`` may be None (a generation prompt).
    """
    if not turns:
        raise UserError(f"{where}: a conversation needs at least one turn")
    ids: list[int] = [fmt.bos_id]
    labels: list[int] = [IGNORE]
    images_used = 0
    budget = max_txt_len
    for t, turn in enumerate(turns):
        prompt, n = _prompt_ids(tokenizer, fmt, turn.get("user", ""))
        if t:
            prompt = [fmt.bos_id] + prompt
        answer_text = turn.get("assistant")
        if answer_text is None and t != len(turns) - 1:
            raise UserError(f"{where}: turn {t} has no assistant text but is not the last turn")
        answer = _tokenize(tokenizer, answer_text + fmt.end_sym) if answer_text is not None else []
        if t and budget is not None:  # later prompts count against the text budget; a cut turn is dropped whole
            text_len = len(prompt) - prompt.count(IMAGE_SLOT)
            if text_len >= budget:
                break
            budget -= text_len
        images_used += n
        ids += prompt
        labels += [IGNORE] * len(prompt)
        if budget is not None:
            answer = answer[:budget]
            budget -= len(answer)
        ids += answer
        labels += answer
    total_placeholders = sum(turn.get("user", "").count(fmt.placeholder) for turn in turns)
    if total_placeholders != n_images:
        raise UserError(
            f"{where}: {total_placeholders} {fmt.placeholder} placeholder(s) but {n_images} image(s) were given"
        )
    return ids, labels, images_used


def build_inputs(
    conversations: list[list[dict]],
    image_counts: list[int],
    tokenizer,
    fmt: PromptFormat,
    max_txt_len: int | None = None,
    padding_side: str = "right",
) -> ModelInputs:
    """Id matrix (with IMAGE_SLOT runs), mask and labels for a batch of conversations."""
    if len(conversations) != len(image_counts):
        raise UserError(f"image_counts: {len(image_counts)} entries for {len(conversations)} conversations")
    rows = [
        sample_ids(turns, tokenizer, fmt, max_txt_len, n, where=f"sample {i}")
        for i, (turns, n) in enumerate(zip(conversations, image_counts))
    ]
    width = max(len(ids) for ids, _, _ in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), fmt.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    used = [k < n_used for (_, _, n_used), n in zip(rows, image_counts) for k in range(n)]
    for i, (ids, labs, _) in enumerate(rows):
        span = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        labels[i, span] = torch.tensor(labs, dtype=torch.long)
        attention_mask[i, span] = 1
    return ModelInputs(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        image_used=torch.tensor(used, dtype=torch.bool),
    )


def embed_inputs(inputs: ModelInputs, embed_tokens, image_embeds: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with the image embeddings ([sum N, Q, H], in sample order) written at the image slots."""
    slots = inputs.image_positions
    embeds = embed_tokens(inputs.input_ids.clamp(min=0).to(embed_tokens.weight.device))
    n_slots = int(slots.sum())
    if image_embeds is not None and len(inputs.image_used) == image_embeds.shape[0]:
        image_embeds = image_embeds[inputs.image_used.to(image_embeds.device)]
    if n_slots == 0:
        return embeds
    if image_embeds is None or image_embeds.shape[0] * image_embeds.shape[1] != n_slots:
        got = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        raise UserError(f"images: the prompts have {n_slots} image positions but the images give {got} vectors")
    flat = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
    return embeds.masked_scatter(slots.to(embeds.device)[..., None], flat)
