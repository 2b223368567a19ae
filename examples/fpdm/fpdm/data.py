"""Datasets for the FPDM example: bundled digits (default), an image folder, a folder of VAE latents.

Every dataset returns ``(x, y)`` with ``x`` a float tensor ``(C, H, W)`` scaled to ``[-1, 1]`` (images) or
scaled VAE latents, and ``y`` an integer class label, and stacks a batch with ``fetch(indices)``, reading
only those items. :func:`load_dataset` builds one from a spec string:

* ``"digits"``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes, 1 channel), no download;
* ``"digits-train"``, ``"digits-test"``: the fixed stratified 80/20 split of those (1,437 / 360 images),
  :func:`digits_split`; train on ``digits-train`` to evaluate against the held-out ``digits-test``;
* ``"folder:PATH"``: an image folder ``PATH/<class>/<image>`` read with PIL (RGB, centre-cropped and
  resized to ``image_size``; 16-bit and float images by their real range); the classes are the sorted
  names of the sub-folders that are not hidden; every image is read once before use, and a damaged one
  stops it with one line;
* ``"latents:DIR"``: a latents folder written by ``extract_latents.py`` (the format is described in
  :mod:`fpdm.latents`), read through memory maps (:class:`LatentFolder`): a process holds the rows it
  reads, never the whole array.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fpdm.files import FileKindError

__all__ = [
    "CROPS",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "IMAGE_EXTENSIONS",
    "LATENTS_FORMAT",
    "BatchesOf",
    "ImageFolder",
    "ImageModeError",
    "LatentFolder",
    "TensorPairs",
    "digits_split",
    "load_dataset",
    "load_digits",
    "pil_to_tensor",
    "quiet_worker",
    "read_image",
    "read_latents_meta",
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

    def fetch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """The items ``indices``, stacked: ``(B, C, H, W)`` and ``(B,)``."""
        index = torch.as_tensor(indices, dtype=torch.long)
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
#: How an image becomes a square of the asked size (:func:`pil_to_tensor`).
CROPS = ("center", "adm")


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


def _square(image: Any, size: int, crop: str) -> Any:
    """A PIL image cropped and resized to ``size`` x ``size``.

    ``"center"``: the centred square of the short side, resized (bicubic) to ``size``. ``"adm"``: the
    recipe of ADM and DiT's ImageNet data: halve the image (box filter) while its short side is at least
    ``2 * size``, resize (bicubic) so that the short side is ``size``, then take the centred square.
    """
    from PIL import Image

    if crop == "center":
        side = min(image.width, image.height)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    if crop != "adm":
        raise ValueError(f"crop must be one of {list(CROPS)}, got {crop!r}")
    while min(image.width, image.height) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.BOX)
    scale = size / min(image.width, image.height)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def pil_to_tensor(image: object, image_size: int, crop: str = "center") -> Tensor:
    """A PIL image as ``(3, S, S)`` in ``[-1, 1]``: RGB, cropped and resized to ``S`` (``crop``: ``"center"``
    or ``"adm"``, see :data:`CROPS`).

    8-bit images go through ``convert("RGB")``; 16-bit grayscale and float images (values in ``[0, 1]``)
    are scaled by their real range and resized in floating point (``convert("RGB")`` would clip them to
    near-white). Others raise :class:`ImageModeError`.
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    unit = _unit_range(image)
    if unit is None:
        square = _square(image.convert("RGB"), image_size, crop)
        array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0  # (S, S, 3)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
    plane = _square(Image.fromarray(unit, mode="F"), image_size, crop)
    gray = torch.from_numpy(np.asarray(plane, dtype=np.float32).clip(0.0, 1.0) * 2.0 - 1.0)
    return gray.unsqueeze(0).expand(3, -1, -1).contiguous()


def read_image(path: Path, image_size: int, crop: str = "center") -> Tensor:
    """One image file as :func:`pil_to_tensor` returns it; ``FileKindError`` naming the file otherwise."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return pil_to_tensor(image, image_size, crop)
    except ImageModeError as error:
        raise FileKindError(f"{path}: {error}") from None
    except Exception as error:  # PIL raises many kinds for a damaged file; all mean the same here
        raise FileKindError(f"{path}: not a readable image, or a damaged one ({error})") from None


def _hidden(name: str) -> bool:
    """Hidden by convention (``.ipynb_checkpoints``, ``.DS_Store``, macOS's ``._photo.jpg``)."""
    return name.startswith(".")


def _class_files(folder: Path) -> list[str]:
    """The image files of one class folder, sorted, hidden ones left out."""
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if not _hidden(entry.name) and entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
    )


class ImageFolder(Dataset):
    """Real images in ``root/<class>/<file>``, read lazily with PIL.

    The classes are the sub-folders whose names do not start with a dot (``.ipynb_checkpoints`` is not a
    class), in sorted order: labels ``0 .. K-1``. A class folder without an image file is refused, as is a
    root without class folders. The file list is kept in numpy arrays (no Python object per image), so
    that ``DataLoader`` workers share it instead of copying it as they read.

    Parameters
    ----------
    root : str or Path
        The folder.
    image_size : int
        Side of the square images returned.
    check : bool
        Read every image once before anything else (the default), so that a damaged file, or one whose
        values cannot be mapped to ``[-1, 1]``, stops a run before it starts rather than when a batch
        reaches it (:class:`files.FileKindError` naming how many and the first one).
    crop : str
        How an image becomes a square (:data:`CROPS`, see :func:`pil_to_tensor`).

    Attributes
    ----------
    classes : list of str
        The class folders' names, in label order.
    files : numpy.ndarray
        ``(N,)`` bytes: each image's path relative to ``root`` (``os.fsencode``), sorted by class then name.
    labels : numpy.ndarray
        ``(N,)`` int64.
    """

    def __init__(self, root: str | Path, image_size: int, check: bool = True, crop: str = "center") -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise FileKindError(f"{self.root}: is a file; expected a folder of images root/<class>/<image>")
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {list(CROPS)}, got {crop!r}")
        self.image_size, self.crop = image_size, crop
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not _hidden(e.name))
        if not self.classes:
            raise ValueError(f"{self.root} has no class sub-folders (expected root/<class>/<image>)")
        files, counts = [], []
        for name in self.classes:
            found = _class_files(self.root / name)
            if not found:
                raise ValueError(
                    f"class folder {self.root / name} holds no image ({', '.join(IMAGE_EXTENSIONS)}); add "
                    "images or move it out of the folder (folders starting with '.' are skipped)"
                )
            files += [os.fsencode(f"{name}/{file}") for file in found]
            counts.append(len(found))
        self.files = np.array(files, dtype=np.bytes_)
        self.labels = np.repeat(np.arange(len(self.classes), dtype=np.int64), counts)
        self.num_classes = len(self.classes)
        if check:
            self.check()

    def path(self, index: int) -> Path:
        """The file of item ``index``."""
        return self.root / os.fsdecode(self.files[index])

    def digest(self) -> str:
        """SHA-256 of the file list with its labels: two folders with the same digest list the same files
        under the same classes."""
        digest = hashlib.sha256()
        for name in self.classes:
            digest.update(os.fsencode(name) + b"\0")
        digest.update(b"\1")
        for file in self.files:
            digest.update(bytes(file) + b"\0")
        return digest.hexdigest()

    def check(self) -> None:
        """Read every image once; ``FileKindError`` with the number of bad files and the first reason."""
        bad = []
        for index in range(len(self)):
            try:
                read_image(self.path(index), 1)
            except FileKindError as error:
                bad.append(str(error))
        if bad:
            raise FileKindError(
                f"{self.root}: {len(bad)} of {len(self)} images cannot be used, the first: {bad[0]}"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = read_image(self.path(index), self.image_size, self.crop)
        return image, torch.tensor(int(self.labels[index]))

    def fetch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """The images ``indices``, decoded and stacked: ``(B, 3, S, S)`` and ``(B,)``."""
        index = [int(i) for i in indices]
        images = [read_image(self.path(i), self.image_size, self.crop) for i in index]
        return torch.stack(images), torch.from_numpy(self.labels[index])


# ----------------------------------------------------------------------------------------------------
# Latents folders (the format: fpdm.latents' module docstring)
# ----------------------------------------------------------------------------------------------------

#: The name and version of the latents folder format, ``meta.json``'s ``"format"``.
LATENTS_FORMAT = "fpdm-latents/1"
LATENTS_NAME, LABELS_NAME, META_NAME = "latents.npy", "labels.npy", "meta.json"
#: Left in a folder by an extraction that has not finished (its description), removed when it has.
JOB_NAME = "job.json"
#: The keys ``meta.json`` must have, and their types.
META_KEYS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "count": int,
    "num_classes": int,
    "class_names": list,
    "scaling_factor": (int, float),
    "vae": (str, type(None)),
    "image_size": (int, type(None)),
    "latent_shape": list,
    "dtype": str,
}
LATENT_DTYPES = ("float16", "float32")
LATENTS_KIND = "a latents folder written by extract_latents.py (latents.npy, labels.npy, meta.json)"


def _convert_command(path: Path) -> str:
    return f"python examples/fpdm/extract_latents.py --convert {path} --out {path.with_suffix('')}"


def read_latents_meta(folder: str | Path) -> dict[str, Any]:
    """A latents folder's ``meta.json``, checked: its format, and each key of :data:`META_KEYS` with its type.

    Raises
    ------
    files.FileKindError
        One line naming the folder: a file (a ``.pt`` latents file of the older format gets the command
        that converts it), no folder, an extraction that has not finished, no ``meta.json``, another format,
        a key missing or of the wrong type.
    """
    folder = Path(folder)
    if folder.is_file():
        if zipfile.is_zipfile(folder):
            raise FileKindError(
                f"{folder}: a latents file of the older format (torch.save); convert it once with: "
                f"{_convert_command(folder)}"
            )
        if folder.name in (LATENTS_NAME, LABELS_NAME, META_NAME):
            raise FileKindError(
                f"{folder}: is a file of a latents folder; name the folder: latents:{folder.parent}"
            )
        raise FileKindError(f"{folder}: is a file (expected {LATENTS_KIND})")
    if not folder.is_dir():
        raise FileKindError(f"{folder}: no such folder (expected {LATENTS_KIND})")
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        if (folder / JOB_NAME).is_file():
            raise FileKindError(
                f"{folder}: an extraction that has not finished; run the same extract_latents.py command "
                "again to finish it"
            )
        raise FileKindError(f"{folder}: has no {META_NAME} (expected {LATENTS_KIND})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        raise FileKindError(f"{meta_path}: not a JSON file ({error})") from None
    if not isinstance(meta, dict):
        raise FileKindError(f"{meta_path}: holds a {type(meta).__name__}, not a JSON object")
    if meta.get("format") != LATENTS_FORMAT:
        raise FileKindError(
            f"{meta_path}: format {meta.get('format')!r}; this version reads {LATENTS_FORMAT!r}"
        )
    for key, kind in META_KEYS.items():
        if key not in meta:
            raise FileKindError(f"{meta_path}: has no {key!r} (expected {LATENTS_KIND})")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise FileKindError(f"{meta_path}: {key!r} is {meta[key]!r}, of the wrong type")
    if meta["dtype"] not in LATENT_DTYPES:
        raise FileKindError(f"{meta_path}: dtype {meta['dtype']!r}; expected one of {list(LATENT_DTYPES)}")
    if meta["num_classes"] < 1 or len(meta["class_names"]) != meta["num_classes"]:
        raise FileKindError(
            f"{meta_path}: {len(meta['class_names'])} class_names for num_classes {meta['num_classes']}"
        )
    return meta


class LatentFolder(Dataset):
    """A latents folder (the format: :mod:`fpdm.latents`), read through memory maps.

    ``latents.npy`` and ``labels.npy`` are opened with ``numpy.load(..., mmap_mode="r")``: an item or a
    batch (:meth:`fetch`) reads its rows from the file (the page cache), so a process's memory does not grow
    with the number of latents. The maps are opened in each process that reads (``DataLoader`` workers
    too, whatever their start method) and never pickled. Items come back as float32 whatever the stored
    dtype.

    Raises
    ------
    files.FileKindError
        One line naming the folder or file, when it is not such a folder (see :func:`read_latents_meta`),
        when an array's shape or dtype differs from ``meta.json``, or a label lies outside the classes.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = read_latents_meta(self.folder)
        self.num_classes: int = self.meta["num_classes"]
        self.class_names: list[str] = self.meta["class_names"]
        self.scaling_factor = float(self.meta["scaling_factor"])
        self._maps: tuple[np.memmap, np.memmap] | None = None
        self._check_arrays()

    def _open(self, name: str) -> np.memmap:
        path = self.folder / name
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise FileKindError(f"{path}: not a readable .npy file ({error})") from None
        if not isinstance(array, np.memmap):
            raise FileKindError(f"{path}: not a .npy array that can be memory-mapped")
        return array

    @property
    def latents(self) -> np.memmap:
        """``(N, C, h, w)``, memory-mapped."""
        return self._memmaps()[0]

    @property
    def labels(self) -> np.memmap:
        """``(N,)`` int64, memory-mapped."""
        return self._memmaps()[1]

    def _memmaps(self) -> tuple[np.memmap, np.memmap]:
        if self._maps is None:
            self._maps = (self._open(LATENTS_NAME), self._open(LABELS_NAME))
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        # A pickled memmap would carry its whole array: a worker opens its own maps instead.
        return {**self.__dict__, "_maps": None}

    def _check_arrays(self) -> None:
        meta, (latents, labels) = self.meta, self._memmaps()
        expected = (meta["count"], *meta["latent_shape"])
        if latents.shape != expected or latents.dtype != np.dtype(meta["dtype"]):
            raise FileKindError(
                f"{self.folder / LATENTS_NAME}: {latents.dtype} {latents.shape}, but {META_NAME} says "
                f"{meta['dtype']} {expected}"
            )
        if labels.shape != (meta["count"],) or labels.dtype != np.int64:
            raise FileKindError(
                f"{self.folder / LABELS_NAME}: {labels.dtype} {labels.shape}, expected int64 "
                f"({meta['count']},)"
            )
        chunk = 1 << 20  # a bounded read, whatever the count
        for start in range(0, len(labels), chunk):
            part = np.asarray(labels[start : start + chunk])
            low, high = int(part.min()), int(part.max())
            if low < 0 or high >= self.num_classes:
                raise FileKindError(
                    f"{self.folder / LABELS_NAME}: labels range over {low}..{high}, outside the "
                    f"{self.num_classes} classes 0..{self.num_classes - 1}"
                )

    def __len__(self) -> int:
        return int(self.meta["count"])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.fetch([index])
        return x[0], y[0]

    def fetch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """The rows ``indices``, read from the files: ``(B, C, h, w)`` float32 and ``(B,)`` long."""
        index = np.asarray(indices, dtype=np.int64)
        latents, labels = self._memmaps()
        x = torch.from_numpy(np.asarray(latents[index], dtype=np.float32))
        return x, torch.from_numpy(np.asarray(labels[index]))


def quiet_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=quiet_worker)``: a worker ignores Ctrl-C and SIGTERM, so that when they
    reach the whole process group (a terminal's Ctrl-C, a scheduler's SIGTERM) the main process finishes its
    step and stops its workers itself, rather than finding them dead."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BatchesOf(Dataset):
    """A dataset whose items are whole batches: ``BatchesOf(data)[indices]`` is ``data.fetch(indices)``.

    For ``DataLoader(BatchesOf(data), sampler=..., batch_size=None)``, whose sampler yields lists of
    indices: a worker reads a whole batch with the dataset's own ``fetch``. A file that cannot be read comes
    back as its one-line message (a string) instead of an exception, which a worker would wrap in its
    traceback.
    """

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor] | str:  # type: ignore[override]
        try:
            return self.data.fetch(indices)
        except FileKindError as error:
            return str(error)


def load_dataset(spec: str, image_size: int = 32) -> TensorPairs | ImageFolder | LatentFolder:
    """Build a dataset from ``"digits"``, ``"digits-train"``, ``"digits-test"``, ``"folder:PATH"`` or
    ``"latents:DIR"``."""
    if spec == "digits":
        return load_digits()
    if spec in ("digits-train", "digits-test"):
        return digits_split(spec.removeprefix("digits-"))  # type: ignore[arg-type]
    kind, _, where = spec.partition(":")
    if kind == "folder" and where:
        return ImageFolder(where, image_size)
    if kind == "latents" and where:
        return LatentFolder(where)
    raise ValueError(
        f"unknown dataset {spec!r}; use 'digits', 'digits-train', 'digits-test', 'folder:PATH' "
        "or 'latents:DIR'"
    )
