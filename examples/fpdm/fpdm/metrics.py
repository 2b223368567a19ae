r"""Fréchet distance and KID between two sets of features, and the class agreement of a classifier.

Any feature extractor works (k-diffusion's evaluation takes any too): a :data:`FeatureExtractor` maps images
``(N, C, H, W)`` in ``[-1, 1]`` to features ``(N, D)``; :func:`extract_features` runs one in batches.

Fréchet distance between Gaussians fitted to the two feature sets (Heusel et al. 2017, "GANs trained by a two
time-scale update rule converge to a local Nash equilibrium"), statistics in float64:

.. math::
    \mathrm{FD} = \lVert\mu_a - \mu_b\rVert^2
        + \operatorname{tr}\big(\Sigma_a + \Sigma_b - 2 (\Sigma_a \Sigma_b)^{1/2}\big).

It is biased: two finite samples of one distribution score above zero, more so the smaller they are.
KID (Binkowski et al. 2018, "Demystifying MMD GANs") is the unbiased estimate of the squared maximum mean
discrepancy with the cubic polynomial kernel :math:`k(x, y) = (x \cdot y / d + 1)^3`, averaged over random
subsets; its expectation is zero for two samples of one distribution.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FeatureExtractor",
    "class_agreement",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "inception_score",
    "kernel_inception_distance",
    "mmd2_unbiased",
    "polynomial_kernel",
    "precision_recall",
]

FeatureExtractor = Callable[[Tensor], Tensor]
"""Images ``(N, C, H, W)`` in ``[-1, 1]`` to features ``(N, D)``."""


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: Tensor, batch_size: int = 500) -> Tensor:
    """Features ``(N, D)`` in float64 of images ``(N, C, H, W)``, computed in batches without gradients."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"need images (N, C, H, W) with N > 0, got {tuple(images.shape)}")
    chunks = [extractor(images[i : i + batch_size].float()) for i in range(0, images.shape[0], batch_size)]
    features = torch.cat([c.reshape(c.shape[0], -1) for c in chunks]).double()
    if not torch.isfinite(features).all():
        raise ValueError("the extractor returned non-finite features")
    return features


def _as_float64(features: Tensor | np.ndarray) -> np.ndarray:
    array = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features)
    array = array.astype(np.float64, copy=False)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"need features (N, D) with N >= 2, got shape {array.shape}")
    return array


def feature_statistics(features: Tensor | np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (``N - 1`` normalisation) in float64 of features ``(N, D)``.

    Two passes over ``chunk`` rows at a time (the mean, then the centred products), so that 50,000 float32
    features need no float64 copy of them all.
    """
    array = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"need features (N, D) with N >= 2, got shape {array.shape}")
    count, dim = array.shape
    mean = np.zeros(dim)
    for start in range(0, count, chunk):
        mean += array[start : start + chunk].astype(np.float64).sum(axis=0)
    mean /= count
    products = np.zeros((dim, dim))
    for start in range(0, count, chunk):
        centred = array[start : start + chunk].astype(np.float64) - mean
        products += centred.T @ centred
    return mean, products / (count - 1)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigendecomposition (negative rounding clipped)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance_from_statistics(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between :math:`N(\\mu_a, \\Sigma_a)` and
    :math:`N(\\mu_b, \\Sigma_b)`.

    .. math::
        \\lVert\\mu_a - \\mu_b\\rVert^2 + \\operatorname{tr}\\Sigma_a + \\operatorname{tr}\\Sigma_b
        - 2 \\operatorname{tr}\\big(\\Sigma_a^{1/2} \\Sigma_b \\Sigma_a^{1/2}\\big)^{1/2}

    The trace term equals :math:`\\operatorname{tr}(\\Sigma_a \\Sigma_b)^{1/2}` (the matrices are similar),
    but :math:`\\Sigma_a^{1/2} \\Sigma_b \\Sigma_a^{1/2}` is symmetric positive semi-definite, so its square
    root comes from a symmetric eigendecomposition: real, and stable for singular covariances, with no
    complex round-off from ``scipy.linalg.sqrtm`` to discard. Computed in float64; tiny negative results of
    rounding are returned as 0.
    """
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = (
        np.atleast_2d(np.asarray(sigma_a, np.float64)),
        np.atleast_2d(np.asarray(sigma_b, np.float64)),
    )
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or sigma_a.shape != (d, d) or sigma_b.shape != (d, d):
        raise ValueError(f"shapes do not match: {mu_a.shape}, {sigma_a.shape}, {mu_b.shape}, {sigma_b.shape}")
    root_a = _psd_sqrt(sigma_a)
    middle = root_a @ sigma_b @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = float(np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt)
    return max(distance, 0.0)


def frechet_distance(features_a: Tensor | np.ndarray, features_b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N_a, D)`` and ``(N_b, D)``.

    With :math:`A = (X_a - \\mu_a) / \\sqrt{N_a - 1}` (so :math:`\\Sigma_a = A^T A`) and :math:`B` alike, the
    trace term :math:`\\operatorname{tr}(\\Sigma_a \\Sigma_b)^{1/2}` is the sum of the singular values of the
    :math:`N_a \\times N_b` matrix :math:`A B^T` (the non-zero eigenvalues of :math:`A^T A B^T B` are those
    of :math:`(A B^T)(A B^T)^T`): when that matrix is smaller than :math:`D \\times D` (few samples of wide
    features), it is used instead of the covariances' square roots.
    """
    a, b = _as_float64(features_a), _as_float64(features_b)
    (count_a, dim), count_b = a.shape, b.shape[0]
    if b.shape[1] != dim:
        raise ValueError(f"features of different widths: {a.shape}, {b.shape}")
    if count_a * count_b * min(count_a, count_b) >= dim**3:
        return frechet_distance_from_statistics(*feature_statistics(a), *feature_statistics(b))
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    centred_a, centred_b = (a - mu_a) / np.sqrt(count_a - 1), (b - mu_b) / np.sqrt(count_b - 1)
    trace_sqrt = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum()
    traces = np.sum(centred_a**2) + np.sum(centred_b**2)
    return max(float(np.sum((mu_a - mu_b) ** 2) + traces - 2.0 * trace_sqrt), 0.0)


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """KID's kernel :math:`k(x, y) = (x \\cdot y / d + 1)^3` between rows: ``(M, D), (N, D) -> (M, N)``."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased estimate of the squared MMD with :func:`polynomial_kernel` (Gretton et al. 2012, eq. 3).

    .. math::
        \\widehat{\\mathrm{MMD}}^2_u = \\frac{1}{m(m-1)} \\sum_{i \\ne j} k(x_i, x_j)
        + \\frac{1}{n(n-1)} \\sum_{i \\ne j} k(y_i, y_j) - \\frac{2}{mn} \\sum_{i, j} k(x_i, y_j)

    Leaving out the diagonals makes each term unbiased, so the estimate can be negative; its expectation is 0
    when ``x`` and ``y`` are drawn from the same distribution. Computed in float64.
    """
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2 or x.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"need features (m, D), (n, D) with m, n >= 2, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    across = polynomial_kernel(x, y).mean()
    return float(within_x + within_y - 2.0 * across)


def kernel_inception_distance(
    features_a: Tensor | np.ndarray,
    features_b: Tensor | np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and standard deviation of :func:`mmd2_unbiased` over random subsets (Binkowski et al. 2018).

    Each of ``num_subsets`` rounds draws ``min(subset_size, N_a, N_b)`` rows from each set without
    replacement, independently, from a ``torch.Generator`` seeded with ``seed``. The standard deviation is
    over the subsets (population form); when the subset size equals both sets' sizes every round sees the same
    sets and it is 0.

    Returns
    -------
    tuple of float
        ``(mean, std)``.
    """
    a, b = torch.as_tensor(_as_float64(features_a)), torch.as_tensor(_as_float64(features_b))
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}")
    size = min(subset_size, a.shape[0], b.shape[0])
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [
            mmd2_unbiased(
                a[torch.randperm(a.shape[0], generator=generator)[:size]],
                b[torch.randperm(b.shape[0], generator=generator)[:size]],
            )
            for _ in range(num_subsets)
        ],
        dtype=torch.float64,
    )
    return float(values.mean()), float(values.std(unbiased=False))


def inception_score(logits: Tensor | np.ndarray, split_size: int = 5000) -> float:
    r"""Inception Score (Salimans et al. 2016) of logits ``(N, K)``, computed as ADM's evaluator does.

    .. math:: \mathrm{IS} = \exp\Big(\frac{1}{n} \sum_i \mathrm{KL}\big(p(y | x_i) \,\|\, p(y)\big)\Big),
              \quad p(y) = \frac{1}{n} \sum_i p(y | x_i)

    over consecutive splits of ``split_size`` samples (the last one may be shorter), averaged. In float64;
    ``0 log 0 = 0``. It is 1 when every prediction is the same, ``K`` when predictions are one-hot and the
    classes equally frequent.
    """
    array = _as_float64(logits)
    probs = np.exp(array - array.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    scores = []
    for start in range(0, probs.shape[0], split_size):
        part = probs[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(float(np.exp(terms.sum(axis=1).mean())))
    return float(np.mean(scores))


def _kth_neighbour_radii(features: Tensor, k: int, chunk: int) -> Tensor:
    """Distance of each row to its ``k``-th nearest other row."""
    radii = []
    for start in range(0, features.shape[0], chunk):
        distances = torch.cdist(features[start : start + chunk], features)  # (c, N), itself at 0
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside(points: Tensor, centres: Tensor, radii: Tensor, chunk: int) -> Tensor:
    """Whether each point lies in the union of the balls ``(centres, radii)``."""
    inside = []
    for start in range(0, points.shape[0], chunk):
        distances = torch.cdist(points[start : start + chunk], centres)  # (c, M)
        inside.append((distances <= radii[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(
    real: Tensor | np.ndarray, generated: Tensor | np.ndarray, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-nearest-neighbour manifolds.

    Each set's manifold is the union of balls around its points, of radius the distance to the ``k``-th
    nearest other point of the same set. Precision is the fraction of generated points inside the real
    manifold; recall the fraction of real points inside the generated one. Distances in float64, ``chunk``
    rows of the distance matrix at a time (memory ``chunk x N``).

    Returns
    -------
    tuple of float
        ``(precision, recall)``.
    """
    a, b = torch.as_tensor(_as_float64(real)), torch.as_tensor(_as_float64(generated))
    if a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) <= k:
        raise ValueError(
            f"need features (N, D) with N > k = {k} in both sets, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    real_radii, generated_radii = _kth_neighbour_radii(a, k, chunk), _kth_neighbour_radii(b, k, chunk)
    precision = _inside(b, a, real_radii, chunk).double().mean()
    recall = _inside(a, b, generated_radii, chunk).double().mean()
    return float(precision), float(recall)


@torch.no_grad()
def class_agreement(classifier: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor) -> float:
    """Fraction of images whose predicted class (argmax of ``classifier(images)``) is the requested label."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    predicted = torch.cat(
        [classifier(images[i : i + 500].float()).argmax(1) for i in range(0, len(images), 500)]
    )
    return float((predicted == labels).double().mean())
