"""Datasets for the FPDM example: bundled digits (default), an image folder, pre-extracted VAE latents.

Every dataset returns ``(x, y)`` with ``x`` a float tensor ``(C, H, W)`` scaled to ``[-1, 1]`` (images) or
scaled VAE latents, and ``y`` an integer class label. :func:`load_dataset` builds one from a spec string:

* ``"digits"``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes, 1 channel), no download;
* ``"digits-train"``, ``"digits-test"``: the fixed stratified 80/20 split of those (1,437 / 360 images) from
  ``evaluate.digits_split``; train on ``digits-train`` to evaluate against the held-out ``digits-test``;
* ``"folder:PATH"``: an image folder ``PATH/<class>/<image>`` read with PIL (RGB, centre-cropped and
  resized to ``image_size``); classes are the sorted sub-folder names;
* ``"latents:FILE"``: latents written by ``extract_latents.py`` (``torch.save`` of a dict of tensors, loaded
  with ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "LatentDataset",
    "TensorPairs",
    "load_dataset",
    "load_digits",
    "pil_to_tensor",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


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


def pil_to_tensor(image: object, image_size: int) -> Tensor:
    """A PIL image as ``(3, S, S)`` in ``[-1, 1]``: RGB, centre crop to a square, bicubic resize to ``S``."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (S, S, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageFolder(Dataset):
    """Real images in ``root/<class>/<file>``, read lazily with PIL.

    Parameters
    ----------
    root : str or Path
        The folder; each sub-folder is a class (sorted names give the labels ``0 .. K-1``).
    image_size : int
        Side of the square images returned.
    """

    def __init__(self, root: str | Path, image_size: int) -> None:
        self.root = Path(root)
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

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            return pil_to_tensor(image, self.image_size), torch.tensor(label)


class LatentDataset(TensorPairs):
    """Latents written by ``extract_latents.py``: keys ``latents`` ``(N, C, h, w)`` (already multiplied
    by the VAE's scaling factor), ``labels`` ``(N,)``, ``num_classes`` and ``scaling_factor`` (0-d)."""

    def __init__(self, path: str | Path) -> None:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"latents", "labels", "num_classes"} - set(payload)
        if missing:
            raise ValueError(
                f"{path} is not a latents file from extract_latents.py (missing {sorted(missing)})"
            )
        super().__init__(payload["latents"], payload["labels"], int(payload["num_classes"]))
        self.scaling_factor = float(payload.get("scaling_factor", torch.tensor(1.0)))


def load_dataset(spec: str, image_size: int = 32) -> TensorPairs | ImageFolder:
    """Build a dataset from ``"digits"``, ``"digits-train"``, ``"digits-test"``, ``"folder:PATH"`` or
    ``"latents:FILE"``."""
    if spec == "digits":
        return load_digits()
    if spec in ("digits-train", "digits-test"):
        from evaluate import digits_split  # here, not at the top: evaluate imports this module

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
