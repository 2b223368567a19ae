"""The FID Inception-v3: the network behind the FID, sFID and Inception Score that papers report.

FPDM and DiT report the numbers of ADM's evaluation suite (Dhariwal & Nichol 2021), which runs the
TensorFlow graph ``inception-2015-12-05`` (Szegedy et al. 2016, as used by Heusel et al. 2017 for the FID).
:class:`FIDInceptionV3` is that network in PyTorch, in the layout of pytorch-fid's port, whose weights file
``pt_inception-2015-12-05-6726825d.pth`` (:data:`INCEPTION_WEIGHTS_FILE`) it loads from disk, never from
the network. It differs from torchvision's Inception-v3 where the TensorFlow graph does: average pools that
do not count the padding, a max pool in the last block's pooling branch, 1008 classes.

One forward pass gives the three feature sets of ADM's evaluator:

* ``pool``: the 2048 average-pooled features (TF ``pool_3``), for the FID, precision and recall;
* ``spatial``: the first 7 channels of the 17x17 maps of ``Mixed_6d``'s 1x1 branch (TF ``mixed_6/conv``),
  2023 features, for the sFID (Nash et al. 2021);
* ``logits``: ``pool`` times the classifier's weights without its bias (TF ``softmax`` input), for the
  Inception Score.

Images enter as the TensorFlow graph takes them: ``uint8`` values, resized to 299x299 by TensorFlow 1's
bilinear rule (no half-pixel offset, :func:`resize_like_tensorflow`), then ``(x - 128) / 128``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpdm.files import FileKindError

__all__ = [
    "FEATURES",
    "INCEPTION_WEIGHTS_FILE",
    "FIDInceptionV3",
    "InceptionFeatures",
    "inception_extractor",
    "resize_like_tensorflow",
]

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
#: Where the weights file is published (pytorch-fid's release of the converted TensorFlow weights).
INCEPTION_WEIGHTS_SOURCE = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_FILE
)
#: The feature sets of one forward pass, and their sizes.
FEATURES = {"pool": 2048, "spatial": 7 * 17 * 17, "logits": 1008}


class _Conv(nn.Module):
    """Convolution without bias, batch norm (``eps = 1e-3``), ReLU: the graph's unit, as ``conv``/``bn``."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], **options: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, bias=False, **options)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TensorFlow's SAME average


class _BlockA(nn.Module):  # Mixed_5b, 5c, 5d
    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x: Tensor) -> Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branches = [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), double]
        return torch.cat([*branches, self.branch_pool(_avg_pool(x))], 1)


class _BlockB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):  # Mixed_6b .. 6e: factorised 7x7 convolutions
    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        row, column = {"padding": (0, 3)}, {"padding": (3, 0)}
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, width, 1)
        self.branch7x7_2 = _Conv(width, width, (1, 7), **row)
        self.branch7x7_3 = _Conv(width, 192, (7, 1), **column)
        self.branch7x7dbl_1 = _Conv(cin, width, 1)
        self.branch7x7dbl_2 = _Conv(width, width, (7, 1), **column)
        self.branch7x7dbl_3 = _Conv(width, width, (1, 7), **row)
        self.branch7x7dbl_4 = _Conv(width, width, (7, 1), **column)
        self.branch7x7dbl_5 = _Conv(width, 192, (1, 7), **row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = conv(double)
        return torch.cat([self.branch1x1(x), single, double, self.branch_pool(_avg_pool(x))], 1)


class _BlockD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        seven = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = conv(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):  # Mixed_7b (average pool), Mixed_7c (max pool, as the TensorFlow graph has it)
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        single = self.branch3x3_1(x)
        single = torch.cat([self.branch3x3_2a(single), self.branch3x3_2b(single)], 1)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        double = torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), single, double, self.branch_pool(pooled)], 1)


def resize_like_tensorflow(images: Tensor, size: int) -> Tensor:
    r"""Bilinear resize of ``(N, C, H, W)`` to ``size x size`` by TensorFlow 1's rule (``align_corners`` and
    ``half_pixel_centers`` both off), the resize inside the FID graph: output pixel :math:`i` reads input
    coordinate :math:`i \cdot H / \text{size}` (no half-pixel offset, unlike ``F.interpolate``), between the
    pixels :math:`\lfloor\cdot\rfloor` and :math:`\min(\lfloor\cdot\rfloor + 1, H - 1)`."""

    def along(x: Tensor, dim: int) -> Tensor:
        length = x.shape[dim]
        where = torch.arange(size, dtype=torch.float64) * (length / size)
        low = where.floor().long().clamp(max=length - 1)
        high = (low + 1).clamp(max=length - 1)
        weight = (where - low).to(x.dtype).to(x.device)
        shape = [1] * x.dim()
        shape[dim] = size
        weight = weight.reshape(shape)
        low, high = low.to(x.device), high.to(x.device)
        return x.index_select(dim, low) * (1 - weight) + x.index_select(dim, high) * weight

    return along(along(images, 2), 3)


class FIDInceptionV3(nn.Module):
    """The TensorFlow FID Inception-v3 in PyTorch (see the module); parameter names as pytorch-fid's file.

    ``forward`` takes ``uint8`` (or float ``0..255``) RGB images ``(N, 3, H, W)`` of any size and returns the
    :data:`FEATURES` as a dict of float32 tensors ``(N, D)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280, max_pool=False), _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, FEATURES["logits"])

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = resize_like_tensorflow(images.float(), 299)
        x = (x - 128.0) / 128.0  # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))
        spatial = self.Mixed_6d.branch1x1(x)[:, :7]  # (N, 7, 17, 17): TF's mixed_6/conv, 7 channels
        x = self.Mixed_6e(self.Mixed_6d(x))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048)
        return {"pool": pool, "spatial": spatial.flatten(1), "logits": pool @ self.fc.weight.T}


class InceptionFeatures:
    """:class:`FIDInceptionV3` as a feature extractor: images ``(N, C, H, W)`` in ``[-1, 1]`` (1 or 3
    channels) become ``uint8`` RGB (``round((x + 1) 127.5)``, one channel repeated), as ``sample.py``'s
    ``arr_0`` holds them. Calling it gives the ``pool`` features (a :data:`fpdm.metrics.FeatureExtractor`);
    :meth:`features` gives all of :data:`FEATURES`.

    Parameters
    ----------
    network : FIDInceptionV3
        In eval mode; moved to ``device``.
    device : str or torch.device
        Where the network runs.
    """

    def __init__(self, network: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()

    @torch.no_grad()
    def features(self, images: Tensor) -> dict[str, Tensor]:
        """Every feature set of :data:`FEATURES` of a batch, on the CPU."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes (N, 1 or 3, H, W) images, got {tuple(images.shape)}")
        pixels = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round()
        pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels  # (N, 3, H, W)
        return {k: v.float().cpu() for k, v in self.network(pixels.to(self.device)).items()}

    def __call__(self, images: Tensor) -> Tensor:
        return self.features(images)["pool"]


def inception_extractor(
    weights_path: str | Path | None = None, device: str | torch.device = "cpu"
) -> InceptionFeatures:
    """:class:`FIDInceptionV3` with the weights of ``weights_path``.

    Parameters
    ----------
    weights_path : str or Path, optional
        The converted TensorFlow weights, :data:`INCEPTION_WEIGHTS_FILE` (download it from
        :data:`INCEPTION_WEIGHTS_SOURCE`). By default, that file in torch hub's checkpoint folder
        (``torch.hub.get_dir()/checkpoints``), where pytorch-fid keeps it. It is never downloaded here.
    device : str or torch.device
        Where the network runs.

    Raises
    ------
    FileNotFoundError
        When the weights file is not on disk (the message says where to get it).
    files.FileKindError
        When the file is not a state dict of this network (one line naming the file and the first
        parameter that does not fit).
    """
    path = (
        Path(weights_path)
        if weights_path
        else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}; download {INCEPTION_WEIGHTS_SOURCE} and pass its path "
            "with --inception-weights"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many kinds for a file it cannot read; all mean the same here
        raise FileKindError(f"{path}: not a torch.save file (expected {INCEPTION_WEIGHTS_FILE})") from None
    network = FIDInceptionV3()
    expected = network.state_dict()
    if not isinstance(state, dict):
        raise FileKindError(f"{path}: holds a {type(state).__name__}, not a state dict")
    _check_state(path, state, expected)
    network.load_state_dict(state, strict=False)
    return InceptionFeatures(network, device)


def _check_state(path: Path, state: dict[str, Any], expected: dict[str, Tensor]) -> None:
    """Every parameter and statistic of the network is in ``state`` with its shape (batch-norm step counters
    may be absent; extra entries, such as an auxiliary classifier's, are ignored)."""
    expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    missing: Sequence[str] = sorted(set(expected) - set(state))
    if missing:
        raise FileKindError(
            f"{path}: has no {missing[0]!r} ({len(missing)} parameters missing; expected "
            f"{INCEPTION_WEIGHTS_FILE}, the FID Inception in pytorch-fid's layout)"
        )
    for name, value in expected.items():
        if not isinstance(state[name], Tensor) or state[name].shape != value.shape:
            got = tuple(state[name].shape) if isinstance(state[name], Tensor) else type(state[name]).__name__
            raise FileKindError(f"{path}: {name!r} is {got}, expected {tuple(value.shape)}")
