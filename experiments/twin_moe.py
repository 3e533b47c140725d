"""Issue 27 on the twin: dense vs MoE stage 5 at the same budget, several seeds. For each seed, the causal tiny stage 4
(``<stage4-root>/causal-seed{seed}/stage4``, trained as ``python train.py`` trains it with ``run.seed`` set; trained
here with ``twin_attention.train_four_stages`` when missing) goes through the tiny stage 5
(``train_configs/tiny/stage5_moe.yaml``: same steps, lr and data, ``run.seed`` set) in variants that differ only in
``model.moe``:

* ``dense``: 1 expert, top-1. Upcycled, a one-expert MoE is the dense FFN exactly (gate 1, no token dropped, zero
  router gradient; ``tests/test_moe.py``), so this trains the dense fc1/fc2 of the same layers with the same budget;
* ``moe-top1``: 4 experts, top-1: the same active parameters per token as dense;
* ``moe-top2``: 4 experts, top-2 (MoE-LLaVA's recipe): twice the active FFN parameters in those layers.

Stage 4 itself is scored too (the ``before`` row). Each model is scored on the held-out shapes split (VQA,
grounding) and the two-image questions (``eval_configs/multi_image.yaml``), as ``twin_attention.py`` does.

    python experiments/twin_moe.py --out out/twin_moe --seeds 0,1,2 --stage4-root out/twin_attention

Writes ``results.json`` (every run: figures, seconds, trainable and active parameters, per-expert load shares) and
``table.md`` (mean ± sample standard deviation per variant, and a line per variant on expert load balance) under
``--out``. Runs already in ``results.json`` are kept, not rerun. Run ``python train.py`` once first (data and
backbones); the data must hold ``eval/multi_image``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent
sys.path.insert(0, str(EXPERIMENTS))

from twin_attention import FIGURES, REPO, mean_spread, multi_image_scores, train_four_stages  # noqa: E402

from tinygpt.config import load_config  # noqa: E402
from tinygpt.model import load_vlm  # noqa: E402
from tinygpt.model.moe import moe_modules  # noqa: E402
from tinygpt.tiny.backbones import ensure_tiny_backbones  # noqa: E402
from tinygpt.tiny.recipe import CONFIG_DIR, _stage_options  # noqa: E402
from tinygpt.tiny.shapes import evaluate_shapes  # noqa: E402
from tinygpt.train.stage import run_stage  # noqa: E402

VARIANTS = {"dense": (1, 1), "moe-top1": (4, 1), "moe-top2": (4, 2)}  # name -> (num_experts, top_k)
STAGE5 = CONFIG_DIR / "stage5_moe.yaml"


def stage4_for(seed: int, root: Path, data: Path, backbones: Path) -> Path:
    model_dir = root / f"causal-seed{seed}" / "stage4"
    if (model_dir / "config.json").is_file():
        return model_dir
    return train_four_stages("causal", seed, data, root / f"causal-seed{seed}", backbones)


def parameter_counts(model_dir: Path) -> dict:
    """The LLM's parameters, those a token passes through (a dense layer's FFN, or top_k of an MoE layer's experts
    plus its router), and the same for the FFNs of the MoE layers alone."""
    lm = load_vlm(model_dir).language_model
    total = sum(p.numel() for p in lm.parameters())
    blocks = moe_modules(lm)
    inactive = moe_active = 0
    for _, block in blocks:
        expert = sum(p.numel() for p in block.experts[0].parameters())
        inactive += (block.num_experts - block.top_k) * expert
        moe_active += block.top_k * expert + block.router.weight.numel()
    return {"llm_params": total, "active_llm_params": total - inactive, "active_moe_ffn_params": moe_active or None}


def score(model_dir: Path, data: Path, out: Path) -> dict:
    shapes = evaluate_shapes(model_dir, data / "eval", batch_size=48)
    summary = multi_image_scores(model_dir, data, out)
    row = {"vqa_accuracy": shapes["vqa_accuracy"], "grounding_accuracy": shapes["grounding_accuracy"],
           "multi_image": summary["value"], "multi_image_unparsed": summary["extras"]["unparsed"]}
    row.update(summary["extras"]["per_family"])
    return row


class MoELogLines(logging.Handler):
    """Keeps the training log's ``step N moe layer 1 load 0.27 0.23 ... | aux loss 0.0201`` lines."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " moe layer " in message:
            self.lines.append(message)

    def last_window(self) -> dict | None:
        """The last logged window's per-expert shares per layer, and its step and auxiliary loss."""
        if not self.lines:
            return None
        step, rest = self.lines[-1].split(" moe ", 1)
        parts = rest.split(" | ")
        shares = {p.split()[1]: [float(s) for s in p.split()[3:]] for p in parts if p.startswith("layer ")}
        return {"step": int(step.split()[1]), "shares": shares, "aux_loss": float(parts[-1].split()[-1])}


def train_stage5(cfg) -> tuple[Path, dict | None]:
    logger, handler = logging.getLogger("tinygpt.train"), MoELogLines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        model_dir = run_stage(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return model_dir, handler.last_window()


def one_run(variant: str, seed: int, stage4: Path, data: Path, root: Path, backbones: Path, steps: int | None) -> dict:
    label = variant if steps is None else f"{variant}@{steps}"
    out = root / f"{label}-seed{seed}"
    row = {"variant": label, "seed": seed, "stage4": str(stage4)}
    started = time.monotonic()
    if variant == "before":
        model_dir, summary = stage4, None
    else:
        experts, top_k = VARIANTS[variant]
        options = _stage_options(5, data, out, backbones, None, False) + [
            f"model.init_from={stage4}", f"run.seed={seed}", f"model.moe.num_experts={experts}",
            f"model.moe.top_k={top_k}"] + ([f"schedule.total_steps={steps}"] if steps is not None else [])
        cfg = load_config(STAGE5, options)
        model_dir, last_window = train_stage5(cfg)
        summary = json.loads((model_dir / "train_summary.json").read_text())["summary"]
        row.update(steps=summary["total_steps"], train_seconds=round(summary["seconds"], 1),
                   trainable_params=summary["trainable_params"], moe_load_share=summary.get("moe_load_share"),
                   last_window_load=last_window, last_loss=summary["last_loss"])
    row["model_dir"] = str(model_dir)
    row.update(parameter_counts(model_dir))
    row.update(score(model_dir, data, out))
    row["seconds"] = round(time.monotonic() - started, 1)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| stage 5 | seeds | trainable | active LLM / token | active FFN, MoE layers | shapes VQA | grounding | "
             "two-image (all) | which has | count in both | compare sizes | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        first = mine[0]
        counts = [f"{first[k]:,}" if first.get(k) else "–"
                  for k in ("trainable_params", "active_llm_params", "active_moe_ffn_params")]
        cells = [mean_spread([100 * r[key] for r in mine if r.get(key) is not None]) for key in FIGURES]
        seconds = mean_spread([r["train_seconds"] for r in mine if r.get("train_seconds") is not None], 0)
        lines.append(f"| {variant} | {','.join(str(r['seed']) for r in mine)} | " + " | ".join(counts + cells)
                     + f" | {seconds} |")
    return "\n".join(lines) + "\n"


def balance(rows: list[dict]) -> str:
    """One line per MoE variant: the whole-run share of each expert per layer, mean over seeds, and the largest
    single share of any seed (1 / num_experts each is perfect balance)."""
    lines = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant and r.get("moe_load_share")]
        if not mine or len(next(iter(mine[0]["moe_load_share"].values()))) < 2:
            continue
        layers = []
        for layer in mine[0]["moe_load_share"]:
            shares = [r["moe_load_share"][layer] for r in mine]
            mean = [statistics.mean(s[e] for s in shares) for e in range(len(shares[0]))]
            layers.append(f"layer {layer} " + " ".join(f"{m:.2f}" for m in mean))
        peak = max((max(s), r["seed"], layer) for r in mine for layer, s in r["moe_load_share"].items())
        lines.append(f"{variant}: " + ", ".join(layers) + f" (share of the top-k choices per expert over the whole "
                     f"run, mean of seeds {','.join(str(r['seed']) for r in mine)}; largest single share "
                     f"{peak[0]:.2f}, seed {peak[1]} layer {peak[2]})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="before,dense,moe-top1,moe-top2")
    parser.add_argument("--steps", type=int, default=None, help="stage 5 steps (default: the config's); the rows "
                        "are labelled variant@steps")
    parser.add_argument("--stage4-root", type=Path, default=None,
                        help="holds causal-seed{N}/stage4 (default: --out; missing ones are trained there)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "synthetic")
    parser.add_argument("--cache", type=Path, default=None, help="the tiny backbones' cache (default: TINYGPT_CACHE)")
    args = parser.parse_args(argv)
    backbones = ensure_tiny_backbones(args.cache, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    data, root = args.data.resolve(), args.out.resolve()
    results = args.out / "results.json"
    rows = json.loads(results.read_text()) if results.is_file() else []
    for seed in [int(s) for s in args.seeds.split(",")]:
        stage4 = stage4_for(seed, (args.stage4_root or args.out).resolve(), data, backbones)
        for variant in args.variants.split(","):
            label = variant if args.steps is None or variant == "before" else f"{variant}@{args.steps}"
            if any(r["variant"] == label and r["seed"] == seed for r in rows):
                continue
            rows.append(one_run(variant, seed, stage4, data, root, backbones,
                                None if variant == "before" else args.steps))
            print(json.dumps(rows[-1]), flush=True)
            results.write_text(json.dumps(rows, indent=1))
    text = table(rows) + "\n" + balance(rows)
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
