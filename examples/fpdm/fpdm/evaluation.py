"""Scores of generated images against real ones: FID, sFID, Inception Score, precision and recall, KID.

:func:`evaluate_images` is what ``evaluate.py`` and the sweep call. The features are those of any extractor:
for 1x8x8 digits a small classifier's, trained offline on ``digits-train`` and cached
(:mod:`fpdm.digits_classifier`), so the held-out ``digits-test`` is a fair reference; for other images the
FID Inception-v3 of ADM's evaluation suite (:mod:`fpdm.inception`), which also gives the sFID's spatial
features and the Inception Score's logits. Images are read and scored in batches (:class:`ImageSource`):
memory holds the features (about 20 KB per image with Inception), never all the images. The metrics
themselves are in :mod:`fpdm.metrics`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fpdm.cli import OneLineParser, UsageError, bounded_int, run_command
from fpdm.data import TensorPairs, digits_split, load_dataset
from fpdm.digits_classifier import ClassifierSettings, load_digits_classifier
from fpdm.files import npz_member_rows, save_json_atomically
from fpdm.inception import INCEPTION_WEIGHTS_FILE, InceptionFeatures, inception_extractor
from fpdm.metrics import (
    FeatureExtractor,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)

__all__ = [
    "PIXEL_FD_MAX_DIM",
    "ImageSource",
    "build_parser",
    "evaluate_images",
    "main",
    "read_reference",
    "read_samples",
]

#: ``evaluate_images`` adds the Fréchet distance of the raw pixels for images of at most this many values.
PIXEL_FD_MAX_DIM = 1024
#: The images the digits classifier judges.
DIGITS_SHAPE = (1, 8, 8)
#: Images per batch of the feature extractor.
BATCH = 250


@dataclasses.dataclass
class ImageSource:
    """Images read batch by batch: ``count`` images of shape ``shape`` ``(C, H, W)``, in ``[-1, 1]``.

    Attributes
    ----------
    name : str
        Where they come from, for messages.
    count : int
        How many.
    shape : tuple of int
        ``(C, H, W)``.
    batches : callable
        ``batches(size)`` yields float32 tensors ``(<= size, C, H, W)`` in order, reading as it goes.
    """

    name: str
    count: int
    shape: tuple[int, int, int]
    batches: Callable[[int], Iterator[Tensor]]

    @classmethod
    def from_tensor(cls, images: Tensor | np.ndarray, name: str = "images") -> ImageSource:
        """Images already in memory, ``(N, C, H, W)`` floats in ``[-1, 1]``."""
        check_image_values(images.detach().cpu() if isinstance(images, Tensor) else images, name)
        tensor = torch.as_tensor(images).float()
        _check_axes(tuple(tensor.shape), name)
        return cls(name, tensor.shape[0], tuple(tensor.shape[1:]), lambda size: iter(tensor.split(size)))


def _check_axes(shape: tuple[int, ...], what: str) -> None:
    """Refuse, naming the axes, an image array that is not ``(N, C, H, W)`` (or ``(N, H, W, C)`` uint8)."""
    if len(shape) == 3:
        raise UsageError(
            f"{what} have shape {shape}: the channel axis is missing (expected (N, C, H, W); a set of "
            "one-channel images is (N, 1, H, W): add the axis with images[:, None])"
        )
    if len(shape) != 4 or shape[0] == 0:
        raise UsageError(f"{what} have shape {shape}; expected images (N, C, H, W) with N > 0")


def _npz_source(path: str | Path, expected: str) -> ImageSource | None:
    """The images of an ``.npz``: ``images`` (float ``(N, C, H, W)``) or else ``arr_0`` (uint8
    ``(N, H, W, 3)``, ADM's layout); ``None`` when it has neither."""
    with _open_npz(path, expected) as arrays:
        names = set(arrays.files)
    if "images" in names:
        shape, dtype, _ = npz_member_rows(path, "images", 1)
        what = f"{path}: 'images'"
        if dtype.kind != "f":
            with np.load(path) as arrays:
                check_image_values(arrays["images"][:BATCH], what)  # refused: not floats in [-1, 1]
        _check_axes(shape, what)

        def float_batches(size: int) -> Iterator[Tensor]:
            for rows in npz_member_rows(path, "images", size)[2]:
                check_image_values(rows, what)
                yield torch.from_numpy(rows.astype(np.float32))

        return ImageSource(str(path), shape[0], tuple(shape[1:]), float_batches)
    if "arr_0" in names:
        shape, dtype, _ = npz_member_rows(path, "arr_0", 1)
        if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3):
            raise UsageError(f"{path}: 'arr_0' is {dtype} {shape}; expected uint8 images (N, H, W, 3)")

        def pixel_batches(size: int) -> Iterator[Tensor]:
            for rows in npz_member_rows(path, "arr_0", size)[2]:
                yield torch.from_numpy(rows.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1

        return ImageSource(str(path), shape[0], (shape[3], shape[1], shape[2]), pixel_batches)
    return None


def _folder_source(spec: str, image_size: int) -> ImageSource:
    dataset = load_dataset(spec, image_size=image_size)
    if isinstance(dataset, TensorPairs):
        return ImageSource.from_tensor(dataset.images, spec)
    first = dataset[0][0]

    def batches(size: int) -> Iterator[Tensor]:
        for start in range(0, len(dataset), size):
            yield torch.stack([dataset[i][0] for i in range(start, min(start + size, len(dataset)))])

    return ImageSource(spec, len(dataset), tuple(first.shape), batches)


@dataclasses.dataclass
class Reference:
    """The real side: images to extract features from, and/or precomputed Inception statistics (an ADM
    reference batch's ``mu``/``sigma`` and ``mu_s``/``sigma_s``)."""

    name: str
    images: ImageSource | None = None
    statistics: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)


def read_reference(real: str | Tensor | np.ndarray | ImageSource, image_size: int) -> Reference:
    """The reference of ``--real``: ``digits-test``/``digits-train``/``digits``, ``folder:PATH``, an array
    ``(M, C, H, W)``, or an ``.npz`` with ``images``, ``arr_0`` (an ADM reference batch) and/or ``mu`` and
    ``sigma`` (with ``mu_s``/``sigma_s`` for the sFID).

    Raises
    ------
    cli.UsageError
        A file that holds none of those, or arrays of the wrong kind.
    """
    if isinstance(real, ImageSource):
        return Reference(real.name, real)
    if not isinstance(real, str):
        return Reference("array", ImageSource.from_tensor(real, "the real images"))
    if real in ("digits-train", "digits-test"):
        return Reference(real, ImageSource.from_tensor(digits_split(real.split("-")[1]).images, real))
    if real.endswith((".npz", ".npy")):
        expected = "an .npz file with 'images' (M, C, H, W), 'arr_0' (M, H, W, 3) uint8, or 'mu' and 'sigma'"
        images = _npz_source(real, expected)
        statistics = {}
        with _open_npz(real, expected) as arrays:
            for key, suffix in (("pool", ""), ("spatial", "_s")):
                if f"mu{suffix}" in arrays.files and f"sigma{suffix}" in arrays.files:
                    statistics[key] = (arrays[f"mu{suffix}"].astype(np.float64), arrays[f"sigma{suffix}"])
        if images is None and not statistics:
            raise UsageError(f"{real}: has no 'images', 'arr_0' nor 'mu'/'sigma' (expected {expected})")
        return Reference(real, images, statistics)
    return Reference(real, _folder_source(real, image_size))


@torch.no_grad()
def _features(extractor: Any, source: ImageSource, pixels: bool) -> dict[str, np.ndarray]:
    """Every feature set of the extractor (Inception: pool, spatial, logits; others: one set, ``pool``) and,
    with ``pixels``, the flattened pixels, as float32 arrays ``(N, D)``."""
    collected: dict[str, list[np.ndarray]] = {}
    for batch in source.batches(BATCH):
        found = (
            extractor.features(batch)
            if isinstance(extractor, InceptionFeatures)
            else {"pool": extractor(batch)}
        )
        if pixels:
            found["pixels"] = batch.flatten(1)
        for name, values in found.items():
            values = values.reshape(values.shape[0], -1).double()
            if not torch.isfinite(values).all():
                raise ValueError(f"the extractor returned non-finite {name} features for {source.name}")
            collected.setdefault(name, []).append(values.float().numpy())
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def evaluate_images(
    images: Tensor | np.ndarray | ImageSource,
    real: str | Tensor | np.ndarray | ImageSource = "digits-test",
    extractor: FeatureExtractor | Literal["auto", "classifier", "inception"] = "auto",
    labels: Tensor | np.ndarray | None = None,
    *,
    cache_dir: str | Path | None = None,
    classifier_settings: ClassifierSettings | None = None,
    inception_weights: str | Path | None = None,
    device: str = "cpu",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Scores of generated images against real ones in one feature space.

    Parameters
    ----------
    images : Tensor, ndarray or ImageSource
        Generated images ``(N, C, H, W)`` in ``[-1, 1]`` (or a source that reads them in batches).
    real : str, Tensor, ndarray or ImageSource
        Reference (:func:`read_reference`): ``"digits-test"`` (default), ``"digits-train"``, ``"digits"``,
        ``"folder:PATH"``, an ``.npz`` (``images``, ``arr_0``, or precomputed ``mu``/``sigma``), or an array.
    extractor : callable or {"auto", "classifier", "inception"}
        Any ``Callable[[Tensor], Tensor]`` from images to features ``(N, D)``, or a named one: the digits
        classifier's penultimate layer, or the FID Inception (:func:`fpdm.inception.inception_extractor`).
        ``"auto"``: the classifier for 1x8x8 images, Inception otherwise.
    labels : Tensor or ndarray, optional
        The classes the images were asked for, ``(N,)``; adds ``class_agreement`` (needs 1x8x8 digits: the
        digits classifier judges it).
    cache_dir, classifier_settings : where the digits classifier is cached, and how it is trained.
    inception_weights : the FID Inception's weights file (:data:`fpdm.inception.INCEPTION_WEIGHTS_FILE`).
    device : where the feature extractor runs.
    kid_subsets, kid_subset_size, seed : see :func:`fpdm.metrics.kernel_inception_distance`.

    Returns
    -------
    dict
        ``fd`` (with Inception also ``fid``: the FID), ``precision`` and ``recall`` (k = 3 nearest
        neighbours), ``kid_mean``, ``kid_std``, ``num_images``, ``num_real``, ``feature_dim``,
        ``extractor``; with Inception ``sfid`` and ``inception_score``; for images of at most
        :data:`PIXEL_FD_MAX_DIM` values ``fd_pixels`` (the Fréchet distance of the raw pixels, a check on
        the feature space's blind spots); with the digits classifier ``classifier_test_accuracy`` and, with
        labels, ``class_agreement``. Scores that need the reference's features (KID, precision, recall)
        are left out when the reference gives statistics only.
    """
    source = images if isinstance(images, ImageSource) else ImageSource.from_tensor(images, "images")
    reference = read_reference(real, image_size=source.shape[-1])
    is_digits = source.shape == DIGITS_SHAPE
    use_classifier = extractor == "classifier" or (extractor == "auto" and is_digits)
    classifier = None
    if use_classifier or (labels is not None and is_digits):
        classifier = load_digits_classifier(cache_dir, classifier_settings)
    if use_classifier:
        feature_fn, name = classifier.features, "digits-classifier"
    elif extractor in ("inception", "auto"):
        feature_fn, name = inception_extractor(inception_weights, device), "fid-inception-v3"
    elif callable(extractor):
        feature_fn, name = extractor, getattr(extractor, "__name__", type(extractor).__name__)
    else:
        raise ValueError(
            f"unknown extractor {extractor!r}; use a callable, 'auto', 'classifier' or 'inception'"
        )
    if reference.images is not None and reference.images.shape != source.shape:
        inception = isinstance(feature_fn, InceptionFeatures)
        if not inception or reference.images.shape[0] not in (1, 3):
            raise ValueError(f"real images {reference.images.shape} differ from {source.shape}")
    pixels = math.prod(source.shape) <= PIXEL_FD_MAX_DIM and (
        reference.images is not None and reference.images.shape == source.shape
    )
    generated = _features(feature_fn, source, pixels)
    real_features = _features(feature_fn, reference.images, pixels) if reference.images is not None else {}
    result: dict[str, Any] = {"num_images": source.count, "extractor": name}
    result["num_real"] = reference.images.count if reference.images is not None else None
    result["feature_dim"] = generated["pool"].shape[1]
    result.update(_distances(generated, real_features, reference.statistics))
    if real_features:
        kid_mean, kid_std = kernel_inception_distance(
            generated["pool"], real_features["pool"], num_subsets=kid_subsets, subset_size=kid_subset_size,
            seed=seed,
        )  # fmt: skip
        precision, recall = precision_recall(real_features["pool"], generated["pool"], k=3)
        result.update(kid_mean=kid_mean, kid_std=kid_std, precision=precision, recall=recall)
    if "logits" in generated:
        result["inception_score"] = inception_score(generated["logits"])
    if classifier is not None:
        result["classifier_test_accuracy"] = classifier.test_accuracy
    if labels is not None:
        result["class_agreement"] = _class_agreement(classifier, source, labels)
    return result


def _distances(
    generated: dict[str, np.ndarray], real: dict[str, np.ndarray], statistics: dict[str, tuple[Any, Any]]
) -> dict[str, float]:
    """Fréchet distances of each feature set the two sides share (a reference's statistics first)."""
    names = {"pool": "fd", "spatial": "sfid", "pixels": "fd_pixels"}
    result = {}
    for key, name in names.items():
        if key not in generated or not (key in statistics or key in real):
            continue
        if key in statistics:  # a reference batch's own statistics (ADM's: of far more images than arr_0)
            stats = feature_statistics(generated[key])
            result[name] = frechet_distance_from_statistics(*stats, *statistics[key])
        else:
            result[name] = frechet_distance(generated[key], real[key])
    if "spatial" in generated and "fd" in result:
        result["fid"] = result["fd"]
    return result


@torch.no_grad()
def _class_agreement(classifier: Any, source: ImageSource, labels: Tensor | np.ndarray) -> float:
    """Fraction of images whose predicted class is the requested label (the digits classifier judges)."""
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
    if labels.shape != (source.count,):
        raise ValueError(f"{source.count} images but labels of shape {tuple(labels.shape)}")
    predicted = torch.cat([classifier(batch).argmax(1) for batch in source.batches(BATCH)])
    return float((predicted == labels.long()).double().mean())


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line; see the module docstring."""
    parser = OneLineParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--samples", required=True, help=SAMPLES_HELP)
    add("--real", default="digits-test", help=REAL_HELP)
    add("--extractor", default="auto", choices=["auto", "classifier", "inception"], help="feature space")
    add("--cache-dir", default=None, help="cache of the digits classifier")
    add("--inception-weights", default=None, help=f"the FID Inception's weights, {INCEPTION_WEIGHTS_FILE}")
    add("--device", default="cpu", help="where the feature network runs: 'cpu', 'cuda' or 'cuda:N'")
    add("--kid-subsets", type=bounded_int(1), default=100, help="random subsets KID averages over")
    add("--kid-subset-size", type=bounded_int(2), default=1000, help="images per KID subset")
    add("--seed", type=bounded_int(0), default=0, help="seed of the KID subsets")
    add("--json", action="store_true", help="print one JSON object instead of lines")
    add("--out", default=None, help="also write the scores as one JSON file")
    return parser


SAMPLES_HELP = (
    "samples.npz of sample.py: 'images' (N, C, H, W) floats in [-1, 1] or 'arr_0' (N, H, W, 3) uint8, and "
    "optionally 'labels'"
)
REAL_HELP = (
    "digits-test, digits-train, digits, folder:PATH, or x.npz: 'images', 'arr_0' (an ADM reference batch) "
    "and/or precomputed 'mu'/'sigma'"
)


def read_samples(path: str | Path) -> tuple[ImageSource, Tensor | None]:
    """The images of a ``.npz`` written by ``sample.py`` (``images``, else ``arr_0``), read in batches, and
    its ``labels`` when present.

    Raises
    ------
    cli.UsageError
        One line naming the file when it is not such a file: no images, images without their channel axis,
        labels that are not integers or not one per image.
    """
    expected = "an .npz file from sample.py with 'images' (N, C, H, W) or 'arr_0' (N, H, W, 3)"
    source = _npz_source(path, expected)
    if source is None:
        with _open_npz(path, expected) as arrays:
            keys = sorted(arrays.files)
        raise UsageError(f"{path}: has no 'images' nor 'arr_0' array (keys: {keys}; expected {expected})")
    with _open_npz(path, expected) as arrays:
        raw_labels = np.asarray(arrays["labels"]) if "labels" in arrays.files else None
    if raw_labels is not None and raw_labels.dtype.kind not in "iu":
        raise UsageError(f"{path}: 'labels' are {raw_labels.dtype}; expected integer classes")
    if raw_labels is not None and raw_labels.shape != (source.count,):
        raise UsageError(
            f"{path}: {source.count} images but 'labels' of shape {raw_labels.shape} (expected one per image)"
        )
    labels = None if raw_labels is None else torch.from_numpy(raw_labels.astype(np.int64))
    return source, labels


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
    print(f"{result['num_images']} samples against {result['num_real'] or 'the statistics of'} real images "
          f"({real}); features: {result['extractor']}")  # fmt: skip
    for key, label, digits in LINES:
        if key in result:
            print(f"{label} {result[key]:.{digits}f}")
    if "kid_mean" in result:
        print(f"KID {result['kid_mean']:.5f} +- {result['kid_std']:.5f}")


#: The lines printed without ``--json``: key, label, decimals.
LINES = [
    ("fd", "FD ", 4),
    ("sfid", "sFID", 4),
    ("inception_score", "IS ", 3),
    ("precision", "precision", 4),
    ("recall", "recall", 4),
    ("fd_pixels", "FD of the pixels", 4),
    ("classifier_test_accuracy", "classifier test accuracy", 4),
    ("class_agreement", "class agreement", 4),
]


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate the images in ``--samples`` against ``--real`` and print the scores; exit status 2 on a
    usage error (a file of the wrong kind, reference images of another shape), 1 on a non-finite FD."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def command() -> int:
        source, labels = read_samples(args.samples)
        if source.shape != DIGITS_SHAPE:
            labels = None  # sample.py's labels are judged only for digits (their classifier); others ignored
        options = {"cache_dir": args.cache_dir, "inception_weights": args.inception_weights}
        options.update(kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, seed=args.seed)
        try:
            result = evaluate_images(
                source, real=args.real, extractor=args.extractor, labels=labels, device=args.device, **options
            )
        except (ValueError, FileNotFoundError, ImportError) as error:
            raise UsageError(str(error)) from None
        if args.out:
            save_json_atomically(result, args.out)
        if args.json:
            print(json.dumps(result))
        else:
            _print_lines(result, args.real)
        if not math.isfinite(result["fd"]):
            print("error: the Fréchet distance is not finite", file=sys.stderr)
            return 1
        return 0

    return run_command(parser, command)
