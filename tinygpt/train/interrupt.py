"""Ctrl-C and SIGTERM during a training run: an orderly exit that says where a rerun picks up.

    reached = StepReached()
    with interrupts_reported(cfg, reached):      # SIGTERM raises (io_utils.sigterm_raises), so temporaries go
        ...                                      # the loop keeps reached.step = steps done
    # -> TrainingInterrupted("interrupted at step 7; rerun the same command to resume from .../step_00000006 (step 6)")

``TrainingInterrupted`` is a KeyboardInterrupt (any command's ``report_errors`` still says ``interrupted``, exit 130);
the train command prints its message and exits 130 for Ctrl-C, 143 for SIGTERM. Every process of a multi-process run
exits so; only the main one (``reached.main``) prints the line.
"""

from __future__ import annotations

import contextlib
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ..config.schema import RunConfig
from ..errors import UserError
from ..io_utils import sigterm_raises
from . import checkpoint as ckpt
from .run_guard import launched_as_main

SIGTERM_EXIT = 128 + signal.SIGTERM  # what io_utils.sigterm_raises exits with


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM; ``str()`` says at which step and where a rerun resumes. ``main``: this is
    the process that prints it (the others of a multi-process run exit with the same code, silently)."""

    def __init__(self, message: str, exit_code: int, main: bool = True):
        super().__init__(message)
        self.message, self.exit_code, self.main = message, exit_code, main


@dataclass
class StepReached:
    step: Optional[int] = None  # optimizer steps done so far (None: training has not started)
    checkpoint: Optional[Path] = None  # the newest checkpoint this run resumed from or wrote
    wrote: bool = False  # this run has written a checkpoint (and the replaced run's went with its first)
    main: bool = field(default_factory=launched_as_main)  # the main process (the accelerator's word, once it exists)


def interrupt_message(cfg: RunConfig, step: Optional[int], checkpoint: Optional[Path] = None,
                      wrote: bool = False) -> str:
    """``interrupted at step N; ...`` with what a rerun of the same command does. ``checkpoint``: the newest one this
    run resumed from or wrote (``wrote``: this run has written one). With run.resume auto or true a rerun resumes from
    it (a newer one was found damaged, and stays until this run's first checkpoint); with a path, before this run
    wrote one, from that path again (a newer one is the replaced run's). Otherwise the line names what auto takes:
    the newest intact checkpoint (``checkpoint.newest_intact``)."""
    head = "interrupted" if step is None else f"interrupted at step {step}"
    mode = ckpt.resume_mode(cfg.run.resume)
    same = mode in ("latest", "auto") or (mode == "path" and checkpoint is not None and not wrote)
    found = checkpoint if same else None
    if found is None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, UserError):
            found = ckpt.newest_intact(cfg.checkpoint_dir)[0]
    latest = None
    if found is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            latest = f"{found} (step {int(json.loads((found / 'state.json').read_text())['step'])})"
    if mode == "off":
        also = f" (run.resume=auto resumes from {latest})" if latest else ""
        return f"{head}; run.resume is false: a rerun of the same command starts at step 0{also}"
    if latest is None:
        return f"{head}; no checkpoint yet: a rerun starts at step 0"
    if same:
        return f"{head}; rerun the same command to resume from {latest}"
    return f"{head}; rerun with run.resume=auto to resume from {latest}"


@contextlib.contextmanager
def interrupts_reported(cfg: RunConfig, reached: StepReached) -> Iterator[None]:
    """Inside the block SIGTERM raises like Ctrl-C does; either becomes one ``TrainingInterrupted``."""
    with sigterm_raises():
        try:
            yield
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            raise TrainingInterrupted(_message(cfg, reached), 130, reached.main) from None
        except SystemExit as exc:
            if exc.code != SIGTERM_EXIT:
                raise
            raise TrainingInterrupted(_message(cfg, reached), SIGTERM_EXIT, reached.main) from None


def _message(cfg: RunConfig, reached: StepReached) -> str:
    """The line, on the main process (the one that prints it: the others do not verify checkpoints for it)."""
    return interrupt_message(cfg, reached.step, reached.checkpoint, reached.wrote) if reached.main else "interrupted"
