"""Datasets for the FPDM example: bundled digits (default), an image folder, pre-extracted VAE latents.

Every dataset returns ``(x, y)`` with ``x`` a float tensor ``(C, H, W)`` scaled to ``[-1, 1]`` (images) or
scaled VAE latents, and ``y`` an integer class label. :func:`load_dataset` builds one from a spec string:

* ``"digits"``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes, 1 channel), no download;
* ``"digits-train"``, ``"digits-test"``: the fixed stratified 80/20 split of those (1,437 / 360 images),
  :func:`digits_split`; train on ``digits-train`` to evaluate against the held-out ``digits-test``;
* ``"folder:PATH"``: an image folder ``PATH/<class>/<image>`` read with PIL (RGB, centre-cropped and
  resized to ``image_size``; 16-bit and float images by their real range); classes are the sorted
  sub-folder names; every image is read once before use, and a damaged one stops it with one line;
* ``"latents:FILE"``: latents written by ``extract_latents.py`` (``torch.save`` of a dict of tensors, loaded
  with ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fpdm.files import FileKindError, load_tensors

__all__ = [
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "ImageModeError",
    "LatentDataset",
    "TensorPairs",
    "digits_split",
    "load_dataset",
    "load_digits",
    "pil_to_tensor",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: The digits split: ``train_test_split(test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED)``.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


class TensorPairs(Dataset):
    """An in-memory dataset of ``(x, y)`` pairs.

    Attributes
    ----------
    images : Tensor
        ``(N, C, H, W)`` float.
    labels : Tensor
        ``(N,)`` long.
    num_classes : int
    """

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int) -> None:
        if images.dim() != 4 or labels.shape != (images.shape[0],):
            raise ValueError(f"need images (N, C, H, W) and labels (N,), got {images.shape}, {labels.shape}")
        self.images = images.float().contiguous()
        self.labels = labels.long()
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]


def load_digits() -> TensorPairs:
    """scikit-learn's bundled 8x8 digits, ``(1797, 1, 8, 8)`` in ``[-1, 1]`` (pixel values 0..16)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0  # (N, 1, 8, 8)
    return TensorPairs(images, torch.from_numpy(bunch.target), num_classes=10)


def digits_split(part: Literal["train", "test"]) -> TensorPairs:
    """The fixed, stratified train/test split of the bundled digits (1,437 / 360 images, ``[-1, 1]``).

    ``sklearn.model_selection.train_test_split`` on the indices with ``test_size=0.2``, ``stratify`` on the
    labels and ``random_state=0``: every class keeps its share in both parts, and the split never changes.
    """
    from sklearn.model_selection import train_test_split

    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    digits = load_digits()
    train_index, test_index = train_test_split(
        np.arange(len(digits)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=digits.labels.numpy(),
        random_state=DIGITS_SPLIT_SEED,
    )
    index = torch.from_numpy(np.sort(train_index if part == "train" else test_index))
    return TensorPairs(digits.images[index], digits.labels[index], digits.num_classes)


#: PIL modes of more than 8 bits per channel and the value that maps to white: 16-bit grayscale
#: (``I;16``, and ``I`` as older Pillow opens 16-bit PNGs).
WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0}
#: PIL modes read as 8 bits per channel by ``convert("RGB")``.
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "La")


class ImageModeError(ValueError):
    """An image whose pixel values cannot be mapped to ``[-1, 1]`` without guessing their range."""


def _unit_range(image: Any) -> np.ndarray | None:
    """A wide image's pixels as floats in ``[0, 1]`` ``(H, W)``, or ``None`` for an 8-bit image.

    16-bit images are divided by 65535; float images (``F``, as in float TIFFs) are taken as they are when
    every value lies in ``[0, 1]``. ``ImageModeError`` for anything else (a float image in another range, a
    32-bit integer image that is not a 16-bit PNG, an unknown mode): one line saying why.
    """
    mode = image.mode
    if mode in EIGHT_BIT_MODES:
        return None
    if mode in WIDE_MODES or (mode == "I" and image.format == "PNG"):
        return np.asarray(image, dtype=np.float64).astype(np.float32) / 65535.0
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if not (np.isfinite(array).all() and low >= 0.0 and high <= 1.0):
            raise ImageModeError(
                f"a float image with values in [{low:g}, {high:g}]; float images must hold values in [0, 1] "
                "(convert it to 8 or 16 bits)"
            )
        return array
    raise ImageModeError(f"PIL mode {mode!r} is not supported; convert it to 8- or 16-bit RGB or grayscale")


def _crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def pil_to_tensor(image: object, image_size: int) -> Tensor:
    """A PIL image as ``(3, S, S)`` in ``[-1, 1]``: RGB, centre crop to a square, bicubic resize to ``S``.

    8-bit images go through ``convert("RGB")``; 16-bit grayscale and float images (values in ``[0, 1]``)
    are scaled by their real range and resized in floating point (``convert("RGB")`` would clip them to
    near-white). Others raise :class:`ImageModeError`.
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    unit = _unit_range(image)
    box = _crop_box(image.width, image.height)
    if unit is None:
        image = image.convert("RGB").crop(box).resize((image_size, image_size), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (S, S, 3)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
    plane = Image.fromarray(unit, mode="F").crop(box).resize((image_size, image_size), Image.BICUBIC)
    gray = torch.from_numpy(np.asarray(plane, dtype=np.float32).clip(0.0, 1.0) * 2.0 - 1.0)
    return gray.unsqueeze(0).expand(3, -1, -1).contiguous()


def _read_image(path: Path, image_size: int) -> Tensor:
    """One image file as :func:`pil_to_tensor` returns it; ``FileKindError`` naming the file otherwise."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return pil_to_tensor(image, image_size)
    except ImageModeError as error:
        raise FileKindError(f"{path}: {error}") from None
    except Exception as error:  # PIL raises many kinds for a damaged file; all mean the same here
        raise FileKindError(f"{path}: not a readable image, or a damaged one ({error})") from None


class ImageFolder(Dataset):
    """Real images in ``root/<class>/<file>``, read lazily with PIL.

    Parameters
    ----------
    root : str or Path
        The folder; each sub-folder is a class (sorted names give the labels ``0 .. K-1``).
    image_size : int
        Side of the square images returned.
    check : bool
        Read every image once before anything else (the default), so that a damaged file, or one whose
        values cannot be mapped to ``[-1, 1]``, stops a run before it starts rather than when a batch
        reaches it (:class:`files.FileKindError` naming how many and the first one).
    """

    def __init__(self, root: str | Path, image_size: int, check: bool = True) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise FileKindError(f"{self.root}: is a file; expected a folder of images root/<class>/<image>")
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"{self.root} has no class sub-folders (expected root/<class>/<image>)")
        self.image_size = image_size
        self.samples: list[tuple[Path, int]] = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.num_classes = len(self.classes)
        if check:
            self.check()

    def check(self) -> None:
        """Read every image once; ``FileKindError`` with the number of bad files and the first reason."""
        bad = []
        for path, _ in self.samples:
            try:
                _read_image(path, 1)
            except FileKindError as error:
                bad.append(str(error))
        if bad:
            raise FileKindError(
                f"{self.root}: {len(bad)} of {len(self.samples)} images cannot be used, the first: {bad[0]}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        path, label = self.samples[index]
        return _read_image(path, self.image_size), torch.tensor(label)


class LatentDataset(TensorPairs):
    """Latents written by ``extract_latents.py``: keys ``latents`` ``(N, C, h, w)`` (already multiplied
    by the VAE's scaling factor), ``labels`` ``(N,)`` in ``0 .. num_classes - 1``, ``num_classes`` and
    ``scaling_factor`` (0-d).

    Raises
    ------
    files.FileKindError
        One line naming the file, when it is not such a file: unreadable, damaged, keys missing, tensors of
        the wrong shape, non-finite latents, or labels outside the classes.
    """

    def __init__(self, path: str | Path) -> None:
        kind = "a latents file written by extract_latents.py"
        payload = load_tensors(path, kind, keys=("latents", "labels", "num_classes"))
        latents, labels = payload["latents"], payload["labels"]
        if not isinstance(latents, Tensor) or latents.dim() != 4 or not latents.is_floating_point():
            raise FileKindError(f"{path}: 'latents' is not a float tensor (N, C, h, w) (expected {kind})")
        if (
            not isinstance(labels, Tensor)
            or labels.shape != (latents.shape[0],)
            or labels.is_floating_point()
        ):
            raise FileKindError(f"{path}: 'labels' is not an integer tensor (N,) (expected {kind})")
        num_classes = int(payload["num_classes"])
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise FileKindError(
                f"{path}: labels range over {int(labels.min())}..{int(labels.max())}, outside the "
                f"{num_classes} classes 0..{num_classes - 1}"
            )
        if not torch.isfinite(latents).all():
            raise FileKindError(f"{path}: the latents hold NaN or infinite values")
        super().__init__(latents, labels, num_classes)
        self.scaling_factor = float(payload.get("scaling_factor", torch.tensor(1.0)))


def load_dataset(spec: str, image_size: int = 32) -> TensorPairs | ImageFolder:
    """Build a dataset from ``"digits"``, ``"digits-train"``, ``"digits-test"``, ``"folder:PATH"`` or
    ``"latents:FILE"``."""
    if spec == "digits":
        return load_digits()
    if spec in ("digits-train", "digits-test"):
        return digits_split(spec.removeprefix("digits-"))  # type: ignore[arg-type]
    kind, _, where = spec.partition(":")
    if kind == "folder" and where:
        return ImageFolder(where, image_size)
    if kind == "latents" and where:
        return LatentDataset(where)
    raise ValueError(
        f"unknown dataset {spec!r}; use 'digits', 'digits-train', 'digits-test', 'folder:PATH' "
        "or 'latents:FILE'"
    )
