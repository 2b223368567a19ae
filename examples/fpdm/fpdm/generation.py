"""Sampling a checkpoint of ``train.py`` to an image grid and arrays (``sample.py``).

:func:`load_model` rebuilds the model from the checkpoint alone (``weights_only=True``; the EMA weights
unless asked otherwise); :func:`generate` samples in batches with one seeded generator, so the images
depend only on the seed and the batch size; :func:`main` writes ``grid.png``, ``samples.npz`` and
``summary.json``. The options map one to one onto :func:`fpdm.sampling.sample`, or with ``--parallel``
onto :func:`fpdm.parallel.sample_parallel`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fpdm.cli import OneLineParser, UsageError, bounded_float, bounded_int, run_command
from fpdm.diffusion import METHODS, SPACINGS, GaussianDiffusion
from fpdm.distributed import resolve_device
from fpdm.files import FileKindError, staged_folder
from fpdm.parallel import DEFAULT_TAU, FORMS, ParallelResult, sample_parallel_batches
from fpdm.registry import SOLVERS, make_solver
from fpdm.sampling import SCHEDULES, SampleResult, plan_timesteps, sample
from fpdm.training import TrainConfig, build_model, load_checkpoint, stored_config

__all__ = [
    "OUTPUT_NAMES",
    "build_parser",
    "generate",
    "load_model",
    "main",
    "parse_args",
    "run",
    "save_grid",
    "tile",
]


def load_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a ``train.py`` checkpoint and load its (EMA) weights, in eval mode.

    The architecture comes from the checkpoint's ``config``; the data's channels, image size and number of
    classes from the shapes of its weights, so the data set is not needed.
    """
    ckpt = load_checkpoint(path)
    cfg = TrainConfig(**stored_config(ckpt, TrainConfig))
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
    """Sample one image per label in batches of ``batch_size`` with :func:`fpdm.sampling.sample`.

    One generator, seeded once, serves all batches, so the images depend on ``seed`` and ``batch_size``
    only. ``options`` go to :func:`fpdm.sampling.sample` (``budget`` among them). Returns the images
    ``(N, C, H, W)`` on the CPU and each batch's :class:`~fpdm.sampling.SampleResult`.
    """
    diffusion = GaussianDiffusion() if diffusion is None else diffusion
    generator = torch.Generator().manual_seed(seed)
    batches = labels.split(batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        timesteps, _ = plan_timesteps(model, diffusion, options["budget"], options.get("steps"), "constant")
        steps = len(timesteps)
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


def tile(images: Tensor, nrow: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Images ``(N, C, H, W)`` as one ``uint8`` array ``(rows (H + pad) + pad, nrow (W + pad) + pad, C)``,
    ``nrow`` to a row, ``pad`` pixels of ``fill`` around each; a short last row is filled with ``fill``."""
    n, channels, height, width = images.shape
    rows = math.ceil(n / nrow)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    cells = np.full((rows * nrow, height + pad, width + pad, channels), fill, dtype=np.uint8)
    cells[:n, pad:, pad:] = pixels  # each cell: a pad above and left of its image
    grid = cells.reshape(rows, nrow, height + pad, width + pad, channels).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * (height + pad), nrow * (width + pad), channels)
    return np.pad(grid, ((0, pad), (0, pad), (0, 0)), constant_values=fill)  # the pad below and right


def save_grid(images: Tensor, path: str | Path, *, nrow: int = 10, pixels: int = 48, pad: int = 2) -> Path:
    """Write images ``(N, C, H, W)`` in ``[-1, 1]`` (1 or 3 channels) as one PNG grid (:func:`tile`), each
    image upscaled to ``pixels`` by nearest neighbour (8x8 digits are too small to see at their size)."""
    from PIL import Image

    channels, height, width = images.shape[1:]
    if channels not in (1, 3):
        raise ValueError(f"a grid needs 1 or 3 channels, got {channels} (latents: decode them first)")
    scale = max(1, pixels // max(height, width))
    upscaled = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    array = tile(upscaled, nrow, pad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0] if channels == 1 else array).save(path)
    return path


def _summary(results: list[SampleResult] | list[ParallelResult], labels: Tensor) -> dict[str, Any]:
    first = results[0].summary()
    per_step = ("timesteps", "allocated", "spent", "iterations", "residuals", "first_residuals", "tolerances")
    summary = {
        **{k: v for k, v in first.items() if k not in (*per_step, "wall_s", "num_images")},
        "num_images": int(labels.numel()),
        "batches": len(results),
        "wall_s": sum(r.wall_s for r in results),
        "spent_per_sample_max": max(r.spent_total for r in results),
        "per_step_first_batch": {k: first[k] for k in per_step if k in first},
    }
    if isinstance(results[0], ParallelResult):
        summary["sweeps"] = max(r.sweeps for r in results)
    return summary


OUTPUT_NAMES = ("grid.png", "samples.npz", "summary.json")


def _labels(args: argparse.Namespace, num_classes: int) -> Tensor:
    """``--num`` labels cycling through ``--labels`` (default: every class); ``UsageError`` out of range."""
    if not args.labels:
        return torch.arange(args.num) % num_classes
    wrong = [label for label in args.labels if not 0 <= label < num_classes]
    if wrong:
        raise UsageError(f"--labels {wrong}: the model has classes 0..{num_classes - 1}")
    labels = torch.tensor(args.labels, dtype=torch.long)
    return labels.repeat(math.ceil(args.num / labels.numel()))[: args.num]


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    found = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if found and not overwrite:
        raise UsageError(
            f"{out} already holds samples ({', '.join(found)}); pass --overwrite or another --out"
        )


def _write_arrays(
    path: Path, images: Tensor, labels: Tensor, results: list[SampleResult] | list[ParallelResult]
) -> Path:
    np.savez(
        path,
        images=images.float().numpy(),
        labels=labels.cpu().numpy(),
        timesteps=np.array([r.timesteps for r in results]),
        spent=np.array([r.spent for r in results]),
        iterations=np.array([r.iterations for r in results]),
        residuals=np.array([r.residuals for r in results], dtype=np.float64),
    )
    return path


def _generate(
    model: nn.Module, labels: Tensor, args: argparse.Namespace
) -> tuple[Tensor, list[SampleResult]]:
    reuse = True if args.reuse is None else args.reuse
    options = {"budget": args.budget, "steps": args.steps, "schedule": args.schedule, "reuse": reuse}
    options.update(method=args.method, eta=args.eta, guidance=args.guidance, tol=args.tol)
    return generate(
        model,
        labels.to(args.device),
        batch_size=args.batch_size,
        seed=args.seed,
        progress=args.progress,
        diffusion=GaussianDiffusion(spacing=args.spacing),
        solver=make_solver(args.solver),
        **options,
    )


def _generate_parallel(
    model: nn.Module, labels: Tensor, args: argparse.Namespace
) -> tuple[Tensor, list[ParallelResult]]:
    """``--parallel``: the timesteps and iterations of the sequential run the budget pays for, in parallel."""
    if args.method != "ddim" or args.eta != 0:
        raise UsageError(
            f"--parallel is deterministic DDIM: use --method ddim --eta 0, got --method {args.method} "
            f"--eta {args.eta:g}"
        )
    if args.reuse and hasattr(model, "pre_depth"):
        raise UsageError(
            "--parallel --reuse: the parallel sampler reproduces sequential sampling with --no-reuse (reuse "
            "warm-starts each timestep's solve from the timestep before it, which all timesteps at once "
            "cannot); drop --reuse"
        )
    diffusion = GaussianDiffusion(spacing=args.spacing)
    timesteps, plan = plan_timesteps(model, diffusion, args.budget, args.steps, "constant")
    options: dict[str, Any] = {"steps": len(timesteps), "reuse": False}
    if hasattr(model, "pre_depth"):
        options.update(iterations=min(plan), block_solver=make_solver(args.solver))
    return sample_parallel_batches(
        model,
        labels.to(args.device),
        batch_size=args.batch_size,
        seed=args.seed,
        diffusion=diffusion,
        solver=None if args.chain_solver == "secant" else make_solver(args.chain_solver),
        tol=args.chain_tol,
        tau=args.chain_tau,
        window=args.window,
        form=args.form,
        max_batch=None if args.max_batch == "none" else args.max_batch,
        guidance=args.guidance,
        **options,
    )


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Load, sample, write the grid, the arrays and the summary; returns their paths.

    Raises
    ------
    cli.UsageError
        An output folder that holds samples (without ``--overwrite``), labels outside the model's classes,
        a checkpoint that is not one (:class:`files.FileKindError`), or sampling options that do not fit the
        model or the budget.
    """
    out = Path(args.out)
    _check_out(out, args.overwrite)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device, "--device")
    try:
        model = load_model(args.checkpoint, ema=args.ema, device=device)
    except FileKindError as error:
        raise UsageError(str(error)) from None
    _check_model_options(model, args)
    labels = _labels(args, model.num_classes)
    try:
        images, results = (_generate_parallel if args.parallel else _generate)(model, labels, args)
    except ValueError as error:  # a budget, steps or schedule that does not fit this model
        raise UsageError(str(error)) from None
    summary = {
        "checkpoint": str(args.checkpoint),
        "spacing": args.spacing,
        "seed": args.seed,
        "ema": args.ema,
    }
    summary.update(_summary(results, labels))
    # Written aside, then moved in: a full disk leaves the samples of an earlier run (--overwrite) whole.
    with staged_folder(out) as stage:
        _write_arrays(stage / "samples.npz", images, labels, results)
        if images.shape[1] in (1, 3):
            save_grid(images, stage / "grid.png", nrow=args.nrow, pixels=args.pixels)
        (stage / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    paths = {"npz": out / "samples.npz", "summary": out / "summary.json"}
    if images.shape[1] in (1, 3):
        paths["grid"] = out / "grid.png"
    return paths


TOL_HELP = "FPDM, --schedule tolerance: the relative residual that ends a solve (default: 1e-3)"
REUSE_HELP = "warm start from the last step; default on (--parallel reproduces --no-reuse, refuses --reuse)"
CHAIN_TOL_HELP = "--parallel: one RMS residual for every timestep (default: --chain-tau's noise-scaled ones)"
CHAIN_TAU_HELP = f"--parallel: RMS residual tau * sqrt(1 - abar_t) per timestep (default {DEFAULT_TAU:g})"
MAX_BATCH_HELP = "--parallel: timesteps per model call, 'auto' (default; fits CUDA memory) or 'none'"


def _max_batch_option(text: str) -> int | str:
    """An argparse ``type=`` for ``--max-batch``: ``auto``, ``none`` or an int >= 1."""
    if text in ("auto", "none"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or an int >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line; see the module docstring."""
    parser = OneLineParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    positive = bounded_int(1)
    add("checkpoint", help="checkpoint.pt written by train.py")
    add("--out", default=None, help="output folder (default: samples/ next to the checkpoint)")
    add("--overwrite", action="store_true", help="replace the samples already in --out")
    add("--num", type=positive, default=100, help="number of images")
    add("--budget", type=positive, required=True, help="transformer-block evaluations per sample")
    add("--steps", type=positive, default=None, help="timesteps (default: picked from the budget)")
    add("--schedule", default=None, choices=SCHEDULES, help="FPDM: iterations per timestep (constant)")
    add("--solver", default=None, choices=tuple(SOLVERS), help="FPDM: fixed-point solver (default: picard)")
    add("--reuse", action=argparse.BooleanOptionalAction, default=None, help=REUSE_HELP)
    add("--method", default="ddim", choices=METHODS, help="reverse step")
    add("--eta", type=bounded_float(0.0), default=0.0, help="DDIM noise scale (0: deterministic)")
    add("--spacing", default="trailing", choices=SPACINGS, help="how the timesteps are spaced (respace)")
    add("--guidance", type=bounded_float(), default=2.0, help="classifier-free guidance scale (1: none)")
    add("--tol", type=bounded_float(0.0, low_open=True), default=None, help=TOL_HELP)
    add("--parallel", action="store_true", help="DDIM with every timestep solved at once (parallel.py)")
    add("--chain-solver", default=None, choices=CHAIN_SOLVERS, help="--parallel: chain rule (secant)")
    add("--chain-tol", type=bounded_float(0.0), default=None, help=CHAIN_TOL_HELP)
    add("--chain-tau", type=bounded_float(0.0), default=None, help=CHAIN_TAU_HELP)
    add("--window", type=positive, default=None, help="--parallel: timesteps per sweep (default: all)")
    add("--form", default=None, choices=FORMS, help="--parallel: the map iterated (default: cumulative)")
    add("--max-batch", type=_max_batch_option, default=None, help=MAX_BATCH_HELP)
    add("--seed", type=bounded_int(0), default=0, help="seed of the noise")
    add("--labels", type=bounded_int(0), nargs="*", default=None, help="labels to cycle (default: all)")
    add("--batch-size", type=positive, default=100, help="images per batch")
    add("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    add("--nrow", type=positive, default=10, help="images per row of the grid")
    add("--pixels", type=positive, default=48, help="side of each image in the grid")
    add("--device", default="cpu", help="'cpu', 'cuda' or 'cuda:N'")
    add("--threads", type=positive, default=min(2, torch.get_num_threads()), help="torch CPU threads")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    return parser


#: The rules of ``--chain-solver``: ``secant`` is :class:`implicitdiff.ChainSecant` with one model per
#: sample (``sample_parallel``'s default), the others the solvers of :data:`fpdm.registry.SOLVERS`.
CHAIN_SOLVERS = ("secant", *SOLVERS)

#: Options that only ``--parallel`` uses, and their defaults there (``--chain-tol`` and ``--chain-tau`` stay
#: ``None`` when not given: ``sample_parallel``'s noise-scaled tolerances with its ``DEFAULT_TAU``).
PARALLEL_ONLY = {
    "chain_solver": "secant",
    "chain_tol": None,
    "chain_tau": None,
    "window": None,
    "form": "cumulative",
    "max_batch": "auto",
}
#: Options of the sequential sampler that ``--parallel`` does not use.
SEQUENTIAL_ONLY = ("schedule", "tol")
#: Options of FPDM's implicit block, and their defaults.
FPDM_ONLY = {"schedule": "constant", "solver": "picard", "tol": 1e-3, "reuse": None}


def _given(args: argparse.Namespace, names: Any) -> list[str]:
    """The options among ``names`` given on the command line (left at ``None`` otherwise)."""
    return [name for name in names if getattr(args, name, None) is not None]


def _option_text(args: argparse.Namespace, name: str) -> str:
    value = getattr(args, name)
    if isinstance(value, bool):
        return "--" + ("" if value else "no-") + name.replace("_", "-")
    return f"--{name.replace('_', '-')} {value}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring (a bad value exits with status 2, as does an option
    that would do nothing: a ``--parallel`` option without it, ``--schedule``/``--tol`` with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(Path(args.checkpoint).parent / "samples")
    unused = _given(args, SEQUENTIAL_ONLY) if args.parallel else _given(args, PARALLEL_ONLY)
    if unused:
        why = "--parallel solves DDIM with its own chain" if args.parallel else "it is for --parallel only"
        parser.error(f"{_option_text(args, unused[0])} does nothing here: {why}; drop it")
    if args.chain_tol is not None and args.chain_tau is not None:
        parser.error(
            f"--chain-tol {args.chain_tol:g} and --chain-tau {args.chain_tau:g}: give one (a tolerance for "
            "every timestep, or noise-scaled ones), not both"
        )
    for name, default in PARALLEL_ONLY.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def _check_model_options(model: nn.Module, args: argparse.Namespace) -> None:
    """Refuse FPDM-only options on a DiT; fill in the defaults of those not given."""
    if not hasattr(model, "pre_depth"):
        given = _given(args, FPDM_ONLY)
        if given:
            raise UsageError(
                f"{_option_text(args, given[0])} does nothing with {args.checkpoint}: a "
                f"{type(model).__name__} has no fixed-point solve (--schedule, --solver, --tol and --reuse "
                "are for FPDM); drop it"
            )
    for name, default in FPDM_ONLY.items():
        if getattr(args, name) is None and name != "reuse":
            setattr(args, name, default)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: sample and print where the files are; exit status 2 on a usage error."""
    args = parse_args(argv)

    def command() -> int:
        for name, path in run(args).items():
            print(f"{name}: {path}")
        return 0

    return run_command(build_parser(), command)
