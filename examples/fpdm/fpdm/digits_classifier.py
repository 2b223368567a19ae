"""A small classifier of the bundled 8x8 digits, whose penultimate layer is the example's feature space.

:func:`load_digits_classifier` trains it on ``digits_split("train")`` with a fixed seed, offline, and caches
it under ``~/.cache/implicitdiff`` (or ``$IMPLICITDIFF_CACHE``, or a ``cache_dir`` argument) in a file keyed
by a hash of its training settings, written atomically and read back with ``weights_only=True``. Its
accuracy on the held-out ``digits_split("test")`` comes with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpdm.data import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, TensorPairs, digits_split
from fpdm.files import load_tensors, save_atomically

__all__ = [
    "CLASSIFIER_VERSION",
    "ClassifierSettings",
    "DigitsClassifier",
    "classifier_cache_path",
    "default_cache_dir",
    "load_digits_classifier",
    "train_digits_classifier",
]

# Bump when the classifier's architecture or training code changes, so that old cache files are not reused.
CLASSIFIER_VERSION = 1


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
        payload = load_tensors(path, "a digits classifier cached by evaluate.py", keys=("key", "state_dict"))
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
    save_atomically(payload, path)
    return model
