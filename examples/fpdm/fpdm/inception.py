"""Inception-v3 features (the FID network) through torch-fidelity or torchmetrics, when installed.

The 2048 pool features of the TensorFlow FID Inception-v3, through torch-fidelity, or torchmetrics (which
wraps the same network), when one of them is installed and the weights file is on disk. Nothing is
downloaded here: pass the file, or put it in torch hub's cache. Scores in this space are comparable with
published FID/KID only for RGB images of a reasonable size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["INCEPTION_WEIGHTS_FILE", "InceptionFeatures", "inception_extractor"]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


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
