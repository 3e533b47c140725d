"""Training: model build per stage, optimizer, schedule, dataset mixing, the loop, checkpoints, stage runner.

Entry points: ``tinygpt.train.stage.run_stage(cfg) -> output_dir`` and ``python train.py --cfg-path ...``.
Import the submodules directly; this file imports nothing heavy.
"""
