"""GGUF export and CPU inference for tinygpt models (`python -m quantize ...`).

Export side: gguf_names (shared name tables), qtypes (quantizers), export (HF model dir -> two GGUF files),
random_model (random-weight GGUF files of the real shapes, for benchmarks and tests).
"""
