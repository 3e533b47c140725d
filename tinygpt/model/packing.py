"""Row layouts of a training batch: sequence packing and shape bucketing (training speed; docs/training.md, "Speed
switches").

``build_inputs`` gives one right-padded row per sample. A :class:`RowLayout` rearranges those rows:

* ``tokens_per_row`` (packing): consecutive samples share a row up to that many tokens. Every sample keeps its own
  block of a block-diagonal causal mask (it sees only itself), its own position ids (restarting at 0: RoPE sees what
  it sees unpacked) and its labels, except that the label of its first token is ignored (unpacked, a row's first
  label is never predicted; packed, the previous sample's last token would predict it). So the loss (the mean over
  the same supervised tokens) and every gradient equal the unpacked batch's up to float summation order. Samples keep
  their order, so the image embeddings (scattered in row-major order) stay in their own sample's block. A sample
  longer than ``tokens_per_row`` gets a row of its own.
* ``pad_to_multiple`` (bucketing): the row width is padded up to a multiple of it (padding: mask 0, label ignored),
  so compiled graphs see few distinct shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .sequence import IGNORE, ModelInputs


@dataclass(frozen=True)
class RowLayout:
    tokens_per_row: Optional[int] = None  # pack samples into rows of at most this many tokens; None: one per row
    pad_to_multiple: int = 1              # row width padded up to a multiple of this

    def __post_init__(self) -> None:
        if self.tokens_per_row is not None and self.tokens_per_row < 1:
            raise ValueError(f"tokens_per_row must be >= 1, got {self.tokens_per_row}")
        if self.pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {self.pad_to_multiple}")

    def apply(self, inputs: ModelInputs) -> ModelInputs:
        """``inputs`` (right-padded, one sample per row) in this layout."""
        if self.tokens_per_row is not None:
            return pack(inputs, self.tokens_per_row, self.pad_to_multiple)
        return pad_width(inputs, self.pad_to_multiple)


@dataclass
class PackedInputs(ModelInputs):
    """``attention_mask`` is a boolean [R, 1, W, W] mask (True: may attend); ``position_ids`` [R, W] restart per
    sample; ``rows`` lists the samples of each row in order, ``lengths`` every sample's tokens."""

    position_ids: torch.Tensor = None
    rows: list = None
    lengths: list = None
    token_mask: torch.Tensor = None  # [R, W] the real tokens (the 4-D mask lets a padding position see itself)


def _round_up(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def pad_width(inputs: ModelInputs, multiple: int) -> ModelInputs:
    """Right padding added so the width is a multiple of ``multiple`` (pad id = the id right-padded rows end with)."""
    width = inputs.input_ids.shape[1]
    extra = _round_up(width, multiple) - width
    if extra == 0:
        return inputs
    pad_id = _pad_id(inputs)
    grow = lambda t, value: torch.nn.functional.pad(t, (0, extra), value=value)  # noqa: E731
    return ModelInputs(input_ids=grow(inputs.input_ids, pad_id), attention_mask=grow(inputs.attention_mask, 0),
                       labels=grow(inputs.labels, IGNORE), image_used=inputs.image_used)


def _pad_id(inputs: ModelInputs) -> int:
    padded = inputs.attention_mask == 0
    return int(inputs.input_ids[padded][0]) if padded.any() else 0


def _greedy_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Consecutive samples per row, a new row whenever the next one would pass ``width``."""
    rows: list[list[int]] = [[]]
    used = 0
    for i, length in enumerate(lengths):
        if rows[-1] and used + length > width:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += length
    return rows


def plan_rows(lengths: list[int], tokens_per_row: int) -> list[list[int]]:
    """The fewest rows of consecutive samples within ``tokens_per_row``, then the narrowest width that still needs
    no more rows (so the rows come out balanced, not one full row and a short one)."""
    count = len(_greedy_rows(lengths, max(tokens_per_row, max(lengths))))
    low, high = max(lengths), max(tokens_per_row, max(lengths))
    while low < high:  # the row count of the greedy split never grows with the width
        mid = (low + high) // 2
        if len(_greedy_rows(lengths, mid)) <= count:
            high = mid
        else:
            low = mid + 1
    return _greedy_rows(lengths, low)


def pack(inputs: ModelInputs, tokens_per_row: int, pad_to_multiple: int = 1) -> PackedInputs:
    """Pack right-padded rows (one sample each) into block-diagonal rows; see the module docstring."""
    lengths = [int(n) for n in inputs.attention_mask.sum(dim=1)]
    rows = plan_rows(lengths, tokens_per_row)
    width = _round_up(max(sum(lengths[i] for i in row) for row in rows), pad_to_multiple)
    count = len(rows)
    input_ids = torch.full((count, width), _pad_id(inputs), dtype=inputs.input_ids.dtype)
    labels = torch.full((count, width), IGNORE, dtype=inputs.labels.dtype)
    positions = torch.zeros((count, width), dtype=torch.long)
    segment = torch.zeros((count, width), dtype=torch.long)  # 1, 2, ... per sample of the row; 0 = padding
    for r, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row, start=1):
            n = lengths[i]
            span = slice(start, start + n)
            input_ids[r, span] = inputs.input_ids[i, :n]
            labels[r, span] = inputs.labels[i, :n]
            labels[r, start] = IGNORE
            positions[r, span] = torch.arange(n)
            segment[r, span] = k
            start += n
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] > 0)
    mask = (same & causal) | torch.eye(width, dtype=torch.bool)  # a padding query sees itself: no empty row
    return PackedInputs(input_ids=input_ids, attention_mask=mask[:, None], labels=labels,
                        image_used=inputs.image_used, position_ids=positions, rows=rows, lengths=lengths,
                        token_mask=segment > 0)


def padding_tokens(inputs: ModelInputs) -> tuple[int, int]:
    """(real tokens, padding tokens) of a batch in any layout."""
    total = inputs.input_ids.numel()
    real = sum(inputs.lengths) if isinstance(inputs, PackedInputs) else int(inputs.attention_mask.sum())
    return real, total - real
