"""The small tiny-backbone build that the tests share (a few dozen pretraining steps; see conftest's
``small_backbones``); the full-size default build is exercised by ``python train.py``."""

from tinygpt.tiny.pretrain_llm import LLMPretrainSettings
from tinygpt.tiny.pretrain_vision import VisionPretrainSettings

SMALL_LLM = LLMPretrainSettings(steps=20, batch_size=8, documents=200, ceiling_scenes=4)
SMALL_VISION = VisionPretrainSettings(steps=40, batch_size=8, pool=400, lr=2e-3, warmup=10)
