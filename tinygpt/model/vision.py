"""Vision-side helpers: image-size checks, the one-time bicubic resize of ViT position embeddings, image encoding.

The networks themselves are transformers' ``Blip2VisionModel`` (EVA ViT-g as LAVIS runs it: 39 blocks, no final norm,
its ``post_layernorm`` is LAVIS's ``ln_vision``) and ``Blip2QFormerModel`` (query path only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError


def check_image_size(image_size: int, patch_size: int, where: str = "image_size") -> None:
    if image_size <= 0 or image_size % patch_size:
        raise UserError(f"{where}: {image_size} px is not a positive multiple of the ViT patch size {patch_size}")


def resize_position_embedding(pos: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """Resize ``[1, 1 + g*g, D]`` position embeddings to the grid of ``image_size`` (bicubic, fp32, CLS kept).

    This is the one-time resize LAVIS does when building EVA at 448 px from 224-px weights (257 -> 1025 positions).
    """
    check_image_size(image_size, patch_size)
    new_grid = image_size // patch_size
    old_grid = math.isqrt(pos.shape[1] - 1)
    if old_grid * old_grid != pos.shape[1] - 1:
        raise UserError(f"position embedding has {pos.shape[1]} positions, which is not 1 + a square grid")
    if old_grid == new_grid:
        return pos
    cls_pos, grid = pos[:, :1], pos[:, 1:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos.dtype)
    return torch.cat([cls_pos, grid], dim=1)


def check_pixel_values(pixel_values: torch.Tensor, image_size: int, patch_size: int) -> None:
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise UserError(f"pixel_values: expected [N, 3, H, W], got {list(pixel_values.shape)}")
    height, width = pixel_values.shape[-2:]
    for side in (height, width):
        if side % patch_size:
            raise UserError(f"pixel_values: image side {side} px is not a multiple of the patch size {patch_size}")
    if height != image_size or width != image_size:
        raise UserError(
            f"pixel_values: images are {height}x{width} px but this model was built for {image_size}x{image_size}"
            " (resize the images, or build the model at that size)"
        )
