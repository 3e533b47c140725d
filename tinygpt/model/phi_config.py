"""Configuration of the modified Phi-2 language model (TinyGPT-V's LLM)."""

from transformers import PreTrainedConfig


class TinyGPTPhiConfig(PreTrainedConfig):
    """Phi-2 shapes plus the two optional extra norms of TinyGPT-V.

    ``qk_layernorm``: a LayerNorm over head_dim (shared by all heads) on queries and keys, before RoPE.
    ``post_attention_rmsnorm``: a weight-only RMSNorm on the attention branch output.
    With both switched off the model is plain Phi-2 (and exports to a stock llama.cpp ``phi2`` GGUF).
    ``attention`` (an optional key, read through :func:`attention_kind`): absent = ``causal``; ``mmca`` = multi-modal
    causal attention (``mmca.py``). It is not a declared field, so a causal model's config.json (and the model id of
    its GGUF export) stays what it was before the option existed.
    ``moe``: ``None`` (dense FFNs) or the resolved MoE settings of ``tinygpt.model.moe`` (``num_experts``, ``top_k``,
    ``layers`` as a list of indices, ``aux_loss_weight``, ``capacity_factor``, ``router_jitter``, ``z_loss_weight``).
    """

    model_type = "tinygpt_phi"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    rotary_dim: int = 32
    rope_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    rms_norm_eps: float = 1e-6
    hidden_act: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.0
    initializer_range: float = 0.02
    qk_layernorm: bool = True
    post_attention_rmsnorm: bool = True
    use_cache: bool = True
    tie_word_embeddings: bool = False
    moe: dict | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = 50256

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out.get("moe") is None:  # a dense model's config.json stays as it was before MoE existed
            out.pop("moe", None)
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "rotary_dim", "max_position_embeddings")

    def validate_shapes(self) -> None:
        for name in self.SIZES:  # a hand-edited config.json: "abc", 2.5 or true would fail below as a raw TypeError
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")


ATTENTION_KINDS = ("causal", "mmca")


def attention_kind(config) -> str:
    """The config's attention: ``causal`` (also when the key is absent) or ``mmca``; ValueError for anything else."""
    kind = getattr(config, "attention", None) or "causal"
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention: {kind!r} is not one of {', '.join(ATTENTION_KINDS)}")
    return kind


def set_attention_kind(config, kind: str) -> None:
    """Store ``kind`` on the config; ``causal`` removes the key (the config then serialises as before the option)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention: {kind!r} is not one of {', '.join(ATTENTION_KINDS)}")
    if kind == "causal":
        if hasattr(config, "attention"):
            delattr(config, "attention")
    else:
        config.attention = kind
