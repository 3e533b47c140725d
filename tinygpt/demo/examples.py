"""The demo's examples: three synthetic-shapes scenes (the tiny twin's generator) and questions of the kinds the tiny
model was trained on, one per task.

Contract:
* the PNGs in ``tinygpt/demo/examples/`` are committed; they are `render_scene` of ``sample_scene(scene_rng(0,
  "demo", i), 224, count=3)`` for i = 0, 1, 2, written once by ``python -m tinygpt.demo.examples`` (tests check
  the committed pixels against the generator);
* `example_rows()` gives the gr.Examples rows ``[message, task, region]``: a MultimodalTextbox value
  ``{"text", "files"}``, a task name of `TASK_CHOICES` and the identify region text ("" when none); each question
  is derived from its scene, so its right answer is known (`refer_answer` writes the training data's answer to a
  ``[refer]`` question, which the tests teach a small model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..tiny.synthetic import texts
from ..tiny.synthetic.scenes import Scene, render_scene, sample_scene, scene_rng

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
SEED, STREAM, SIZE, COUNT = 0, "demo", 224, 3


def example_scenes() -> list[Scene]:
    return [sample_scene(scene_rng(SEED, STREAM, i), SIZE, count=COUNT) for i in range(3)]


def example_path(index: int) -> Path:
    return EXAMPLES_DIR / f"shapes_{index + 1}.png"


def region_text(box: tuple[int, int, int, int]) -> str:
    return ", ".join(str(v) for v in box)


def example_rows() -> list[list]:
    """[message, task, region] rows, in the order they are shown."""
    one, two, three = example_scenes()
    p1, p2, p3 = (str(example_path(i)) for i in range(3))
    return [
        [{"text": "how many shapes are there?", "files": [p1]}, "vqa", ""],
        [{"text": texts.phrase(one.objects[-1]), "files": [p1]}, "refer", ""],
        [{"text": "", "files": [p2]}, "caption", ""],
        [{"text": f"what shape is the {two.objects[0].colour} object?", "files": [p2]}, "vqa", ""],
        [{"text": "", "files": [p3]}, "grounding", ""],
        [{"text": texts.object_list(three), "files": [p3]}, "detection", ""],
        [{"text": "", "files": [p3]}, "identify", region_text(three.objects[0].box)],
    ]


def refer_answer(scene: Scene, index: int = -1) -> str:
    """The training-data answer to ``[refer] <phrase>`` for one object: ``<p>phrase</p> {<x1><y1><x2><y2>}``."""
    obj = scene.objects[index]
    return f"<p>{texts.phrase(obj)}</p> {texts.box_text(scene, obj)}"


def write_examples(directory: Path = EXAMPLES_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for i, scene in enumerate(example_scenes()):
        path = directory / example_path(i).name
        render_scene(scene).save(path, format="PNG", optimize=True)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinygpt.demo.examples",
                                     description="Write the demo's three example PNGs (the committed ones are these).")
    parser.add_argument("out", nargs="?", default=str(EXAMPLES_DIR), help="folder to write into (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in write_examples(Path(args.out)):
        print(path, path.stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
