"""`ldm distill`: the distillation as a task of the training spine (`ldm.train.spine.fit`), and its entry point.

The spine owns accelerate, the optimizer and LR schedule, clipping, the EMA of what is saved (train.ema_decay),
checkpoints and exact resume, time budgets, logs and grids; this task supplies the student and its loss
(`ldm.distill.consistency`), and after every optimizer step moves the target network θ⁻ towards the student. The
student and the target are one module (`ConsistencyPair`) so that checkpoints hold both and a resume continues
exactly. Latents come from the latent cache of the config's data under the teacher's autoencoder (reused, never
re-encoded, where the teacher's own training built it), the condition from the data's labels or captions.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import LCMScheduler
from PIL import Image
from torch import nn

from ldm.config import ConfigError, RunConfig
from ldm.data import build_datasets, collate
from ldm.distill.consistency import ConsistencyDistillation, consistency_loss
from ldm.distill.student import make_student_pipeline, write_student_card
from ldm.distill.teacher import Condition, Teacher, check_teacher, read_teacher
from ldm.pipelines import latents
from ldm.pipelines.loading import save_pipeline
from ldm.train import best, budget, latent_cache
from ldm.train.devices import use_cpu
from ldm.train.spine import check_trackers, ema_weights, fit

STUDENT_DIR = "student"  # <output_dir>/student: the student's pipeline folder


class ConsistencyPair(nn.Module):
    """The online student θ (trained) and its target θ⁻ (an EMA of θ, no gradients, always in eval mode), both
    initialised from the teacher's denoiser. `forward` runs the student, so that DDP sees its parameters used."""

    def __init__(self, denoiser: nn.Module, transformer: bool):
        super().__init__()
        self.transformer = transformer
        self.student = copy.deepcopy(denoiser).requires_grad_(True)
        self.target = copy.deepcopy(denoiser).requires_grad_(False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        from ldm.pipelines.pipeline_common import denoiser_output

        return denoiser_output(self.student, x, t, cond.class_labels, cond.context, transformer=self.transformer)

    def train(self, mode: bool = True) -> ConsistencyPair:
        super().train(mode)
        self.target.eval()  # no dropout in the target's prediction
        return self

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        """θ⁻ ← μ·θ⁻ + (1 − μ)·θ."""
        for target, online in zip(self.target.parameters(), self.student.parameters()):
            target.lerp_(online.detach(), 1.0 - decay)


def student_scheduler(teacher_config, cfg: RunConfig) -> LCMScheduler:
    """The student's sampler: LCMScheduler on the teacher's noise schedule and parameterisation, with the grid the
    student is distilled on (N = T / k points) and the boundary condition's time scale."""
    d = cfg.distill
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "rescale_betas_zero_snr")
    given = {k: teacher_config[k] for k in keys if teacher_config.get(k) is not None}
    return LCMScheduler(**given, original_inference_steps=teacher_config["num_train_timesteps"] // d.skip_interval,
                        timestep_scaling=d.timestep_scaling, clip_sample=False)


def sampling_conditioning(teacher: Teacher, info, train_dataset):
    """The grids' and evaluations' conditions (ldm.train.conditioning's classes), at the student's guidance scale 1:
    the guidance it learned is in its weights."""
    from ldm.train.conditioning import ClassConditioning, NoConditioning

    if teacher.kind == "class":
        return ClassConditioning(teacher.pipe.num_classes, teacher.pipe.class_names, 0.0, 1.0)
    if teacher.kind == "text":
        from ldm.captions import all_captions, class_prompts
        from ldm.train.text_conditioning import TextConditioning

        prompts = class_prompts(info.captions, info.num_classes)
        labels = list(range(info.num_classes)) if prompts else None
        if prompts is None:
            prompts = list(dict.fromkeys(all_captions(train_dataset, info.captions)))
        return TextConditioning(None, 0.0, 1.0, prompts, labels)
    return NoConditioning()


class DistillTask:
    name = "distill"

    def __init__(self, cfg: RunConfig, teacher: Teacher, conditioning):
        self.cfg, self.teacher, self.conditioning = cfg, teacher, conditioning
        d = cfg.distill
        self.lcd = ConsistencyDistillation(teacher.alphas_cumprod, d.skip_interval, teacher.prediction_type,
                                           d.timestep_scaling)
        self.scheduler = student_scheduler(teacher.pipe.scheduler.config, cfg)
        self.stage_dir = Path(cfg.output_dir) / self.name
        self.best_dir = self.stage_dir / "best"
        self.eval_network, self.eval_real, self.best = None, None, None
        if d.train.eval_every:
            from ldm.eval.evaluation import headline_key
            from ldm.eval.features import FeatureNetworkUnavailable, load_feature_network

            try:  # before any work, as the denoiser stage does
                self.eval_network = load_feature_network(cfg.denoiser.eval_features)
            except (FeatureNetworkUnavailable, FileNotFoundError) as e:
                raise ConfigError("distill.train.eval_every > 0 needs a feature network (denoiser.eval_features): "
                                  f"{e}") from e
            self.best = best.resumed_best(self.stage_dir, d.train,
                                          headline_key(self.eval_network, cfg.denoiser.eval_metric))

    def build_modules(self) -> dict[str, nn.Module]:
        return {"model": ConsistencyPair(self.teacher.denoiser, self.teacher.transformer)}

    def learning_rate(self, module_name: str, default: float) -> float:
        return default

    def attach(self, accelerator, modules: dict[str, nn.Module]) -> None:
        self.accelerator = accelerator
        self.model = modules["model"]  # DDP-wrapped in a multi-process run
        self.pair = accelerator.unwrap_model(self.model)
        self.teacher.to(accelerator.device)

    def after_optimizer_step(self, step: int) -> None:
        self.pair.update_target(self.cfg.distill.target_decay)

    def compute_loss(self, batch: dict, step: int):
        device = self.accelerator.device
        # 1. Latents z_0 ~ q(z|x): from the cached posterior moments (the autoencoder is not run), or by encoding.
        with torch.no_grad():
            if latent_cache.MEAN in batch:
                z0 = latent_cache.sample_latents(self.teacher.pipe.vae, batch)
            else:
                z0 = latents.encode(self.teacher.pipe.vae, batch["pixel_values"])
            z0 = z0.float()
            cond = self.teacher.condition(batch, device)
        # 2. Adjacent points of the grid, t_{n+1} > t_n, and x_{t_{n+1}} of the forward process (global RNG).
        start, end = self.lcd.sample_timesteps(z0.shape[0], device)
        x_start = self.lcd.noisy(z0, torch.randn_like(z0), start)
        # 3. The student's consistency output f_θ(x_{t_{n+1}}, t_{n+1}).
        pred = self.lcd.consistency(self.model(x_start, start, cond), x_start, start)
        # 4. The guided teacher's DDIM step to t_n, and the target's f_θ⁻ there (no gradient).
        with torch.no_grad(), self.accelerator.autocast():
            x_end = self.lcd.solver_step(self.teacher.guided_output(x_start, start, cond).float(), x_start, start, end)
            target_output = self.teacher.output(self.pair.target, x_end, end, cond).float()
            target = self.lcd.consistency(target_output, x_end, end)
        d = self.cfg.distill
        return consistency_loss(pred, target, d.loss, d.huber_c), {}

    def make_pipeline(self, student: nn.Module):
        return make_student_pipeline(self.teacher, student, self.scheduler, self.cfg.distill.num_inference_steps)

    @torch.no_grad()
    def sample_grid(self, model, step: int) -> Image.Image:
        pipe = self.make_pipeline(model.student)
        pipe.set_progress_bar_config(disable=True)
        t = self.cfg.distill.train
        return self.conditioning.sample_grid(pipe, t.num_sample_images, t.seed, self.cfg.distill.num_inference_steps)

    @torch.no_grad()
    def evaluate(self, accelerator, model, ema, step: int) -> dict[str, Any]:
        """Score denoiser.eval_num_samples samples of the student's EMA weights at its own step count, log them as
        eval/*, and keep the best as <output_dir>/distill/best/ (as the denoiser stage does)."""
        from ldm.eval.evaluation import HIGHER_IS_BETTER, evaluate_pipeline, headline_key, reference_features

        u, metric = self.cfg.denoiser, self.cfg.denoiser.eval_metric
        if self.eval_real is None:
            self.eval_real = reference_features(self.eval_network, self.cfg.data, self.cfg.distill.train.batch_size,
                                                accelerator.device)
        with ema_weights(accelerator, model, ema) as pair:
            result = evaluate_pipeline(self.make_pipeline(pair.student), self.eval_network, self.eval_real,
                                       u.eval_num_samples, self.cfg.distill.num_inference_steps,
                                       self.cfg.distill.train.batch_size, seed=self.cfg.distill.train.seed,
                                       names=(metric,), plan=self.conditioning.sample_plan())
            key = headline_key(self.eval_network, metric)
            value = result["metrics"][key]
            accelerator.log({f"eval/{k}": v for k, v in result["metrics"].items() if isinstance(v, float)}, step=step)
            self.best = best.keep(accelerator, self.best_dir, self.best, value, HIGHER_IS_BETTER[metric],
                                  pair.student, self._writer(pair.student),
                                  {"step": step, "metric": key, "value": value, **result})
        accelerator.wait_for_everyone()
        return result

    def _writer(self, student: nn.Module):
        def write(folder: Path) -> None:
            save_pipeline(self.make_pipeline(student), folder)
            write_student_card(folder, self.cfg, self.lcd.num_points, self.teacher.kind)
        return write

    def finish(self, model) -> dict[str, Any]:
        out = Path(self.cfg.output_dir) / STUDENT_DIR
        self._writer(model.student)(out)
        grid_path = self.stage_dir / "samples" / "final.png"
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        self.sample_grid(model, self.cfg.distill.train.max_steps).save(grid_path)
        return {"pipeline": str(out), "grid": str(grid_path)}


def latent_data(cfg: RunConfig, vae, train_dataset, info, captions: bool):
    """(data set, collate_fn): the latent cache of the config's data under the teacher's autoencoder (reused if the
    teacher's training built it), or the images where the data cannot be cached or denoiser.latent_cache is off."""
    reason = None if cfg.denoiser.latent_cache else "denoiser.latent_cache is off"
    reason = reason or latent_cache.skip_reason(cfg.data)
    if reason is not None:
        print(f"latent cache off: {reason}; encoding on the fly")
        return train_dataset, collate
    t = cfg.distill.train
    return latent_cache.build_or_load(vae, cfg.data, info, latent_cache.cache_root(cfg), batch_size=t.batch_size,
                                      cpu=use_cpu(t), captions=captions), latent_cache.collate


def prepare(cfg: RunConfig):
    """Everything checked before any work: the teacher's folder, the config's data, the teacher against both. Returns
    (teacher, training images, their DataInfo)."""
    if not cfg.distill.teacher:
        raise ConfigError("distill.teacher: no teacher; give its pipeline folder (ldm distill --model DIR)")
    pipe = read_teacher(cfg.distill.teacher)
    teacher = Teacher(pipe, cfg.distill.guidance_scale)
    train_dataset, _, info = build_datasets(cfg.data, captions=teacher.kind == "text")
    check_teacher(pipe, cfg, info, cfg.distill.teacher)
    return teacher, train_dataset, info


def train_distill(cfg: RunConfig) -> dict[str, Any]:
    """Distil cfg.distill.teacher into a student; writes its pipeline to <output_dir>/student."""
    check_trackers(cfg.distill.train, "distill")
    started_at = budget.clock()  # a time budget includes loading the teacher and the latent cache
    teacher, train_dataset, info = prepare(cfg)
    conditioning = sampling_conditioning(teacher, info, train_dataset)
    dataset, collate_fn = latent_data(cfg, teacher.pipe.vae, train_dataset, info, teacher.kind == "text")
    task = DistillTask(cfg, teacher, conditioning)
    print(f"distilling {cfg.distill.teacher} ({teacher.kind}, guidance {teacher.guidance_scale:g}, "
          f"{teacher.prediction_type}) on a grid of {task.lcd.num_points} timesteps (skip interval "
          f"{cfg.distill.skip_interval}); the student samples in {cfg.distill.num_inference_steps} steps")
    metrics = fit(task, cfg, cfg.distill.train, dataset, collate_fn, started_at=started_at)
    if metrics:  # the main process: the cost of this run (a resumed one: of its part), for the record
        metrics["minutes"] = round((budget.clock() - started_at) / 60, 2)
        print(f"student saved to {metrics['pipeline']} after {metrics['minutes']} min; samples: {metrics['grid']}")
        (Path(cfg.output_dir) / task.name / "summary.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
