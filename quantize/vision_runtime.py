"""Image -> 32 LLM input vectors on CPU, from the vision GGUF: ViT (+ ln_vision) -> Q-Former -> proj1 -> proj2.

The networks are transformers' Blip2VisionModel / Blip2QFormerModel (the same classes training uses), built on
the meta device from the file's hyper-parameters and then filled tensor by tensor from the GGUF: every Linear
becomes a PyTorch dynamic-int8 Linear (per-output-channel symmetric weights, fbgemm kernels), everything else
fp32. No fp32 copy of the whole model ever exists, and the file's pages behind each tensor are dropped once it is
copied (quantize.memory.drop_pages), so peak memory stays near the int8 size. The int8 rows are cached on disk after
the first load of a file and read back by the next ones, which then only prepack them (quantize.vision_cache).
Preprocessing = LAVIS's eval processor: RGB, bicubic resize to image_size x image_size, /255, (x - mean) / std
with the mean/std stored in the file.
"""
from __future__ import annotations

import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

from tinygpt.errors import UserError
from tinygpt.pixels import to_rgb, upright

from . import gguf_names as names
from . import vision_cache
from .cli_checks import check_image_file
from .gguf_file import GGUFContents, as_float32, vision_values
from .memory import drop_pages


def load_image(path: str | os.PathLike, image_size: int, mean, std) -> torch.Tensor:
    """[1, 3, S, S] float32 pixels; UserError for a missing file, one that is not an image, or one with more pixels
    than PIL opens without its decompression-bomb warning (Image.MAX_IMAGE_PIXELS)."""
    path = check_image_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a warning past the limit, an error at 2x
            with Image.open(path) as img:
                img = to_rgb(upright(img)).resize((image_size, image_size), Image.BICUBIC)  # as a viewer shows it
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
        raise UserError(f"{path}: the image has {size}, more than the {Image.MAX_IMAGE_PIXELS:,} an image may have "
                        "(PIL's decompression-bomb limit); scale it down") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def per_row_int8(weight: torch.Tensor) -> torch.Tensor:
    """The quantized (qint8) form of a float weight [out, in]: symmetric, one scale per output row."""
    scale = (weight.abs().amax(dim=1).double() / 127.0).clamp(min=1e-12)
    zero = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch 2.13 marks quantized-tensor creation deprecated; the kernels remain
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(weight.float(), scale, zero, 0, torch.qint8)


def from_int8_rows(rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """per_row_int8's result again from its int8 rows and float64 scales (quantize.vision_cache stores those)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch._make_per_channel_quantized_tensor(rows, scale, torch.zeros(rows.shape[0], dtype=torch.long), 0)


def int8_linear(qweight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A dynamic-quantized Linear over a per-row qint8 weight: int8 weights, fp32 activations in and out."""
    out_features, in_features = qweight.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # built 1x1 and then given the real weight: the constructor would otherwise prepack a full-size zero weight
        layer = DynamicLinear(1, 1, bias_=bias is not None, dtype=torch.qint8)
        layer.in_features, layer.out_features = in_features, out_features
        layer.set_weight_bias(qweight, bias)
    return layer


class VisionEncoder:
    """`encode(path_or_pixels)` -> float32 numpy [num_query_tokens, llm_hidden_size]."""

    def __init__(self, vision: GGUFContents, int8: bool = True, n_threads: int = 2):
        self.file = vision
        self.values = v = vision_values(vision)
        if n_threads:
            torch.set_num_threads(int(n_threads))
        self.int8 = int8
        self.image_size = v["image_size"]
        self.mean, self.std = v["image_mean"], v["image_std"]
        vcfg = Blip2VisionConfig(
            hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], num_hidden_layers=v["num_layers"],
            num_attention_heads=v["num_heads"], image_size=v["image_size"], patch_size=v["patch_size"],
            layer_norm_eps=v["layer_norm_eps"])
        qcfg = Blip2QFormerConfig(
            hidden_size=v["qformer.hidden_size"], num_hidden_layers=v["qformer.num_layers"],
            num_attention_heads=v["qformer.num_heads"], intermediate_size=v["qformer.intermediate_size"],
            cross_attention_frequency=v["qformer.cross_attention_frequency"],
            encoder_hidden_size=v["qformer.encoder_hidden_size"], layer_norm_eps=v["qformer.layer_norm_eps"])
        for cfg in (vcfg, qcfg):
            cfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.root = nn.Module()
            self.root.vision_model = Blip2VisionModel(vcfg)
            self.root.qformer = Blip2QFormerModel(qcfg)
            self.root.query_tokens = nn.Parameter(torch.empty(1, v["num_query_tokens"], v["qformer.hidden_size"]))
            self.root.proj1 = nn.Linear(v["qformer.hidden_size"], v["proj_hidden_size"])
            self.root.proj2 = nn.Linear(v["proj_hidden_size"], v["llm_hidden_size"])
        self.root.vision_model.post_layernorm.eps = v["ln_vision_eps"]
        by_torch_name = {}
        for gname in vision.tensors:
            try:
                by_torch_name[names.gguf_to_torch_vision(gname)] = gname
            except KeyError:
                raise UserError(f"{vision.path}: unknown tensor {gname!r}") from None
        self._used: set[str] = set()
        self._linears: list[tuple[nn.Module, str, str, bool]] = []
        self._shapes: dict[str, tuple] = {}
        self._fill(self.root, "", by_torch_name)
        # the Linear layers (dequantize, requantize per row, prepack: C++ that releases the GIL) on n_threads threads;
        # in int8 mode the int8 rows come from the cache when an earlier load of this file stored them
        full_names = [job[2] for job in self._linears]
        cache = vision_cache.cache_file(vision, [by_torch_name[f"{n}.weight"] for n in full_names
                                                 if f"{n}.weight" in by_torch_name]) if int8 else None
        self._reader = vision_cache.open_entry(cache, full_names)  # one layer at a time, or None
        # what the int8 cache did for this load: "read", "written", or "off" (fp32 mode, turned off, no model_id)
        self.cache_state = "read" if self._reader is not None else "written" if cache is not None else "off"
        self._writer = vision_cache.Writer(cache, {n: tuple(self._shapes[n][0]) for n in full_names}) \
            if cache is not None and self._reader is None else None
        workers = max(1, int(n_threads or 1))
        try:
            with ThreadPoolExecutor(workers) as pool:
                layers = list(pool.map(lambda job: self._linear(job[2], job[3], by_torch_name), self._linears))
        except BaseException:
            if self._writer is not None:
                self._writer.abort()
            raise
        finally:
            if self._reader is not None:
                self._reader.close()
        for (module, child_name, _, _), layer in zip(self._linears, layers):
            setattr(module, child_name, layer)
        if self._writer is not None:
            if not self._writer.commit():
                self.cache_state = "off"
        self._linears.clear()
        self._reader, self._writer = None, None
        unused = sorted(set(by_torch_name) - self._used)
        if unused:
            raise UserError(f"{vision.path}: tensor {by_torch_name[unused[0]]!r} does not fit this vision model "
                            f"({len(unused)} unused)")
        self.root.eval()

    def _get(self, torch_name: str, by_torch_name: dict, shape) -> torch.Tensor:
        if torch_name not in by_torch_name:
            raise UserError(f"{self.file.path}: tensor {names.torch_to_gguf_vision(torch_name)!r} is missing")
        arr = as_float32(self.file.tensor(by_torch_name[torch_name]))
        if tuple(arr.shape) != tuple(shape):
            raise UserError(f"{self.file.path}: tensor {by_torch_name[torch_name]!r} has shape {list(arr.shape)}, "
                            f"expected {list(shape)}")
        self._used.add(torch_name)
        out = torch.from_numpy(np.array(arr, dtype=np.float32))
        drop_pages(self.file.reader, self.file.tensor(by_torch_name[torch_name]).data)  # copied: the file pages go
        return out

    def _linear(self, full: str, has_bias: bool, by_torch_name: dict) -> nn.Module:
        w_shape, b_shape = self._shapes[full]
        b = self._get(full + ".bias", by_torch_name, b_shape) if has_bias else None
        try:  # an entry that fails to read (changed under us, an I/O error) only costs this layer's rebuild
            cached = self._reader.get(full) if self._reader is not None else None
        except OSError:
            cached = None
        if cached is not None and tuple(cached[0].shape) == tuple(w_shape):
            if full + ".weight" not in by_torch_name:
                raise UserError(f"{self.file.path}: tensor {names.torch_to_gguf_vision(full + '.weight')!r} is missing")
            self._used.add(full + ".weight")
            return int8_linear(from_int8_rows(*cached), b)
        w = self._get(full + ".weight", by_torch_name, w_shape)
        if self.int8:
            qweight = per_row_int8(w)
            del w
            if self._writer is not None:
                self._writer.put(full, qweight)
            return int8_linear(qweight, b)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            lin.bias = nn.Parameter(b, requires_grad=False)
        return lin

    def _fill(self, module: nn.Module, prefix: str, by_torch_name: dict) -> None:
        for child_name, child in list(module.named_children()):
            full = prefix + child_name
            if isinstance(child, nn.Linear):  # built later, in parallel (__init__)
                self._linears.append((module, child_name, full, child.bias is not None))
                self._shapes[full] = (child.weight.shape, child.bias.shape if child.bias is not None else None)
            else:
                self._fill(child, full + ".", by_torch_name)
        for pname, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[pname] = nn.Parameter(self._get(prefix + pname, by_torch_name, p.shape),
                                                         requires_grad=False)
        for bname, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                raise UserError(f"{self.file.path}: buffer {prefix + bname} is not in the file")

    def preprocess(self, path: str | os.PathLike) -> torch.Tensor:
        return load_image(path, self.image_size, self.mean, self.std)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        r = self.root
        states = r.vision_model(pixel_values=pixels.float()).last_hidden_state  # post_layernorm = ln_vision
        queries = r.query_tokens.expand(states.shape[0], -1, -1)
        mask = torch.ones(states.shape[:-1], dtype=torch.long)
        out = r.qformer(query_embeds=queries, encoder_hidden_states=states, encoder_attention_mask=mask)
        feats = out.last_hidden_state[:, : queries.shape[1]]
        return r.proj2(r.proj1(feats))[0].float().numpy()

    def encode(self, image: str | os.PathLike) -> np.ndarray:
        return self.encode_pixels(self.preprocess(image))

    def timed_encode(self, image) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        out = self.encode(image)
        return out, time.perf_counter() - t0
