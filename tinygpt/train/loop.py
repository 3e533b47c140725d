"""The training loop on accelerate: autocast (bf16, or fp16 with loss scaling), gradient accumulation, clipping,
non-finite-loss skipping, resume checkpoints, progress.

One optimizer step = ``grad_accum_steps`` micro-batches per process, each one whole batch of one dataset (see
``mixing.py``). A non-finite loss on any process skips the whole step on every process (gradients dropped, nothing
updated, counted); ``run.max_nonfinite`` of them in a row stop the run with a clear message, leaving the last good
checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._dynamo
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, gather_object

from ..config.schema import RunConfig
from ..data.bad_records import share_counts
from ..errors import UserError
from . import checkpoint as ckpt
from .accelerate_config import accumulation_plugin, agree_deepspeed
from .interrupt import StepReached
from .run_guard import changed_settings, resume_line, run_fingerprint, stage_record
from . import sharded
from .mixing import DataMixer
from .moe_log import MoELoad
from .optim import build_optimizer
from .progress import Progress, format_summary, peak_memory_gb
from .run_totals import RunTotals
from .schedule import WarmupCosine
from .speed import compile_failed, row_layout

log = logging.getLogger("tinygpt.train")
MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class TrainingStopped(UserError):
    """Too many non-finite losses in a row."""


def make_accelerator(run, where: str = ""):
    """An Accelerator for ``run`` (the RunSection). In a single, non-launched process the global accelerate state
    is reset first, so several stages can run in one process (the tiny recipe, tests). Built with
    ``run.grad_accum_steps`` (accelerate_config.py): ``accelerator.backward`` divides each micro-batch's loss by it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(True)
    precision = MIXED[run.precision]
    cuda = torch.cuda.is_available() and not run.cpu
    if precision == "fp16" and not cuda:  # accelerate autocasts nothing for fp16 on a CPU (precision_note says so)
        precision = "bf16"
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)  # text-only batches leave proj1/proj2 unused
    cpu_fsdp = sharded.cpu_fsdp_launch(cuda)
    # cpu=True also when there is no GPU: only then does accelerate see a torchrun/mpirun launch as multi-CPU (gloo)
    accelerator = Accelerator(cpu=not cuda, mixed_precision=precision, kwargs_handlers=[ddp],
                              gradient_accumulation_plugin=accumulation_plugin(run, where))
    return sharded.fsdp_on_cpu(accelerator) if cpu_fsdp else accelerator


def check_deepspeed(cfg: RunConfig, accelerator) -> None:
    """UserError for ``run.grad_accum_steps`` > 1 under DeepSpeed: accelerate's DeepSpeed backward steps the engine at
    every micro-batch this loop does not mark as not the last (it marks none yet), so accumulation would silently be
    one step per micro-batch (docs/training.md, DeepSpeed). Then the DeepSpeed config must clip with
    ``optim.max_grad_norm`` (accelerate_config.agree_deepspeed): said here, before any model loads."""
    if accelerator.distributed_type.name != "DEEPSPEED":
        return
    if cfg.run.grad_accum_steps > 1:
        raise UserError(f"{cfg.origin('run.grad_accum_steps')}: run.grad_accum_steps: {cfg.run.grad_accum_steps} "
                        "is not supported under DeepSpeed yet (it would step at every micro-batch); use 1 and a "
                        "larger batch_size, or run without DeepSpeed")
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is not None:
        agree_deepspeed(cfg, plugin)


def ran_precision(accelerator) -> str:
    """The ``run.precision`` the accelerator runs: fp32, bf16 or fp16 (under DeepSpeed, its config's)."""
    return {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)


def precision_note(cfg: RunConfig, accelerator) -> str | None:
    """One line when the precision that runs is not ``run.precision`` (fp16 without a GPU runs bf16), else None."""
    asked, ran = cfg.run.precision, ran_precision(accelerator)
    if asked == ran:
        return None
    why = ("PyTorch has no fp16 autocast on the CPU" if accelerator.device.type == "cpu"
           else f"the accelerate launch config runs {ran}")
    return (f"{cfg.origin('run.precision')}: run.precision: {asked} cannot run here ({why}); this run trains in "
            f"{ran} instead (set run.precision: {ran} to run it without this warning)")


def compute_loss(model, batch: dict, model_cfg) -> torch.Tensor:
    """Loss of one micro-batch (the data contract's collated batch, plus the optional ``row_layout`` the loop adds:
    packing / bucketing, ``speed.py``). Tests replace this to inject failures."""
    images = batch["images"]
    features = batch.get("image_features")
    return model(turns=batch["turns"], image_counts=batch["image_counts"],
                 pixel_values=None if features is not None else images,
                 image_features=features, max_txt_len=model_cfg.max_txt_len,
                 template=model_cfg.prompt_template, end_sym=model_cfg.end_sym, loss_only=True,
                 row_layout=batch.get("row_layout")).loss


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors (``images``, ``image_features``) moved to ``device``."""
    out = dict(batch)
    for key in ("images", "image_features"):
        if isinstance(out.get(key), torch.Tensor):
            out[key] = out[key].to(device, non_blocking=True)
    return out


@dataclass
class TrainResult:
    start_step: int
    end_step: int
    skipped_steps: int
    last_loss: float | None
    summary: dict = field(default_factory=dict)
    model: object = None  # the prepared (wrapped) model, for saving under FSDP (sharded.model_to_save)


def train(cfg: RunConfig, accelerator, model, mixer: DataMixer, trainable_count: int,
          resume_from: Path | None = None, reached: StepReached | None = None) -> TrainResult:
    """Train from step 0, or from `resume_from` (the checkpoint tinygpt.train.run_guard.check_resume picked).
    ``reached.step`` follows the steps done (for the message when the run is interrupted)."""
    reached = reached or StepReached()
    r, sched_cfg = cfg.run, cfg.schedule
    note = precision_note(cfg, accelerator)
    if note and accelerator.is_main_process:
        log.warning("%s", note)
    schedule = WarmupCosine.from_config(sched_cfg)
    optimizer = build_optimizer(model, cfg.optim, schedule.lr_at(0))
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # no DataLoader goes through prepare(), so DeepSpeed needs the micro-batch size here
        # (clipping and accumulation were set in its config by check_deepspeed, before the model loaded)
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = max(e.batch_size for e in mixer.entries)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # DeepSpeed's engine steps inside accelerator.backward (grad_accum_steps is 1 there, check_deepspeed): a
    # non-finite loss on any process is found before that backward, which is then not run on any process
    steps_in_backward = accelerator.distributed_type.name == "DEEPSPEED"
    clipped = sharded.clip_parameters(accelerator, model, trainable)
    layout = row_layout(r)
    fingerprint = run_fingerprint(cfg)  # kept in each checkpoint: a resume with other settings says so
    if accelerator.is_main_process:
        ckpt.remove_temporaries(cfg.checkpoint_dir)  # a killed run's half-written or half-deleted checkpoints

    start_step, skipped, nonfinite_run, data_state, last_loss, stale = 0, 0, 0, None, None, ()
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, accelerator, model, optimizer)
        start_step, skipped = int(state["step"]), int(state.get("skipped_steps", 0))
        last_loss = state.get("last_loss")
        nonfinite_run, data_state = int(state.get("nonfinite_in_a_row", 0)), state.get("data", {})
        data_state = data_state.get(str(accelerator.process_index), data_state.get("0"))
        changed = changed_settings(state.get("fingerprint"), run_fingerprint(cfg))
        if changed and accelerator.is_main_process:
            log.warning("resuming %s with settings other than the run that wrote it (%s): the result will differ "
                        "from an uninterrupted run", resume_from, "; ".join(changed))
        if state.get("slots") != mixer.slots:
            log.warning("%s was written with %s micro-batch slots per step, this run has %d: the data order "
                        "after resume differs from an uninterrupted run", resume_from, state.get("slots"), mixer.slots)
        if accelerator.is_main_process:
            log.info("resuming from %s (step %d)", resume_from, start_step)
    elif accelerator.is_main_process and resume_line(cfg, None):
        log.info("%s", resume_line(cfg, None))  # run.resume auto found none
    if accelerator.is_main_process:  # the replaced run's (check_resume named them): kept until this run's first
        stale = tuple(ckpt.replaced_by(cfg.checkpoint_dir, start_step if resume_from is not None else None))
    accelerator.wait_for_everyone()
    reached.step = start_step
    mixer.start(start_step, data_state)

    progress = Progress(total_steps=sched_cfg.total_steps, start_step=start_step, enabled=accelerator.is_main_process,
                        show_bar=r.progress, device=accelerator.device, log_every=r.log_every,
                        log_dir=Path(cfg.checkpoint_dir), tensorboard=r.tensorboard,
                        wandb_project=r.wandb_project, run_name=os.path.basename(r.output_dir.rstrip("/")),
                        replacing=bool(stale))
    started, samples_total = time.monotonic(), 0
    model_cfg = cfg.model
    datasets = {entry.name: entry.dataset for entry in mixer.entries}
    moe_load, totals = MoELoad(model), RunTotals()
    if moe_load and resume_from is not None:  # the whole-run load shares go on from the checkpoint's counts
        moe_load.resume(state.get("moe_load"), resume_from, start_step)
    if resume_from is not None:  # so do the summary's seconds and bad records
        totals.resume(state, resume_from, start_step, accelerator.is_main_process)
    try:
        for step in range(start_step, sched_cfg.total_steps):
            lr = schedule.apply(optimizer, step)
            step_losses, step_samples, finite = [], 0, True
            for micro in range(r.grad_accum_steps):
                _, batch = mixer.next_batch(step, micro)
                batch = to_device(batch, accelerator.device)
                if layout is not None:
                    batch["row_layout"] = layout
                step_samples += len(batch["turns"])
                last_micro = micro == r.grad_accum_steps - 1
                sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(model)
                with sync:
                    with accelerator.autocast():
                        loss = compute_loss(model, batch, model_cfg)
                    if moe_load:
                        moe_load.add()
                    finite = finite and bool(torch.isfinite(loss.detach()).item())
                    if not (steps_in_backward and any_process_bad(accelerator, finite)):
                        accelerator.backward(loss)  # divided by r.grad_accum_steps there (make_accelerator)
                step_losses.append(float(loss.detach()))
            any_bad = any_process_bad(accelerator, finite)
            if accelerator.num_processes > 1:  # bad records: judged and summed up over all processes
                share_counts(datasets, lambda counts: sum_over_processes(accelerator, counts))
            step_samples = samples_over_processes(accelerator, step_samples)
            if any_bad:
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                nonfinite_run += 1
                log.warning("step %d: non-finite loss, step skipped (%d in a row, %d in all)", step + 1,
                            nonfinite_run, skipped)
                if nonfinite_run >= r.max_nonfinite:
                    last = [p for p in ckpt.list_checkpoints(cfg.checkpoint_dir) if p not in stale]
                    kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
                    raise TrainingStopped(
                        f"training stopped at step {step + 1}: {nonfinite_run} non-finite losses in a row; {kept}; "
                        f"try: {nonfinite_advice(cfg, accelerator.mixed_precision)}")
            else:
                nonfinite_run = 0
                if cfg.optim.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(clipped, cfg.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                last_loss = sum(step_losses) / len(step_losses)
            samples_total += step_samples
            done = step + 1
            logged = bool(moe_load) and (done % r.log_every == 0 or done == sched_cfg.total_steps)
            progress.step(step, None if any_bad else last_loss, lr, step_samples,
                          dict(mixer.counts), moe_load.metrics() if logged else None)
            if logged:
                if accelerator.is_main_process:
                    log.info("step %d %s", done, moe_load.line())
                moe_load.reset()
            reached.step = done
            final = done == sched_cfg.total_steps  # always checkpointed: a rerun then knows the run is done
            due = final or bool(r.save_every and done % r.save_every == 0)
            if due and nonfinite_run and not final:
                log.warning("step %d: no checkpoint while losses are non-finite (the last good one stays)", done)
            elif due:
                mixer.restart_streams(done)  # streams restart at every checkpoint, so its data position is exact
                state = {"skipped_steps": skipped, "nonfinite_in_a_row": nonfinite_run, "slots": mixer.slots,
                         "schedule": schedule.state_dict(), "last_loss": last_loss, "fingerprint": fingerprint,
                         "stage": stage_record(cfg), "data": _gather_data_state(accelerator, mixer.state()),
                         **totals.state(time.monotonic() - started, datasets)}
                if moe_load:
                    state["moe_load"] = moe_load.state()  # the main process's counts (it writes state.json)
                reached.checkpoint = ckpt.save_checkpoint(accelerator, model, optimizer, done, cfg.checkpoint_dir,
                                                          state, r.keep_last, replaces=stale,
                                                          on_placed=progress.checkpointed)  # the curve follows it
                reached.wrote, stale = True, ()  # the replaced run's checkpoints went with this one
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        raise compile_failed(cfg, exc) from exc
    finally:
        progress.close()
    seconds = time.monotonic() - started
    end_step = sched_cfg.total_steps
    summary = {
        "start_step": start_step, "end_step": end_step, "total_steps": sched_cfg.total_steps,
        **totals.summary(seconds, datasets),  # seconds and bad_records (all processes) of the whole run
        "samples_per_s": samples_total / seconds if seconds > 0 else 0.0,
        "steps_per_s": (end_step - start_step) / seconds if seconds > 0 else 0.0,
        "trainable_params": trainable_count, "skipped_steps": skipped, "last_loss": last_loss,
        "peak_mem_gb": peak_memory_gb(accelerator.device), "counts": dict(mixer.counts),
        "processes": accelerator.num_processes, "distributed_type": accelerator.distributed_type.name,
        "precision": ran_precision(accelerator), **({"precision_requested": r.precision} if note else {}),
    }
    if moe_load:  # moe_load_share: layer -> per-expert share of the run's top-k choices (resumes included)
        summary.update(moe_load.summary())
    if accelerator.is_main_process:
        log.info("%s", format_summary(summary))
    return TrainResult(start_step, end_step, skipped, last_loss, summary, model)


def nonfinite_advice(cfg: RunConfig, mixed_precision: str) -> str:
    """What to try after non-finite losses, leaving out what is already in effect: a lower ``schedule.init_lr``
    always (with its value), ``optim.max_grad_norm`` when unset, a wider precision than the one that ran
    (``mixed_precision``: accelerate's "fp16", "bf16" or "no")."""
    tries = [f"lower schedule.init_lr (now {cfg.schedule.init_lr:g})"]
    if cfg.optim.max_grad_norm is None:
        tries.append("set optim.max_grad_norm (e.g. 1.0)")
    if mixed_precision == "fp16":
        tries.append("use run.precision bf16 or fp32")
    elif mixed_precision == "bf16":
        tries.append("use run.precision fp32")
    if len(tries) == 1:
        return tries[0]
    return ", ".join(tries[:-1]) + " or " + tries[-1]


def any_process_bad(accelerator, finite: bool) -> bool:
    """True on every process when the loss was not finite on any of them."""
    flag = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def sum_over_processes(accelerator, values: list[int]) -> list[int]:
    """The element-wise sum of ``values`` over all processes (collective)."""
    total = accelerator.reduce(torch.tensor(values, dtype=torch.int64, device=accelerator.device), reduction="sum")
    return [int(v) for v in total.tolist()]


def samples_over_processes(accelerator, samples: int) -> int:
    """The samples of one step on all processes together (collective with several). Not ``samples * processes``:
    each process draws its own dataset for each micro-batch, and datasets have their own batch sizes."""
    if accelerator.num_processes == 1:
        return samples
    return sum_over_processes(accelerator, [samples])[0]


def _gather_data_state(accelerator, state: dict) -> dict:
    """Each process's data position, keyed by process index (streams are per process)."""
    if accelerator.num_processes == 1:
        return {"0": state}
    states = gather_object([state])
    return {str(i): s for i, s in enumerate(states)}
