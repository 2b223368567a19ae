"""Encode an image folder into VAE latents for latent-space training (``--data latents:FILE``).

Uses diffusers' ``AutoencoderKL`` (``pip install implicitdiff[latents]``), e.g. Stable Diffusion's VAE as in
DiT and FPDM (256 px images -> 32x32x4 latents)::

    python examples/fpdm/extract_latents.py --images /data/imagenet/train --out imagenet256.pt \\
        --vae stabilityai/sd-vae-ft-ema --image-size 256

``--vae`` is a Hub id or a local folder saved with ``AutoencoderKL.save_pretrained``. ``--random-tiny-vae``
builds a small randomly initialised autoencoder instead (for tests, and machines without the weights).
The output is a ``torch.save`` of plain tensors, read by ``data.LatentDataset`` with ``weights_only=True``:
``latents`` ``(N, C, h, w)`` float32, already multiplied by the VAE's ``scaling_factor``; ``labels`` ``(N,)``;
``num_classes``, ``scaling_factor`` (0-d tensors); written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import ImageFolder

__all__ = ["encode_folder", "load_vae", "main", "tiny_vae"]


def tiny_vae(seed: int = 0) -> Any:
    """A small randomly initialised ``AutoencoderKL`` (2x downsampling, 4 latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def load_vae(name: str | None, random_tiny: bool = False) -> Any:
    """``AutoencoderKL.from_pretrained(name)`` (Hub id or local folder), or :func:`tiny_vae`."""
    if random_tiny:
        return tiny_vae()
    if not name:
        raise ValueError("pass --vae (a Hub id or a folder) or --random-tiny-vae")
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(name)


@torch.no_grad()
def encode_folder(
    vae: Any,
    images: ImageFolder,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    sample: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Encode every image; returns the dict written by :func:`main`.

    ``sample=True`` draws from the encoder's diagonal Gaussian (as DiT's feature extraction does);
    ``False`` takes its mean.
    """
    vae = vae.to(device).eval()
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    generator = torch.Generator(device=device).manual_seed(seed)
    latents, labels = [], []
    for start in range(0, len(images), batch_size):
        items = [images[i] for i in range(start, min(start + batch_size, len(images)))]
        x = torch.stack([x for x, _ in items]).to(device)  # (B, 3, S, S) in [-1, 1]
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        latents.append((z * scaling).float().cpu())  # (B, 4, S/f, S/f)
        labels.append(torch.stack([y for _, y in items]))
    return {
        "latents": torch.cat(latents),
        "labels": torch.cat(labels).long(),
        "num_classes": torch.tensor(images.num_classes),
        "scaling_factor": torch.tensor(scaling),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="image folder root/<class>/<image>")
    parser.add_argument("--out", required=True, help="output file (.pt)")
    parser.add_argument("--vae", default=None, help="AutoencoderKL: Hub id or local folder")
    parser.add_argument("--random-tiny-vae", action="store_true", help="a small random VAE (tests)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mean", action="store_true", help="encode to the posterior mean, not a sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    vae = load_vae(args.vae, args.random_tiny_vae)
    payload = encode_folder(
        vae,
        ImageFolder(args.images, args.image_size),
        batch_size=args.batch_size,
        device=args.device,
        sample=not args.mean,
        seed=args.seed,
    )
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out)
    shape = tuple(payload["latents"].shape)
    print(f"wrote {shape[0]} latents of shape {shape[1:]} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
