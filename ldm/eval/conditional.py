"""Which condition each evaluation sample is drawn with, and how well the samples match it.

A `SamplePlan` gives sample i (drawn with seed + i) the condition i mod K of K conditions, so N samples hold N / K
of each, whichever process draws them:
  unconditional  no condition (pipe(batch_size=...))
  classes        class k = i mod K, with classifier-free guidance (pipe(class_labels=..., guidance_scale=...))
  text           prompt k = i mod K (pipe(prompt=..., guidance_scale=...)); the prompt of class k when the
                 captions come from a template over the class names, so the requested class is known

Where the requested class is known, a classifier scores the samples by its accuracy on it (overall and per class):
how often the model draws what it was asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SamplePlan:
    kind: str  # "none", "class" or "text"
    conditions: list | None = None  # class ids (class) or prompts (text), one per condition k
    labels: list[int] | None = None  # the class that condition k asks for, when known
    guidance_scale: float | None = None  # classifier-free guidance scale (conditional models)

    @classmethod
    def unconditional(cls) -> SamplePlan:
        return cls("none")

    @classmethod
    def classes(cls, num_classes: int, guidance_scale: float) -> SamplePlan:
        return cls("class", list(range(num_classes)), list(range(num_classes)), guidance_scale)

    @classmethod
    def text(cls, prompts: list[str], labels: list[int] | None, guidance_scale: float) -> SamplePlan:
        if labels is not None and len(labels) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(labels)} labels")
        return cls("text", list(prompts), labels, guidance_scale)

    @property
    def num_conditions(self) -> int:
        return len(self.conditions) if self.conditions else 1

    def requested(self, indices: list[int]) -> list[int] | None:
        """The class each sample asks for (None when unknown)."""
        return None if self.labels is None else [self.labels[i % len(self.labels)] for i in indices]

    def pipe_kwargs(self, indices: list[int]) -> dict[str, Any]:
        """The pipeline's conditioning arguments for these samples."""
        if self.kind == "none":
            return {"batch_size": len(indices)}
        chosen = [self.conditions[i % len(self.conditions)] for i in indices]
        key = "class_labels" if self.kind == "class" else "prompt"
        return {key: chosen, "guidance_scale": self.guidance_scale}

    def describe(self) -> dict[str, Any]:
        """What a report says about the plan."""
        if self.kind == "none":
            return {}
        out: dict[str, Any] = {"conditioning": self.kind, "guidance_scale": self.guidance_scale,
                               "num_conditions": self.num_conditions}
        if self.kind == "text" and self.labels is not None:
            out["prompts"] = self.conditions
        return out


def requested_class_accuracy(logits: torch.Tensor, requested: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """The classifier's accuracy on the requested class: overall, and per requested class (in class order)."""
    correct = (logits.argmax(dim=1) == requested).double()
    per_class = [correct[requested == k].mean().item() if (requested == k).any() else float("nan")
                 for k in range(num_classes)]
    return {"accuracy": correct.mean().item(), "per_class_accuracy": per_class}


def plan_for(pipe, data_cfg, info, guidance_scale: float | None = None) -> SamplePlan:
    """The evaluation plan for `pipe` against the data of `data_cfg` (its DataInfo `info`):
    class models sample every class equally; text models every class's prompt when the data's captions come from
    `data.caption_template`, else the data's distinct captions (the requested class is then unknown). Without a
    `guidance_scale`, the model's own (saved with it, `loading.guidance_scale_of`)."""
    from ldm.pipelines.loading import conditioning_of, guidance_scale_of

    kind = conditioning_of(pipe)
    if kind == "none":
        if guidance_scale is not None:
            raise ValueError("guidance_scale: the model is unconditional, it takes no guidance")
        return SamplePlan.unconditional()
    g = guidance_scale_of(pipe) if guidance_scale is None else guidance_scale
    if kind == "class":
        if info.num_classes is not None and info.num_classes != pipe.num_classes:
            raise ValueError(f"the data has {info.num_classes} classes but the model {pipe.num_classes}; evaluate "
                             "a class model on the data it was trained on")
        return SamplePlan.classes(pipe.num_classes, g)
    if data_cfg.caption_template and info.num_classes:
        from ldm.captions import CaptionSource, class_prompts

        source = CaptionSource(None, data_cfg.caption_template, "label", info.class_names)
        return SamplePlan.text(class_prompts(source, info.num_classes), list(range(info.num_classes)), g)
    from ldm.captions import all_captions
    from ldm.data import DataError, build_datasets

    try:
        train, _, captioned = build_datasets(data_cfg, captions=True)
    except DataError as e:
        raise ValueError(f"a text model is evaluated with prompts from the data's captions: {e}") from e
    return SamplePlan.text(list(dict.fromkeys(all_captions(train, captioned.captions))), None, g)


def check_classifier_matches(network, plan: SamplePlan) -> None:
    """The classifier must have the classes the plan asks for, or its accuracy means nothing."""
    if plan.labels is None or network.kind != "classifier":
        return
    wanted = max(plan.labels) + 1
    if network.num_classes != wanted:
        raise ValueError(f"the classifier knows {network.num_classes} classes but the model is asked for class ids up "
                         f"to {wanted - 1}; train the classifier on the model's data (`ldm train-classifier`)")
