"""Sampling a checkpoint of ``train.py`` to an image grid and arrays (``sample.py``), on one process or many.

:func:`load_model` rebuilds the model from the checkpoint alone (``weights_only=True``; the EMA weights
unless asked otherwise). Sample ``i`` of a run is a function of ``(seed, i)`` only: its label
(:func:`fpdm.sampling.sample_labels`) and its noise (:func:`fpdm.sampling.sample_generators`), so the images
do not depend on the batch size nor on the number of processes. :func:`run` spreads the batches over the
processes of a ``torchrun`` launch (:mod:`fpdm.shards`: one file per finished batch, so an interrupted run
resumes; with ``--parallel --spread timesteps`` every process works on each batch instead, evaluating its
share of each sweep's timesteps), decodes a latent model's samples with its VAE, and writes
``samples.npz`` (``arr_0``: uint8 images ``(N, H, W, 3)``, the layout of ADM's evaluation suite),
``grid.png`` and ``summary.json``. The options map one to one onto :func:`fpdm.sampling.sample`, or with
``--parallel`` onto :func:`fpdm.parallel.sample_parallel`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fpdm.cli import Interrupted, OneLineParser, UsageError, bounded_float, bounded_int, run_command
from fpdm.diffusion import METHODS, SPACINGS, GaussianDiffusion
from fpdm.distributed import Runtime, on_main_then_all, run_on_main, setup_runtime, shutdown_runtime
from fpdm.files import FileKindError, remove_stale_stages, staged_folder
from fpdm.parallel import DEFAULT_TAU, FORMS, ParallelResult, sample_parallel
from fpdm.run_folder import RunLock
from fpdm.sampling import SCHEDULES, SampleResult, plan_timesteps, sample, sample_generators, sample_labels
from fpdm.shards import SHARDS_NAME, ShardPlan, merge_shards, open_shards
from fpdm.training import SOLVERS, load_trained_model, make_solver

__all__ = [
    "LOCK_NAME",
    "OUTPUT_NAMES",
    "Decoder",
    "build_parser",
    "generate",
    "load_decoder",
    "load_model",
    "main",
    "parse_args",
    "pixels",
    "run",
    "save_grid",
    "tile",
]

#: What a run writes to ``--out``; ``--overwrite`` replaces them (and deletes those the new run does not
#: write).
OUTPUT_NAMES = ("grid.png", "samples.npz", "summary.json")
#: The lock file of a sampling run's folder (:class:`fpdm.run_folder.RunLock`).
LOCK_NAME = "sample.lock"


def _load(path: str | Path, ema: bool, device: str | torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a checkpoint (in eval mode) and the checkpoint's stored configuration, as saved
    (:func:`training.load_trained_model`)."""
    model, config = load_trained_model(path, ema=ema)
    return model.to(device).eval(), config


def load_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a ``train.py`` checkpoint and load its (EMA) weights, in eval mode.

    The architecture comes from the checkpoint's ``config``; the data's channels, image size and number of
    classes from the shapes of its weights, so the data set is not needed.
    """
    return _load(path, ema, device)[0]


# ----------------------------------------------------------------------------------------------------------
# Latents to images
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Decoder:
    """A VAE that turns a latent model's samples into images: ``vae.decode(z / scaling_factor)``.

    Attributes
    ----------
    name : str
        Where the VAE came from (a Hub id or a folder), for the summary.
    vae : diffusers.AutoencoderKL
        The network, in eval mode on the sampling device.
    scaling_factor : float
        The factor the latents were multiplied by when they were encoded.
    """

    name: str
    vae: Any
    scaling_factor: float

    @torch.no_grad()
    def __call__(self, latents: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[-1, 1]`` (float32) of latents ``(B, C, h, w)``."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return images.float().clamp(-1, 1)


def _latents_meta(data: str) -> dict[str, Any]:
    """The ``meta.json`` of the latents folder a model was trained on (``latents:DIR``), if it is there."""
    kind, _, where = data.partition(":")
    meta = Path(where) / "meta.json"
    if kind != "latents" or not meta.is_file():
        return {}
    try:
        found = json.loads(meta.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def decoder_source(config: dict[str, Any], vae: str | None) -> tuple[str | None, float | None]:
    """The VAE (Hub id or folder) and scaling factor that decode a model's samples: ``vae`` when given, else
    the checkpoint's configuration (``vae``, ``scaling_factor``), else the ``meta.json`` of the latents folder
    it was trained on; ``(None, None)`` for a model of images. A scaling factor not recorded anywhere is
    the VAE's own (``vae.config.scaling_factor``)."""
    meta = _latents_meta(str(config.get("data", "")))
    name = vae or config.get("vae") or meta.get("vae")
    scaling = config.get("scaling_factor") or meta.get("scaling_factor")
    return (str(name) if name else None), (float(scaling) if scaling else None)


def load_decoder(name: str, scaling_factor: float | None, device: torch.device, in_channels: int) -> Decoder:
    """``diffusers.AutoencoderKL.from_pretrained(name)`` on ``device``, checked against the model's channels.

    Raises
    ------
    cli.UsageError
        One line when diffusers is missing, the VAE cannot be loaded (no such folder; a Hub id without a
        network), or its latents have another number of channels than the model's samples.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UsageError("decoding latents needs diffusers: pip install 'implicitdiff[latents]'") from None
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its advice to install accelerate is not ours to print
    try:
        vae = AutoencoderKL.from_pretrained(name)
    except Exception as error:  # diffusers and huggingface_hub raise many kinds; each means "not loaded"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(
            f"--vae {name}: could not load a diffusers AutoencoderKL ({reason}); pass --vae with a local "
            "folder written by save_pretrained, or a Hub id when the Hub can be reached"
        ) from None
    channels = int(vae.config.latent_channels)
    if channels != in_channels:
        raise UsageError(f"--vae {name}: its latents have {channels} channels, the model's {in_channels}")
    scaling = float(scaling_factor or getattr(vae.config, "scaling_factor", None) or 1.0)
    return Decoder(name, vae.to(device).eval(), scaling)


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------


def pixels(images: Tensor) -> np.ndarray:
    """Images ``(N, C, H, W)`` in ``[-1, 1]`` as ``uint8`` ``(N, H, W, 3)``: ``round((x + 1) 127.5)``, one
    channel repeated to three (the layout of ``arr_0`` that ADM's evaluator and torch-fidelity read)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"need images (N, 1 or 3, H, W), got {tuple(images.shape)}")
    values = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return values.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()


def tile(images: Tensor, nrow: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Images ``(N, C, H, W)`` as one ``uint8`` array ``(rows (H + pad) + pad, nrow (W + pad) + pad, C)``,
    ``nrow`` to a row, ``pad`` pixels of ``fill`` around each; a short last row is filled with ``fill``."""
    n, channels, height, width = images.shape
    rows = math.ceil(n / nrow)
    values = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    cells = np.full((rows * nrow, height + pad, width + pad, channels), fill, dtype=np.uint8)
    cells[:n, pad:, pad:] = values  # each cell: a pad above and left of its image
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


# ----------------------------------------------------------------------------------------------------------
# Sampling one batch
# ----------------------------------------------------------------------------------------------------------


def generate(
    model: nn.Module,
    labels: Tensor,
    *,
    batch_size: int,
    seed: int = 0,
    start: int = 0,
    progress: bool = True,
    diffusion: GaussianDiffusion | None = None,
    **options: Any,
) -> tuple[Tensor, list[SampleResult]]:
    """Sample one image per label in batches of ``batch_size`` with :func:`fpdm.sampling.sample`.

    Label ``k`` is sample ``start + k``: its noise comes from its own generator, seeded by
    ``(seed, start + k)`` (:func:`fpdm.sampling.sample_generators`), so the images do not depend on
    ``batch_size``. ``options`` go to :func:`fpdm.sampling.sample` (``budget`` among them). Returns the images
    ``(N, C, H, W)`` on the CPU and each batch's :class:`~fpdm.sampling.SampleResult`.
    """
    diffusion = GaussianDiffusion() if diffusion is None else diffusion
    images, results = [], []
    with _progress_bar(progress, labels.numel(), batch_size, model, diffusion, options) as callback:
        for offset in range(0, labels.numel(), batch_size):
            batch = labels[offset : offset + batch_size]
            generators = sample_generators(seed, start + offset, start + offset + batch.numel())
            result = sample(model, diffusion, batch, generator=generators, callback=callback, **options)
            images.append(result.images.cpu())
            results.append(result)
    return torch.cat(images), results


@contextlib.contextmanager
def _progress_bar(
    show: bool, samples: int, batch_size: int, model: nn.Module, diffusion: GaussianDiffusion, options: Any
) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A tqdm bar over the timesteps of ``samples`` samples, and the sampler's callback that moves it. It is
    closed (its line ended) however the block ends, so that a message after Ctrl-C starts on its own line."""
    bar = None
    if show:
        from tqdm import tqdm

        steps = len(plan_timesteps(model, diffusion, options["budget"], options.get("steps"), "constant")[0])
        total = math.ceil(samples / batch_size) * steps
        bar = tqdm(total=total, desc="sample", unit="step", dynamic_ncols=True)

    def callback(info: dict[str, Any]) -> None:
        if bar is not None:
            bar.set_postfix(evals=info["spent"], residual=f"{info['residual']:.1e}", refresh=False)
            bar.update(1)

    try:
        yield callback
    finally:
        if bar is not None:
            bar.close()


class _InitialNoise(TorchFunctionMode):
    """Hands ``noise`` to the call ``torch.randn(shape, generator=marker)`` by which
    :func:`fpdm.parallel.sample_parallel` draws its initial noise, so that it starts from each sample's own
    noise (:func:`fpdm.sampling.sample_generators`), as the sequential sampler does; other calls run as usual.
    """

    def __init__(self, noise: Tensor) -> None:
        super().__init__()
        self.noise = noise
        self.marker = torch.Generator()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.randn and kwargs.get("generator") is self.marker:
            if tuple(args[0]) != tuple(self.noise.shape):
                raise ValueError(f"initial noise {tuple(self.noise.shape)} drawn as {tuple(args[0])}")
            return self.noise.clone()
        return func(*args, **kwargs)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler's options of the command line (sequential: :func:`fpdm.sampling.sample`)."""
    reuse = True if args.reuse is None else args.reuse
    options = {"budget": args.budget, "steps": args.steps, "schedule": args.schedule, "reuse": reuse}
    options.update(method=args.method, eta=args.eta, guidance=args.guidance, tol=args.tol)
    return options


def _parallel_options(model: nn.Module, diffusion: GaussianDiffusion, args: argparse.Namespace) -> dict:
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
    timesteps, plan = plan_timesteps(model, diffusion, args.budget, args.steps, "constant")
    options: dict[str, Any] = {"steps": len(timesteps), "reuse": False}
    if hasattr(model, "pre_depth"):
        options.update(iterations=min(plan), block_solver=make_solver(args.solver))
    options.update(
        solver=None if args.chain_rule in SECANT_RULES else make_solver(args.chain_rule),
        secant_base=SECANT_RULES.get(args.chain_rule, "form"),
        tol=args.chain_tol,
        tau=args.chain_tau,
        window=args.window,
        form=args.form,
        max_batch=None if args.max_batch == "none" else args.max_batch,
        guidance=args.guidance,
        max_evals=args.max_evals,
        error_tol=args.error_tol,
    )
    return options


def _sample_batch(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    args: argparse.Namespace,
    start: int,
    stop: int,
    callback: Callable[[dict[str, Any]], None],
    group: Any = None,
) -> tuple[Tensor, Tensor, SampleResult | ParallelResult]:
    """The labels and samples of the indices ``start .. stop - 1`` (the model's output, on the CPU); with
    ``group`` (``--parallel --spread timesteps``), each sweep spread over its ranks."""
    labels = sample_labels(start, stop, model.num_classes, args.labels)
    generators = sample_generators(args.seed, start, stop)
    device_labels = labels.to(args.device)
    result: SampleResult | ParallelResult
    if args.parallel:
        shape = (stop - start, model.in_channels, model.input_size, model.input_size)
        initial = _InitialNoise(torch.stack([torch.randn(shape[1:], generator=g) for g in generators]))
        with initial:
            options = _parallel_options(model, diffusion, args)
            result = sample_parallel(
                model, diffusion, device_labels, generator=initial.marker, group=group, **options
            )
    else:
        solver = make_solver(args.solver)
        options = _options(args)
        result = sample(
            model, diffusion, device_labels, generator=generators, callback=callback, solver=solver, **options
        )
    return labels, result.images.float().cpu(), result


def _shard_arrays(
    labels: Tensor,
    samples: Tensor,
    result: SampleResult | ParallelResult,
    decoder: Decoder | None,
    latent: bool,
) -> dict[str, np.ndarray]:
    """What a shard holds: ``arr_0`` (uint8 images), the model's output (``images`` or ``latents``, float32),
    the labels, the costs of each timestep and the batch's summary (JSON)."""
    arrays: dict[str, np.ndarray] = {}
    if decoder is not None:
        arrays["arr_0"] = pixels(decoder(samples.to(next(decoder.vae.parameters()).device)).cpu())
    elif not latent:
        arrays["arr_0"] = pixels(samples)
    arrays["latents" if latent else "images"] = samples.numpy().astype(np.float32)
    arrays["labels"] = labels.numpy().astype(np.int64)
    arrays.update(
        timesteps=np.array(result.timesteps),
        spent=np.array(result.spent),
        iterations=np.array(result.iterations),
        residuals=np.array(result.residuals, dtype=np.float64),
    )
    summary = {**result.summary(), "spent_total": result.spent_total}
    if isinstance(result, ParallelResult):
        summary["sweeps"] = result.sweeps
    arrays["summary"] = np.array(json.dumps(summary))
    return arrays


# ----------------------------------------------------------------------------------------------------------
# The run: lock, shards, sampling, merge
# ----------------------------------------------------------------------------------------------------------


class _Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM during a run, raised in the main thread as Ctrl-C's ``KeyboardInterrupt`` is (and,
    like it, held up by no ``except Exception``); ``signum`` names the signal in the message."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`_Stopped` while the block (the whole run) goes on (main thread
    only): the finished shards are on disk either way, the message says so, and a second signal during
    the clean-up is a message too, not a silent end. SIGINT gets this handler even where the process
    inherited it ignored (a job started in the background by a shell without job control): Python then
    installs no ``KeyboardInterrupt`` of its own, and ``kill -INT`` would not stop the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        raise _Stopped(signum)

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _settings(args: argparse.Namespace, decoder_name: str | None, latent: bool) -> dict[str, Any]:
    """What the samples depend on (a rerun with the same settings resumes the shards of the first)."""
    checkpoint = Path(args.checkpoint).resolve()
    stat = checkpoint.stat()
    settings = {
        "checkpoint": str(checkpoint),
        "checkpoint_bytes": stat.st_size,
        "checkpoint_mtime_ns": stat.st_mtime_ns,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "labels": args.labels,
        "ema": args.ema,
        "spacing": args.spacing,
        "latent": latent,
        "vae": decoder_name,
        "parallel": args.parallel,
    }
    names = ("budget", "steps", "schedule", "solver", "reuse", "method", "eta", "guidance", "tol")
    if args.parallel:
        names += tuple(PARALLEL_ONLY)
    settings.update({name: getattr(args, name) for name in names})
    return settings


def _interrupted(plan: ShardPlan, signum: int) -> Interrupted:
    """The one-line message after Ctrl-C or SIGTERM: what was kept and how to continue."""
    done = len(plan.finished())
    name = signal.Signals(signum).name
    if done == 0:
        return Interrupted(f"stopped by {name} before a batch was finished: nothing was kept", signum)
    samples = min(done * plan.batch_size, plan.num_samples)
    return Interrupted(
        f"stopped by {name}: {done} of {plan.num_batches} batches ({samples} of {plan.num_samples} samples) "
        f"are kept in {plan.folder}; run the same command again to continue from them",
        signum,
    )


def _check_outputs(out: Path, overwrite: bool) -> None:
    found = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if found and not overwrite:
        raise UsageError(
            f"{out} already holds samples ({', '.join(found)}); pass --overwrite or another --out"
        )


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Load, sample (spread over the processes of a ``torchrun`` launch), write the arrays, the grid and the
    summary; returns their paths (on rank 0; other ranks return ``{}``).

    Raises
    ------
    cli.UsageError
        An output folder that holds samples (without ``--overwrite``) or is in use by another sampler,
        labels outside the model's classes, a checkpoint that is not one (:class:`files.FileKindError`),
        a VAE that cannot be loaded, or sampling options that do not fit the model or the budget.
    cli.Interrupted
        After Ctrl-C or SIGTERM: the finished batches are kept as shards, and the message says so.
    OSError
        An output folder that cannot be written (checked before sampling).
    """
    runtime = setup_runtime(args.device)
    ended_well = False
    try:
        with _stop_signals_raise():
            paths = _run(args, runtime)
        ended_well = True
        return paths
    finally:
        shutdown_runtime(runtime, wait=False if runtime.distributed else ended_well)


def _take_folder(out: Path, overwrite: bool) -> RunLock:
    """Rank 0's checks of ``--out`` before any work: a file in the way, a folder in use by another sampler
    (the lock, which also proves the folder can be written), samples of an earlier run; then, the folder
    taken, the stale stages of a killed run's final move are deleted."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    lock = RunLock(out, LOCK_NAME, "sample.py")
    lock.acquire()
    try:
        _check_outputs(out, overwrite)
    except BaseException:
        lock.release()
        raise
    for stage in remove_stale_stages(out):  # a merge killed with -9 left its partial samples.npz
        print(f"[sample] removed {stage}, the unfinished output of a killed run", flush=True)
    return lock


def _run(args: argparse.Namespace, runtime: Runtime) -> dict[str, Path]:
    out = Path(args.out)
    existed = out.is_dir()
    lock = run_on_main(runtime, lambda: _take_folder(out, args.overwrite))
    try:
        return _sample_in_folder(args, runtime, out)
    except BaseException:
        if lock is not None:
            _leave_nothing_empty(out, existed, lock)
        raise
    finally:
        if lock is not None:
            lock.release()


def _leave_nothing_empty(out: Path, existed: bool, lock: RunLock) -> None:
    """After a failed or interrupted run: a shard folder without a finished batch is removed, and so is a
    folder this run created and left empty, so that neither stands in the way of the corrected command."""
    shards = out / SHARDS_NAME
    if shards.is_dir() and not any(shards.glob("batch-*.npz")):
        shutil.rmtree(shards, ignore_errors=True)
    lock.release()
    if not existed:
        with contextlib.suppress(OSError):
            out.rmdir()  # only when empty


def _sample_in_folder(args: argparse.Namespace, runtime: Runtime, out: Path) -> dict[str, Path]:
    torch.set_num_threads(args.threads)
    args.device = str(runtime.device)
    try:
        model, config = _load(args.checkpoint, args.ema, runtime.device)
    except FileKindError as error:
        raise UsageError(str(error)) from None
    _check_model_options(model, args)
    if args.labels and max(args.labels) >= model.num_classes:
        wrong = [label for label in args.labels if label >= model.num_classes]
        raise UsageError(f"--labels {wrong}: the model has classes 0..{model.num_classes - 1}")
    latent = str(config.get("data", "")).startswith("latents:") or model.in_channels not in (1, 3)
    if args.vae and not latent:
        raise UsageError(f"--vae {args.vae}: {args.checkpoint} samples images, not latents; drop --vae")
    name, scaling = decoder_source(config, args.vae) if latent else (None, None)
    decoder = load_decoder(name, scaling, runtime.device, model.in_channels) if name else None
    # Latents are not clipped to [-1, 1] as images are (DiT samples them the same way).
    diffusion = GaussianDiffusion(spacing=args.spacing, clip_denoised=not latent)
    try:  # a budget, steps or schedule that does not fit this model: refused before any file is written
        schedule = "constant" if args.parallel else args.schedule
        plan_timesteps(model, diffusion, args.budget, args.steps, schedule)
        if args.parallel:
            _parallel_options(model, diffusion, args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    settings = _settings(args, name, latent)
    opened = run_on_main(runtime, lambda: open_shards(out, settings, args.overwrite))
    done_before = opened[1] if opened is not None else 0
    if runtime.distributed:
        dist.barrier()  # the shard folder exists before any rank writes to it
    plan = ShardPlan(out / SHARDS_NAME, args.num_samples, args.batch_size)
    if runtime.is_main and done_before:
        print(f"[sample] resuming: {done_before} of {plan.num_batches} batches are already in {plan.folder}",
              flush=True)  # fmt: skip
    if runtime.is_main and latent and decoder is None:
        print(f"[sample] {args.checkpoint} samples latents and names no VAE: writing latents only (pass "
              "--vae to decode them into images)", flush=True)  # fmt: skip
    start_time = time.perf_counter()
    group, mine, remaining = _share(plan, runtime, args)
    show = args.progress and runtime.is_main and not args.parallel
    bar = _progress_bar(show, remaining * args.batch_size, args.batch_size, model, diffusion, _options(args))
    try:  # a stop while the shards are merged keeps them too (they are deleted once samples.npz is in)
        with bar as callback:
            for batch in mine:
                start, stop = plan.indices(batch)
                try:
                    labels, samples, result = _sample_batch(
                        model, diffusion, args, start, stop, callback, group
                    )
                except ValueError as error:
                    raise UsageError(str(error)) from None
                if group is None or runtime.is_main:  # spread timesteps: every rank holds the batch
                    plan.write(batch, _shard_arrays(labels, samples, result, decoder, latent))
        if runtime.distributed:
            dist.barrier()
        if not runtime.is_main:
            return {}
        summary = {"checkpoint": str(args.checkpoint), "spacing": args.spacing, "seed": args.seed}
        summary["ema"] = args.ema
        summary.update(_summary(plan), world_size=runtime.world_size, resumed_batches=done_before)
        summary.update(decoded_with=name, elapsed_s=time.perf_counter() - start_time)
        if args.parallel:
            summary["spread"] = args.spread
        return _write_outputs(out, plan, summary, args)
    except (KeyboardInterrupt, _Stopped) as stop:
        signum = stop.signum if isinstance(stop, _Stopped) else signal.SIGINT
        if not runtime.is_main:
            raise SystemExit(128 + signum) from None
        raise _interrupted(plan, signum) from None


def _share(plan: ShardPlan, runtime: Runtime, args: argparse.Namespace) -> tuple[Any, Iterator[int], int]:
    """This rank's part of the run: the process group that spreads each sweep (``None`` but for
    ``--parallel --spread timesteps`` under torchrun), the batches it samples that have no shard yet, and
    how many.

    Spread samples (the sequential sampler's way, and ``--parallel``'s default): rank ``r`` of ``W`` samples
    the batches ``r, r + W, ...`` alone and writes their shards. Spread timesteps: every rank samples every
    batch, each evaluating its share of each sweep's timesteps, and rank 0 alone writes the shards; the
    batches left are rank 0's listing of the shard folder, so that every rank runs the same sweeps.
    """
    if not (args.parallel and args.spread == "timesteps" and runtime.distributed):
        done = plan.finished()  # a listing: its size is what was done, not the run's (lazily, below)
        own = len(range(runtime.rank, plan.num_batches, runtime.world_size))
        remaining = own - sum(1 for b in done if b % runtime.world_size == runtime.rank)
        return None, plan.batches_for(runtime.rank, runtime.world_size, done), remaining
    done = on_main_then_all(runtime, plan.finished)
    return dist.group.WORLD, plan.batches_for(0, 1, done), plan.num_batches - len(done)


def _summary(plan: ShardPlan) -> dict[str, Any]:
    """The run's costs from its shards' summaries: the first batch's options and per-step costs; totals."""
    per_step = ("timesteps", "allocated", "spent", "iterations", "residuals", "first_residuals", "tolerances")
    summary: dict[str, Any] = {}
    wall_s, spent_max, sweeps, ranks = 0.0, 0, 0, 1
    for batch, record in enumerate(plan.summaries()):
        if batch == 0:
            summary = {k: v for k, v in record.items() if k not in (*per_step, "wall_s", "num_images")}
            summary["per_step_first_batch"] = {k: record[k] for k in per_step if k in record}
        wall_s += record["wall_s"]
        spent_max = max(spent_max, record["spent_total"])
        sweeps = max(sweeps, record.get("sweeps", 0))
        ranks = max(ranks, record.get("ranks", 1))  # the processes that shared a batch's sweeps
    summary.update(num_images=plan.num_samples, batches=plan.num_batches, wall_s=wall_s)
    summary["spent_per_sample_max"] = spent_max
    if summary.get("parallel"):
        summary.update(sweeps=sweeps, ranks=ranks)
    return summary


def _grid_images(plan: ShardPlan, count: int) -> Tensor | None:
    """The first ``count`` samples as images in ``[-1, 1]`` (from ``images``, else ``arr_0``), or ``None``."""
    pieces, have = [], 0
    for batch in range(plan.num_batches):
        if have >= count:
            break
        with np.load(plan.path(batch)) as arrays:
            if "images" in arrays.files:
                piece = torch.from_numpy(arrays["images"])
            elif "arr_0" in arrays.files:
                piece = torch.from_numpy(arrays["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1
            else:
                return None
        pieces.append(piece[: count - have])
        have += pieces[-1].shape[0]
    return torch.cat(pieces)


def _write_outputs(out: Path, plan: ShardPlan, summary: dict[str, Any], args: argparse.Namespace) -> dict:
    """Merge the shards into ``samples.npz``, write the grid (the first ``nrow x nrow`` samples) and the
    summary, all moved into ``out`` at once; then delete the shards."""
    paths = {"npz": out / "samples.npz", "summary": out / "summary.json"}
    # Written aside, then moved in: a full disk leaves the samples of an earlier run (--overwrite) whole.
    with staged_folder(out, replaces=OUTPUT_NAMES) as stage:
        merge_shards(plan, stage / "samples.npz", aliases={"arr_1": "labels"})
        grid = _grid_images(plan, min(plan.num_samples, args.nrow * args.nrow))
        if grid is not None and grid.shape[1] in (1, 3):
            save_grid(grid, stage / "grid.png", nrow=args.nrow, pixels=args.pixels)
            paths["grid"] = out / "grid.png"
        (stage / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(plan.folder, ignore_errors=True)
    return paths


NUM_SAMPLES_HELP = "number of samples (default 100), spread over the processes under torchrun"
VAE_HELP = "a latent model's VAE: a diffusers AutoencoderKL folder or Hub id (default: the checkpoint's)"
TOL_HELP = "FPDM, --schedule tolerance: the relative residual that ends a solve (default: 1e-3)"
REUSE_HELP = "warm start from the last step; default on (--parallel reproduces --no-reuse, refuses --reuse)"
CHAIN_TOL_HELP = "--parallel: one RMS residual for every timestep (default: --chain-tau's noise-scaled ones)"
CHAIN_TAU_HELP = f"--parallel: RMS residual tau * sqrt(1 - abar_t) per timestep (default {DEFAULT_TAU:g})"
BUDGET_HELP = (
    "transformer-block evaluations per sample (--parallel: of the sequential run it reproduces; it spends "
    "more, capped by --max-evals)"
)
ERROR_TOL_HELP = (
    "--parallel: also stop once the samples are estimated within this of the chain's solution, largest "
    "entry (default: off)"
)
CHAIN_RULE_HELP = (
    "--parallel: the chain's update rule (default secant: ChainSecant, one secant model per sample; "
    "secant-fitted: the same with a fitted base, base='fitted')"
)
MAX_EVALS_HELP = "--parallel: most block evaluations per sample, first guess included (default: no cap)"
MAX_BATCH_HELP = "--parallel: timesteps per model call, 'auto' (default; fits CUDA memory) or 'none'"
BATCH_SIZE_HELP = "images per batch (of each process; one batch for all with --spread timesteps)"
SPREAD_HELP = (
    "--parallel under torchrun: what the processes share. 'samples' (default): each samples its own "
    "batches, no communication while sampling; pays with many samples. 'timesteps': all sample the same "
    "batch, each evaluating its share of each sweep's timesteps (one gather of the states per sweep); pays "
    "with few samples, where one device would sit idle at a small batch"
)


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


class _Renamed(argparse.Action):
    """An option's old spelling: it still sets the new option, and warns (``FutureWarning``) with its name.

    (``--solver`` is FPDM's fixed-point solver of each timestep; the chain's rule had been spelt
    ``--chain-solver``.)
    """

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, help=f"deprecated spelling of {new}", **kwargs)
        self.new = new

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None
    ) -> None:
        warnings.warn(f"{option} is deprecated: spell it {self.new}", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    """The command line; see the module docstring."""
    parser = OneLineParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    positive = bounded_int(1)
    add("checkpoint", help="checkpoint.pt written by train.py")
    add("--out", default=None, help="output folder (default: samples/ next to the checkpoint)")
    add("--overwrite", action="store_true", help="replace the samples already in --out")
    add("--num-samples", type=positive, default=None, help=NUM_SAMPLES_HELP)
    add("--num", type=positive, default=None, help="--num-samples for one process (torchrun takes --num)")
    add("--budget", type=positive, required=True, help=BUDGET_HELP)
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
    add("--chain-rule", default=None, choices=CHAIN_RULES, help=CHAIN_RULE_HELP)
    add("--chain-solver", dest="chain_rule", choices=CHAIN_RULES, action=_Renamed, new="--chain-rule")
    add("--chain-tol", type=bounded_float(0.0), default=None, help=CHAIN_TOL_HELP)
    add("--chain-tau", type=bounded_float(0.0), default=None, help=CHAIN_TAU_HELP)
    add("--window", type=positive, default=None, help="--parallel: timesteps per sweep (default: all)")
    add("--form", default=None, choices=FORMS, help="--parallel: the map iterated (default: cumulative)")
    add("--max-batch", type=_max_batch_option, default=None, help=MAX_BATCH_HELP)
    add("--max-evals", type=positive, default=None, help=MAX_EVALS_HELP)
    add("--error-tol", type=bounded_float(0.0), default=None, help=ERROR_TOL_HELP)
    add("--spread", default=None, choices=SPREADS, help=SPREAD_HELP)
    add("--seed", type=bounded_int(0), default=0, help="seed of the noise")
    add("--labels", type=bounded_int(0), nargs="*", default=None, help="labels to cycle (default: all)")
    add("--batch-size", type=positive, default=100, help=BATCH_SIZE_HELP)
    add("--vae", default=None, help=VAE_HELP)
    add("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    add("--nrow", type=positive, default=10, help="images per row of the grid (of the first nrow x nrow)")
    add("--pixels", type=positive, default=48, help="side of each image in the grid")
    add("--device", default="cpu", help="'cpu', 'cuda' or 'cuda:N'")
    add("--threads", type=positive, default=min(2, torch.get_num_threads()), help="torch CPU threads")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    return parser


#: The rules of ``--chain-rule``: ``secant`` is :class:`implicitdiff.ChainSecant` with one model per
#: sample (``sample_parallel``'s default), ``secant-fitted`` the same with ``base="fitted"``, the others
#: the solvers of :data:`fpdm.training.SOLVERS`.
SECANT_RULES = {"secant": "form", "secant-fitted": "fitted"}
CHAIN_RULES = (*SECANT_RULES, *SOLVERS)

#: Options that only ``--parallel`` uses, and their defaults there (``--chain-tol`` and ``--chain-tau`` stay
#: ``None`` when not given: ``sample_parallel``'s noise-scaled tolerances with its ``DEFAULT_TAU``).
PARALLEL_ONLY = {
    "chain_rule": "secant",
    "chain_tol": None,
    "chain_tau": None,
    "window": None,
    "form": "cumulative",
    "max_batch": "auto",
    "max_evals": None,
    "error_tol": None,
    "spread": "samples",
}
#: What the processes of a ``torchrun`` launch share under ``--parallel`` (see ``_share``).
SPREADS = ("samples", "timesteps")
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
    if args.num is not None and args.num_samples is not None:
        parser.error(f"--num {args.num} and --num-samples {args.num_samples}: give one (--num is its alias)")
    if args.num is not None and "RANK" in os.environ:
        parser.error(
            "--num is --num-samples's alias for one process; under torchrun pass --num-samples (torchrun "
            "reads --num as its own --numa-binding)"
        )
    args.num_samples = args.num_samples or args.num or 100
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
