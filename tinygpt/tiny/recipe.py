"""The embedded default (``python train.py`` with no arguments): the whole TinyGPT-V recipe, tiny, on any CPU.

1. synthetic shapes data in the real formats (``python -m tinygpt.tiny.synthetic``), unless already there;
2. the tiny backbones (``tinygpt.tiny.backbones``, cached once per machine);
3. tiny stages 1-4 from ``train_configs/tiny/stage{1..4}.yaml`` with the real training loop, each starting from
   the previous stage's output;
4. the shapes suite on the held-out split after each stage, through evaluate.py's own path (``tinygpt.tiny.shapes``:
   the chat engine, the shapes benchmark, the batched `predict`, so ``python evaluate.py --cfg-path
   eval_configs/shapes.yaml`` gives the same figures), and on the untrained projections ("stage 0": the backbones
   as stage 1 receives them, in stage 1's prompt format): the first 120 items
   of each list for stages 0-3, the whole split (600 questions, ~600 boxes, 300 captions) for the final stage, whose
   figure is the one that counts (120 questions leave a standard error of ~3.5 points); under the table, how many
   items each row used and the ceiling the stages cannot pass: the LLM's accuracy with the true scene code
   (``tinygpt.tiny.llm_ceiling``);
5. a table (stdout), ``results.json``, ``results.txt`` and the per-stage chart ``results.png`` in ``out_dir``;
6. no silent garbage (``tinygpt.evaluation.health``): a greedy-decoding self-check of the backbones' LLM (KV cache
   against plain forwards) and, for full-length runs, floors on the ceiling and on stage 4. When one fails, the
   results are still written, then :class:`BrokenModelError` names what failed, the installed versions and the
   drift canary (``train.py`` exits with status 3).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

from tinygpt.config.load import load_config
from tinygpt.errors import BrokenModelError, UserError
from tinygpt.evaluation.health import FLOORS, broken_message, generation_problems, installed_versions, score_problems
from tinygpt.io_utils import atomic_paths, check_output_dir, writing
from tinygpt.model import load_vlm
from tinygpt.paths import TINY_OUTPUT_DIR, tiny_data_dir, train_configs_dir
from tinygpt.tiny.backbones import current_ceiling, ensure_tiny_backbones
from tinygpt.tiny.pretrain_llm import LLMPretrainSettings
from tinygpt.tiny.pretrain_vision import VisionPretrainSettings
from tinygpt.tiny.shapes import evaluate_loaded, evaluate_shapes
from tinygpt.tiny.synthetic import GENERATOR_VERSION, generate
from tinygpt.train.stage import run_stage

CONFIG_DIR = train_configs_dir() / "tiny"
STAGES = (1, 2, 3, 4)
# Tiny models on CPU evaluate fastest in batches of 128 (docs/tiny-twin-log.md; the same answers as at 48).
EVAL_BATCH = 128
COLUMNS = (("caption_f1", "caption F1"), ("caption_attribute_recall", "attr. recall"),
           ("vqa_accuracy", "VQA acc."), ("grounding_accuracy", "grounding acc."))


def _ensure_data(data_dir: Path, seed: int, progress: bool) -> dict:
    """The data the recipe trains on, written when missing; returns its generator settings (version, seed, scale).
    Data written with other settings (``python -m tinygpt.tiny.synthetic --scale small``, another seed) is used as it
    is, with a warning that names each difference: the results then differ from the recipe's."""
    wanted = {"version": GENERATOR_VERSION, "seed": seed, "scale": "tiny"}
    if (data_dir / "manifest.json").is_file() and (data_dir / "eval" / "vqa.json").is_file():
        try:
            manifest = json.loads((data_dir / "manifest.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            manifest = {}
        made = {key: manifest.get(key) if isinstance(manifest, dict) else None for key in wanted}
        differ = [f"{key} {made[key]!r} (the recipe's: {value!r})" for key, value in wanted.items()
                  if made[key] != value]
        if differ:
            print(f"[tiny] WARNING: {data_dir} was generated with {', '.join(differ)}: the results will differ "
                  "from the recipe's (remove the folder to have the recipe's data written)", file=sys.stderr,
                  flush=True)
        elif progress:
            print(f"[tiny] synthetic data: reusing {data_dir}", flush=True)
        return made
    if progress:
        print(f"[tiny] synthetic data: writing {data_dir}", flush=True)
    generate(data_dir, seed=seed, scale="tiny", progress=progress)
    return wanted


def _stage_options(stage: int, data_dir: Path, out_dir: Path, backbones: Path, max_steps: int | None,
                   progress: bool) -> list[str]:
    options = [f"vars.data_root={data_dir}", f"vars.output_root={out_dir}", "run.resume=false",
               f"run.progress={str(progress).lower()}"]
    if stage == 1:
        options.append(f"model.init_from={backbones}")
    if max_steps is not None:
        options += [f"schedule.total_steps={max_steps}", f"schedule.warmup_steps={max(1, max_steps // 5)}",
                    f"run.save_every={max_steps}"]
    return options


def _stage0_model(backbones: Path):
    """The backbones in stage 1's prompt format: what stage 1 starts from."""
    model = load_vlm(backbones)
    stage1 = load_config(CONFIG_DIR / "stage1.yaml", [f"model.init_from={backbones}"]).model
    model.config.prompt_template = stage1.prompt_template
    model.config.end_sym = stage1.end_sym
    model.config.stop_strings = [stage1.end_sym] if stage1.end_sym.strip() else []
    return model


def format_table(rows: dict[str, dict]) -> str:
    header = f"{'stage':<8}" + "".join(f"{title:>16}" for _, title in COLUMNS) + f"{'seconds':>10}"
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        metrics = row["metrics"]
        cells = "".join(f"{100 * metrics[key]:>15.1f}%" for key, _ in COLUMNS)
        lines.append(f"{name:<8}{cells}{row.get('train_seconds', 0):>10.0f}")
    sizes: dict[tuple, list[str]] = {}
    for name, row in rows.items():
        counts = row["metrics"].get("counts", {})
        sizes.setdefault(tuple(counts.get(k) for k in ("captions", "vqa", "refer")), []).append(name)
    for (captions, vqa, refer), names in sizes.items():
        lines.append(f"{', '.join(names)}: {captions} captions, {vqa} questions, {refer} boxes (held-out scenes)")
    return "\n".join(lines)


def format_ceiling(ceiling: dict) -> str:
    """One line: what the frozen LLM reaches when it reads the true scene code (``tinygpt.tiny.llm_ceiling``)."""
    return (f"ceiling: the tiny LLM reading the true scene code: VQA {100 * ceiling['vqa_accuracy']:.1f}%, "
            f"grounding {100 * ceiling['grounding_accuracy']:.1f}% ({ceiling['scenes']} held-out scenes"
            + "".join(f", {name} {version}" for name, version in ceiling.get("versions", {}).items()) + ")")


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the vision pretraining runs in one)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _plot(rows: dict[str, dict], ceiling: dict | None, path: Path) -> None:
    """Grouped bars per stage (caption F1, attribute recall, VQA, grounding); dashed: the ceiling (the frozen LLM
    reading the true scene code)."""
    import matplotlib  # here, not at the top: choosing the Agg backend on import would change a notebook's backend

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    width = 0.8 / len(COLUMNS)
    figure, axis = plt.subplots(figsize=(7.5, 3.8))
    for i, (key, title) in enumerate(COLUMNS):
        xs = [n + (i - (len(COLUMNS) - 1) / 2) * width for n in range(len(names))]
        axis.bar(xs, [100 * rows[n]["metrics"][key] for n in names], width, label=title, color=f"C{i}")
    if ceiling:  # labelled over stage 0, whose bars stay low
        for key, colour, label in (("vqa_accuracy", "C2", "VQA"), ("grounding_accuracy", "C3", "grounding")):
            axis.axhline(100 * ceiling[key], color=colour, linestyle="--", linewidth=1)
            axis.text(-0.45, 100 * ceiling[key] - 4.5, f"{label} ceiling", color=colour, fontsize=7)
    axis.set_xticks(range(len(names)), names)
    axis.set_ylim(0, 105)
    axis.set_ylabel("% on held-out scenes")
    axis.set_title("tiny TinyGPT-V: each stage on held-out synthetic shapes")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8, ncols=len(COLUMNS), frameon=False)
    figure.tight_layout()
    try:
        figure.savefig(path, format="png", dpi=110)
    finally:
        plt.close(figure)


def health_problems(rows: dict[str, dict], ceiling: dict | None, generation: list[str],
                    floors_apply: bool) -> list[str]:
    """What makes this run's results unbelievable: the generation self-check always; the floors on the ceiling and on
    the final stage only for full-length runs (a shortened run is expected to score low)."""
    problems = list(generation)
    if floors_apply:
        if ceiling:
            problems += score_problems(ceiling, label="LLM ceiling")
        problems += score_problems(rows[f"stage {STAGES[-1]}"]["metrics"], label=f"stage {STAGES[-1]}")
    return problems


def format_health(problems: list[str], floors_apply: bool) -> str:
    floors = (f"floors VQA {100 * FLOORS.vqa:.0f}% / grounding {100 * FLOORS.grounding:.0f}%" if floors_apply
              else "floors not applied to a shortened run")
    return f"health: {'BROKEN: ' + '; '.join(problems) if problems else 'ok'} (decoding self-check, {floors})"


def run_tiny_recipe(
    out_dir: str | os.PathLike = TINY_OUTPUT_DIR,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_steps: int | None = None,
    eval_limit: int | None = 120,
    final_eval_limit: int | None = None,
    llm: LLMPretrainSettings = LLMPretrainSettings(),
    vision: VisionPretrainSettings = VisionPretrainSettings(),
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run everything; returns the results written to ``out_dir/results.json``.

    ``data_dir`` defaults to ``$TINYGPT_TINY_DATA`` or ``data/synthetic``; ``max_steps`` caps every stage's steps
    (quick runs and tests); ``eval_limit`` caps each evaluation list of stages 0-3 and ``final_eval_limit`` those of
    the last stage (None: the whole held-out split).
    """
    start = time.monotonic()
    out = Path(out_dir).resolve()
    data = tiny_data_dir(data_dir).resolve()
    if not CONFIG_DIR.is_dir():
        raise UserError(f"{CONFIG_DIR}: the tiny stage configs are missing (a checkout has them in train_configs/tiny, "
                        "an installed package in tinygpt/train_configs/tiny)")
    check_output_dir(out, "tiny recipe: out_dir", "tiny recipe's stage outputs and results")
    timings: dict[str, float] = {}

    t = time.monotonic()
    data_settings = _ensure_data(data, seed, progress)
    timings["data"] = time.monotonic() - t

    t = time.monotonic()
    backbones = ensure_tiny_backbones(cache_dir, llm=llm, vision=vision, progress=progress)
    timings["backbones"] = time.monotonic() - t

    split = data / "eval"
    rows: dict[str, dict] = {}
    t = time.monotonic()
    stage0 = _stage0_model(backbones)
    generation = generation_problems(stage0.language_model)
    if generation and progress:
        print(f"[tiny] WARNING: {generation[0]}: the scores below will be garbage", flush=True)
    ceiling = current_ceiling(backbones, progress)
    if progress:
        print("[tiny] evaluating stage 0 (untrained projections)", flush=True)
    rows["stage 0"] = {"metrics": evaluate_loaded(stage0, split, limit=eval_limit, batch_size=EVAL_BATCH),
                       "model_dir": str(backbones), "train_seconds": 0.0}
    timings["eval stage 0"] = time.monotonic() - t

    for stage in STAGES:
        path = CONFIG_DIR / f"stage{stage}.yaml"
        cfg = load_config(path, _stage_options(stage, data, out, backbones, max_steps, progress))
        if progress:
            print(f"[tiny] stage {stage}: {cfg.schedule.total_steps} steps -> {cfg.run.output_dir}", flush=True)
        t = time.monotonic()
        model_dir = run_stage(cfg)
        train_seconds = time.monotonic() - t
        timings[f"stage {stage}"] = train_seconds
        t = time.monotonic()
        limit = final_eval_limit if stage == STAGES[-1] else eval_limit
        metrics = evaluate_shapes(model_dir, split, limit=limit, batch_size=EVAL_BATCH)
        timings[f"eval stage {stage}"] = time.monotonic() - t
        rows[f"stage {stage}"] = {"metrics": metrics, "model_dir": str(model_dir), "train_seconds": train_seconds,
                                  "steps": cfg.schedule.total_steps}
        if progress:
            m = metrics
            print(f"[tiny] stage {stage}: caption F1 {m['caption_f1']:.3f}, VQA {m['vqa_accuracy']:.3f}, "
                  f"grounding {m['grounding_accuracy']:.3f} ({train_seconds:.0f} s training)", flush=True)

    timings["total"] = time.monotonic() - start
    results = {"stages": rows, "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "settings": {"data_dir": str(data), "backbones": str(backbones), "max_steps": max_steps,
                            "eval_limit": eval_limit,
                            "final_eval_limit": final_eval_limit, "llm": dataclasses.asdict(llm),
                            "vision": dataclasses.asdict(vision), "seed": seed, "data": data_settings}}
    results["cpu_seconds"] = round(cpu_seconds(), 1)
    if ceiling:
        results["llm_ceiling"] = ceiling
    floors_apply = max_steps is None and llm.steps >= LLMPretrainSettings().steps
    problems = health_problems(rows, ceiling, generation, floors_apply)
    results["health"] = {"ok": not problems, "problems": problems, "floors_applied": floors_apply,
                         "floors": dataclasses.asdict(FLOORS), "versions": installed_versions()}
    table = "\n".join([format_table(rows), *([format_ceiling(ceiling)] if ceiling else []),
                       format_health(problems, floors_apply)])
    files = [out / "results.json", out / "results.txt", out / "results.png"]
    with writing(out, "the tiny recipe's results (results.json, results.txt, results.png)"), \
            atomic_paths(files) as (json_tmp, text_tmp, chart_tmp):  # the three replaced together, or none of them
        json_tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        text_tmp.write_text(table + "\n", encoding="utf-8")
        _plot(rows, ceiling, chart_tmp)
    print(table)
    print(f"[tiny] total {timings['total']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU; results in "
          f"{out / 'results.json'}, chart in {out / 'results.png'}", flush=True)
    if problems:
        raise BrokenModelError(broken_message(problems, str(out / "results.json")))
    return results
