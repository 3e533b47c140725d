"""Evaluation speed: samples/s batched against one at a time, PyTorch and GGUF side by side, in one printed table.

    python -m tinygpt.evaluation.bench --model outputs/tiny/stage4 --gguf out/gguf [--benchmark shapes] [--limit 64]

Each backend is loaded once; each measurement runs `predict` (the evaluation path of tinygpt.evaluation.runner) over
the same samples (the loader's ``--limit``) on a fresh engine over that backend (an empty image cache: every image is
encoded in every pass), ``--repeat`` times, and keeps the best pass. ``same answers`` counts the samples whose
prediction equals the one-at-a-time prediction of the same backend. A benchmark to read, not a timed test. Answers
that look like garbage (`runner.garbage_problems` of their official score: a broken model is fast too) print a
``WARNING`` line under the table and on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..chat.engine import ChatEngine
from ..chat.launch import check_device
from ..errors import UserError, report_errors
from .benchmark import Benchmark, Prediction, Sample
from .benchmarks import get_benchmark, names
from .config import default_root
from .report import text_table
from .runner import engine_load_options, garbage_problems


def measure(engine: ChatEngine, samples: Sequence[Sample], batch_size: int,
            repeat: int = 2) -> tuple[float, list[Prediction]]:
    """(best seconds of ``repeat`` passes, predictions), each pass on a fresh engine over ``engine``'s backend (an
    empty image cache). The best pass, not the first: first-use costs (allocations, weight pages, the GGUF
    runtime's repacking) and a shared host's noise are not the rate."""
    from .predict import predict

    best, predictions = float("inf"), []
    for _ in range(repeat):
        fresh = ChatEngine(engine.backend, engine.settings, engine.image_cache_size)
        start = time.perf_counter()
        predictions = list(predict(fresh, samples, batch_size))
        best = min(best, time.perf_counter() - start)
    return best, predictions


def bench_rows(engines: dict[str, ChatEngine], samples_of, batch_size: int, repeat: int = 2,
               check: Optional[Callable[[str, list, list], None]] = None) -> list[list[str]]:
    """Table rows: per backend, the batched pass then the one-at-a-time pass. ``samples_of(engine)`` gives the
    samples (their prompts may depend on the model's template); ``check(label, samples, predictions)`` sees each
    backend's one-at-a-time predictions (`garbage_check`)."""
    rows = [["backend", "batch", "samples", "seconds", "samples/s", "speed-up", "same answers"]]
    for label, engine in engines.items():
        samples = samples_of(engine)
        results = {size: measure(engine, samples, size, repeat) for size in dict.fromkeys((batch_size, 1))}
        single_seconds, single = results[1]
        if check is not None:
            check(label, samples, single)
        for size, (seconds, predictions) in results.items():
            same = sum(int(a == b) for a, b in zip(predictions, single))
            rows.append([label, str(size), str(len(samples)), f"{seconds:.2f}", f"{len(samples) / seconds:.2f}",
                         f"{single_seconds / seconds:.2f}x", f"{same}/{len(samples)}"])
    return rows


def garbage_check(bench: Benchmark, warnings: list[str]) -> Callable[[str, list, list], None]:
    """A `bench_rows` check: the official score of a backend's answers and `runner.garbage_problems`, one line in
    ``warnings`` per backend whose answers look like garbage (a fast broken model is no result)."""
    def check(label: str, samples: list, predictions: list) -> None:
        scores = bench.score(samples, predictions, "official")
        problems = garbage_problems(scores, samples, predictions)
        if problems:
            warnings.append(f"WARNING: {label}: these answers look like garbage, not a model to time: "
                            f"{'; '.join(problems)}")
    return check


def parse_args(argv: list[str] | None = None, prog: str = "python -m tinygpt.evaluation.bench") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a saved model directory (PyTorch), e.g. outputs/tiny/stage4")
    parser.add_argument("--gguf", help="its exported GGUF directory (python -m quantize export --model M --out DIR)")
    parser.add_argument("--benchmark", default="shapes", help=f"one of {', '.join(names())} (default shapes)")
    parser.add_argument("--root", help="the dataset directory (default: the synthetic files for the tiny model)")
    parser.add_argument("--split", help="default: the benchmark's first split")
    parser.add_argument("--limit", type=int, default=16,
                        help="the loader's limit (default 16; shapes: the first N records of each of its 3 files)")
    parser.add_argument("--repeat", type=int, default=2, help="passes per measurement, the best one counts (default 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="the batched measurement's batch (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="GGUF CPU threads (default 2)")
    parser.add_argument("--device", default="cpu", help="PyTorch device (default cpu)")
    return parser.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    if not args.model and not args.gguf:
        raise UserError("--model and/or --gguf: nothing to measure")
    if min(args.limit, args.batch_size, args.repeat) < 1:
        raise UserError(f"--limit, --batch-size and --repeat must be >= 1, got {args.limit}, {args.batch_size} and "
                        f"{args.repeat}")
    if args.model:
        check_device(args.device, "--device")
    bench = get_benchmark(args.benchmark)
    split = args.split or bench.splits[0]
    if split not in bench.splits:
        raise UserError(f"--split: expected one of {', '.join(bench.splits)}, got {split!r}")
    root = Path(args.root) if args.root else default_root(args.benchmark)
    if not root.is_dir():
        raise UserError(f"--root: {root} is not a directory")
    engines = {}
    if args.model:
        engine = ChatEngine.from_model_dir(args.model, device=args.device)
        engines[engine.name] = engine
    if args.gguf:
        engine = ChatEngine.from_gguf(args.gguf, {"n_threads": args.threads})
        engines[engine.name] = engine

    def samples_of(engine: ChatEngine) -> list[Sample]:
        options = {"limit": args.limit, **engine_load_options(args.benchmark, engine)}
        return bench.load(root, split, options)

    print(f"{bench.title}, split {split}, {root}: limit {args.limit}, batch {args.batch_size} against 1, best of "
          f"{args.repeat}")
    warnings: list[str] = []
    rows = bench_rows(engines, samples_of, args.batch_size, args.repeat, garbage_check(bench, warnings))
    print("\n".join(text_table(rows) + warnings))
    for line in warnings:
        print(line, file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report_errors(lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
