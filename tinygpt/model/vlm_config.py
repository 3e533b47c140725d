"""Configuration of the whole TinyGPT-V model: vision tower, Q-Former, projections, LLM and its prompt format."""

from __future__ import annotations

from transformers import Blip2QFormerConfig, Blip2VisionConfig, PreTrainedConfig

from .phi_config import TinyGPTPhiConfig


class TinyGPTVConfig(PreTrainedConfig):
    """The single source of truth for a trained model: sizes, the prompt template and the stop strings.

    ``prompt_template`` wraps every user turn (``{}`` is the user text), ``end_sym`` ends every answer; training,
    evaluation, chat and export all read them from here.
    ``lora``: ``None`` or ``{"r", "alpha", "dropout", "target_modules"}``; when set the LoRA layers are part of the
    model and of its saved weights. ``base_model``: for a directory that holds only the trainable tensors, the
    directory (relative to this one, or absolute) that holds the rest.
    """

    model_type = "tinygptv"
    sub_configs = {
        "vision_config": Blip2VisionConfig,
        "qformer_config": Blip2QFormerConfig,
        "text_config": TinyGPTPhiConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    proj_hidden_size: int = 4096
    ln_vision_eps: float = 1e-5
    prompt_template: str = "###Human: {} ###Assistant: "
    end_sym: str = "###"
    stop_strings: list | None = None
    image_placeholder: str = "<ImageHere>"
    lora: dict | None = None
    base_model: str | None = None
    tokenizer_source: str | None = None

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = Blip2VisionConfig()
        elif isinstance(self.vision_config, dict):
            self.vision_config = Blip2VisionConfig(**self.vision_config)
        if self.qformer_config is None:
            self.qformer_config = Blip2QFormerConfig()
        elif isinstance(self.qformer_config, dict):
            self.qformer_config = Blip2QFormerConfig(**self.qformer_config)
        if self.text_config is None:
            self.text_config = TinyGPTPhiConfig()
        elif isinstance(self.text_config, dict):
            self.text_config = TinyGPTPhiConfig(**self.text_config)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        if self.stop_strings is None:
            self.stop_strings = [self.end_sym] if self.end_sym.strip() else []
        super().__post_init__(**kwargs)

    @property
    def image_size(self) -> int:
        return int(self.vision_config.image_size)

    @property
    def image_token_count(self) -> int:
        return self.num_query_tokens
