"""Fréchet distance and KID between generated and real images, in the feature space of any extractor.

Command line (the arrays written by ``sample.py``: key ``images``, ``(N, C, H, W)`` in ``[-1, 1]``, and,
when present, ``labels``, the classes that were asked for)::

    python examples/fpdm/evaluate.py --samples samples.npz --real digits-test

From Python (what the sweep calls)::

    from evaluate import evaluate_images
    metrics = evaluate_images(images, real="digits-test", labels=labels)
    metrics["fd"], metrics["kid_mean"], metrics["kid_std"], metrics["class_agreement"]

Feature spaces. Any ``Callable[[Tensor], Tensor]`` mapping images ``(N, C, H, W)`` in ``[-1, 1]`` to
features ``(N, D)`` works, as k-diffusion's evaluation takes any extractor. Two come with the example:

* ``"classifier"`` (the default for 1x8x8 images): a small MLP trained offline on the training split of the
  bundled digits, with a fixed seed; the features are its penultimate layer (64 units). It is trained once and
  cached under ``~/.cache/implicitdiff`` (or ``$IMPLICITDIFF_CACHE``, or a ``cache_dir`` argument), in a file
  keyed by a hash of its training settings, written atomically and read back with ``weights_only=True``.
  Its accuracy on the held-out split is reported with every evaluation.
* ``"inception"`` (the default for other images): the 2048 pool features of the TensorFlow FID Inception-v3,
  through torch-fidelity, or torchmetrics (which wraps the same network), when one of them is installed and
  the weights file is on disk. Nothing is downloaded here: pass the file, or put it in torch hub's cache.
  Scores in this space are comparable with published FID/KID only for RGB images of a reasonable size.

The digits split. ``digits-train`` and ``digits-test`` are a stratified 80/20 split of scikit-learn's 1,797
digits by ``sklearn.model_selection.train_test_split(test_size=0.2, stratify=labels, random_state=0)``
(1,437 and 360 images): see :func:`digits_split`. Train diffusion models on ``digits-train`` only, so that the
held-out ``digits-test`` is a fair reference for them and for the classifier.

Fréchet distance between Gaussians fitted to the two feature sets (Heusel et al. 2017, "GANs trained by a two
time-scale update rule converge to a local Nash equilibrium"), statistics in float64:

.. math::
    \\mathrm{FD} = \\lVert\\mu_a - \\mu_b\\rVert^2
        + \\operatorname{tr}\\big(\\Sigma_a + \\Sigma_b - 2 (\\Sigma_a \\Sigma_b)^{1/2}\\big).

It is biased: two finite samples of one distribution score above zero, more so the smaller they are.
KID (Binkowski et al. 2018, "Demystifying MMD GANs") is the unbiased estimate of the squared maximum mean
discrepancy with the cubic polynomial kernel :math:`k(x, y) = (x \\cdot y / d + 1)^3`, averaged over random
subsets; its expectation is zero for two samples of one distribution.

Threads: the matrices here are small (the digits' features are 64-dimensional). On a busy 2-core machine a
second torch or BLAS thread made them up to 100x slower (measured); the tests run them on one thread
(``torch.set_num_threads(1)`` and ``threadpoolctl.threadpool_limits(1)``), and a sweep may do the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, TensorPairs, digits_split, load_dataset

__all__ = [
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "PIXEL_FD_MAX_DIM",
    "ClassifierSettings",
    "DigitsClassifier",
    "FeatureExtractor",
    "InceptionFeatures",
    "class_agreement",
    "classifier_cache_path",
    "default_cache_dir",
    "digits_split",
    "evaluate_images",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "inception_extractor",
    "kernel_inception_distance",
    "load_digits_classifier",
    "mmd2_unbiased",
    "polynomial_kernel",
    "train_digits_classifier",
]

FeatureExtractor = Callable[[Tensor], Tensor]
"""Images ``(N, C, H, W)`` in ``[-1, 1]`` to features ``(N, D)``."""

#: ``evaluate_images`` adds the Fréchet distance of the raw pixels for images of at most this many values.
PIXEL_FD_MAX_DIM = 1024
# Bump when the classifier's architecture or training code changes, so that old cache files are not reused.
CLASSIFIER_VERSION = 1
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


# ----------------------------------------------------------------------------------------------------------
# The digits split and the classifier
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
    """How the digits classifier is trained; a hash of these (and of the split) names its cache file.

    Attributes
    ----------
    epochs, batch_size, lr, weight_decay : training by AdamW on the training split.
    hidden : units of the first hidden layer.
    feature_dim : units of the penultimate layer, the feature space of the metrics.
    seed : seeds the initialisation and the batch order.
    """

    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-2
    weight_decay: float = 1e-4
    hidden: int = 128
    feature_dim: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.epochs, self.batch_size, self.hidden, self.feature_dim) < 1 or self.lr <= 0:
            raise ValueError(f"invalid classifier settings {self}")

    def key(self) -> str:
        """A hash of the settings, the split and the code version (16 hex digits)."""
        payload = {
            **dataclasses.asdict(self),
            "version": CLASSIFIER_VERSION,
            "split_seed": DIGITS_SPLIT_SEED,
            "test_fraction": DIGITS_TEST_FRACTION,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class DigitsClassifier(nn.Module):
    """A small MLP for 1x8x8 digits in ``[-1, 1]``; :meth:`features` is its penultimate layer.

    ``flatten (64) - linear (hidden) - ReLU - linear (feature_dim) - ReLU - linear (10)``. An MLP rather than
    a CNN: on 8x8 digits it is nearly as accurate (97% against 98% for a two-layer CNN, measured) and a
    training step costs about a ninth as much on a CPU.

    The features are divided by ``feature_scale``, their root mean square over the training split (set
    after training, stored with the weights), so that :math:`x \\cdot y / d` is of order one, the regime
    KID's cubic kernel is meant for (as Inception's pool features); the Fréchet distance scales by
    ``1 / feature_scale**2`` accordingly.
    """

    feature_scale: Tensor

    def __init__(self, hidden: int = 128, feature_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.register_buffer("feature_scale", torch.ones(()))
        self.test_accuracy = float("nan")  # set by training or loading

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``(N, feature_dim)`` of images ``(N, 1, 8, 8)``, over ``feature_scale``."""
        if x.shape[1:] != (1, 8, 8):
            raise ValueError(f"the digits classifier takes (N, 1, 8, 8) images, got {tuple(x.shape)}")
        return self.body(x) / self.feature_scale

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, 10)``."""
        return self.head(self.body(x))


def default_cache_dir() -> Path:
    """``$IMPLICITDIFF_CACHE``, else ``$XDG_CACHE_HOME/implicitdiff``, else ``~/.cache/implicitdiff``."""
    if os.environ.get("IMPLICITDIFF_CACHE"):
        return Path(os.environ["IMPLICITDIFF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "implicitdiff"


def classifier_cache_path(settings: ClassifierSettings, cache_dir: str | Path | None = None) -> Path:
    """Where the classifier trained with ``settings`` is cached."""
    return Path(cache_dir or default_cache_dir()) / f"digits-classifier-{settings.key()}.pt"


@torch.no_grad()
def _accuracy(model: nn.Module, data: TensorPairs) -> float:
    model.eval()
    return float((model(data.images).argmax(1) == data.labels).double().mean())


def train_digits_classifier(settings: ClassifierSettings) -> DigitsClassifier:
    """Train :class:`DigitsClassifier` on ``digits_split("train")``; deterministic given the settings.

    The global RNG is left untouched: the initialisation runs under a forked, seeded RNG and the batch order
    comes from a seeded ``torch.Generator``. Sets ``test_accuracy`` on the held-out split.
    """
    train, test = digits_split("train"), digits_split("test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = DigitsClassifier(settings.hidden, settings.feature_dim, train.num_classes)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            loss = F.cross_entropy(model(train.images[batch]), train.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval().requires_grad_(False)
    model.test_accuracy = _accuracy(model, test)
    with torch.no_grad():
        model.feature_scale.copy_(model.body(train.images).square().mean().sqrt())
    return model


def _save_atomically(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: readers never see half a
    file, and two processes writing the same key leave one whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_digits_classifier(
    cache_dir: str | Path | None = None, settings: ClassifierSettings | None = None
) -> DigitsClassifier:
    """The digits classifier for ``settings``: from the cache if it is there, else trained and cached.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Folder of the cache; :func:`default_cache_dir` by default.
    settings : ClassifierSettings, optional
        Training settings; the defaults train in a few seconds on a CPU to about 97% test accuracy.

    Returns
    -------
    DigitsClassifier
        In eval mode, without gradients; ``test_accuracy`` is its accuracy on ``digits_split("test")``.
    """
    settings = settings or ClassifierSettings()
    path = classifier_cache_path(settings, cache_dir)
    if path.exists():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("key") != settings.key():
            raise ValueError(f"{path} holds a classifier for other settings; delete it to retrain")
        model = DigitsClassifier(settings.hidden, settings.feature_dim)
        model.load_state_dict(payload["state_dict"])
        model.test_accuracy = float(payload["test_accuracy"])
        return model.eval().requires_grad_(False)
    model = train_digits_classifier(settings)
    payload = {
        "key": settings.key(),
        "settings": dataclasses.asdict(settings),
        "state_dict": model.state_dict(),
        "test_accuracy": model.test_accuracy,
    }
    _save_atomically(payload, path)
    return model


# ----------------------------------------------------------------------------------------------------------
# Inception features (torch-fidelity or torchmetrics)
# ----------------------------------------------------------------------------------------------------------


class InceptionFeatures:
    """Adapts an Inception network that takes uint8 RGB images to a :data:`FeatureExtractor`.

    Images in ``[-1, 1]`` become ``round((x + 1) * 127.5)`` in ``uint8``; one channel is repeated to three.
    The network resizes to 299x299 itself (torch-fidelity's and torchmetrics' both do).

    Parameters
    ----------
    network : Callable
        ``uint8 (N, 3, H, W) -> (N, D)`` features, or a tuple whose first item they are.
    """

    def __init__(self, network: Callable[[Tensor], Tensor | tuple[Tensor, ...]]) -> None:
        self.network = network

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes (N, 1 or 3, H, W) images, got {tuple(images.shape)}")
        pixels = ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels  # (N, 3, H, W)
        out = self.network(pixels)
        out = out[0] if isinstance(out, tuple | list) else out
        return out.reshape(images.shape[0], -1)


def inception_extractor(weights_path: str | Path | None = None) -> InceptionFeatures:
    """The FID Inception-v3 (2048 pool features) through torch-fidelity, else torchmetrics.

    Parameters
    ----------
    weights_path : str or Path, optional
        The converted TensorFlow weights (``weights-inception-2015-12-05-6726825d.pth``, the file both
        packages download). By default, that file in torch hub's checkpoint folder
        (``torch.hub.get_dir()/checkpoints``). It is never downloaded here.

    Raises
    ------
    ImportError
        When neither ``torch-fidelity`` nor ``torchmetrics[image]`` is installed.
    FileNotFoundError
        When the weights file is not on disk.
    """
    path = (
        Path(weights_path)
        if weights_path
        else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    )
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as Network
    except ImportError:
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3 as Network
        except ImportError as error:
            raise ImportError(
                "Inception features need torch-fidelity or torchmetrics[image] (pip install torch-fidelity); "
                "for the bundled digits use the default classifier features"
            ) from error
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}; download {INCEPTION_WEIGHTS_FILE} (torch-fidelity's "
            "release v0.2.0) and pass its path, or place it in torch hub's checkpoints folder"
        )
    network = Network("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    return InceptionFeatures(network.eval())


# ----------------------------------------------------------------------------------------------------------
# The metrics
# ----------------------------------------------------------------------------------------------------------


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


def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (``N - 1`` normalisation) in float64 of features ``(N, D)``."""
    array = _as_float64(features)
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False))


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
    """Fréchet distance between Gaussians fitted to two feature sets ``(N_a, D)`` and ``(N_b, D)``."""
    return frechet_distance_from_statistics(*feature_statistics(features_a), *feature_statistics(features_b))


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


def _load_real(real: str | Tensor | np.ndarray, image_size: int) -> Tensor:
    if not isinstance(real, str):
        return torch.as_tensor(real).float()
    if real in ("digits-train", "digits-test"):
        return digits_split("train" if real == "digits-train" else "test").images
    if real.endswith(".npz"):
        with np.load(real) as arrays:
            return torch.from_numpy(arrays["images"]).float()
    dataset = load_dataset(real, image_size=image_size)
    if isinstance(dataset, TensorPairs):
        return dataset.images
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def evaluate_images(
    images: Tensor | np.ndarray,
    real: str | Tensor | np.ndarray = "digits-test",
    extractor: FeatureExtractor | Literal["auto", "classifier", "inception"] = "auto",
    labels: Tensor | np.ndarray | None = None,
    *,
    cache_dir: str | Path | None = None,
    classifier_settings: ClassifierSettings | None = None,
    inception_weights: str | Path | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Fréchet distance and KID of generated images against real ones; the class agreement when labelled.

    Parameters
    ----------
    images : Tensor or ndarray
        Generated images ``(N, C, H, W)`` in ``[-1, 1]``.
    real : str, Tensor or ndarray
        Reference images: ``"digits-test"`` (default), ``"digits-train"``, ``"digits"`` (all 1,797),
        ``"folder:PATH"``, a ``.npz`` file with key ``images``, or an array ``(M, C, H, W)`` in ``[-1, 1]``.
    extractor : callable or {"auto", "classifier", "inception"}
        Any ``Callable[[Tensor], Tensor]`` from images to features ``(N, D)``, or a named one: the digits
        classifier's penultimate layer, or Inception (:func:`inception_extractor`). ``"auto"``: the classifier
        for 1x8x8 images, Inception otherwise.
    labels : Tensor or ndarray, optional
        The classes the images were asked for, ``(N,)``; adds ``class_agreement`` (needs 1x8x8 digits: the
        digits classifier judges it).
    cache_dir, classifier_settings : where the digits classifier is cached, and how it is trained.
    inception_weights : the Inception weights file (see :func:`inception_extractor`).
    kid_subsets, kid_subset_size, seed : see :func:`kernel_inception_distance`.

    Returns
    -------
    dict
        ``fd``, ``kid_mean``, ``kid_std``, ``num_images``, ``num_real``, ``feature_dim``, ``extractor`` (a
        name); for images of at most :data:`PIXEL_FD_MAX_DIM` values, ``fd_pixels``, the Fréchet distance of
        the raw pixels (a check on the feature space's blind spots: some noise images land near digits in
        the classifier's features, never in pixel space); with the digits classifier,
        ``classifier_test_accuracy`` and, with labels, ``class_agreement``.
    """
    images = torch.as_tensor(images).float()
    if images.dim() != 4:
        raise ValueError(f"need images (N, C, H, W), got {tuple(images.shape)}")
    real_images = _load_real(real, image_size=images.shape[-1])
    if real_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"real images {tuple(real_images.shape[1:])} differ from {tuple(images.shape[1:])}")
    is_digits = images.shape[1:] == (1, 8, 8)
    classifier = None
    if (extractor == "classifier" or (extractor == "auto" and is_digits)) or (
        labels is not None and is_digits
    ):
        classifier = load_digits_classifier(cache_dir, classifier_settings)
    if extractor == "classifier" or (extractor == "auto" and is_digits):
        feature_fn, name = classifier.features, "digits-classifier"
    elif extractor in ("inception", "auto"):
        feature_fn, name = inception_extractor(inception_weights), "inception-v3"
    elif callable(extractor):
        feature_fn, name = extractor, getattr(extractor, "__name__", type(extractor).__name__)
    else:
        raise ValueError(
            f"unknown extractor {extractor!r}; use a callable, 'auto', 'classifier' or 'inception'"
        )

    generated, reference = extract_features(feature_fn, images), extract_features(feature_fn, real_images)
    kid_mean, kid_std = kernel_inception_distance(
        generated, reference, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
    )
    result: dict[str, Any] = {
        "fd": frechet_distance(generated, reference),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "num_images": images.shape[0],
        "num_real": real_images.shape[0],
        "feature_dim": generated.shape[1],
        "extractor": name,
    }
    if images[0].numel() <= PIXEL_FD_MAX_DIM:
        result["fd_pixels"] = frechet_distance(images.flatten(1).double(), real_images.flatten(1).double())
    if classifier is not None:
        result["classifier_test_accuracy"] = classifier.test_accuracy
    if labels is not None:
        if classifier is None:
            raise ValueError(
                "class agreement needs the digits classifier: labels are only judged for 1x8x8 digits"
            )
        result["class_agreement"] = class_agreement(classifier, images, torch.as_tensor(labels))
    return result


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate the arrays in ``--samples`` against ``--real``; print the metrics (and return them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--samples", required=True, help=".npz with 'images' (N, C, H, W) in [-1, 1], 'labels'"
    )
    parser.add_argument(
        "--real", default="digits-test", help="digits-test, digits-train, digits, folder:PATH, x.npz"
    )
    parser.add_argument("--extractor", default="auto", choices=["auto", "classifier", "inception"])
    parser.add_argument("--cache-dir", default=None, help="cache of the digits classifier")
    parser.add_argument("--inception-weights", default=None, help="the Inception weights file")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args(argv)

    with np.load(args.samples) as arrays:
        if "images" not in arrays:
            parser.error(f"{args.samples} has no 'images' array (keys: {sorted(arrays.files)})")
        images = torch.from_numpy(np.asarray(arrays["images"], dtype=np.float32))
        labels = torch.from_numpy(np.asarray(arrays["labels"])).long() if "labels" in arrays else None
    result = evaluate_images(
        images,
        real=args.real,
        extractor=args.extractor,
        labels=labels,
        cache_dir=args.cache_dir,
        inception_weights=args.inception_weights,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(result))
        return result
    print(
        f"{result['num_images']} samples against {result['num_real']} real images ({args.real}); "
        f"features: {result['extractor']}"
    )
    print(f"FD  {result['fd']:.4f}")
    print(f"KID {result['kid_mean']:.5f} +- {result['kid_std']:.5f}")
    if "fd_pixels" in result:
        print(f"FD of the pixels {result['fd_pixels']:.4f}")
    if "classifier_test_accuracy" in result:
        print(f"classifier test accuracy {result['classifier_test_accuracy']:.4f}")
    if "class_agreement" in result:
        print(f"class agreement {result['class_agreement']:.4f}")
    if not math.isfinite(result["fd"]):
        raise SystemExit("the Fréchet distance is not finite")
    return result


if __name__ == "__main__":
    main()
