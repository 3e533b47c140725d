"""The shipped FSDP config on a machine without a GPU: the documented command (``accelerate launch --config_file
train_configs/accelerate/fsdp.yaml train.py --cfg-path ...``) trains FSDP on the CPU processes, with no extra flag.
accelerate refuses the config's ``fsdp_sync_module_states`` on a CPU (a traceback before this fix) and would otherwise
set the launch up as plain data parallel; ``tinygpt.train.sharded`` turns the one off and the other into FSDP. The
checkpoint and the stage output gather their full state dicts through torch.distributed.checkpoint's API, so no
"FSDP.state_dict_type() ... deprecated" FutureWarning is printed (twice per process and save before).

The documented launch itself, on 2 CPU processes with no traceback or warning, is tests/test_fsdp.py's (one launch
there serves both, as each costs ~20 s on a 2-core machine); this module checks the environment switch alone."""

from __future__ import annotations

import os

import test_train
from tinygpt.config.schema import RunSection

fresh_accelerate_state = test_train.fresh_accelerate_state  # shared fixture: accelerate's state reset


def test_an_fsdp_launch_without_a_gpu_turns_sync_module_states_off(monkeypatch, caplog):
    """What ``accelerate launch --config_file fsdp.yaml`` puts in the environment, on a CPU: the accelerator is made
    (accelerate raised "FSDP parameter initialization with `sync_module_states=True` is not supported on cpu")."""
    from tinygpt.train.loop import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "true")
    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING", raising=False)  # restored after the test
    monkeypatch.delenv("RANK", raising=False)
    with caplog.at_level("INFO", logger="tinygpt.train"):
        accelerator = make_accelerator(RunSection(output_dir="unused", precision="fp32", cpu=True))
    assert accelerator.device.type == "cpu"
    assert os.environ["FSDP_SYNC_MODULE_STATES"] == "false"
    assert ("FSDP on the CPU: fsdp_sync_module_states turned off (accelerate allows it only on a GPU; every process "
            "loads the same initial weights)") in caplog.text
