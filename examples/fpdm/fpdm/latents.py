"""Encoding an image folder into VAE latents for latent-space training (``extract_latents.py``).

Uses diffusers' ``AutoencoderKL`` (``pip install implicitdiff[latents]``), e.g. Stable Diffusion's VAE as in
DiT and FPDM (256 px images to 32x32x4 latents); ``--random-tiny-vae`` builds a small random one instead,
for tests. The output is a ``torch.save`` of plain tensors (``latents`` already scaled by the VAE's
``scaling_factor``, ``labels``), written atomically and read by ``fpdm.data.LatentDataset`` with
``weights_only=True``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fpdm.cli import OneLineParser, UsageError, bounded_int, run_command
from fpdm.data import ImageFolder
from fpdm.distributed import resolve_device
from fpdm.files import FileKindError, save_atomically

__all__ = ["build_parser", "encode_folder", "load_vae", "main", "tiny_vae"]


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


def build_parser() -> argparse.ArgumentParser:
    """The command line; see the module docstring."""
    parser = OneLineParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--images", required=True, help="image folder root/<class>/<image>")
    add("--out", required=True, help="output file (.pt)")
    add("--overwrite", action="store_true", help="replace --out if it exists")
    add("--vae", default=None, help="AutoencoderKL: Hub id or local folder")
    add("--random-tiny-vae", action="store_true", help="a small random VAE (tests)")
    add("--image-size", type=bounded_int(1), default=256, help="side of the square images encoded")
    add("--batch-size", type=bounded_int(1), default=32, help="images per batch")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="'cpu', 'cuda' or 'cuda:N'")
    add("--mean", action="store_true", help="encode to the posterior mean, not a sample")
    add("--seed", type=bounded_int(0), default=0, help="seed of the posterior samples")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; see the module docstring. Exit status 2 on a usage error (an existing ``--out``
    without ``--overwrite``, a missing image folder, no VAE named)."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def command() -> int:
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise UsageError(f"{out} already exists; pass --overwrite or another --out")
        try:
            images = ImageFolder(args.images, args.image_size)
            vae = load_vae(args.vae, args.random_tiny_vae)
        except (ValueError, FileNotFoundError) as error:
            raise UsageError(str(error)) from None
        options = {
            "batch_size": args.batch_size,
            "device": args.device,
            "sample": not args.mean,
            "seed": args.seed,
        }
        resolve_device(args.device, "--device")
        try:
            payload = encode_folder(vae, images, **options)
        except FileKindError as error:  # an image changed since the folder was checked
            raise UsageError(str(error)) from None
        save_atomically(payload, out)
        shape = tuple(payload["latents"].shape)
        print(f"wrote {shape[0]} latents of shape {shape[1:]} to {out}")
        return 0

    return run_command(parser, command)
