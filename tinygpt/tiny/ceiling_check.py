"""The drift canary's check of the tiny LLM:  python -m tinygpt.tiny.ceiling_check --check

Builds the cached tiny backbones if ``$TINYGPT_CACHE`` lacks them (about 6 minutes on 2 cores), then, under the
installed torch and transformers, runs the decoding self-check and re-measures the true-code ceiling
(``llm_ceiling.py``) against the floors (``tinygpt.evaluation.health``). Prints one line; with ``--check`` exits 1 when
something is broken (2 for a usage or cache error).
"""

from __future__ import annotations

import argparse
import sys

from tinygpt.errors import report_errors
from tinygpt.evaluation.health import generation_problems, score_problems, versions_text
from tinygpt.model import load_vlm
from tinygpt.tiny.backbones import ensure_tiny_backbones, measure_ceiling


def main(argv: list[str] | None = None, prog: str = "python -m tinygpt.tiny.ceiling_check") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Re-measure the tiny LLM's true-code ceiling under the installed "
                                                 "versions (builds the cached backbones first if needed).")
    parser.add_argument("--check", action="store_true", help="exit 1 when the ceiling or generation is broken")
    parser.add_argument("--cache-dir", help="backbone cache (default $TINYGPT_CACHE or ~/.cache/tinygpt)")
    args = parser.parse_args(argv)
    return report_errors(lambda: _check(args.cache_dir, args.check))


def _check(cache_dir: str | None, check: bool) -> int:
    directory = ensure_tiny_backbones(cache_dir, progress=True)
    problems = generation_problems(load_vlm(directory).language_model)
    ceiling = measure_ceiling(directory)
    problems += score_problems(ceiling, label="ceiling")
    print(f"tiny LLM ceiling: VQA {100 * ceiling['vqa_accuracy']:.1f}%, grounding "
          f"{100 * ceiling['grounding_accuracy']:.1f}% ({ceiling['scenes']} scenes) under {versions_text()}: "
          + ("ok" if not problems else "BROKEN: " + "; ".join(problems)), flush=True)
    return 1 if problems and check else 0


if __name__ == "__main__":
    sys.exit(main())
