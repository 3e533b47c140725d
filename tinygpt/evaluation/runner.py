"""Run one benchmark: samples -> predictions (resumable) -> scores -> ``summary.json``.

    summary = run_evaluation(load_eval_config("eval_configs/gqa.yaml"))

Contract:
* ``<out_dir>/predictions.jsonl``: the first line is ``{"fingerprint": {...}}`` (benchmark, split, root, data_id (the
  annotation files' content), model path, model_id, backend, the load options but the limit: what decides the answers,
  not how they are scored; resume.py),
  then one `Prediction` per line (``{"id", "text", "scores"}``), appended and flushed as soon as each is known;
* one run at a time per out_dir: an flock on ``<out_dir>/run.lock`` is held for the whole run (resume.run_lock);
  run.lock, predictions.jsonl or summary.json that is a folder is refused before the model loads; a run that fails
  before writing any prediction removes what it made (the header-only predictions file, and an out_dir it made with
  its run.lock), never what was there;
* a rerun reads it (saying ``resuming: N of M predictions from PATH`` on stderr), keeps the predictions of the
  loaded samples, and predicts only the rest; a last line cut off by a kill is dropped (and redone); a file
  made by another benchmark / split / data / model / backend / prompt is refused with a UserError, or moved aside
  to ``predictions.jsonl.<time>.old`` with ``restart=True``;
* then both scorings (official and tinygpt-v-compat) from the same predictions; ``summary.json`` (written atomically)
  has the headline of ``run.scoring`` (metric, value, extras) and both score dicts, n, backend, model, prompt,
  commit, versions, and under ``timing`` what differs between an interrupted and an uninterrupted run;
* garbage in the official scores (whatever the headline) or the headline's says so (:func:`run_garbage`): a loud
  ``WARNING`` line on stderr and ``"warning"`` in summary.json.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..chat.launch import open_engine
from ..errors import UserError
from ..io_utils import atomic_write_text, check_output_dir, writing
from ..version import tinygpt_version
from .benchmark import SCORINGS, Benchmark, Prediction, Sample
from .benchmarks import get_benchmark
from .config import EvalConfig, default_root
from .metrics import has_nan
from .resume import LOCK, PREDICTIONS, SUMMARY, fingerprint, move_aside, read_predictions, run_lock

__all__ = ["PREDICTIONS", "SUMMARY", "fingerprint", "garbage_problems", "read_predictions", "run_evaluation"]

# garbage thresholds (fractions): a headline under NEAR_ZERO; a yes/no benchmark with every parsed answer one class
# (ALL_SAME_MIN+ of them); more than MOST_UNPARSED of the answers unparsable; every generated answer the same text
# (ALL_SAME_MIN+); any NaN log-probability
NEAR_ZERO = 0.05
MOST_UNPARSED = 0.50
ALL_SAME_MIN = 10


# ---- progress ------------------------------------------------------------------------------------------------------

def progress_bar(total: int, initial: int, label: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(advance(n), close()): a tqdm bar with ETA when tqdm is installed, else a plain stderr line every ~5 s."""
    try:
        from tqdm import tqdm
    except ImportError:
        start, state = time.monotonic(), {"done": initial, "shown": 0.0}

        def advance(n: int) -> None:
            state["done"] += n
            now = time.monotonic() - start
            if now - state["shown"] >= 5 or state["done"] == total:
                rate = (state["done"] - initial) / now if now > 0 else 0.0
                eta = (total - state["done"]) / rate if rate > 0 else float("nan")
                print(f"{label}: {state['done']}/{total} ({rate:.2f} samples/s, ETA {eta:.0f} s)", file=sys.stderr,
                      flush=True)
                state["shown"] = now

        return advance, lambda: None
    bar = tqdm(total=total, initial=initial, desc=label, unit="sample", file=sys.stderr, dynamic_ncols=True)
    return bar.update, bar.close


# ---- garbage -------------------------------------------------------------------------------------------------------

def _unparsed_share(scores: dict) -> float:
    """The largest share of unparsable answers a score dict reports (keys ``unparsed`` / ``*_unparsed``, each a
    fraction of n: the benchmarks' contract, `benchmarks.common.yes_no_figures`). ``strict_*`` figures are left out:
    a strict parse kept beside a benchmark's own rule (POPE's ``strict_unparsed``) does not decide garbage."""
    shares = [float(value) for key, value in scores.items()
              if (key == "unparsed" or key.endswith("_unparsed")) and not key.startswith("strict_")
              and isinstance(value, (int, float))]
    return max(shares, default=0.0)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _majority_share(samples: Sequence[Sample]) -> Optional[float]:
    """The share of the commoner label among yes / no (1 / 0) labels: the accuracy of always giving it; None without
    labels."""
    labels = [bool(s.label) for s in samples if s.label in (0, 1)]
    if not labels:
        return None
    yes = sum(labels) / len(labels)
    return max(yes, 1.0 - yes)


def _one_class(scores: dict, samples: Sequence[Sample], predictions: Sequence[Prediction]) -> Optional[str]:
    """"every answer is yes" / "every answer is no" for a yes/no benchmark (``yes_ratio`` reported) whose parsed
    answers (ALL_SAME_MIN or more) are all one class, whatever its headline (POPE's F1 of answering yes to
    everything is 66.7%); with the accuracy beside the majority-class share of the labels where both are known."""
    ratio = scores.get("yes_ratio")
    if not _number(ratio) or ratio not in (0, 1):
        return None
    n = scores.get("n") if _number(scores.get("n")) else len(predictions)
    unparsed = float(scores["unparsed"]) if _number(scores.get("unparsed")) else 0.0
    parsed = n if ratio == 1 else round(n * (1.0 - unparsed))
    if parsed < ALL_SAME_MIN:
        return None
    problem = ("every answer is yes" if ratio == 1 else
               "every answer is no" if unparsed == 0 else "every parsed answer is no")
    accuracy, majority = scores.get("accuracy"), _majority_share(samples)
    if _number(accuracy) and majority is not None:
        problem += (f": accuracy {100 * accuracy:.1f}% is no better than always giving the commoner label "
                    f"({100 * majority:.1f}%)")
    return problem


def _nan_scores(predictions: Sequence[Prediction]) -> int:
    """How many predictions carry a NaN log-probability (a numerically broken model)."""
    return sum(1 for p in predictions if p.scores and has_nan(p.scores))


def garbage_problems(scores: dict, samples: Sequence[Sample], predictions: Sequence[Prediction]) -> list[str]:
    """Why these results look like a broken model rather than a weak one ([] when none):
    the headline under 5%; a yes/no benchmark (``yes_ratio`` reported) with every parsed answer one class (10 or
    more); more than half of the answers unparsable; every generated answer the same text (10 or more answers);
    any NaN log-probability."""
    problems = []
    value = scores.get("value")
    if _number(value) and value < NEAR_ZERO:
        problems.append(f"{scores.get('metric', 'value')} {100 * value:.1f}% is under {100 * NEAR_ZERO:.0f}%")
    one_class = _one_class(scores, samples, predictions)
    if one_class:
        problems.append(one_class)
    unparsed = _unparsed_share(scores)
    if unparsed > MOST_UNPARSED:
        problems.append(f"{100 * unparsed:.0f}% of the answers are unparsable (> {100 * MOST_UNPARSED:.0f}%)")
    texts = [" ".join(p.text.lower().split()) for p in predictions if p.text is not None]
    if len(texts) >= ALL_SAME_MIN and len(set(texts)) == 1:
        problems.append(f"all {len(texts)} generated answers are {texts[0][:40]!r}")
    nan = _nan_scores(predictions)
    if nan:
        problems.append(f"{nan} of {len(predictions)} predictions have NaN log-probabilities (left out of the "
                        f"likelihood figures)")
    return problems


# ---- the run -------------------------------------------------------------------------------------------------------

def _commit() -> Optional[str]:
    """The checkout's commit (``-dirty`` when tracked files changed), or None outside a git checkout."""
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, timeout=10)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout,
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return head.stdout.strip() + ("-dirty" if changed.returncode == 0 and changed.stdout.strip() else "")


def synthetic_data(root: Path) -> bool:
    """Whether ``root`` holds files tinygpt's synthetic generators wrote (their manifest.json says so)."""
    for manifest in (root / "manifest.json", root.parent / "manifest.json"):
        try:
            if str(json.loads(manifest.read_text(encoding="utf-8")).get("generator", "")).startswith("tinygpt."):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def versions(backend: str) -> dict[str, Optional[str]]:
    names = ["torch", "transformers"] + (["ggml-python"] if backend == "gguf" else [])
    found: dict[str, Optional[str]] = {"python": platform.python_version(), "tinygpt": tinygpt_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _jsonable(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)  # numpy scalars; anything else as text


def score_all(bench: Benchmark, samples: list[Sample], predictions: list[Prediction]) -> dict[str, dict]:
    """Both scorings of the same predictions (a benchmark without a compat scorer says so in its own dict)."""
    return {scoring: bench.score(samples, predictions, scoring) for scoring in SCORINGS}


def _check_root(cfg: EvalConfig) -> None:
    root = Path(cfg.benchmark.root)
    if root.is_dir():
        return
    synthetic = root == default_root(cfg.benchmark.name)
    hint = (" (the synthetic files for the tiny model: `python -m tinygpt.tiny.synthetic` writes data/synthetic/eval"
            " and eval/multi_image, also over an older tree whose files it rewrites byte-identically with the same"
            " seed; `python -m tinygpt.tiny.synthetic.benchmark_files --out data/synthetic/benchmarks` the others)"
            if synthetic else "")
    raise UserError(f"{cfg.blame('benchmark.root')}: {root} is not a directory{hint}; point it at the dataset with "
                    f"--options benchmark.root=DIR")


def engine_load_options(name: str, engine) -> dict:
    """Load options that depend on the model: the shapes suite asks a model trained with the bare template ("{}",
    stages 1-2) for a caption with the bare image (tinygpt.evaluation.benchmarks.shapes)."""
    if name != "shapes":
        return {}
    from .benchmarks.shapes import caption_prompt_for

    return {"caption_prompt": caption_prompt_for(engine)}


def _check_run_files(out_dir: Path, where: str) -> None:
    """run.lock, predictions.jsonl and summary.json, where they exist, are files this run can write: a folder (or a
    read-only file) in their place is a UserError before the model loads, not after the run."""
    for name in (LOCK, PREDICTIONS, SUMMARY):
        path = out_dir / name
        if path.is_dir():
            raise UserError(f"{where}: {path} is a directory, not a file; move it away or choose another run.out_dir")
        if name != SUMMARY and path.exists() and not os.access(path, os.W_OK):  # summary.json is replaced, not written
            raise UserError(f"{where}: {path} is not writable; move it away or choose another run.out_dir")


def _blamed(cfg: EvalConfig, error: UserError, prefix: str, key: str | None = None) -> UserError:
    """A message that starts with ``prefix`` (a benchmark's ``benchmark.options.limit: ...``, the backend's
    ``device cuda: ...``) rewritten to name who set the key (``--options benchmark.options.limit: ...``, or the
    config file); ``key``: the key the prefix stands for (default: the message's first word)."""
    message = str(error)
    if not message.startswith(prefix):
        return error
    if key is None:
        key, _, rest = message.partition(": ")
    else:
        rest = message[len(prefix):].lstrip()
    return UserError(f"{cfg.blame(key)}: {rest}")


def _load(bench: Benchmark, cfg: EvalConfig, extra: dict) -> list[Sample]:
    try:
        samples = bench.load(Path(cfg.benchmark.root), cfg.benchmark.split, {**cfg.load_options, **extra})
    except UserError as error:
        raise _blamed(cfg, error, "benchmark.options.") from None
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise UserError(f"{cfg.benchmark.root}: sample ids repeat in split {cfg.benchmark.split}")
    if not samples:
        raise UserError(f"{cfg.benchmark.root}: split {cfg.benchmark.split} has no samples")
    return samples


def run_garbage(scores: dict[str, dict], headline: str, samples: Sequence[Sample],
                predictions: Sequence[Prediction]) -> list[str]:
    """`garbage_problems` of the official scores, whatever the headline (a lenient compat scorer must not hide
    garbage), and of the headline's too when it is another (each problem once)."""
    problems = garbage_problems(scores["official"], samples, predictions)
    if headline != "official":
        problems += [f"{headline}: {p}" for p in garbage_problems(scores[headline], samples, predictions)
                     if p not in problems]
    return problems


def run_evaluation(cfg: EvalConfig, restart: bool = False, engine=None, quiet: bool = False) -> dict:
    """Evaluate ``cfg``'s model on its benchmark (``engine``: an already open ChatEngine, for tests and the bench);
    returns the summary written to ``<out_dir>/summary.json``. One run at a time per out_dir (``run.lock``)."""
    bench = get_benchmark(cfg.benchmark.name)
    out_dir = check_output_dir(cfg.run.out_dir, cfg.blame("run.out_dir"), "evaluation results")
    _check_run_files(out_dir, cfg.blame("run.out_dir"))
    _check_root(cfg)
    samples = _load(bench, cfg, {})  # the files are checked before the model loads
    with run_lock(out_dir, cfg.blame("run.out_dir")):  # a failure before any prediction removes what the run made
        return _run(cfg, bench, out_dir, samples, restart, engine, quiet)


def _run(cfg: EvalConfig, bench: Benchmark, out_dir: Path, samples: list[Sample], restart: bool, engine,
         quiet: bool) -> dict:
    from .predict import predict  # torch and the engine: imported once the config is known to be good

    path = out_dir / PREDICTIONS
    if restart:
        for moved in move_aside(out_dir):
            print(f"moved aside: {moved}", file=sys.stderr)
    expected = fingerprint(cfg)
    done = read_predictions(path, expected)
    if engine is None:
        try:
            engine = open_engine(cfg.launch)
        except UserError as error:  # "device cuda: no CUDA GPU ..." from the backend: name model.device
            raise _blamed(cfg, error, "device ", "model.device") from None
    extra = engine_load_options(bench.name, engine)
    if extra:
        samples = _load(bench, cfg, extra)
    todo = [s for s in samples if s.id not in done]
    if len(todo) < len(samples):
        print(f"resuming: {len(samples) - len(todo)} of {len(samples)} predictions from {path}", file=sys.stderr,
              flush=True)
    label = f"{cfg.benchmark.name}/{cfg.benchmark.split}"
    advance, close = progress_bar(len(samples), len(samples) - len(todo), label) if not quiet else (
        lambda n: None, lambda: None)
    start = time.monotonic()
    with writing(path, "predictions"), open(path, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write(json.dumps({"fingerprint": expected}) + "\n")
            f.flush()
        try:
            for prediction in predict(engine, todo, cfg.run.batch_size):
                f.write(json.dumps(prediction.to_json()) + "\n")
                f.flush()
                done[prediction.id] = prediction
                advance(1)
        finally:
            close()
    seconds = time.monotonic() - start
    predictions = [done[s.id] for s in samples]
    scores = score_all(bench, samples, predictions)
    headline = scores[cfg.run.scoring]
    problems = run_garbage(scores, cfg.run.scoring, samples, predictions)
    summary = {
        "benchmark": bench.name, "title": bench.title, "split": cfg.benchmark.split,
        "root": str(Path(cfg.benchmark.root).resolve()), "synthetic": synthetic_data(Path(cfg.benchmark.root)),
        "n": len(samples),
        "metric": headline.get("metric", bench.metric), "value": headline.get("value"), "scoring": cfg.run.scoring,
        "extras": {k: v for k, v in headline.items() if k not in ("metric", "value")},
        "scores": scores, "paper": bench.paper,
        "backend": getattr(engine, "name", cfg.launch.model.backend), "model": expected["model"],
        "model_id": expected["model_id"],
        "prompt": {"options": {**expected["options"], **extra}, "example": samples[0].prompt,
                   "template": getattr(getattr(getattr(engine, "backend", None), "prompt", None), "template", None)},
        "config": str(cfg.source), "commit": _commit(), "versions": versions(cfg.launch.model.backend),
        "warning": "; ".join(problems) or None,
        "timing": {"seconds": round(seconds, 3), "predicted": len(todo), "reused": len(samples) - len(todo),
                   "samples_per_second": round(len(todo) / seconds, 3) if todo and seconds > 0 else None},
    }
    with writing(out_dir / SUMMARY, "the summary"):
        atomic_write_text(out_dir / SUMMARY, json.dumps(summary, indent=2, default=_jsonable) + "\n")
    if problems:
        print(f"WARNING: {label}: these figures look like garbage, not a measurement: {summary['warning']}",
              file=sys.stderr, flush=True)
    return summary
