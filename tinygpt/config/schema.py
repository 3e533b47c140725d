"""The typed schema of a training run: ``RunConfig {model, data, optim, schedule, run}`` (+ free ``vars``).

Every key a stage YAML may set is a dataclass field here; ``tinygpt.config.load`` validates the merged YAML into these
classes (unknown key, wrong type or missing required value -> UserError naming the YAML file and the dotted key).
``MISSING`` marks a required value. The comment after each field is its documentation (the README lists them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

REQUIRED: Any = "???"  # a required value (omegaconf's own MISSING marker, so "key: ???" in a YAML means the same)

PRESETS = ("tinygptv", "tiny")
ATTENTIONS = ("causal", "mmca")
TRAINABLE_SETS = ("stage1", "lora", "moe")
MOE_LAYER_PATTERNS = ("all", "alternate")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
SAVE_MODES = ("auto", "trainable_only", "whole")
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("builtin:tiny",)


@dataclass
class LoraSettings:
    r: int = 64                      # LoRA rank
    alpha: float = 16.0              # LoRA alpha (scaling = alpha / r)
    dropout: float = 0.05            # dropout on the LoRA input
    target_modules: list[str] = field(default_factory=lambda: ["qkv", "dense"])  # LLM Linear names that get LoRA


@dataclass
class MoESettings:
    num_experts: int = 4             # experts per MoE layer (each a copy of the dense FFN: fc1, fc2)
    top_k: int = 2                   # experts per token; their gates are the softmax renormalised over the top-k
    layers: Union[str, list[int]] = "all"  # all | alternate (layers 1, 3, 5, ...) | a list of layer indices
    aux_loss_weight: float = 0.01    # Switch load-balancing loss E * sum_i f_i * P_i, added to the training loss
    capacity_factor: Optional[float] = 1.5  # training only: expert keeps <= ceil(cf*tokens*top_k/E); null = dropless
    router_jitter: float = 0.0       # training only: router input times uniform(1 - j, 1 + j) noise (0 = off)
    z_loss_weight: float = 0.0       # router z-loss mean(logsumexp(logits)^2) weight (0 = off)


@dataclass
class GradientCheckpointing:
    vision: bool = False             # recompute ViT blocks in backward (the original's use_grad_checkpoint)
    llm: bool = False                # recompute Phi decoder layers in backward (the big memory saver)


@dataclass
class Packing:
    enabled: bool = False            # several samples per row, each attending only to itself (the same loss)
    tokens_per_row: int = 2048       # row budget in tokens (image tokens included); a longer sample gets its own row


@dataclass
class CompileSwitches:
    llm: bool = False                # torch.compile each Phi decoder layer (one graph reused by all layers)
    vision: bool = False             # torch.compile each frozen ViT and Q-Former layer


@dataclass
class ModelSection:
    preset: str = "tinygptv"         # size when init_from is null: tinygptv (full) | tiny
    init_from: Optional[str] = None  # model dir (a previous stage's output or a built base) | builtin:tiny | null
    image_size: Optional[int] = None  # ViT input size; differs from init_from's -> position embeddings resized once
    trainable: str = "stage1"        # trainable set: stage1 (proj + norm weights) | lora (stage1 + LoRA A/B) | moe
    moe: Optional[MoESettings] = None  # null = dense FFNs; set = MoE-tuning (upcycles a dense init_from; trainable moe)
    lora: Optional[LoraSettings] = None  # null = no LoRA layers; {} = r 64, alpha 16, dropout 0.05 on qkv, dense
    extra_norms: bool = True         # q/k LayerNorm + post-attention RMSNorm (only used when init_from is null)
    tokenizer: Optional[str] = None  # tokenizer source when init_from is null: null/builtin | local dir | hub id
    prompt_template: str = "{}"      # wraps every user turn ({} = the user text); saved into the output model
    end_sym: str = "\n"              # ends every answer; saved into the output model
    max_txt_len: int = 32            # answer/next-turn tokens kept after the first prompt
    gradient_checkpointing: GradientCheckpointing = field(default_factory=GradientCheckpointing)
    load_in_4bit: bool = False       # QLoRA: frozen LLM Linear weights in 4-bit NF4 (bitsandbytes)
    attention: Optional[str] = None  # LLM attention: causal | mmca (multi-modal causal); unset: the starting model's


@dataclass
class DatasetSpec:
    kind: str = REQUIRED             # a kind of tinygpt.data.registry.build_dataset, or qformer_features
    sample_ratio: float = 1.0        # relative probability of drawing this dataset for a batch
    batch_size: int = REQUIRED       # samples per batch per process (one batch = one dataset)
    params: dict[str, Any] = field(default_factory=dict)  # the kind's own parameters (paths, options)


@dataclass
class DataSection:
    datasets: dict[str, Optional[DatasetSpec]] = REQUIRED  # name -> spec; a null entry disables an inherited dataset
    num_workers: int = 2             # DataLoader worker processes per dataset
    max_bad_fraction: float = 0.01   # bad records a dataset may hold before the run stops
    bad_records_min: int = 20        # records seen before the bad fraction is judged


@dataclass
class OptimSection:
    name: str = "adamw"              # adamw | adamw8bit (bitsandbytes)
    weight_decay: float = 0.05       # for ndim >= 2 weights whose name has no bias/ln/norm; 0 for the rest
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: Optional[float] = None  # clip the global gradient norm; null = no clipping (the original)
    fused: bool = False              # torch's fused AdamW kernel (adamw; adamw8bit, one kernel already, ignores it)


@dataclass
class ScheduleSection:
    init_lr: float = REQUIRED        # peak learning rate, reached at the end of warm-up
    min_lr: float = REQUIRED         # cosine floor at the last step (must be <= init_lr)
    warmup_lr: float = 1e-6          # learning rate at step 0
    warmup_steps: int = 0            # linear warm-up length in global optimizer steps
    total_steps: int = REQUIRED      # optimizer steps of the whole stage (cosine spans all of them)


@dataclass
class RunSection:
    output_dir: str = REQUIRED       # the stage output: an HF-native model dir the next stage's init_from names
    checkpoint_dir: Optional[str] = None  # resume checkpoints, logs and summary; null -> <output_dir>-checkpoints
    seed: int = 42                   # seeds weights-independent randomness: data order, mixing, dropout
    precision: str = "bf16"          # fp32 | bf16 | fp16 (autocast; fp16 adds loss scaling)
    grad_accum_steps: int = 1        # micro-batches per optimizer step per process
    save_every: int = 1000           # optimizer steps between resume checkpoints (0 = only at the end; the last
                                     # step is always checkpointed, so a rerun of a finished run knows it is done)
    keep_last: int = 2               # resume checkpoints kept
    resume: Union[bool, str] = "auto"  # false | true (latest, must exist) | auto (latest if any) | a checkpoint path
    save_mode: str = "auto"          # stage output: auto | trainable_only (+ base reference) | whole
    log_every: int = 10              # steps between log lines / TensorBoard points
    max_nonfinite: int = 10          # non-finite losses in a row before the run stops
    cpu: bool = False                # force the CPU even when a GPU is there
    progress: bool = True            # tqdm progress bar
    tensorboard: bool = False        # write TensorBoard events under checkpoint_dir/tensorboard
    wandb_project: Optional[str] = None  # log to Weights & Biases (network) only when set
    packing: Packing = field(default_factory=Packing)  # sequence packing (speed; on in the full-size stages)
    pad_to_multiple: int = 1         # pad every batch's row width to a multiple of this (fewer shapes to compile)
    compile: CompileSwitches = field(default_factory=CompileSwitches)  # regional torch.compile (speed)


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    run: RunSection = field(default_factory=RunSection)
    vars: dict[str, Any] = field(default_factory=dict)  # free values for ${vars.x} interpolation (data roots, ...)
    # not YAML keys: where the config came from, for error messages
    source: str = field(default="<config>", metadata={"internal": True})
    origins: dict[str, str] = field(default_factory=dict, metadata={"internal": True})

    def origin(self, dotted: str) -> str:
        """The file (or ``--options``) that set ``dotted`` or its closest parent; else the top YAML."""
        key = dotted
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key.rpartition(".")[0]
        return self.source

    def active_datasets(self) -> dict[str, DatasetSpec]:
        return {name: spec for name, spec in self.data.datasets.items() if spec is not None}

    @property
    def checkpoint_dir(self) -> str:
        return self.run.checkpoint_dir or f"{self.run.output_dir.rstrip('/')}-checkpoints"
