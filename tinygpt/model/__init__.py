"""Model definitions; importing this package registers them with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .checkpoint_io import load_vlm, save_vlm
from .lora import merge_lora
from .phi import TinyGPTPhiForCausalLM, TinyGPTPhiModel
from .phi_config import TinyGPTPhiConfig
from .presets import build_config
from .vlm import TinyGPTVForConditionalGeneration
from .vlm_config import TinyGPTVConfig

AutoConfig.register(TinyGPTPhiConfig.model_type, TinyGPTPhiConfig, exist_ok=True)
AutoModelForCausalLM.register(TinyGPTPhiConfig, TinyGPTPhiForCausalLM, exist_ok=True)
AutoConfig.register(TinyGPTVConfig.model_type, TinyGPTVConfig, exist_ok=True)
AutoModel.register(TinyGPTVConfig, TinyGPTVForConditionalGeneration, exist_ok=True)

__all__ = [
    "TinyGPTPhiConfig",
    "TinyGPTPhiForCausalLM",
    "TinyGPTPhiModel",
    "TinyGPTVConfig",
    "TinyGPTVForConditionalGeneration",
    "build_config",
    "load_vlm",
    "merge_lora",
    "save_vlm",
]
