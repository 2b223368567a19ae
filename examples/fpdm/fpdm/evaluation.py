"""Fréchet distance and KID between generated and real images, in the feature space of any extractor.

:func:`evaluate_images` is what ``evaluate.py`` and the sweep call. For 1x8x8 digits the features are a
small classifier's, trained offline on ``digits-train`` and cached (:mod:`fpdm.digits_classifier`), so the
held-out ``digits-test`` is a fair reference; other images use Inception-v3 features where installed
(:mod:`fpdm.inception`). The metrics themselves are in :mod:`fpdm.metrics`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fpdm.cli import OneLineParser, UsageError, bounded_int, run_command
from fpdm.data import TensorPairs, digits_split, load_dataset
from fpdm.digits_classifier import ClassifierSettings, load_digits_classifier
from fpdm.inception import inception_extractor
from fpdm.metrics import (
    FeatureExtractor,
    class_agreement,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
)

__all__ = ["PIXEL_FD_MAX_DIM", "build_parser", "evaluate_images", "main", "read_samples"]

#: ``evaluate_images`` adds the Fréchet distance of the raw pixels for images of at most this many values.
PIXEL_FD_MAX_DIM = 1024


def _load_real(real: str | Tensor | np.ndarray, image_size: int) -> Tensor:
    if not isinstance(real, str):
        return torch.as_tensor(real).float()
    if real in ("digits-train", "digits-test"):
        return digits_split("train" if real == "digits-train" else "test").images
    if real.endswith((".npz", ".npy")):
        expected = "an .npz file with 'images' (M, C, H, W)"
        with _open_npz(real, expected) as arrays:
            if "images" not in arrays:
                raise UsageError(f"{real}: has no 'images' array (expected {expected})")
            raw = np.asarray(arrays["images"])
        check_image_values(raw, f"--real {real}: 'images'")
        return torch.from_numpy(raw.astype(np.float32))
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
    check_image_values(images.detach().cpu() if isinstance(images, Tensor) else images, "images")
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
        labels = torch.as_tensor(labels)
        classes = classifier.head.out_features
        inside = labels.numel() == 0 or 0 <= int(labels.min()) <= int(labels.max()) < classes
        if labels.is_floating_point() or not inside:
            shown = f"{labels.min().item()}..{labels.max().item()}" if labels.numel() else "none"
            raise ValueError(
                f"labels range over {shown} ({labels.dtype}); the classifier has the classes 0..{classes - 1}"
            )
        result["class_agreement"] = class_agreement(classifier, images, labels)
    return result


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line; see the module docstring."""
    parser = OneLineParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--samples", required=True, help=".npz with 'images' (N, C, H, W) in [-1, 1] and optionally 'labels'")
    add("--real", default="digits-test", help="digits-test, digits-train, digits, folder:PATH or x.npz")
    add("--extractor", default="auto", choices=["auto", "classifier", "inception"], help="feature space")
    add("--cache-dir", default=None, help="cache of the digits classifier")
    add("--inception-weights", default=None, help="the Inception weights file")
    add("--kid-subsets", type=bounded_int(1), default=100, help="random subsets KID averages over")
    add("--kid-subset-size", type=bounded_int(2), default=1000, help="images per KID subset")
    add("--seed", type=bounded_int(0), default=0, help="seed of the KID subsets")
    add("--json", action="store_true", help="print one JSON object instead of lines")
    return parser


def read_samples(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """``images`` (and ``labels``, when present) of a ``.npz`` written by ``sample.py``.

    Raises
    ------
    cli.UsageError
        One line naming the file when it is not such a file.
    """
    expected = "an .npz file from sample.py with 'images' (N, C, H, W)"
    arrays = _open_npz(path, expected)
    with arrays:
        if "images" not in arrays:
            keys = sorted(arrays.files)
            raise UsageError(f"{path}: has no 'images' array (keys: {keys}; expected {expected})")
        raw = np.asarray(arrays["images"])
        raw_labels = np.asarray(arrays["labels"]) if "labels" in arrays else None
    if raw_labels is not None and raw_labels.dtype.kind not in "iu":
        raise UsageError(f"{path}: 'labels' are {raw_labels.dtype}; expected integer classes")
    labels = None if raw_labels is None else torch.from_numpy(raw_labels.astype(np.int64))
    check_image_values(raw, f"{path}: 'images'")
    images = torch.from_numpy(raw.astype(np.float32))
    if images.dim() != 4 or (labels is not None and labels.shape != (images.shape[0],)):
        raise UsageError(
            f"{path}: images {tuple(images.shape)} and labels do not match (expected {expected})"
        )
    return images, labels


def _open_npz(path: str | Path, expected: str) -> Any:
    """``np.load`` of an ``.npz`` (no pickles); ``UsageError`` naming the file for anything else (a folder,
    a damaged file, a ``.npy`` array)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path}: is a folder (expected {expected})")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        raise UsageError(f"{path}: not a readable .npz file (expected {expected})") from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise UsageError(f"{path}: a single .npy array, not an .npz of named arrays (expected {expected})")
    return arrays


#: How far outside ``[-1, 1]`` an image value may lie (sampled images are not clipped exactly).
IMAGE_RANGE_SLACK = 0.05


def check_image_values(images: Any, what: str) -> None:
    """Refuse, with one line naming ``what``, images that are not floats in ``[-1, 1]``: integer images
    (``uint8`` in ``0..255`` would be scored as nonsense), values beyond the range by more than
    :data:`IMAGE_RANGE_SLACK`, NaN or infinity."""
    array = np.asarray(images)
    if array.dtype.kind in "iub":
        raise UsageError(
            f"{what} are {array.dtype} (values {array.min() if array.size else 0}.."
            f"{array.max() if array.size else 0}); expected floats in [-1, 1], e.g. x / 127.5 - 1 for uint8"
        )
    if array.dtype.kind != "f":
        raise UsageError(f"{what} are {array.dtype}; expected floats in [-1, 1]")
    if array.size and not np.isfinite(array).all():
        raise UsageError(f"{what} hold NaN or infinite values")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if low < -1 - IMAGE_RANGE_SLACK or high > 1 + IMAGE_RANGE_SLACK:
        raise UsageError(f"{what} range over [{low:g}, {high:g}]; expected floats in [-1, 1]")


def _print_lines(result: dict[str, Any], real: str) -> None:
    print(f"{result['num_images']} samples against {result['num_real']} real images ({real}); "
          f"features: {result['extractor']}")  # fmt: skip
    print(f"FD  {result['fd']:.4f}")
    print(f"KID {result['kid_mean']:.5f} +- {result['kid_std']:.5f}")
    if "fd_pixels" in result:
        print(f"FD of the pixels {result['fd_pixels']:.4f}")
    if "classifier_test_accuracy" in result:
        print(f"classifier test accuracy {result['classifier_test_accuracy']:.4f}")
    if "class_agreement" in result:
        print(f"class agreement {result['class_agreement']:.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate the arrays in ``--samples`` against ``--real`` and print the metrics; exit status 2 on a
    usage error (a file of the wrong kind, reference images of another shape), 1 on a non-finite FD."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def command() -> int:
        images, labels = read_samples(args.samples)
        options = {"cache_dir": args.cache_dir, "inception_weights": args.inception_weights}
        options.update(kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, seed=args.seed)
        try:
            result = evaluate_images(
                images, real=args.real, extractor=args.extractor, labels=labels, **options
            )
        except (ValueError, FileNotFoundError, ImportError) as error:
            raise UsageError(str(error)) from None
        if args.json:
            print(json.dumps(result))
        else:
            _print_lines(result, args.real)
        if not math.isfinite(result["fd"]):
            print("error: the Fréchet distance is not finite", file=sys.stderr)
            return 1
        return 0

    return run_command(parser, command)
