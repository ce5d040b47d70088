"""Feature networks for FID/KID/precision-recall/IS, feature extraction and the cache of real-data features.

Two networks share one interface (`forward(images in [-1, 1]) -> (N, d)` features, `features_and_logits`,
`num_features`, a `name` that every report prints, a `fingerprint` of the weights), so every metric has one code
path. Being `nn.Module`s with `num_features`, they also plug into torchmetrics' FrechetInceptionDistance /
KernelInceptionDistance as a custom `feature` network.

  InceptionFeatures   Inception-v3 pool3 (2048-d) and logits via torchmetrics / torch-fidelity: FID proper. Its
                      weights are downloaded once by torch-fidelity (needs internet and `pip install torch-fidelity`).
  ClassifierFeatures  the penultimate layer of a classifier trained with `ldm train-classifier`: "classifier-FID".

Real-data features depend only on (data set, feature network), so they are cached under
`<cache_dir>/real-<data fingerprint>-<split>-<network fingerprint>-<n>.safetensors` and a second evaluation reuses them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.eval.classifier import WEIGHTS_NAME, load_classifier

# torch-fidelity's Inception weights (the TF FID network ported), as stored in torch.hub's checkpoint folder.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


class FeatureNetworkUnavailable(RuntimeError):
    """The feature network cannot be loaded here (weights missing and not downloadable); the message says what to do."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("LDM_CACHE_DIR", Path.home() / ".cache" / "ldm")) / "features"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ClassifierFeatures(nn.Module):
    """Penultimate activations (features) and logits of a `ldm.eval.classifier.SmallCNN`."""

    kind = "classifier"
    metric_prefix = "classifier-"  # scores in this feature space are classifier-FID, never "FID"

    def __init__(self, path: str | Path):
        super().__init__()
        path = Path(path)
        self.model = load_classifier(path)
        self.config = self.model.config
        self.num_features = self.config.feature_dim
        self.num_classes = self.config.num_classes
        self.fingerprint = _file_sha256(path / WEIGHTS_NAME)[:16]
        acc = self.config.test_accuracy
        self.name = (f"classifier-FID features: SmallCNN classifier {path} ({self.num_features}-d penultimate layer, "
                     f"{self.num_classes} classes, test accuracy "
                     f"{'n/a' if acc is None else f'{100 * acc:.1f}%'}, sha256 {self.fingerprint})")

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.features_and_logits(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features (2048-d) and its 1008 logits, as torchmetrics' FID and IS use them."""

    kind = "inception"
    metric_prefix = ""
    num_features = 2048

    def __init__(self):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        # antialias=False: torch-fidelity's TF1-style bilinear resize to 299, as the original TF FID code (and
        # published FIDs) do; torchmetrics' own default (antialias=True) gives slightly different numbers.
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                      antialias=False)
        self.num_classes = 1008
        self.fingerprint = INCEPTION_WEIGHTS_FILE.rsplit("-", 1)[-1].split(".")[0] + "-tf1resize"
        self.name = "Inception-v3 pool3 features (torch-fidelity inception-v3-compat, 2048-d): FID"

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [-1, 1] -> uint8 RGB, which the network resizes to 299x299 itself.
        images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        # The network's own forward returns only the first of its features_list; this returns both, in order.
        features, logits = self.net._torch_fidelity_forward(images.to(next(self.net.parameters()).device))
        return features.reshape(len(images), -1), logits.reshape(len(images), -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


def inception_unavailable_reason() -> str | None:
    """Why Inception cannot be used here, or None if it can (weights cached, or downloadable)."""
    import importlib.util

    alternative = ("Alternative: train a classifier on your data and use its features (reported as classifier-FID, "
                   "comparable between your own models only): `ldm train-classifier --data configs/digits.yaml --out "
                   "runs/digits/classifier`, then add `--features runs/digits/classifier`.")
    if importlib.util.find_spec("torch_fidelity") is None:
        return ("Inception FID needs torch-fidelity, which is not installed (`pip install torch-fidelity`; its "
                f"Inception-v3 weights, {INCEPTION_WEIGHTS_FILE}, are then downloaded once). " + alternative)
    weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false")
    if not weights.is_file() and offline:
        return (f"Inception FID needs the Inception-v3 weights {weights}, which are not there and cannot be downloaded "
                "(offline: HF_HUB_OFFLINE is set). Run once with internet access to download them. " + alternative)
    return None


def load_feature_network(path: str | Path | None) -> ClassifierFeatures | InceptionFeatures:
    """A classifier folder's features, or (path None) Inception's; FeatureNetworkUnavailable says why not."""
    if path is not None:
        return ClassifierFeatures(path)
    reason = inception_unavailable_reason()
    if reason is not None:
        raise FeatureNetworkUnavailable(reason)
    try:
        return InceptionFeatures()
    except Exception as e:  # a failed download surfaces as URLError, OSError, RuntimeError, ...
        raise FeatureNetworkUnavailable(f"could not load the Inception-v3 weights: {e}") from e


@torch.no_grad()
def extract(network, batches, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Features, logits (and labels, if the batches have them) of every image of `batches`, on the CPU.

    `batches` yields image tensors in [-1, 1] or {"pixel_values", "label"} dicts. RGB images also get "colour": (N, 2)
    mean chroma and coloured-pixel share per image (`ldm.eval.colour.image_colour`).
    """
    from ldm.eval.colour import image_colour

    network = network.to(device).eval()
    features, logits, labels, colour = [], [], [], []
    for batch in batches:
        images = batch["pixel_values"] if isinstance(batch, dict) else batch
        f, lg = network.features_and_logits(images.to(device))
        features.append(f.double().cpu())
        logits.append(lg.double().cpu())
        if images.shape[1] == 3:
            colour.append(image_colour(images.cpu()))
        if isinstance(batch, dict) and "label" in batch:
            labels.append(batch["label"].cpu())
    out = {"features": torch.cat(features), "logits": torch.cat(logits)}
    if colour:  # RGB: each image's mean chroma and coloured-pixel share (ldm.eval.colour), so a gray model shows
        out["colour"] = torch.cat(colour)
    if labels:
        out["labels"] = torch.cat(labels)
    return out


def cached_real_features(network, dataset, data_fingerprint: str, split: str, cache_dir: str | Path | None,
                         batch_size: int = 256, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Features of every image of `dataset`, read from the cache if this (data, network) pair was seen before.

    With several processes each extracts a shard and the shards are gathered (accelerate); the main process writes
    the cache file (and, on a node without a shared file system, that node's local main process its own copy).
    `cache_dir=None` disables the cache.
    """
    from accelerate.utils import gather_object

    from ldm.data import build_dataloader
    from ldm.train.devices import process_state
    from ldm.train.shared_files import temporary_name, write_once

    state = process_state()
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"real-{data_fingerprint}-{split}-{network.fingerprint}-{len(dataset)}.v2.safetensors"
        # Together: a process that returned here alone would leave the others waiting in gather_object below (nodes
        # without a shared file system may differ).
        if all(gather_object([path.is_file()])):
            return load_file(path)
    with state.split_between_processes(list(range(len(dataset)))) as indices:
        shard = dataset.select(indices) if len(indices) < len(dataset) else dataset
        loader = build_dataloader(shard, batch_size, shuffle=False, num_workers=0, seed=0, drop_last=False)
        local = extract(network, loader, device)
    parts = gather_object([local])
    real = {key: torch.cat([part[key] for part in parts]) for key in local}
    if path is not None:

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_name(path)
            save_file({k: v.contiguous() for k, v in real.items()}, tmp)
            tmp.replace(path)  # atomic: a concurrent reader never sees half a file

        write_once(state, path.is_file, write)
    return real
