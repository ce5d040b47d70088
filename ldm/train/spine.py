"""The training spine shared by the VAE and the UNet trainers.

A `TrainingTask` supplies the networks and the loss; `fit` owns everything else: accelerate (devices, processes,
mixed precision, gradient accumulation), AdamW, warm-up + LR schedule, clipping, the EMA (`ldm.train.ema`),
checkpoints and exact resume, trackers, the progress bar and sample grids (`ldm.train.logs`), and the answers to
faults (`ldm.train.faults`): NaN/Inf steps skipped, non-finite weights never saved, a checkpoint on SIGTERM/SIGINT. The loop moves values to the host once per
optimizer step (a few flags: NaN/Inf anywhere, a stop signal on any process) and on logging steps.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, send_to_device, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ldm.config import ConfigError, RunConfig, TrainConfig, save_config, stage_section, to_dict
from ldm.train import budget as time_budget
from ldm.train import checkpoint, faults, logs
from ldm.train.devices import configure_backends, prepare_for_device, use_cpu
from ldm.train.ema import ema_weights, make_ema  # noqa: F401  (ema_weights: the trainers' former import)
from ldm.train.loader import make_train_loader, set_epoch
from ldm.train.posthoc_ema import PosthocEMA, make_posthoc_ema


class TrainingTask(Protocol):
    """What a trainer supplies to the spine."""

    name: str  # "vae" or "unet": names the run's sub-directory and the tracker project

    def build_modules(self) -> dict[str, nn.Module]:
        """Trainable networks; the one under "model" is averaged (EMA), sampled and saved."""

    def learning_rate(self, module_name: str, default: float) -> float:
        """Peak learning rate of one module's parameter group."""

    def attach(self, accelerator: Accelerator, modules: dict[str, nn.Module]) -> None:
        """Receive the prepared (device-placed, possibly DDP-wrapped) modules before the first step."""

    def compute_loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch and detached values to log."""

    def sample_grid(self, model: nn.Module, step: int) -> Image.Image | None:
        """A grid from `model` (EMA weights loaded) for the logs; main process only."""

    def finish(self, model: nn.Module) -> dict[str, Any]:
        """Save the final model (EMA weights loaded) and return its summary metrics; main process only."""


@dataclass
class TrainState:
    """Progress that a resumed run must continue from."""

    global_step: int = 0  # optimizer steps taken; a step the fp16 gradient scaler skipped (inf/NaN) does not count
    epoch: int = 0  # passes over the data begun
    batches_in_epoch: int = 0  # micro-batches of the current epoch this process has consumed
    start_step: int = 0  # global_step this run started (or resumed) from
    skipped_steps: int = 0  # optimizer steps the gradient scaler skipped in this run
    bad_steps: int = 0  # optimizer steps skipped in this run for a NaN/Inf loss or gradient
    bad_in_a_row: int = 0  # of which the latest consecutive ones
    losses_finite: torch.Tensor | None = None  # on-device: every micro-batch loss of the step under way was finite
    pending: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # logs of the step under way
    saved: tuple[Path, dict[str, int]] | None = None  # the last checkpoint this run wrote, and its position
    loss_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # on-device sums since the last log step
    loss_count: dict[str, int] = field(default_factory=dict)  # values summed per key (grad norms: per optimizer step)
    posthoc: PosthocEMA | None = None  # train.ema_posthoc: the power-function averages, checkpointed with the rest

    def position(self) -> dict[str, int]:
        """Where training stands, written into every checkpoint (training_state.json)."""
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}


def check_trackers(train_cfg: TrainConfig, stage: str) -> None:
    """Fail at start-up, not at the first log step, when the chosen tracker is not installed."""
    if train_cfg.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"{stage_section(stage)}.train.report_to=wandb, but wandb is not installed: `pip install wandb` (then "
            "`wandb login`), or set report_to to tensorboard or none"
        )


def make_accelerator(train_cfg: TrainConfig, stage_dir: Path) -> Accelerator:
    project = ProjectConfiguration(project_dir=str(stage_dir), logging_dir=str(stage_dir / "logs"))
    return Accelerator(
        mixed_precision=train_cfg.mixed_precision,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        log_with=None if train_cfg.report_to == "none" else train_cfg.report_to,
        project_config=project,
        # A seeded sampler makes the data order a function of (seed, epoch), so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=train_cfg.seed, non_blocking=torch.cuda.is_available()
        ),
        cpu=use_cpu(train_cfg),
        # None leaves the choice to `accelerate config` / `accelerate launch --dynamo_backend`.
        dynamo_backend="inductor" if train_cfg.compile else None,
    )


def build_optimizer(task: TrainingTask, modules: dict[str, nn.Module], cfg: TrainConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    groups = [
        {"params": [p for p in module.parameters() if p.requires_grad], "lr": task.learning_rate(name, cfg.learning_rate)}
        for name, module in modules.items()
    ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
        # The fused kernel updates all parameters in a few launches; CUDA only.
        fused=device.type == "cuda",
    )


def resume(accelerator: Accelerator, model: nn.Module, ema: EMAModel | None, path: Path, state: TrainState,
           batches_per_epoch: int | None, accumulation: int) -> None:
    """Restore the checkpoint at `path` and set `state` to the step and data position it was saved at."""
    step, position = checkpoint.load(accelerator, model, ema, path, state.posthoc)
    if batches_per_epoch is None:
        # A stream's epoch length is unknown: the resumed run continues with a fresh shuffle (seeded by the step)
        # instead of at the exact position.
        position = {"epoch": step, "batches_in_epoch": 0}
    elif position is None:  # written before training_state.json existed: every step took `accumulation` batches
        steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
        position = {"epoch": step // steps_per_epoch, "batches_in_epoch": (step % steps_per_epoch) * accumulation}
    elif position["batches_in_epoch"] >= batches_per_epoch:  # saved after an epoch's last batch: the next begins
        position = {"epoch": position["epoch"] + 1, "batches_in_epoch": 0}
    state.global_step = state.start_step = step
    state.epoch, state.batches_in_epoch = position["epoch"], position["batches_in_epoch"]


def fit(task: TrainingTask, run_cfg: RunConfig, train_cfg: TrainConfig, dataset, collate_fn,
        started_at: float | None = None, budget: time_budget.TimeBudget | None = None) -> dict[str, Any]:
    """Train `task` for train_cfg.max_steps optimizer steps, or for train_cfg.max_minutes (counted from
    `started_at`, a `budget.clock()` reading, or from now), or within `budget` (made by the caller: the autoencoder
    stage of one budget for the whole run, ldm.train.run_budget), and return the task's final metrics."""
    check_trackers(train_cfg, task.name)
    stage_dir = Path(run_cfg.output_dir) / task.name
    resume_path = checkpoint.resolve_resume_path(train_cfg.resume_from_checkpoint, stage_dir / "checkpoints")
    if resume_path is not None:
        checkpoint.check_same_run(run_cfg, task.name, resume_path / "config.yaml", f"checkpoint {resume_path}")
    elif checkpoint.list_checkpoints(stage_dir / "checkpoints"):  # a fresh run would mix its checkpoints with these
        checkpoint.check_same_run(run_cfg, task.name, stage_dir / "config.yaml", f"output_dir {run_cfg.output_dir}")
    # A resumed budget run keeps the time already spent, and its plan unless train.max_minutes changed.
    budget, replanned = time_budget.start(train_cfg, started_at, resume_path, budget)
    accelerator = make_accelerator(train_cfg, stage_dir)
    # Processes on this machine share its cores (torchrun and accelerate set LOCAL_WORLD_SIZE).
    configure_backends(train_cfg, accelerator.device, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    # Per-process seeds (seed + rank) give every rank its own noise; DDP broadcasts rank 0's initial weights.
    set_seed(train_cfg.seed, device_specific=True)
    if accelerator.is_main_process:
        stage_dir.mkdir(parents=True, exist_ok=True)
        save_config(run_cfg, stage_dir / "config.yaml")
        if train_cfg.report_to != "none":
            accelerator.init_trackers(task.name, config=logs.flat_hparams(to_dict(run_cfg)))

    # 1. Networks, optimizer, LR schedule, data: prepared by accelerate for the devices and processes in use.
    modules = {name: prepare_for_device(m, train_cfg, accelerator.device) for name, m in task.build_modules().items()}
    optimizer = build_optimizer(task, modules, train_cfg, accelerator.device)
    total_steps = time_budget.schedule_steps(train_cfg.max_steps, budget)
    if hasattr(task, "set_run_length"):
        task.set_run_length(total_steps if total_steps != time_budget.UNPLANNED_STEPS else None)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    lr_scheduler = get_scheduler(
        train_cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train_cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    if budget is not None and budget.stable_lr:  # warmup-stable-decay, not one of diffusers' schedules
        time_budget.resize_lr_schedule(lr_scheduler, train_cfg, total_steps, accelerator.num_processes, budget)
    loader = make_train_loader(dataset, collate_fn, run_cfg, train_cfg)
    streamed = isinstance(dataset, torch.utils.data.IterableDataset)
    names = list(modules)
    # A stream is already split across processes (make_train_loader); accelerate must not split or dispatch it again.
    prepared = accelerator.prepare(*modules.values(), optimizer, *([] if streamed else [loader]), lr_scheduler)
    modules = dict(zip(names, prepared[: len(names)]))
    optimizer, *loaders, lr_scheduler = prepared[len(names):]
    loader = loaders[0] if loaders else loader
    task.attach(accelerator, modules)
    model = accelerator.unwrap_model(modules["model"])
    ema = make_ema(model, train_cfg, accelerator.device)

    # 2. Resume: step count, weights, optimizer, LR schedule, EMA, RNG states, and the position in the data.
    state = TrainState(posthoc=make_posthoc_ema(model, train_cfg, stage_dir, accelerator, fresh=resume_path is None))
    if resume_path is not None:
        resume(accelerator, model, ema, resume_path, state, None if streamed else len(loader),
               train_cfg.gradient_accumulation_steps)
        accelerator.print(f"resumed from {resume_path} at step {state.global_step}")
        if replanned:  # the optimizer state just loaded holds the old plan's LR
            accelerator.print(replanned)
            time_budget.resize_lr_schedule(lr_scheduler, train_cfg, total_steps, accelerator.num_processes, budget)
    with faults.StopSignals() as signals:
        try:
            _train_loop(task, run_cfg, train_cfg, accelerator, modules, optimizer, lr_scheduler, loader, ema, state,
                        stage_dir, signals, budget)
        except (faults.TrainingInterrupted, faults.NumericalError):
            accelerator.end_training()  # the logs so far reach the disk
            raise

    # 3. Final model from the EMA weights, checked to be finite first.
    accelerator.wait_for_everyone()
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        faults.check_finite_weights({"model": model}, ema, state.global_step, "the final model",
                                    stage_dir / "checkpoints")
        if ema is not None:
            ema.copy_to(model.parameters())
        try:
            metrics = task.finish(model)
        except OSError as e:  # disk full, no permission
            raise checkpoint.CheckpointError(
                f"could not write the trained {task.name} model: {e}. The checkpoints are intact: free space or fix "
                "permissions, then run again with --train.resume_from_checkpoint=latest to write it") from e
        metrics.update(start_step=state.start_step, skipped_steps=state.skipped_steps, bad_steps=state.bad_steps)
    accelerator.wait_for_everyone()  # the saved model is complete when any process returns
    accelerator.end_training()
    return metrics


def _train_loop(task, run_cfg, train_cfg, accelerator, modules, optimizer, lr_scheduler, loader, ema, state,
                stage_dir, signals, budget=None) -> None:
    """Epochs of micro-batches from `state`'s position until train_cfg.max_steps optimizer steps are done, or the
    time budget is spent."""
    total = train_cfg.max_steps if budget is None else budget.planned_steps  # a budget's plan may not be known yet
    progress = tqdm(total=total, initial=state.global_step, desc=f"train {task.name}",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for module in modules.values():
        module.train()
    clock = logs.Clock(state.global_step, train_cfg.batch_size * accelerator.num_processes
                   * train_cfg.gradient_accumulation_steps)
    # A resumed budget run may have nothing left to do: its plan is done or its time spent.
    done = budget is not None and (budget.remaining() <= 0 or state.global_step >= (budget.planned_steps or math.inf))
    while not done and (budget is not None or state.global_step < train_cfg.max_steps):
        set_epoch(loader, state.epoch)
        skip = state.batches_in_epoch  # a resumed run continues inside the epoch it was saved in
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        num_batches = 0
        for batch in epoch_loader:
            num_batches += 1
            state.batches_in_epoch += 1
            batch = send_to_device(batch, accelerator.device)  # a no-op for prepared loaders; streams come on CPU
            step = _micro_step(task, batch, state, train_cfg, accelerator, modules, optimizer, lr_scheduler, signals)
            if step is None:  # inside a gradient accumulation
                continue
            grad_norms, bad, stop = step
            last = False
            if bad:
                _skip_bad_step(state, train_cfg, accelerator, stage_dir)
            elif optimizer.step_was_skipped:
                # The fp16 gradient scaler found inf/NaN gradients and left the weights (and the LR schedule, which
                # accelerate steps only after a real step) alone: the step does not count, and the EMA stays too.
                state.skipped_steps += 1
                logs.commit_step(state, {})
            else:
                state.bad_in_a_row = 0
                logs.commit_step(state, grad_norms)
                if ema is not None:
                    ema.step(accelerator.unwrap_model(modules["model"]).parameters())
                state.global_step += 1
                if hasattr(task, "after_optimizer_step"):  # a distillation's target network follows the student
                    task.after_optimizer_step(state.global_step)
                if state.posthoc is not None:
                    state.posthoc.update(accelerator.unwrap_model(modules["model"]), state.global_step)
                progress.update(1)
                last = budget is None and state.global_step >= train_cfg.max_steps  # a budget replaces max_steps
                if budget is not None:
                    last = time_budget.count_step(task, train_cfg, accelerator, budget, lr_scheduler, progress,
                                                  state.global_step)
                _after_step(task, run_cfg, train_cfg, accelerator, modules, ema, lr_scheduler, state,
                            stage_dir, clock, progress, last, budget)
            if stop:
                _stop(signals, run_cfg, train_cfg, accelerator, modules, ema, state, stage_dir, budget)
            if last:
                done = True
                break
        else:
            if num_batches == 0 and skip == 0:  # a stream (no length to check up front) with less than one batch
                raise ValueError(f"the training data gave no batch of train.batch_size={train_cfg.batch_size} on "
                                 "this process; lower the batch size or add images")
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    progress.close()


def _micro_step(task, batch, state, train_cfg, accelerator, modules, optimizer, lr_scheduler, signals):
    """Forward and backward of one micro-batch; on the last of an accumulation, clip and step unless a loss or
    gradient is NaN/Inf on any process. Returns None inside an accumulation, else (the gradient norms before
    clipping, whether the step was skipped as bad, whether a stop signal arrived)."""
    with accelerator.accumulate(*modules.values()):
        loss, values = task.compute_loss(batch, state.global_step)
        accelerator.backward(loss)
        finite = torch.isfinite(loss.detach()).all()
        state.losses_finite = finite if state.losses_finite is None else state.losses_finite & finite
        for key, value in {"loss": loss.detach(), **values}.items():
            state.pending.setdefault(key, []).append(value)
        if not accelerator.sync_gradients:
            return None
        grad_norms = _clip_gradients(accelerator, modules, train_cfg.max_grad_norm)
        bad, stop = faults.step_flags(accelerator, state.losses_finite, grad_norms, signals)
        # With fp16 the gradient scaler skips inf/NaN steps itself (and must see every step to adapt its scale).
        bad = bad and accelerator.scaler is None
        if not bad:
            optimizer.step()
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    state.losses_finite = None
    return grad_norms, bad, stop


def _skip_bad_step(state: TrainState, train_cfg: TrainConfig, accelerator, stage_dir: Path) -> None:
    """A NaN/Inf loss or gradient: the weights, optimizer, LR schedule and EMA were left alone; count it, drop its
    logs, and stop after train.max_bad_steps in a row."""
    state.bad_steps += 1
    state.bad_in_a_row += 1
    state.pending = {}
    accelerator.print(f"step {state.global_step + 1}: NaN or Inf loss or gradient, step skipped "
                      f"({state.bad_in_a_row} in a row, {state.bad_steps} in this run)")
    if state.bad_in_a_row >= train_cfg.max_bad_steps:
        raise faults.too_many_bad_steps(state.bad_in_a_row, state.global_step + 1, stage_dir / "checkpoints")


def _save_checkpoint(run_cfg, train_cfg, accelerator, modules, ema, state, stage_dir, budget=None) -> Path:
    """The training state at this step boundary, after checking that the weights are finite."""
    checkpoint_dir = stage_dir / "checkpoints"
    faults.check_finite_weights({name: accelerator.unwrap_model(m) for name, m in modules.items()}, ema,
                                state.global_step, f"checkpoint-{state.global_step}", checkpoint_dir)
    path = checkpoint.save(accelerator, modules["model"], ema, run_cfg, checkpoint_dir, state.position(),
                           train_cfg.checkpoints_total_limit, budget, state.posthoc)
    state.saved = (path, state.position())
    return path


def _stop(signals, run_cfg, train_cfg, accelerator, modules, ema, state, stage_dir, budget=None) -> None:
    """A stop signal reached some process: checkpoint this step boundary (all processes) and stop."""
    saved = state.saved
    if saved is None or saved[1] != state.position():  # not saved at this very point already
        saved = (_save_checkpoint(run_cfg, train_cfg, accelerator, modules, ema, state, stage_dir, budget), None)
    raise faults.interrupted(signals.received or faults.STOP_SIGNALS[0], state.global_step, saved[0])


def _clip_gradients(accelerator, modules: dict[str, nn.Module], max_grad_norm: float) -> dict[str, torch.Tensor]:
    """Clip each trained network's all-reduced gradient to max_grad_norm by its own global norm (the VAE's
    discriminator is a separate player, as with the two optimizers of the LDM/taming autoencoder) and return the
    norms before clipping, as device tensors (read on logging steps only). max_grad_norm=0 measures without
    clipping."""
    limit = max_grad_norm or float("inf")
    norms = {}
    for name, module in modules.items():
        key = "grad_norm" if name == "model" else f"{name}_grad_norm"
        if not norms:  # accelerate's clip unscales fp16 gradients first, which may happen once per step
            norms[key] = accelerator.clip_grad_norm_(module.parameters(), limit)
        else:
            norms[key] = torch.nn.utils.clip_grad_norm_(module.parameters(), limit)
    return norms


def _after_step(task, run_cfg, train_cfg, accelerator, modules, ema, lr_scheduler, state, stage_dir, clock,
                progress, last: bool, budget=None) -> None:
    """What follows an optimizer step on its schedule: logs, checkpoint, sample grid, evaluation."""
    step = state.global_step
    if step % train_cfg.log_every == 0 or last:
        logs.log_step(accelerator, state, lr_scheduler, clock.images_per_sec(step), progress)
    model = modules["model"]
    if state.posthoc is not None:
        state.posthoc.after_step(step, last)
    # A budget run also saves its last step: where it stops is not known in advance.
    if train_cfg.checkpointing_steps and (step % train_cfg.checkpointing_steps == 0 or (last and budget is not None)):
        _save_checkpoint(run_cfg, train_cfg, accelerator, modules, ema, state, stage_dir, budget)
    if train_cfg.sample_every and step % train_cfg.sample_every == 0:
        logs.write_sample_grid(task, accelerator, model, ema, stage_dir, step)
    # The last step is evaluated too, so that best/ competes with the final weights. A budget may ask for evaluations
    # of its own (the plateau rule of ldm.train.run_budget).
    every = train_cfg.eval_every or getattr(budget, "eval_every", 0)
    if every and (step % every == 0 or last) and hasattr(task, "evaluate"):
        task.evaluate(accelerator, model, ema, step)  # all processes (UNet: sampling is split)
