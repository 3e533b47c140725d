"""TinyGPT-V: frozen EVA ViT-g -> frozen Q-Former -> proj1 -> proj2 -> modified Phi-2 (+ LoRA)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerModel, Blip2VisionModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import UserError
from .lora import inject_lora
from .packing import RowLayout
from .phi import TinyGPTPhiForCausalLM
from .phi_config import attention_kind
from .sequence import ModelInputs, PromptFormat, build_inputs, embed_inputs
from .vision import check_image_size, check_pixel_values
from .vlm_config import TinyGPTVConfig


class TinyGPTVForConditionalGeneration(PreTrainedModel):
    config_class = TinyGPTVConfig
    config: TinyGPTVConfig
    base_model_prefix = "tinygptv"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["TinyGPTPhiDecoderLayer", "Blip2EncoderLayer", "Blip2QFormerLayer"]

    def __init__(self, config: TinyGPTVConfig):
        super().__init__(config)
        vision = config.vision_config
        check_image_size(int(vision.image_size), int(vision.patch_size), where="vision_config.image_size")
        self.vision_model = Blip2VisionModel(vision)
        self.vision_model.post_layernorm.eps = config.ln_vision_eps  # LAVIS ln_vision: torch default eps 1e-5
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.proj1 = nn.Linear(config.qformer_config.hidden_size, config.proj_hidden_size)
        self.proj2 = nn.Linear(config.proj_hidden_size, config.text_config.hidden_size)
        self.language_model = TinyGPTPhiForCausalLM(config.text_config)
        if config.lora is not None:
            inject_lora(self.language_model, config.lora)
        self.tokenizer = None  # attached by the loader; not part of the weights
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if module is self:
            nn.init.normal_(self.query_tokens, std=self.config.qformer_config.initializer_range)
        elif isinstance(module, nn.Linear) and module in (self.proj1, self.proj2):
            module.reset_parameters()  # PyTorch default (kaiming-uniform), as the original projections

    # ---- prompt format -------------------------------------------------------------------------------------
    def prompt_format(self, template: str | None = None, end_sym: str | None = None) -> PromptFormat:
        text = self.config.text_config
        return PromptFormat(
            template=self.config.prompt_template if template is None else template,
            end_sym=self.config.end_sym if end_sym is None else end_sym,
            placeholder=self.config.image_placeholder,
            bos_id=text.bos_token_id,
            pad_id=text.pad_token_id,
            image_tokens=self.config.num_query_tokens,
        )

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise UserError("model.tokenizer is not set: load the model with tinygpt.model.load_vlm or attach one")
        return self.tokenizer

    # ---- images ----------------------------------------------------------------------------------------------
    def qformer_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> Q-Former outputs [N, Q, 768]: the frozen part, cacheable once per dataset."""
        vision = self.config.vision_config
        check_pixel_values(pixel_values, int(vision.image_size), int(vision.patch_size))
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        image_states = self.vision_model(pixel_values=pixel_values.to(dtype)).last_hidden_state
        queries = self.query_tokens.expand(image_states.shape[0], -1, -1)
        mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=image_states.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_states, encoder_attention_mask=mask)
        return out.last_hidden_state[:, : self.config.num_query_tokens]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Q-Former outputs [N, Q, 768] -> LLM input vectors [N, Q, hidden]."""
        return self.proj2(self.proj1(features.to(self.proj1.weight.dtype)))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.project(self.qformer_features(pixel_values))

    # ---- training / scoring ----------------------------------------------------------------------------------
    def prepare_inputs(
        self,
        conversations: list[list[dict]],
        image_counts: list[int],
        max_txt_len: int | None = None,
        padding_side: str = "right",
        template: str | None = None,
        end_sym: str | None = None,
    ) -> ModelInputs:
        fmt = self.prompt_format(template, end_sym)
        return build_inputs(conversations, image_counts, self._require_tokenizer(), fmt, max_txt_len, padding_side)

    def forward(
        self,
        turns: list[list[dict]] | None = None,
        image_counts: list[int] | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        max_txt_len: int | None = None,
        template: str | None = None,
        end_sym: str | None = None,
        loss_only: bool = False,
        row_layout: RowLayout | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Loss of a batch of conversations (see ``sequence.py``).

        Images come as ``pixel_values`` [sum N, 3, S, S] or as cached Q-Former ``image_features`` [sum N, Q, 768].
        ``loss_only`` skips the logits of unsupervised positions (the training loop's fast path); ``row_layout``
        packs samples into shared rows and/or pads the width to a multiple (``packing.py``; the same loss).
        """
        if turns is None:
            raise UserError("forward: pass turns (a list of conversations)")
        counts = image_counts if image_counts is not None else [0] * len(turns)
        inputs = self.prepare_inputs(turns, counts, max_txt_len, "right", template, end_sym)
        if row_layout is not None:
            inputs = row_layout.apply(inputs)
        positions = getattr(inputs, "position_ids", None)
        real = getattr(inputs, "token_mask", None)  # a packed batch's real tokens (MoE routes only those)
        image_embeds = self._image_embeds(pixel_values, image_features)
        device = self.proj1.weight.device
        embeds = embed_inputs(inputs, self.language_model.get_input_embeddings(), image_embeds)
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=inputs.attention_mask.to(device),
            position_ids=None if positions is None else positions.to(device),
            labels=inputs.labels.to(device),
            use_cache=False,
            loss_only=loss_only,
            **({} if real is None else {"token_mask": real.to(device)}),
            **self.image_mask_kwargs(inputs),
        )

    def image_mask_kwargs(self, inputs: ModelInputs) -> dict:
        """``{"image_mask": which positions are image tokens}`` for a language model with ``attention: mmca``; ``{}``
        for a causal one (which does not read it)."""
        if attention_kind(self.config.text_config) != "mmca":
            return {}
        return {"image_mask": inputs.image_positions.to(self.proj1.weight.device)}

    def _image_embeds(self, pixel_values, image_features):
        if image_features is not None:
            return self.project(image_features)
        if pixel_values is not None and pixel_values.shape[0]:
            return self.encode_images(pixel_values)
        return None

    # ---- generation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        turns: list[list[dict]],
        image_counts: list[int] | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """New token ids for each conversation; its last turn's ``assistant`` is None (left-padded batch).

        Stops at the config's stop strings (``###`` by default) and at EOS; sampling, beams and a ``streamer``
        go through ``generate_kwargs`` to transformers' ``generate``.
        """
        counts = image_counts if image_counts is not None else [0] * len(turns)
        inputs = self.prepare_inputs(turns, counts, None, "left")
        image_embeds = self._image_embeds(pixel_values, image_features)
        device = self.proj1.weight.device
        embeds = embed_inputs(inputs, self.language_model.get_input_embeddings(), image_embeds)
        context = self.config.text_config.max_position_embeddings
        max_new = generate_kwargs.get("max_new_tokens", 20)
        if embeds.shape[1] + max_new > context:
            raise UserError(
                f"prompt: {embeds.shape[1]} tokens + max_new_tokens {max_new} exceed the context of {context}"
            )
        text = self.config.text_config
        generate_kwargs.setdefault("pad_token_id", text.pad_token_id)
        generate_kwargs.setdefault("eos_token_id", text.eos_token_id)
        stops = generate_kwargs.pop("stop_strings", self.config.stop_strings)
        if isinstance(stops, str):  # transformers takes one string too; list() would split it into characters
            stops = [stops]
        if stops:
            generate_kwargs["stop_strings"] = list(stops)
            generate_kwargs.setdefault("tokenizer", self._require_tokenizer())
        return self.language_model.generate(
            inputs_embeds=embeds, attention_mask=inputs.attention_mask.to(device), **self.image_mask_kwargs(inputs),
            **generate_kwargs,
        )

    def decode_answer(self, token_ids: torch.Tensor) -> str:
        """Text of generated ids, cut at the first stop string or end symbol."""
        text = self._require_tokenizer().decode(token_ids, skip_special_tokens=True)
        for stop in [*self.config.stop_strings, self.config.end_sym]:
            if stop and stop.strip() and stop in text:
                text = text[: text.index(stop)]
        return text.strip()
