"""The student's pipeline folder: the teacher's pipeline with the student in the denoiser's place, diffusers'
LCMScheduler as its sampler, guidance scale 1 (the teacher's guidance is in its weights) and its own step count.

  unconditional, class   ldm's LatentDiffusionPipeline (`num_inference_steps` and `guidance_scale` in
                         model_index.json; a class DiT in a stock DiTPipeline folder where it fits, as the teacher)
  text                   a stock StableDiffusionPipeline folder (or ldm's text class where the teacher's was), the
                         step count and scale as `_num_inference_steps` and `_guidance_scale` (text_to_image.py)

Both load with `LatentDiffusionPipeline.from_pretrained` / `load_pipeline` and with diffusers'
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`; `ldm sample`, `ldm eval`, `ldm sweep` and the
demo sample them with `lcm` at their own step count when none is given. README.md and distillation.json say how the
student was made.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ldm.config import RunConfig
from ldm.pipelines import LatentDiffusionPipeline
from ldm.pipelines.text_to_image import make_text_pipeline
from ldm.train.conditioning import denoiser_component

RECORD = "distillation.json"  # how the student was made: teacher, skip interval, guidance, steps, loss


def make_student_pipeline(teacher, student: nn.Module, scheduler, num_inference_steps: int):
    """The teacher's pipeline (`ldm.distill.teacher.Teacher`) with `student` as its denoiser, sampled by `scheduler`
    (an LCMScheduler) at guidance scale 1, with the student's own step count."""
    pipe = teacher.pipe
    if teacher.kind == "text":
        return make_text_pipeline(pipe.vae, student, pipe.text_encoder, pipe.tokenizer, scheduler,
                                  guidance_scale=1.0, num_inference_steps=num_inference_steps)
    classes = {} if teacher.kind == "none" else {"class_names": pipe.class_names, "guidance_scale": 1.0,
                                                  "num_classes": pipe.num_classes}
    return LatentDiffusionPipeline(vae=pipe.vae, scheduler=scheduler, **denoiser_component(student), **classes,
                                   num_inference_steps=num_inference_steps)


def write_student_card(folder: Path, cfg: RunConfig, grid_points: int, kind: str) -> None:
    """README.md and distillation.json of a student folder; `kind`: the teacher's conditioning."""
    d = cfg.distill
    record = {"teacher": d.teacher, "method": "latent consistency distillation (Luo et al. 2023)",
              "skip_interval": d.skip_interval, "grid_points": grid_points,
              "num_inference_steps": d.num_inference_steps, "guidance_scale": d.guidance_scale,
              "target_decay": d.target_decay, "timestep_scaling": d.timestep_scaling, "loss": d.loss,
              "max_steps": d.train.max_steps, "max_minutes": d.train.max_minutes, "data": cfg.data.source,
              "data_path": cfg.data.path}
    (Path(folder) / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    index = json.loads((Path(folder) / "model_index.json").read_text())
    stock = isinstance(index["_class_name"], str)  # a stock diffusers folder: no remote code
    loader = index["_class_name"] if stock else "DiffusionPipeline"
    remote = "" if stock else ", trust_remote_code=True"
    condition = {"none": "batch_size=4", "class": "class_labels=[0, 1, 2, 3], guidance_scale=1.0",
                 "text": '["a prompt"] * 4, guidance_scale=1.0'}[kind]
    guidance = "the teacher's own" if d.guidance_scale is None else f"{d.guidance_scale:g}"
    card = f"""---
library_name: diffusers
tags: [latent-consistency-model, ldm, few-step]
---

# A {d.num_inference_steps}-step student of `{d.teacher}`

Distilled with `ldm distill` (latent consistency distillation, Luo et al. 2023) from the teacher's DDIM trajectories
on a grid of {grid_points} timesteps (skip interval {d.skip_interval}){'' if kind == 'none' else f', at guidance scale {guidance}, which is built into the weights'}.
Its sampler is `LCMScheduler`: 1 to 8 steps, best at its own {d.num_inference_steps}, one network pass per step and
no classifier-free guidance at sampling (`guidance_scale=1`).

```python
import torch
from diffusers import {loader}

pipe = {loader}.from_pretrained("{folder}"{remote})
images = pipe({condition}, num_inference_steps={d.num_inference_steps},
              generator=torch.Generator().manual_seed(0)).images
```

With `ldm` installed: `ldm sample --model DIR --out grid.png` samples with its own sampler and step count. How it was
made: `{RECORD}`.
"""
    (Path(folder) / "README.md").write_text(card)
