"""A feature-cache build stages its files in ``.<out name>.<pid>.<random>.tmp`` next to --out, as the exports name
their temporaries; a later build removes those of builds that are no longer running and keeps those of live ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


class Samples(torch.utils.data.Dataset):
    """Two 112-px samples; ``seen`` records the temporaries next to ``out`` while the build runs."""

    def __init__(self, out: Path):
        self.out, self.seen = out, []

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        self.seen += [p.name for p in self.out.parent.iterdir() if p.name.startswith(f".{self.out.name}.")]
        return {"images": torch.rand(1, 3, 112, 112), "turns": [{"user": "<ImageHere>", "assistant": str(i)}],
                "dataset": "shapes"}


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


def staging(parent: Path, name: str, pid: int, tag: str) -> Path:
    """What a build killed half-way leaves: its staging folder with a shard in it."""
    folder = parent / f".{name}.{pid}.{tag}.tmp"
    folder.mkdir()
    (folder / "features-00000.safetensors").write_bytes(b"\0" * 64)
    return folder


@pytest.mark.parametrize("out_name", ["cache", "cache[1]"])
def test_a_build_removes_the_temporaries_of_dead_builds_only(tiny_vlm, tmp_path, caplog, out_name):
    from tinygpt.train.features import write_features

    out = tmp_path / out_name
    dead = staging(tmp_path, out_name, dead_pid(), "k1ll3d00")
    live = staging(tmp_path, out_name, os.getpid(), "l1ve0000")  # another build of the same cache, still running
    other = staging(tmp_path, "other-cache", dead_pid(), "n0tm1ne0")  # a dead build of another cache: not ours
    samples = Samples(out)
    with caplog.at_level("INFO", logger="tinygpt.train"):
        write_features(tiny_vlm(), samples, out, "shapes", None, progress=False)
    assert not dead.exists() and live.is_dir() and other.is_dir()
    assert f"removed {dead} (a temporary of a feature-cache build that is no longer running)" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["samples"] == 2
    building = {name for name in samples.seen if name != live.name}
    assert len(building) == 1 and building.pop().startswith(f".{out_name}.{os.getpid()}.")  # named with its PID
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out_name, live.name, other.name])
