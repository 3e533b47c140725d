"""Multi-modal causal attention (MMCA, DeepSpeed-VisualChat), the ``attention: mmca`` option of the Phi config.

Given the model's usual boolean mask (causal AND key not padding, or a packed row's block-diagonal mask) and which
positions hold image embeddings:

* an image query attends (one softmax) to the earlier image keys its mask allows, never to text;
* a text query gets two softmaxes whose outputs are added: softmax over the allowed *text* keys times V, plus
  softmax over the allowed *image* keys times V. A text query with no image key before it gets exactly 0 from the
  image part (its row would be empty: it is computed over the plain mask instead, which is finite, and multiplied by
  0), so no NaN ever appears, in the output or in the gradients.

Both parts run through ``scaled_dot_product_attention``: twice the attention work of the causal model, no extra
parameters. The "same modality" part always holds the query itself, so it is never empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MMCAMask:
    """The two boolean masks [B, 1, S, K] (True = may attend) and which query rows have an image part at all."""

    same: torch.Tensor  # image query -> image keys; text query -> text keys
    cross: torch.Tensor  # text query -> image keys; rows without any: the plain mask (finite, weighted by 0 below)
    has_cross: torch.Tensor  # [B, 1, S, 1] 1.0 where the text query has image keys, else 0.0
    any_cross: bool  # False: no row has an image part (text only), the second softmax is skipped


def mmca_mask(mask: torch.Tensor, key_is_image: torch.Tensor, past: int) -> MMCAMask:
    """``mask``: [B or 1, 1, S, K] boolean; ``key_is_image``: [B, K] boolean for every key (cached ones first); the
    queries are the last S keys (``past`` = K - S)."""
    keys = key_is_image.bool()[:, None, None, :]  # [B, 1, 1, K]
    queries = key_is_image.bool()[:, past:][:, None, :, None]  # [B, 1, S, 1]
    same = mask & (keys == queries)
    cross = mask & keys & ~queries
    has = cross.any(dim=-1, keepdim=True)
    cross = torch.where(has, cross, mask)
    return MMCAMask(same=same, cross=cross, has_cross=has.float(), any_cross=bool(has.any()))


def mmca_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: MMCAMask, scale: float) -> torch.Tensor:
    """softmax(text part)·V + softmax(image part)·V per query (q, k, v: [B, H, S|K, D]); see the module docstring."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks.same, scale=scale)
    if masks.any_cross:
        cross = F.scaled_dot_product_attention(q, k, v, attn_mask=masks.cross, scale=scale)
        out = out + cross * masks.has_cross.to(cross.dtype)
    return out
