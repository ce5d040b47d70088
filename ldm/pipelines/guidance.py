"""Class labels and classifier-free guidance, shared by ldm's pipelines.

Classifier-free guidance (Ho & Salimans 2022): one network is trained both with the condition c and, for a share of
the examples (`cond_dropout`), with a null condition ∅. At sampling time the two predictions are extrapolated,

    ε̃(x_t, c) = ε(x_t, ∅) + s · (ε(x_t, c) − ε(x_t, ∅)),

s = 1 gives the conditional model alone, s > 1 trades diversity for fidelity to c. Both predictions come from ONE
batched forward pass over [x_t, x_t] with conditions [∅, c] (diffusers' Stable Diffusion order: unconditional
first). A class-conditional UNet2DModel has `num_class_embeds = num_classes + 1` embeddings; the last one is ∅,
which only the pipeline itself uses.

This file imports only torch: it is copied into every saved model folder beside the pipeline modules.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

ClassLabels = int | str | Sequence[int | str] | torch.Tensor  # or numpy integer arrays and scalars


def num_classes_of(unet) -> int | None:
    """Classes of a class-conditional UNet2DModel (its embeddings less the null one); None if it is unconditional."""
    num_embeds = getattr(unet.config, "num_class_embeds", None)
    return None if num_embeds is None else num_embeds - 1


def null_class_of(transformer) -> int:
    """The null class id of a DiTTransformer2DModel: its last class embedding (diffusers' LabelEmbedding keeps one
    past `num_embeds_ada_norm` for classifier-free guidance); DiTPipeline's 1000 for a model saved for it."""
    return transformer.config.num_embeds_ada_norm


def class_label_ids(class_labels: ClassLabels, num_classes: int, class_names: Sequence[str] | None) -> list[int]:
    """Class ids in [0, num_classes) for integers (Python, numpy or torch) or class names; a ValueError names
    `class_labels` for anything else.

    The null class (id num_classes) is not a class: asking for it is an error, as is any id out of range.
    """
    if hasattr(class_labels, "reshape") and hasattr(class_labels, "tolist"):
        # torch tensors and numpy arrays or scalars (np.int64(3)), flattened to Python numbers; this file does not
        # import numpy, so numpy objects are recognised by these two methods.
        class_labels = class_labels.reshape(-1).tolist()
    if isinstance(class_labels, (numbers.Integral, str)):
        class_labels = [class_labels]
    names = list(class_names) if class_names else None
    valid = (f"ints 0..{num_classes - 1}" + (f" or names {', '.join(map(repr, names))}" if names else ""))
    ids = []
    for label in class_labels:
        if isinstance(label, bool) or not isinstance(label, (numbers.Integral, str)):  # numbers.Integral: np.int64
            # ValueError like every other bad class label, so callers catch one kind of error.
            raise ValueError(f"class_labels: {label!r} is neither a class id nor a class name; use {valid}")  # noqa: TRY004
        if isinstance(label, str):
            if names is None or label not in names:
                raise ValueError(f"class_labels: unknown class name {label!r}; this model knows {valid}")
            label = names.index(label)
        elif not 0 <= label < num_classes:
            null = " (the null class of classifier-free guidance, not a class)" if label == num_classes else ""
            raise ValueError(f"class_labels: {label}{null} is out of range; this model has {valid}")
        ids.append(int(label))
    if not ids:
        raise ValueError("class_labels: empty; give one label per image")
    return ids


def with_null_class(class_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[∅] * B + class_labels: the conditions of one batched guided pass over [x_t, x_t]."""
    return torch.cat([torch.full_like(class_labels, num_classes), class_labels])


def combine_guidance(model_output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Split a [∅ | c] batch of predictions and extrapolate: ε(∅) + s (ε(c) − ε(∅))."""
    uncond, cond = model_output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)
