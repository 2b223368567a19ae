"""Sample a trained FPDM (or DiT) under a budget of block evaluations; write an image grid and the arrays.

::

    python examples/fpdm/sample.py runs/fpdm-digits/checkpoint.pt --budget 48 --num 100 --guidance 2 \\
        --schedule constant --solver picard --out runs/fpdm-digits/samples

The checkpoint is the one ``train.py`` writes, read with ``weights_only=True``; the EMA weights are used
unless ``--no-ema``. Labels cycle through the classes (``--labels`` picks them). The options map one to one
onto :func:`sampling.sample` (``--steps`` omitted: picked from the budget; ``--no-reuse``: cold starts).
Written under ``--out``: ``grid.png`` (one row per ``--nrow`` images, each upscaled to ``--pixels`` pixels),
``samples.npz`` (``images`` ``(N, C, H, W)`` in ``[-1, 1]``, ``labels``, and per batch and timestep
``timesteps``, ``spent``, ``iterations``, ``residuals``) and ``summary.json`` (options and spent compute).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusion import SPACINGS, GaussianDiffusion
from sampling import METHODS, SCHEDULES, SampleResult, block_cost, pick_steps, sample
from train import TrainConfig, build_model, load_checkpoint, make_solver

__all__ = ["generate", "load_model", "main", "parse_args", "run", "save_grid"]


def load_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a ``train.py`` checkpoint and load its (EMA) weights, in eval mode.

    The architecture comes from the checkpoint's ``config``; the data's channels, image size and number of
    classes from the shapes of its weights, so the data set is not needed.
    """
    ckpt = load_checkpoint(path)
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by train.py (no 'config' or 'model')")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in fields})
    if ema and "ema" in ckpt:
        state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    else:
        state = ckpt["model"]
    _, in_channels, patch, _ = state["patch_embed.weight"].shape  # (D, C, p, p)
    grid = math.isqrt(state["pos_embed"].shape[1])
    num_classes = state["y_embedder.table.weight"].shape[0] - 1
    model = build_model(cfg, in_channels, grid * patch, num_classes)
    model.load_state_dict(state)
    return model.to(device).eval()


def generate(
    model: nn.Module,
    labels: Tensor,
    *,
    batch_size: int,
    seed: int = 0,
    progress: bool = True,
    diffusion: GaussianDiffusion | None = None,
    **options: Any,
) -> tuple[Tensor, list[SampleResult]]:
    """Sample one image per label in batches of ``batch_size`` with :func:`sampling.sample`.

    One generator, seeded once, serves all batches, so the images depend on ``seed`` and ``batch_size``
    only. ``options`` go to :func:`sampling.sample` (``budget`` among them). Returns the images ``(N, C, H,
    W)`` on the CPU and each batch's :class:`~sampling.SampleResult`.
    """
    diffusion = GaussianDiffusion() if diffusion is None else diffusion
    generator = torch.Generator().manual_seed(seed)
    batches = labels.split(batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        fixed, implicit = block_cost(model)
        steps = options.get("steps") or pick_steps(options["budget"], fixed, implicit)
        bar = tqdm(total=len(batches) * steps, desc="sample", unit="step", dynamic_ncols=True)
    images, results = [], []

    def callback(info: dict[str, Any]) -> None:
        if bar is not None:
            bar.set_postfix(evals=info["spent"], residual=f"{info['residual']:.1e}", refresh=False)
            bar.update(1)

    for batch in batches:
        result = sample(model, diffusion, batch, generator=generator, callback=callback, **options)
        images.append(result.images.cpu())
        results.append(result)
    if bar is not None:
        bar.close()
    return torch.cat(images), results


def save_grid(images: Tensor, path: str | Path, *, nrow: int = 10, pixels: int = 48, pad: int = 2) -> Path:
    """Write images ``(N, C, H, W)`` in ``[-1, 1]`` (1 or 3 channels) as one PNG grid, each image upscaled
    to ``pixels`` by nearest neighbour (8x8 digits are too small to see at their size)."""
    from PIL import Image

    n, channels, height, width = images.shape
    if channels not in (1, 3):
        raise ValueError(f"a grid needs 1 or 3 channels, got {channels} (latents: decode them first)")
    scale = max(1, pixels // max(height, width))
    tiles = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    tiles = tiles.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    rows = math.ceil(n / nrow)
    tile_h, tile_w = height * scale, width * scale
    canvas = torch.full(
        (channels, rows * (tile_h + pad) + pad, nrow * (tile_w + pad) + pad), 255, dtype=torch.uint8
    )
    for k in range(n):
        r, c = divmod(k, nrow)
        top, left = pad + r * (tile_h + pad), pad + c * (tile_w + pad)
        canvas[:, top : top + tile_h, left : left + tile_w] = tiles[k]
    array = canvas.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0] if channels == 1 else array).save(path)
    return path


def _summary(results: list[SampleResult], labels: Tensor) -> dict[str, Any]:
    first = results[0].summary()
    per_step = ("timesteps", "allocated", "spent", "iterations", "residuals", "first_residuals")
    return {
        **{k: v for k, v in first.items() if k not in (*per_step, "wall_s", "num_images")},
        "num_images": int(labels.numel()),
        "batches": len(results),
        "wall_s": sum(r.wall_s for r in results),
        "spent_per_sample_max": max(r.spent_total for r in results),
        "per_step_first_batch": {k: first[k] for k in per_step},
    }


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Load, sample, write the grid, the arrays and the summary; returns their paths."""
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint, ema=args.ema, device=args.device)
    if args.labels:
        labels = torch.tensor(args.labels, dtype=torch.long)
        labels = labels.repeat(math.ceil(args.num / labels.numel()))[: args.num]
    else:
        labels = torch.arange(args.num) % model.num_classes
    images, results = generate(
        model,
        labels.to(args.device),
        batch_size=args.batch_size,
        seed=args.seed,
        progress=args.progress,
        diffusion=GaussianDiffusion(spacing=args.spacing),
        budget=args.budget,
        steps=args.steps,
        schedule=args.schedule,
        solver=make_solver(args.solver),
        reuse=args.reuse,
        method=args.method,
        eta=args.eta,
        guidance=args.guidance,
        tol=args.tol,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"npz": out / "samples.npz", "summary": out / "summary.json"}
    np.savez(
        paths["npz"],
        images=images.float().numpy(),
        labels=labels.cpu().numpy(),
        timesteps=np.array([r.timesteps for r in results]),
        spent=np.array([r.spent for r in results]),
        iterations=np.array([r.iterations for r in results]),
        residuals=np.array([r.residuals for r in results], dtype=np.float64),
    )
    summary = {
        "checkpoint": str(args.checkpoint),
        "spacing": args.spacing,
        "seed": args.seed,
        "ema": args.ema,
        **_summary(results, labels),
    }
    if images.shape[1] in (1, 3):
        paths["grid"] = save_grid(images, out / "grid.png", nrow=args.nrow, pixels=args.pixels)
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("checkpoint", help="checkpoint.pt written by train.py")
    add("--out", default=None, help="output folder (default: samples/ next to the checkpoint)")
    add("--num", type=int, default=100, help="number of images")
    add("--budget", type=int, required=True, help="transformer-block evaluations per sample")
    add("--steps", type=int, default=None, help="timesteps (default: picked from the budget)")
    add("--schedule", default="constant", choices=SCHEDULES)
    add("--solver", default="picard", choices=["picard", "anderson", "broyden"])
    add("--reuse", action=argparse.BooleanOptionalAction, default=True, help="warm start from the last step")
    add("--method", default="ddim", choices=METHODS)
    add("--eta", type=float, default=0.0, help="DDIM noise scale")
    add("--spacing", default="trailing", choices=SPACINGS, help="how the timesteps are spaced (respace)")
    add("--guidance", type=float, default=2.0, help="classifier-free guidance scale (1: none)")
    add("--tol", type=float, default=1e-3, help="relative residual of the 'tolerance' schedule")
    add("--seed", type=int, default=0)
    add("--labels", type=int, nargs="*", default=None, help="labels to cycle through (default: all classes)")
    add("--batch-size", type=int, default=100)
    add("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    add("--nrow", type=int, default=10, help="images per row of the grid")
    add("--pixels", type=int, default=48, help="side of each image in the grid")
    add("--device", default="cpu")
    add("--threads", type=int, default=min(2, torch.get_num_threads()), help="torch CPU threads")
    add("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(Path(args.checkpoint).parent / "samples")
    if args.num < 1 or args.batch_size < 1:
        parser.error("--num and --batch-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: sample and print where the files are."""
    paths = run(parse_args(argv))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
