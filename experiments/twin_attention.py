"""Issue 27 on the twin: causal vs MMCA attention, same budget, several seeds, on single- and two-image held-out
questions. For each attention kind and seed, the four tiny stages train from the cached tiny backbones exactly as
``python train.py`` trains them (same configs, steps and data), with ``model.attention`` set in stage 1 (later stages
keep it) and ``run.seed`` set in every stage; stage 4 is then scored on the held-out shapes split (VQA, grounding)
and on the two-image questions (``eval_configs/multi_image.yaml``).

    python experiments/twin_attention.py --out out/twin_attention --seeds 0,1,2      # ~4 min per run on 2 cores

Writes ``results.json`` (every run) and ``table.md`` (mean ± sample standard deviation per kind) under ``--out``.
Run ``python train.py`` once first (data and backbones).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tinygpt.config import load_config  # noqa: E402
from tinygpt.tiny.backbones import ensure_tiny_backbones  # noqa: E402
from tinygpt.tiny.recipe import CONFIG_DIR, STAGES, _stage_options  # noqa: E402
from tinygpt.tiny.shapes import evaluate_shapes  # noqa: E402
from tinygpt.train.stage import run_stage  # noqa: E402

FIGURES = ("vqa_accuracy", "grounding_accuracy", "multi_image", "which_has", "count_both", "compare_size")


def train_four_stages(kind: str, seed: int, data: Path, out: Path, backbones: Path) -> Path:
    model_dir = None
    for stage in STAGES:
        options = _stage_options(stage, data, out, backbones, None, False) + [f"run.seed={seed}"]
        if stage == 1:
            options.append(f"model.attention={kind}")
        model_dir = run_stage(load_config(CONFIG_DIR / f"stage{stage}.yaml", options))
    return Path(model_dir)


def multi_image_scores(model_dir: Path, data: Path, out: Path) -> dict:
    run_dir = out / "multi_image_eval"
    config = REPO / "eval_configs" / "multi_image.yaml"
    options = [f"model.path={model_dir}", f"benchmark.root={data / 'eval' / 'multi_image'}", f"run.out_dir={run_dir}"]
    subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--cfg-path", str(config), "--restart", "--quiet",
                    "--options", *options], check=True, cwd=REPO, capture_output=True, text=True)
    return json.loads((run_dir / "summary.json").read_text())


def one_run(kind: str, seed: int, data: Path, root: Path, backbones: Path) -> dict:
    out = root / f"{kind}-seed{seed}"
    started = time.monotonic()
    model_dir = train_four_stages(kind, seed, data, out, backbones)
    shapes = evaluate_shapes(model_dir, data / "eval", batch_size=48)
    summary = multi_image_scores(model_dir, data, out)
    row = {"kind": kind, "seed": seed, "model_dir": str(model_dir), "seconds": round(time.monotonic() - started, 1),
           "vqa_accuracy": shapes["vqa_accuracy"], "grounding_accuracy": shapes["grounding_accuracy"],
           "multi_image": summary["value"], "multi_image_unparsed": summary["extras"]["unparsed"]}
    row.update(summary["extras"]["per_family"])
    return row


def mean_spread(values: list[float], digits: int = 1) -> str:
    """A table cell: mean ± sample standard deviation (0 for one value), "–" for none."""
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| attention | seeds | shapes VQA | grounding | two-image (all) | which has | count in both | "
             "compare sizes |", "|---|---|---|---|---|---|---|---|"]
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        cells = [mean_spread([100 * r[key] for r in mine if r.get(key) is not None]) for key in FIGURES]
        lines.append(f"| {kind} | {','.join(str(r['seed']) for r in mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--kinds", default="causal,mmca")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "synthetic")
    parser.add_argument("--cache", type=Path, default=None, help="the tiny backbones' cache (default: TINYGPT_CACHE)")
    args = parser.parse_args(argv)
    backbones = ensure_tiny_backbones(args.cache, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for kind in args.kinds.split(","):
            rows.append(one_run(kind, seed, args.data.resolve(), args.out.resolve(), backbones))
            print(json.dumps(rows[-1]), flush=True)
            (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
