"""Fixes from a review of the training code (loop, mixing, schedule, optimizer, progress)."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class TwoProcesses:
    """The parts of an Accelerator that ``samples_over_processes`` uses, as process 0 of two sees them: ``reduce``
    sums this process's tensor with the other process's (``other``)."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, other: list[int]):
        self.other = other

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        return tensor + torch.tensor(self.other, dtype=tensor.dtype)


def test_samples_per_step_are_summed_over_processes_not_multiplied():
    """Each process draws its own dataset for each micro-batch, with that dataset's batch size (stage 4: 1 to 3), so
    a step's samples are the sum over processes. The loop counted ``this process's samples * processes``: a
    2-process tiny stage 4 (torchrun, batch sizes 2/4/6) logged 4, 12, 4, 4 samples for steps that read 2+4, 6+6,
    2+2 and 2+6, so samples/s (bar, log, TensorBoard, train_summary.json) was wrong."""
    from tinygpt.train.loop import samples_over_processes

    assert samples_over_processes(TwoProcesses([4]), 2) == 6  # was 2 * 2 = 4
    assert samples_over_processes(TwoProcesses([6]), 2) == 8
    assert samples_over_processes(SimpleNamespace(num_processes=1), 5) == 5  # one process: no collective


def _caption_shards(folder, shards: int, per_shard: int) -> str:
    import io
    import json
    import tarfile

    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16)).save(jpeg, format="JPEG")
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:02d}.tar", "w") as tar:
            for k in range(per_shard):
                caption = json.dumps({"caption": f"s{shard} n{k}"}).encode()
                for ext, data in (("jpg", jpeg.getvalue()), ("json", caption)):
                    info = tarfile.TarInfo(f"{shard}{k:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00..{shards - 1:02d}}}.tar")


def _first_pass(pattern: str, rank: int, world: int, steps: int) -> list[str]:
    from tinygpt.data.collate import collate_batch
    from tinygpt.data.formats.webdataset_pairs import WebDatasetPairs
    from tinygpt.train.mixing import DataMixer, MixEntry

    dataset = WebDatasetPairs(pattern, image_size=14, seed=rank, resampled=False, shuffle_buffer=4, name="w",
                              process_text=False)
    mixer = DataMixer([MixEntry("w", dataset, 1, 1.0)], seed=0, total_steps=steps, world_size=world, rank=rank,
                      grad_accum_steps=1, num_workers=0, collate=collate_batch)
    mixer.start(0)
    return [mixer.next_batch(step, 0)[1]["turns"][0][0]["assistant"] for step in range(steps)]


def test_a_finite_stream_is_split_over_processes_by_shard(tmp_path, caplog):
    """With several processes, each read every shard of a finite stream (resampled: false) in its pass, so a pass
    over 2 processes read each sample twice; now process r reads shards r, r + n, ...: one pass, each sample once."""
    pattern = _caption_shards(tmp_path, shards=4, per_shard=3)
    first, second = _first_pass(pattern, 0, 2, 6), _first_pass(pattern, 1, 2, 6)
    everything = {f"s{s} n{k}" for s in range(4) for k in range(3)}
    assert set(first) | set(second) == everything and not set(first) & set(second)
    assert {a.split()[0] for a in first} == {"s0", "s2"} and {a.split()[0] for a in second} == {"s1", "s3"}
    (tmp_path / "few").mkdir()
    few = _caption_shards(tmp_path / "few", shards=1, per_shard=3)
    assert sorted(_first_pass(few, 0, 2, 3)) == ["s0 n0", "s0 n1", "s0 n2"]  # fewer shards than processes: all
    assert "1 shards for 2 training processes" in caplog.text
