"""No silent garbage: checks that refuse to present a broken model's scores as an ordinary result.

Two kinds of check, both cheap:

* :func:`generation_problems` decodes a few random prompts greedily with transformers' ``generate`` (KV cache on) and
  with a hand-rolled loop of full forwards (no cache, no transformers generation code) and compares the tokens. A
  working model gives the same tokens whatever its weights are, so this catches an upstream release that breaks
  cached decoding (transformers 5.25 renamed the cache argument: every answer became ``red red red …``) on any model,
  trained or not, in well under a second for the tiny twin.
* :func:`score_problems` compares the shapes suite's figures with :data:`FLOORS`: levels that no working build of the
  embedded default comes near (README, "Why the floors"), and the share of answers that do not parse.

Callers write their table and results first, then raise ``tinygpt.errors.BrokenModelError`` with
:func:`broken_message`, which names the installed torch/transformers and the drift canary; every command line prints it
as one ``error:`` line and exits with status 3 (``tinygpt.errors.report_errors``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers


CANARY_COMMAND = "python .ci/canary.py"


@dataclass(frozen=True)
class Floors:
    """Lowest believable figures of the embedded default (fractions). Every working build measured so far: stage-4 VQA
    79.7-88.0%, grounding 51.2-100%; true-code ceiling 81.0-97.6% / 64.3-100%. The broken install of 2026-12-03:
    10.3% / 0.0%, ceiling 11.9% / 0.0%. The floors sit about 30 points under the worst working build and far above
    the broken one; answering "yes" to every question scores about 15%."""

    vqa: float = 0.50
    grounding: float = 0.25
    unparsed: float = 0.50  # more than half of the answers unparsable: VQA answers outside the split's answer set,
                            # grounding answers with no box


FLOORS = Floors()


def installed_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def versions_text() -> str:
    return ", ".join(f"{name} {version}" for name, version in installed_versions().items())


def broken_message(problems: list[str], where: str) -> str:
    """One line: what is wrong, the installed versions, what to run."""
    return (f"{where}: the results are not believable: {'; '.join(problems)} (installed: {versions_text()}). The "
            f"results were written for inspection; if the install changed, run the drift canary: {CANARY_COMMAND}")


@torch.no_grad()
def generation_problems(language_model, prompts: int = 3, prompt_length: int = 6, new_tokens: int = 8,
                        seed: int = 0) -> list[str]:
    """Greedy ``generate`` with the KV cache, from token ids and from embeddings (the VLM's way), against a full
    forward per token on random prompts; [] when every token agrees."""
    generator = torch.Generator().manual_seed(seed)
    embed = language_model.get_input_embeddings()
    ids = torch.randint(1, int(language_model.config.vocab_size), (prompts, prompt_length), generator=generator)
    ids = ids.to(embed.weight.device)
    pad, eos = language_model.config.pad_token_id, language_model.config.eos_token_id
    was_training = language_model.training
    language_model.eval()
    agree = total = 0
    try:
        reference = ids
        for _ in range(new_tokens):
            logits = language_model(reference, use_cache=False).logits[:, -1]
            reference = torch.cat([reference, logits.argmax(-1, keepdim=True)], dim=1)
        for row in range(prompts):
            prompt, mask = ids[row : row + 1], torch.ones_like(ids[row : row + 1])
            want = reference[row, prompt_length:]
            from_ids = language_model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens,
                                               do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad)
            from_embeds = language_model.generate(inputs_embeds=embed(prompt), attention_mask=mask,
                                                  max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                                  use_cache=True, pad_token_id=pad)
            for got in (from_ids[0, prompt_length:].tolist(), from_embeds[0].tolist()):
                total += len(want)
                agree += sum(int(a == b) for a, b in zip(got, want.tolist()))
                if len(got) < len(want) and got and got[-1] == eos:  # stopped at EOS where the reference has it
                    agree += len(want) - len(got)
    finally:
        language_model.train(was_training)
    if agree < total:
        return [f"generation with the KV cache disagrees with a plain forward pass ({100 * agree / total:.0f}% of "
                f"{total} greedy tokens agree; a working install gives 100%)"]
    return []


def score_problems(metrics: dict, floors: Floors = FLOORS, label: str = "") -> list[str]:
    """Shapes-suite figures (``evaluate_loaded``'s or the ceiling's keys) that fall under the floors."""
    prefix = f"{label} " if label else ""
    problems = []
    if "vqa_accuracy" in metrics and metrics["vqa_accuracy"] < floors.vqa:
        problems.append(f"{prefix}VQA {100 * metrics['vqa_accuracy']:.1f}% < floor {100 * floors.vqa:.0f}%")
    if "grounding_accuracy" in metrics and metrics["grounding_accuracy"] < floors.grounding:
        problems.append(f"{prefix}grounding {100 * metrics['grounding_accuracy']:.1f}% < floor "
                        f"{100 * floors.grounding:.0f}%")
    for key, what in (("vqa_unparsed", "VQA answers outside the answer set"),
                      ("grounding_unparsed", "grounding answers without a box")):
        if metrics.get(key, 0.0) > floors.unparsed:
            problems.append(f"{prefix}{100 * metrics[key]:.0f}% {what} (> {100 * floors.unparsed:.0f}%)")
    return problems
