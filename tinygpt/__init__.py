"""tinygpt: TinyGPT-V-style vision-language models trained on one GPU, run in 4 bits on a CPU."""
