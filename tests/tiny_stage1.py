"""A short tiny stage-1 run as the write-safety and resume tests start it: the options and the in-process CLI call
(conftest's ``tiny_stage1_run`` trains one for the session; test_write_safety and the resume tests use them)."""

from __future__ import annotations

from pathlib import Path

from tinygpt.config import load_config

STAGE1 = Path(__file__).resolve().parents[1] / "train_configs" / "tiny" / "stage1.yaml"


def stage_options(synthetic: Path, root: Path, base: Path, steps: int, **extra) -> list[str]:
    cfg = load_config(STAGE1)
    opts = [f"vars.data_root={synthetic}", f"vars.output_root={root}", f"schedule.total_steps={steps}",
            "schedule.warmup_steps=1", "run.progress=false", "model.max_txt_len=24", f"model.init_from={base}"]
    opts += [f"data.datasets.{name}.batch_size=2" for name in cfg.active_datasets()]
    return opts + [f"{key.replace('__', '.')}={value}" for key, value in extra.items()]


def train_main(opts: list[str]) -> int:
    import train

    return train.main(["--quiet", "--cfg-path", str(STAGE1), "--options", *opts])
