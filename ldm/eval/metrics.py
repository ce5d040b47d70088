"""Sample-quality metrics as pure functions of feature arrays, logits or image pairs.

Every function takes torch tensors and returns Python floats (or a dict of them), so it can be tested on toy arrays
and serves any feature network (Inception, or our own classifier: see `ldm.eval.features`):

  frechet_distance   FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to two feature sets
  kernel_distance    KID (Binkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel, over subsets
  precision_recall   improved precision and recall (Kynkäänniemi et al. 2019): k-NN manifolds of the features
  inception_score    IS (Salimans et al. 2016) from class logits
  class_distribution the histogram of predicted classes, its entropy, KL to uniform and to the real images' histogram
  psnr, ssim         reconstruction quality of image pairs in [-1, 1] (torchmetrics' functional implementations)

All statistics are computed in float64: FID subtracts nearly equal traces and loses digits in float32.
"""

from __future__ import annotations

import math

import torch


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and unbiased covariance (d, d) of an (N, d) feature array, in float64."""
    x = features.double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an (N >= 2, d) feature array, got shape {tuple(x.shape)}")
    mu = x.mean(dim=0)
    centered = x - mu
    return mu, centered.T @ centered / (x.shape[0] - 1)


def frechet_distance_from_statistics(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                                     sigma2: torch.Tensor) -> float:
    """d² = |mu1 - mu2|² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    tr((sigma1 sigma2)^(1/2)) is the sum of the square roots of the eigenvalues of sigma1 sigma2 (a product of two
    PSD matrices has real non-negative eigenvalues; round-off makes tiny imaginary or negative parts, dropped by
    taking the real part of the complex square root), as torchmetrics does.
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    mean_term = (mu1 - mu2).square().sum()
    trace_sqrt = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return max((mean_term + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt).item(), 0.0)


def frechet_distance(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """FID between two (N, d) feature sets (FID proper when the features are Inception pool3 activations)."""
    return frechet_distance_from_statistics(*feature_statistics(features1), *feature_statistics(features2))


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # k(x, y) = (x·y / d + 1)^3, the kernel of the KID paper.
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² estimate: means of k(x, x') and k(y, y') over distinct pairs, minus twice the mean k(x, y)."""
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    sum_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    sum_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return (sum_xx + sum_yy - 2 * k_xy.mean()).item()


def kernel_distance(features1: torch.Tensor, features2: torch.Tensor, num_subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and std of the unbiased MMD² over `num_subsets` random subsets (without replacement) of each set.

    The estimate is unbiased, so it is ~0 (and may be slightly negative) for two samples of one distribution.
    `subset_size` is capped at the smaller set's size.
    """
    x, y = features1.double(), features2.double()
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 features in each set")
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([
        mmd2_unbiased(x[torch.randperm(x.shape[0], generator=generator)[:size]],
                      y[torch.randperm(y.shape[0], generator=generator)[:size]])
        for _ in range(num_subsets)
    ])
    return values.mean().item(), values.std().item() if num_subsets > 1 else 0.0


def _kth_neighbour_radii(features: torch.Tensor, k: int, batch_size: int = 512) -> torch.Tensor:
    """Distance of every point to its k-th nearest neighbour within the same set (itself excluded).

    Row blocks of the distance matrix keep memory at batch_size x N (50k features: 200 MB, not 20 GB).
    """
    # The smallest distance of each row, 0, is the point itself: take the (k+1)-th.
    return torch.cat([torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values
                      for chunk in features.split(batch_size)])


def _fraction_in_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                          batch_size: int = 512) -> float:
    """Share of `points` inside at least one ball (centre_i, radius_i)."""
    inside = [
        (torch.cdist(chunk, centres) <= radii[None]).any(dim=1)
        for chunk in points.split(batch_size)
    ]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    1. The real manifold is the union of balls around each real feature with radius = distance to its k-th
       nearest real neighbour; likewise the fake manifold.
    2. precision = share of fake features inside the real manifold (are samples realistic?);
       recall    = share of real features inside the fake manifold (is the data's variety covered?).
    """
    real, fake = real.double(), fake.double()
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features in each set")
    precision = _fraction_in_manifold(fake, real, _kth_neighbour_radii(real, k))
    recall = _fraction_in_manifold(real, fake, _kth_neighbour_radii(fake, k))
    return precision, recall


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` equal parts (Salimans et al. 2016).

    Ranges from 1 (every sample gets the same class distribution) to the number of classes (confident predictions
    spread evenly over all classes).
    """
    log_p = torch.log_softmax(logits.double(), dim=1)
    splits = max(1, min(splits, log_p.shape[0]))
    scores = []
    for part in log_p.chunk(splits):
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # log p(y), averaged over the part
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp())
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std().item() if len(scores) > 1 else 0.0


def class_distribution(logits: torch.Tensor, reference_logits: torch.Tensor | None = None) -> dict:
    """Histogram of predicted classes of unconditional samples, its entropy (nats) and KL(histogram || uniform).

    A generator that covers every class equally has KL = 0 and entropy = log(num_classes). With
    `reference_logits` (the same classifier on the real images), also the real images' histogram and
    KL(samples || real): the fair reference, since a classifier that confuses two classes does not predict a
    balanced data set uniformly either (a class it under-predicts on real images is not missing from the samples).
    """
    p = _class_histogram(logits)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item() + 0.0  # + 0.0: no "-0"
    out = {
        "class_fractions": p.tolist(),
        "class_entropy": entropy,
        "class_kl_to_uniform": math.log(len(p)) - entropy,
    }
    if reference_logits is not None:
        q = _class_histogram(reference_logits)
        out["real_class_fractions"] = q.tolist()
        # A class of the samples that no real image is predicted as: floor q so that the KL stays finite.
        out["class_kl_to_real"] = (p[p > 0] * (p[p > 0] / q[p > 0].clamp_min(1e-4)).log()).sum().item() + 0.0
    return out


def _class_histogram(logits: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1]).double()
    return counts / counts.sum()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels.to(logits.device)).double().mean().item()


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1], measured on the [0, 1] scale.

    Capped at 100 dB (MSE 1e-10), so identical images give a finite number that averages.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    x, y = (images.double() + 1) / 2, (references.double() + 1) / 2
    return peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3)).clamp_max(100.0)


def ssim(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5, smaller for tiny images) in [-1, 1] range."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    size = min(images.shape[-2:])
    kernel_size = min(11, size if size % 2 else size - 1)
    sigma = 1.5 * kernel_size / 11
    x, y = (images.double() + 1) / 2, (references.double() + 1) / 2
    return structural_similarity_index_measure(x, y, data_range=1.0, kernel_size=kernel_size, sigma=sigma,
                                               reduction="none")
