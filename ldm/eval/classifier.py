"""A small CNN classifier trained on a labelled data set: the feature network of "classifier-FID".

Inception-v3 features (the "I" of FID) describe ImageNet photographs; on 32x32 grayscale digits, or where its
weights cannot be downloaded, a classifier trained on the data set itself gives more telling features. Its
penultimate activations replace Inception's pool3 features in FID/KID/precision-recall, and its logits give an
Inception-Score-style IS and the class distribution of samples. Scores from it are called classifier-FID, etc.:
they are comparable between models evaluated with the same classifier file, never with published Inception FIDs.

Saved as a folder: `classifier.safetensors` (weights) and `config.json` (channels, resolution, num_classes,
feature_dim, test accuracy, class names, data fingerprint).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class ClassifierConfig:
    channels: int  # image channels (1 grayscale, 3 rgb)
    resolution: int  # input images are resolution x resolution (others are resized)
    num_classes: int  # outputs of the last layer
    width: int = 32  # channels of the first conv; doubled at each of the two downsamplings
    feature_dim: int = 128  # size of the penultimate layer: the features of classifier-FID
    test_accuracy: float | None = None  # accuracy on held-out images, written after training
    class_names: list[str] | None = None  # names of the classes, if the data set has them
    data_fingerprint: str | None = None  # ldm.data DataInfo.fingerprint of the training data


class SmallCNN(nn.Module):
    """conv(w, /2) -> conv(2w, /2) -> conv(4w) -> global average pool -> fc(feature_dim) = features -> fc(classes).

    Downsampling first keeps it cheap: about 6 MFLOPs per 32x32 image, so it trains in seconds on a CPU.
    GroupNorm (not BatchNorm) makes features independent of the batch they are computed in.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]

        self.body = nn.Sequential(
            *block(config.channels, w, 2), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, config.feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of any size and 1 or 3 channels -> the classifier's channels and resolution."""
        images = images.to(self.head.weight.device, self.head.weight.dtype)
        c, r = self.config.channels, self.config.resolution
        if images.shape[1] != c:
            images = images.mean(dim=1, keepdim=True) if c == 1 else images.expand(-1, c, -1, -1)
        if images.shape[-2:] != (r, r):
            images = F.interpolate(images, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        return images

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(self.prepare(images))
        return features, self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]


def save_classifier(model: SmallCNN, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / WEIGHTS_NAME)
    (path / CONFIG_NAME).write_text(json.dumps(asdict(model.config), indent=2) + "\n")


def load_classifier(path: str | Path) -> SmallCNN:
    path = Path(path)
    if not (path / WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{path} is not a classifier folder (needs {WEIGHTS_NAME} and {CONFIG_NAME}); make one with "
            "`ldm train-classifier --data CONFIG_OR_FOLDER --out PATH`"
        )
    from ldm.pipelines.loading import check_weights_files

    check_weights_files(path)
    model = SmallCNN(ClassifierConfig(**json.loads((path / CONFIG_NAME).read_text())))
    model.load_state_dict(load_file(path / WEIGHTS_NAME))
    return model.eval().requires_grad_(False)


def _batches(dataset, batch_size: int, shuffle: bool, seed: int):
    from ldm.data import build_dataloader

    return build_dataloader(dataset, batch_size, shuffle=shuffle, num_workers=0, seed=seed, drop_last=False)


def _in_memory(dataset, max_values: int = 100_000_000):
    """Decode a small data set once into (images, labels) tensors, so epochs do not re-run the PIL transforms;
    None for sets of more than `max_values` pixel values, which are streamed through the DataLoader instead."""
    first = dataset[0]["pixel_values"]
    if len(dataset) * first.numel() > max_values:
        return None
    batches = list(_batches(dataset, 512, shuffle=False, seed=0))
    return torch.cat([b["pixel_values"] for b in batches]), torch.cat([b["label"] for b in batches])


@torch.no_grad()
def evaluate_accuracy(model: SmallCNN, dataset, batch_size: int = 256) -> float:
    model.eval()
    correct = total = 0
    for batch in _batches(dataset, batch_size, shuffle=False, seed=0):
        correct += (model(batch["pixel_values"]).argmax(dim=1).cpu() == batch["label"]).sum().item()
        total += len(batch["label"])
    return correct / total


def train_classifier(train_dataset, test_dataset, config: ClassifierConfig, epochs: int = 10,
                     batch_size: int = 64, learning_rate: float = 5e-3, seed: int = 0,
                     device: str = "cpu", log=print) -> SmallCNN:
    """Train with AdamW + cross-entropy (one-cycle LR), then record the held-out accuracy in the config."""
    torch.manual_seed(seed)
    model = SmallCNN(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    memory = _in_memory(train_dataset)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train_dataset) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        if memory is not None:
            order = torch.randperm(len(memory[0]), generator=generator).split(batch_size)
            batches = ({"pixel_values": memory[0][i], "label": memory[1][i]} for i in order)
        else:
            batches = _batches(train_dataset, batch_size, shuffle=True, seed=seed + epoch)
        total_loss = 0.0
        for batch in batches:
            loss = F.cross_entropy(model(batch["pixel_values"]), batch["label"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
        log(f"epoch {epoch + 1}/{epochs}: loss {total_loss / steps_per_epoch:.4f}")
    model.config.test_accuracy = evaluate_accuracy(model, test_dataset)
    return model.eval().requires_grad_(False)
