"""Training of FPDM and DiT, from the command line to the last checkpoint, in the order it happens.

:func:`main` parses the command line into a :class:`TrainConfig` (one field per flag) and calls
:func:`train`, which is the run, top to bottom:

1. **config**: every field checked against its rules (:meth:`TrainConfig.check`);
2. **runtime**: one process, or a rank of a ``torchrun`` launch (DistributedDataParallel, gloo or NCCL);
3. **folder and lock**: one run at a time owns ``--out`` (:class:`run_folder.RunFolder`); ``--resume``
   continues its run exactly and refuses a change of what the checkpoint belongs to
   (:data:`REFUSED_ON_RESUME`), ``--overwrite`` starts it again; nothing is written before the run's first
   log record or checkpoint;
4. **data**: the digits, an image folder or latents, read in an order that is a function of (seed, step)
   (:func:`batch_indices`), so that a resume needs no iterator state;
5. **model, EMA, optimizer**: the preset with the run's solver and gradient estimator (:data:`SOLVERS`,
   :data:`ESTIMATORS`; S-JFB by default), an EMA of the weights, AdamW; bf16 autocast and TF32 on CUDA;
6. **resume**: the checkpoint's weights, EMA, optimizer, random streams and estimator state;
7. **the loop**: a step, a log record, a checkpoint, signals. A non-finite loss stops training and keeps
   the last good checkpoint; Ctrl-C or SIGTERM writes a checkpoint after the step and stops, a second one
   stops at once (:class:`cli.StopSignals`);
8. **final checks**: under ``torchrun``, the replicas' weights are identical;
9. **release**: the lock, then the process group.

The helpers follow in that order; the data order closes the file. The model's counts come back with its
output, so the JSONL log records what each step spent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fpdm.cli import (
    EXIT_NON_FINITE,
    Interrupted,
    OneLineParser,
    SecondSignal,
    StopSignals,
    UsageError,
    add_options,
    check_config,
    config_from_args,
    flag,
    option,
    run_command,
)
from fpdm.data import BatchesOf, load_dataset, quiet_worker
from fpdm.diffusion import GaussianDiffusion
from fpdm.distributed import Runtime, gather_objects, setup_runtime, shutdown_runtime
from fpdm.files import FileKindError
from fpdm.models import FPDM, PRESETS, compile_blocks, create_model
from fpdm.run_folder import (
    CHECKPOINT_NAME,
    LOG_NAME,
    RunFolder,
    checked_config,
    compare_configs,
    load_checkpoint,
    stored_config,
)
from implicitdiff import IFT, JFB, SJFB, Anderson, Broyden, GradientEstimator, PhantomGradient, Picard, Solver

__all__ = [
    "CHECKPOINT_NAME",
    "ESTIMATORS",
    "ESTIMATOR_OPTIONS",
    "LOG_NAME",
    "REFUSED_ON_RESUME",
    "SOLVERS",
    "NonFiniteLossError",
    "StepBatches",
    "TrainConfig",
    "batch_indices",
    "build_model",
    "compare_configs",
    "ema_multi_avg_fn",
    "load_checkpoint",
    "load_trained_model",
    "main",
    "make_estimator",
    "make_optimizer",
    "make_solver",
    "parse_args",
    "stored_config",
    "train",
    "training_batches",
]

# ----------------------------------------------------------------------------------------------------
# Solvers and gradient estimators by name: the one table of every command line (--solver, --grad)
# ----------------------------------------------------------------------------------------------------

#: Fixed-point solvers by name, each built with its default options.
SOLVERS: dict[str, Callable[[], Solver]] = {"picard": Picard, "anderson": Anderson, "broyden": Broyden}


def _sjfb(settings: Any) -> GradientEstimator:
    return SJFB(
        no_grad_iters=tuple(settings.sjfb_no_grad), grad_iters=tuple(settings.sjfb_grad), seed=settings.seed
    )


def _ift(settings: Any) -> GradientEstimator:
    # The backward solve gets twice the forward cap (at least 20): the adjoint converges more slowly.
    return IFT(max_iter=max(2 * settings.max_iter, 20), tol=settings.tol, stop_mode="rel")


def _phantom(settings: Any) -> GradientEstimator:
    return PhantomGradient(k=settings.phantom_k, tau=settings.phantom_tau)


#: Gradient estimators by name: a factory of the run's settings (a :class:`TrainConfig`, or any object with
#: the attributes it reads).
ESTIMATORS: dict[str, Callable[[Any], GradientEstimator]] = {
    "sjfb": _sjfb,
    "jfb": lambda settings: JFB(),
    "ift": _ift,
    "phantom": _phantom,
}

#: The settings only one estimator reads (the others ignore them): a run refuses them with another.
ESTIMATOR_OPTIONS: dict[str, tuple[str, ...]] = {
    "sjfb": ("sjfb_no_grad", "sjfb_grad"),
    "phantom": ("phantom_k", "phantom_tau"),
}


def make_solver(name: str) -> Solver:
    """The solver ``name`` of :data:`SOLVERS` with default options."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose from {sorted(SOLVERS)}")
    return SOLVERS[name]()


def make_estimator(name: str, settings: Any) -> GradientEstimator:
    """The gradient estimator ``name`` of :data:`ESTIMATORS`, configured from ``settings``."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown gradient estimator {name!r}; choose from {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](settings)


# ----------------------------------------------------------------------------------------------------
# The run's settings
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; each field is a flag of the command line (``hidden_size``:
    ``--hidden-size``), with the help and the allowed values declared here once."""

    out: str = option("runs/fpdm", "run folder: checkpoint.pt and log.jsonl")
    model: str = option("FPDM-Digits/2", "model preset", choices=tuple(PRESETS))
    hidden_size: int | None = option(None, "width of the blocks (default: the preset's)", low=1)
    num_heads: int | None = option(None, "attention heads (default: the preset's)", low=1)
    depth: int | None = option(None, "DiT: number of blocks (default: the preset's)", low=1)
    pre_depth: int | None = option(None, "FPDM: explicit blocks before the implicit block", low=0)
    post_depth: int | None = option(None, "FPDM: explicit blocks after the implicit block", low=0)
    data: str = option("digits", "'digits', 'digits-train', 'digits-test', 'folder:PATH' or 'latents:DIR'")
    image_size: int = option(32, "side of the images of a folder: dataset", low=1)
    batch_size: int = option(128, "global batch, split over the processes", low=1)
    steps: int = option(5000, "training steps (in all, counting those of a resumed run)", low=1)
    lr: float = option(1e-3, "AdamW learning rate", low=0.0, low_open=True)
    weight_decay: float = option(0.0, "AdamW weight decay", low=0.0)
    grad_clip: float = option(1.0, "clip the gradient norm to this", low=0.0, low_open=True)
    ema_decay: float = option(0.999, "decay of the EMA of the weights", low=0.0, high=1.0)
    ema_warmup: bool = option(
        False,
        "EMA decay min(ema_decay, (1 + n) / (10 + n)) after n updates: an EMA that does not lag short runs",
    )
    class_dropout: float = option(
        0.1, "label dropout (classifier-free guidance)", low=0.0, high=1.0, high_open=True
    )
    grad: str = option("sjfb", "gradient estimator of the implicit block", choices=tuple(ESTIMATORS))
    solver: str = option("picard", "fixed-point solver of the implicit block", choices=tuple(SOLVERS))
    max_iter: int = option(8, "cap on the forward solve's iterations (not S-JFB's draws)", low=1)
    tol: float = option(1e-3, "relative residual that ends the forward solve", low=0.0, low_open=True)
    sjfb_no_grad: tuple[int, int] = option(
        (0, 6), "S-JFB: range of no-grad iterations", low=0, metavar=("MIN", "MAX")
    )
    sjfb_grad: tuple[int, int] = option(
        (1, 3), "S-JFB: range of differentiable iterations", low=1, metavar=("MIN", "MAX")
    )
    phantom_k: int = option(5, "phantom gradient: differentiable steps", low=1)
    phantom_tau: float = option(0.5, "phantom gradient: damping", low=0.0, high=1.0, low_open=True)
    seed: int = option(0, "seed of the weights, the data order and the noise", low=0)
    ckpt_every: int = option(500, "write the checkpoint every this many steps (and at the end)", low=1)
    log_every: int = option(10, "write a log record every this many steps (and at the end)", low=1)
    resume: bool = option(False, "continue the run in --out from its checkpoint (the rules are below)")
    overwrite: bool = option(
        False, "start again in a folder that holds a run, deleting its checkpoint and log"
    )
    workers: int = option(
        0,
        "DataLoader worker processes that read (and decode) the batches ahead; 0: the training process",
        low=0,
    )
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    bf16: bool | None = option(None, "bf16 autocast (default: on CUDA)")
    progress: bool = option(True, "show a progress bar")
    compile: bool = option(
        False,
        "compile the blocks with torch.compile (models.compile_blocks); the solver loop stays eager",
    )

    #: Fields a resume refuses to change: the checkpoint's weights, estimator state and data order belong to
    #: them (:func:`run_folder.compare_configs`).
    REFUSED_ON_RESUME: ClassVar[tuple[str, ...]] = (
        *("model", "hidden_size", "num_heads", "depth", "pre_depth", "post_depth", "data", "image_size"),
        *("grad", "seed"),
    )
    #: Fields that say how to run, not what: never compared on resume.
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = (
        *("out", "resume", "overwrite", "workers", "device", "bf16", "progress", "compile"),
    )

    def check(self) -> None:
        """Every field against its rules, and the rules between fields.

        Raises
        ------
        ValueError
            Naming the field, its value and what is allowed.
        """
        check_config(self)
        for name in ("sjfb_no_grad", "sjfb_grad"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be (MIN, MAX) with MIN <= MAX, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run, or start it again")
        self._check_unused()

    #: Fields only an FPDM uses (its implicit block), and those only one estimator uses.
    FPDM_ONLY: ClassVar[tuple[str, ...]] = (
        *("pre_depth", "post_depth", "grad", "solver", "max_iter", "tol"),
        *("sjfb_no_grad", "sjfb_grad", "phantom_k", "phantom_tau"),
    )
    ESTIMATOR_ONLY: ClassVar[dict[str, str]] = {
        field: estimator for estimator, fields in ESTIMATOR_OPTIONS.items() for field in fields
    }

    def _check_unused(self) -> None:
        """Refuse a setting that would do nothing for this model, estimator or data (left at its default, it
        is not compared), so that no run records an option as if it had been used."""
        defaults = TrainConfig()
        changed = [n for n in self.FPDM_ONLY if getattr(self, n) != getattr(defaults, n)]
        if not self.model.startswith("FPDM") and changed:
            name = changed[0]
            raise ValueError(
                f"{flag(name)} {_shown(getattr(self, name))} does nothing with --model {self.model}: only an "
                "FPDM has an implicit block; drop it"
            )
        if self.model.startswith("FPDM") and self.depth is not None:
            raise ValueError(
                f"--depth {self.depth} does nothing with --model {self.model}: it is a DiT's number of "
                "blocks; an FPDM takes --pre-depth and --post-depth"
            )
        for name in changed:
            needs = self.ESTIMATOR_ONLY.get(name)
            if needs is not None and self.grad != needs:
                raise ValueError(
                    f"{flag(name)} {_shown(getattr(self, name))} does nothing with --grad {self.grad}: it is "
                    f"for --grad {needs}"
                )
        if self.image_size != defaults.image_size and not self.data.startswith("folder:"):
            raise ValueError(
                f"--image-size {self.image_size} does nothing with --data {self.data}: only folder: images "
                "are resized (digits are 8x8, latents keep their size)"
            )

    def model_overrides(self) -> dict[str, Any]:
        """The preset's constructor arguments this run replaces."""
        names = ("hidden_size", "num_heads", "depth", "pre_depth", "post_depth")
        overrides = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        overrides["class_dropout_prob"] = self.class_dropout
        return overrides


def _shown(value: Any) -> str:
    """A value as it is typed on the command line (``(0, 6)`` -> ``0 6``)."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


#: Fields a resume refuses to change: the checkpoint's weights, estimator state and data order belong to them.
REFUSED_ON_RESUME = TrainConfig.REFUSED_ON_RESUME


# ----------------------------------------------------------------------------------------------------
# The command line and the run
# ----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, train, report; exit status 0 done, 1 a non-finite loss, 2 a usage error, 3 a file
    that could not be written, 128 + the signal's number when stopped by Ctrl-C or SIGTERM (see
    :func:`cli.run_command`)."""
    cfg = parse_args(argv)

    def command() -> int:
        try:
            summary = train(cfg)
        except NonFiniteLossError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_NON_FINITE
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(summary))
        return 0

    return run_command(build_parser(), command)


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line into a checked :class:`TrainConfig` (a bad value exits with status 2)."""
    parser = build_parser()
    cfg = config_from_args(TrainConfig, parser.parse_args(argv))
    try:
        cfg.check()
    except ValueError as error:
        parser.error(str(error))
    return cfg


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from :class:`TrainConfig`'s fields."""
    epilog = (
        "A folder that holds a run is continued with --resume or started again with --overwrite, never "
        "overwritten otherwise. --resume refuses a change of "
        + ", ".join(flag(name) for name in REFUSED_ON_RESUME)
        + " and applies any other change (--lr, --steps, ...) with a notice naming it. One run at a time "
        "owns a folder (its train.lock). Ctrl-C or SIGTERM writes a checkpoint and stops. Exit status: 0 "
        "done, 1 a non-finite loss, 2 a usage error (a folder in use among them), 3 a file that could not be "
        "written "
        "(the last checkpoint is kept), 130 Ctrl-C and 143 SIGTERM (after writing a checkpoint)."
    )
    parser = OneLineParser(description=__doc__.split("\n")[0], epilog=epilog)
    add_options(parser, TrainConfig)
    return parser


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the last log record (under ``torchrun`` with the
    replicas' check).

    Raises
    ------
    ValueError
        A field out of its allowed values (:meth:`TrainConfig.check`).
    cli.UsageError
        The run folder's rules (:class:`run_folder.RunFolder`), data that cannot be read, model options that
        do not fit together.
    files.FileKindError
        A checkpoint to resume that is damaged, or not one this version can build.
    NonFiniteLossError
        If the loss becomes NaN or infinite on any rank; nothing is saved after the last good checkpoint.
    cli.Interrupted
        After Ctrl-C or SIGTERM (in the main thread): the step under way is finished and checkpointed, and
        the message names the checkpoint; its ``signum`` is the signal's number. A second signal stops at
        once; the message names the last checkpoint written.
    OSError
        A file that could not be written (:class:`CheckpointWriteError` for a checkpoint: the previous one
        is kept).
    """
    cfg.check()  # 1. config
    runtime = setup_runtime(cfg.device)  # 2. runtime
    folder, run, ended_well = RunFolder(cfg, runtime), None, False
    try:
        resumed = folder.take()  # 3. folder and lock; the checkpoint to resume, if any
        dataset = _load_data(cfg, runtime)  # 4. data
        run = _build_run(cfg, runtime, folder, dataset)  # 5. model, EMA, optimizer
        start = _restore(run, resumed) if resumed is not None else 0  # 6. resume
        resumed = None  # the run holds what it needs of the checkpoint: let the rest go
        with (
            StopSignals() as stop,
            _Progress(cfg, runtime, folder, start) as progress,
            contextlib.closing(training_batches(dataset, cfg, runtime, start)) as batches,
        ):
            for step, (x, y) in enumerate(batches, start):  # 7. the loop: step, log, checkpoint, signals
                loss, grad_norm, state = _train_step(run, x, y, step, stop)
                done = step + 1
                progress.step(done, loss, grad_norm, state)
                if done % cfg.ckpt_every == 0 or done == cfg.steps or stop.agreed:
                    _write_checkpoint(run, done)
                if stop.agreed and done < cfg.steps:
                    raise _stopped(run, stop.agreed, done)
        summary = {**progress.record, **_check_replicas(run)}  # 8. final checks
        ended_well = True
        return summary
    except SecondSignal as second:
        raise _stopped_at_once(run, second.signum) from None
    finally:
        if runtime.distributed:  # 9. release: DDP's reducer holds the process group, let it go first
            _forget_locals(sys.exc_info()[1])
            run = batches = None
            gc.collect()
        folder.release()
        shutdown_runtime(runtime, wait=ended_well)


def _forget_locals(error: BaseException | None) -> None:
    """Clear the locals of the frames an exception's traceback keeps (and its context's): a model or a DDP
    wrapper held there would outlive the process group."""
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


# ----------------------------------------------------------------------------------------------------
# 4. Data
# ----------------------------------------------------------------------------------------------------


def _load_data(cfg: TrainConfig, runtime: Runtime) -> Any:
    """The dataset of ``--data``, refused in one line when it cannot be read or holds fewer items than a
    batch."""
    if cfg.batch_size % runtime.world_size:
        raise UsageError(
            f"--batch-size {cfg.batch_size} is not divisible by the {runtime.world_size} processes"
        )
    try:
        dataset = load_dataset(cfg.data, cfg.image_size)
    except FileKindError as error:
        raise UsageError(str(error)) from None
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--data {cfg.data!r}: {error}") from None
    batch_indices(len(dataset), cfg.batch_size, cfg.seed, 0)  # a batch larger than the data: refused now
    return dataset


# ----------------------------------------------------------------------------------------------------
# 5. Model, EMA, optimizer
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """The objects of one training run."""

    cfg: TrainConfig
    runtime: Runtime
    folder: RunFolder
    model: nn.Module
    net: nn.Module  # the model, wrapped in DistributedDataParallel when distributed
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    noise_gen: torch.Generator
    use_bf16: bool
    diffusion: GaussianDiffusion = dataclasses.field(default_factory=GaussianDiffusion)
    #: The step of the last checkpoint written or restored (0: none yet).
    saved_step: int = 0

    @property
    def estimator(self) -> Any:
        return self.model.deq.grad if isinstance(self.model, FPDM) else None


def _build_run(cfg: TrainConfig, runtime: Runtime, folder: RunFolder, dataset: Any) -> _Run:
    """The model (the preset, shaped by the data), its EMA, AdamW, the random streams and the DDP wrapper."""
    device = runtime.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sample_x, _ = dataset[0]
    # Same seed on every rank: identical initial weights (DDP also broadcasts them from rank 0).
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg, sample_x.shape[0], sample_x.shape[-1], dataset.num_classes).to(device)
    except ValueError as error:
        raise UsageError(f"the model options do not fit together: {error}") from None
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(cfg.ema_decay, cfg.ema_warmup), use_buffers=True)
    ema.requires_grad_(False)
    optimizer = make_optimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.compile:
        # After the EMA's copy: the copy must not share the compiled callables of the model.
        compile_blocks(model)
    # Per-rank randomness (timesteps, noise, label dropout) differs across ranks; the estimator's draws
    # (S-JFB) come from its own generator, seeded alike on every rank.
    noise_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + runtime.rank)
    torch.manual_seed(cfg.seed * 1_000_003 + runtime.rank + 7)
    net: nn.Module = model
    if runtime.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_bf16 = device.type == "cuda" if cfg.bf16 is None else cfg.bf16
    return _Run(cfg, runtime, folder, model, net, ema, optimizer, noise_gen, use_bf16)


def build_model(cfg: TrainConfig, in_channels: int, input_size: int, num_classes: int) -> nn.Module:
    """The preset with the run's overrides and the data's shape; for FPDM, the run's solver and estimator."""
    overrides = cfg.model_overrides()
    overrides.update(in_channels=in_channels, input_size=input_size, num_classes=num_classes)
    if cfg.model.startswith("FPDM"):
        estimator = make_estimator(cfg.grad, cfg)
        overrides.update(solver=make_solver(cfg.solver), grad=estimator, max_iter=cfg.max_iter, tol=cfg.tol)
    else:
        for name in ("pre_depth", "post_depth"):
            overrides.pop(name, None)
    return create_model(cfg.model, **overrides)


EMAUpdate = Callable[[list[Tensor], list[Tensor], Tensor], None]


def ema_multi_avg_fn(decay: float, warmup: bool = False) -> EMAUpdate:
    r"""The EMA update for ``torch.optim.swa_utils.AveragedModel(multi_avg_fn=...)``.

    :math:`\bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta` with :math:`d` = ``decay``, or with
    ``warmup`` :math:`d_n = \min(\text{decay}, (1 + n) / (10 + n))` after :math:`n` updates (the averaged
    model's ``n_averaged``, saved in its state dict, so a resumed run continues the same schedule). A fixed
    decay of 0.999 averages over about the last 1,000 steps, which in a run of a few thousand steps lags
    the weights far behind; with warm-up the window, :math:`1 / (1 - d_n) = (10 + n) / 9` steps, grows with
    the run until it reaches the fixed decay's.
    Without warm-up this is ``get_ema_multi_avg_fn(decay)``. Integer buffers are copied.
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_decay must be a float in [0, 1], got {decay!r}")
    if not warmup:
        return get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        # A 0-dim tensor on the parameters' device: no host sync per step.
        n = num_averaged.to(torch.float64)
        weight = 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=decay)
        for avg, cur in zip(averaged, current, strict=True):
            if avg.is_floating_point() or avg.is_complex():
                avg.lerp_(cur, weight.to(device=avg.device, dtype=avg.dtype))
            else:
                avg.copy_(cur)

    return update


def make_optimizer(params: Any, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where this torch supports it for their device.

    ``fused=True`` runs on CUDA since torch 2.0 and on the CPU since 2.4; where it is refused (an older
    torch, another device) the optimizer falls back to the default implementation.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


# ----------------------------------------------------------------------------------------------------
# 6. Resume (and the model of a checkpoint, for sampling)
# ----------------------------------------------------------------------------------------------------


def _restore(run: _Run, ckpt: dict[str, Any]) -> int:
    """Load a checkpoint into the run; the optimizer takes the request's ``lr`` and ``weight_decay``.
    Returns the checkpoint's step, which the run remembers as its last checkpoint."""
    path, runtime = run.folder.checkpoint_path, run.runtime
    missing = [key for key in ("ema", "optimizer", "rng") if key not in ckpt]
    if missing:
        raise FileKindError(f"{path}: has no {missing[0]!r}, which a resume needs")
    ranks = len(ckpt["rng"])
    if ranks != runtime.world_size:
        raise UsageError(
            f"{path} was written by {ranks} processes, this run has {runtime.world_size}: an exact resume "
            "needs the same number"
        )
    _check_weights(path, run.cfg, run.model.state_dict(), ckpt["model"])
    _check_weights(path, run.cfg, run.ema.state_dict(), ckpt["ema"])
    run.model.load_state_dict(ckpt["model"])
    run.ema.load_state_dict(ckpt["ema"])
    # The implementation (fused, foreach) is this machine's choice, not the checkpoint's.
    chosen = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in run.optimizer.param_groups]
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as error:
        raise FileKindError(f"{path}: its optimizer state does not fit the model ({error})") from None
    for group, implementation in zip(run.optimizer.param_groups, chosen, strict=True):
        group.update(lr=run.cfg.lr, weight_decay=run.cfg.weight_decay, **implementation)
    state = ckpt["rng"][runtime.rank]
    torch.set_rng_state(state["torch"])
    run.noise_gen.set_state(state["noise"])
    if runtime.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], runtime.device)
    if run.estimator is not None and ckpt.get("estimator") is not None:
        run.estimator.load_state_dict(ckpt["estimator"])
    run.saved_step = int(ckpt["step"])
    return run.saved_step


#: The fields that size a preset's model.
_SIZES = ("hidden_size", "num_heads", "depth", "pre_depth", "post_depth")


def _check_weights(
    path: Path | str, cfg: TrainConfig, expected: dict[str, Any], found: dict[str, Any]
) -> None:
    """``FileKindError`` naming the checkpoint ``path`` when its weights ``found`` do not fit the model its
    config ``cfg`` builds (whose state dict is ``expected``): one line, not torch's list of every key."""

    def family(keys: Any) -> str:  # only an FPDM has an injection layer
        return "an FPDM" if any(key.endswith("injection.weight") for key in keys) else "a DiT"

    if family(found) != family(expected):
        raise FileKindError(f"{path}: its config names {cfg.model} but its weights are {family(found)}'s")
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    if missing or unexpected:
        counts = f"{len(missing)} missing" + (f" ({missing[0]}, ...)" if missing else "")
        counts += f", {len(unexpected)} unexpected" + (f" ({unexpected[0]}, ...)" if unexpected else "")
        raise FileKindError(f"{path}: its weights do not fit its config ({cfg.model}): {counts}")
    for key, value in expected.items():
        if isinstance(value, Tensor) and isinstance(found[key], Tensor) and value.shape != found[key].shape:
            sizes = [f"{flag(n)} {getattr(cfg, n)}" for n in _SIZES if getattr(cfg, n) is not None]
            raise FileKindError(
                f"{path}: its weights do not fit its config ({' '.join([cfg.model, *sizes])}): {key} is "
                f"{tuple(found[key].shape)} in the checkpoint, {tuple(value.shape)} for the config"
            )


def load_trained_model(path: str | Path, *, ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a ``train.py`` checkpoint with its (EMA) weights, on the CPU, and the checkpoint's
    configuration as stored.

    The architecture comes from the checkpoint's config; the data's channels, image size and number of
    classes from the shapes of its weights, so the data set is not needed.

    Raises
    ------
    files.FileKindError
        One line naming the checkpoint: not a checkpoint, a config this version cannot build (a preset it
        does not know), weights that do not fit the config (another size, an FPDM's under a DiT's name).
    """
    ckpt = load_checkpoint(path)
    cfg = checked_config(ckpt, path, TrainConfig)
    if ema and "ema" in ckpt:
        state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    else:
        state = ckpt["model"]
    try:
        _, in_channels, patch, _ = state["patch_embed.weight"].shape  # (D, C, p, p)
        grid = math.isqrt(state["pos_embed"].shape[1])
        num_classes = state["y_embedder.table.weight"].shape[0] - 1
    except (KeyError, AttributeError, ValueError) as error:
        raise FileKindError(f"{path}: its weights are not a DiT's or an FPDM's (no {error})") from None
    try:
        model = build_model(cfg, in_channels, grid * patch, num_classes)
    except ValueError as error:
        raise FileKindError(f"{path}: its config does not build a model ({error})") from None
    _check_weights(path, cfg, model.state_dict(), state)
    model.load_state_dict(state)
    return model, dict(ckpt["config"])


# ----------------------------------------------------------------------------------------------------
# 7. The loop: a step, a log record, a checkpoint, signals
# ----------------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite; the last good checkpoint is left in place."""


def _train_step(run: _Run, x: Tensor, y: Tensor, step: int, stop: StopSignals) -> tuple[Tensor, Tensor, Any]:
    """One optimisation step; returns the loss, the gradient norm before clipping and the model's state.

    The model's counts (block evaluations, the estimator's evaluations) and its solve's statistics come back
    with its output (DDP passes the tuple through), never through attributes that the forward pass sets on
    the module. The ranks agree on a stop requested on any of them in the same reduction that checks the
    loss.
    """
    cfg, runtime = run.cfg, run.runtime
    run.model.train()
    with torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
        loss, state = run.diffusion.training_loss(run.net, x, y, generator=run.noise_gen)
    # One reduction for two questions: a non-finite loss on any rank, a stop signal on any rank.
    checks = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, *stop.flags()], device=runtime.device)
    if runtime.distributed:
        dist.all_reduce(checks)
    bad, *stops = checks.tolist()
    stop.agree(stops)
    if bad > 0:
        last = f"{run.folder.checkpoint_path} (step {run.saved_step})" if run.saved_step else None
        raise NonFiniteLossError(
            f"non-finite training loss ({loss.item()}) at step {step + 1} on {int(bad)} of "
            f"{runtime.world_size} rank(s); training stopped. The last good checkpoint is "
            f"{last or 'none (no checkpoint yet)'}. Try a lower --lr or --grad-clip, or check the data."
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.ema.update_parameters(run.model)
    return loss, grad_norm, state


class _Progress:
    """Rank 0's log records (every ``--log-every`` steps and at the last) and its progress bar; every rank
    keeps its last :attr:`record` (``{"step": start}`` until there is one)."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, folder: RunFolder, start: int) -> None:
        self.cfg, self.folder, self.is_main = cfg, folder, runtime.is_main
        self.record: dict[str, Any] = {"step": start}
        self.bar = None
        if runtime.is_main and cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
        self._tick, self._last_logged = time.perf_counter(), start

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()  # before any message: it starts on its own line

    def step(self, done: int, loss: Tensor, grad_norm: Tensor, state: Any) -> None:
        """After step ``done`` (counted from 1): a log record when one is due."""
        if self.is_main and (done % self.cfg.log_every == 0 or done == self.cfg.steps):
            now = time.perf_counter()
            record = {"step": done, "loss": loss.item(), "grad_norm": float(grad_norm)}
            record.update(
                sec_per_step=(now - self._tick) / (done - self._last_logged), **_solve_record(state)
            )
            self._tick, self._last_logged, self.record = now, done, record
            self.folder.append_log(record)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", evals=record.get("block_evals", "-"))
        if self.bar is not None:
            self.bar.update(1)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _solve_record(state: Any) -> dict[str, Any]:
    """Block evaluations and the implicit solve's statistics of one training forward (FPDM only).

    ``block_evals`` = pre + post + ``nfe`` + ``grad_evals``: ``nfe`` evaluations of the implicit block
    without a gradient (the solver's; S-JFB's no-grad draw, or fewer when the tolerance stopped it) and
    ``grad_evals`` differentiable ones (the estimator's; S-JFB's grad draw), which the backward pass
    goes through again.
    """
    if state is None or getattr(state, "stats", None) is None:
        return {}
    residual = state.stats.residual.float()
    return {
        "block_evals": state.block_evals,
        "nfe": state.stats.nfe,
        "grad_evals": state.grad_evals,
        "residual_max": _finite_or_none(float(residual.max())),
        "residual_mean": _finite_or_none(float(residual.mean())),
        "converged": float(state.stats.converged.float().mean()),
    }


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is left in place.

    An ``OSError`` whose ``strerror`` is one line naming what failed and the checkpoint that is kept.
    """

    def __init__(self, run: _Run, step: int, error: OSError) -> None:
        path = run.folder.checkpoint_path
        kept = (
            f"{path} (step {run.saved_step}) is kept" if run.saved_step else "no checkpoint was written yet"
        )
        reason = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        super().__init__(error.errno, f"could not write the checkpoint of step {step} ({reason}); {kept}")


def _write_checkpoint(run: _Run, step: int) -> None:
    """Every rank's RNG state is gathered; rank 0 writes; all wait for it."""
    rng_states = gather_objects(run.runtime, _rng_state(run))
    if run.runtime.is_main:
        estimator = run.estimator
        payload = {
            "step": step,
            "model": run.model.state_dict(),
            "ema": run.ema.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "rng": rng_states,
            "estimator": estimator.state_dict() if hasattr(estimator, "state_dict") else None,
            "config": dataclasses.asdict(run.cfg),
        }
        try:
            run.folder.save_checkpoint(payload)
        except OSError as error:
            raise CheckpointWriteError(run, step, error) from None
    if run.runtime.distributed:
        dist.barrier()
    run.saved_step = step


def _rng_state(run: _Run) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "noise": run.noise_gen.get_state()}
    if run.runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(run.runtime.device)
    return state


def _stopped(run: _Run, signum: int, done: int) -> Interrupted:
    """The stop after a first Ctrl-C or SIGTERM, once step ``done`` is checkpointed."""
    name, path = signal.Signals(signum).name, run.folder.checkpoint_path
    return Interrupted(
        f"stopped by {name} after step {done} of {run.cfg.steps}; {path} (step {done}) holds it: continue "
        "with --resume",
        signum,
    )


def _stopped_at_once(run: _Run | None, signum: int) -> Interrupted:
    """The stop by a second signal, wherever it came (in a step, in a checkpoint's write)."""
    kept = "no checkpoint was written"
    if run is not None and run.saved_step:
        path = run.folder.checkpoint_path
        kept = f"{path} (step {run.saved_step}) is the last checkpoint: continue with --resume"
    return Interrupted(f"stopped at once by a second {signal.Signals(signum).name}; {kept}", signum)


# ----------------------------------------------------------------------------------------------------
# 8. Final checks
# ----------------------------------------------------------------------------------------------------


def _check_replicas(run: _Run) -> dict[str, Any]:
    """DDP keeps replicas in lockstep; check it rather than assume it. Rank 0 logs the record and returns
    it; a single process has nothing to check."""
    if not run.runtime.distributed:
        return {}
    flat = torch.cat([p.detach().float().flatten().cpu() for p in run.model.parameters()])
    replicas = gather_objects(run.runtime, flat)
    spread = max(float((r - replicas[0]).abs().max()) for r in replicas)
    if not run.runtime.is_main:
        return {}
    record = {"step": run.cfg.steps, "world_size": run.runtime.world_size, "rank_param_max_abs_diff": spread}
    run.folder.append_log(record)
    return record


# ----------------------------------------------------------------------------------------------------
# The data order: a function of (seed, step), so that resuming needs no iterator state
# ----------------------------------------------------------------------------------------------------


def epoch_order(num_items: int, seed: int, epoch: int) -> Tensor:
    """The order of the items in epoch ``epoch``: a permutation seeded by ``(seed, epoch)``."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(num_items: int, batch_size: int, seed: int, step: int) -> Tensor:
    """The global batch of training step ``step``: epochs are seeded permutations, the last partial
    batch of an epoch is dropped."""
    per_epoch = num_items // batch_size
    if per_epoch == 0:
        raise UsageError(f"--batch-size {batch_size} exceeds the dataset ({num_items} items)")
    epoch, k = divmod(step, per_epoch)
    return epoch_order(num_items, seed, epoch)[k * batch_size : (k + 1) * batch_size]


class StepBatches(torch.utils.data.Sampler):
    """The indices one rank reads at the steps ``start .. stop - 1``: its share of each global batch
    :func:`batch_indices` (rank ``r`` of ``W`` takes the ``r``-th of ``W`` equal slices).

    A sampler for ``DataLoader(BatchesOf(dataset), sampler=..., batch_size=None)``: the order stays a
    function of ``(seed, step)`` whatever reads it, and a rank never reads another rank's rows. An epoch's
    permutation is drawn once, not at every step.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        start: int,
        stop: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = max(1, self.num_items // self.batch_size)
        local = self.batch_size // self.world_size
        order, order_epoch = None, -1
        for step in range(self.start, self.stop):
            epoch, k = divmod(step, per_epoch)
            if epoch != order_epoch:
                batch_indices(self.num_items, self.batch_size, self.seed, step)  # its checks
                order, order_epoch = epoch_order(self.num_items, self.seed, epoch), epoch
            assert order is not None
            first = k * self.batch_size + self.rank * local
            yield order[first : first + local].tolist()


def training_batches(
    dataset: Any, cfg: Any, runtime: Runtime, start: int
) -> Generator[tuple[Tensor, Tensor], None, None]:
    """This rank's ``(x, y)`` of the steps ``start .. cfg.steps - 1``, read by ``cfg.workers`` DataLoader
    workers (decoding images there) or, with none, by this process; on the run's device."""
    loader = torch.utils.data.DataLoader(
        BatchesOf(dataset),
        sampler=StepBatches(
            len(dataset), cfg.batch_size, cfg.seed, start, cfg.steps, runtime.rank, runtime.world_size
        ),
        batch_size=None,
        num_workers=cfg.workers,
        pin_memory=runtime.device.type == "cuda",
        worker_init_fn=quiet_worker,
        # Its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise, which
        # would shift the training's random draws at each resume.
        generator=torch.Generator(),
    )
    for batch in loader:
        if isinstance(batch, str):  # a file that cannot be read any more
            raise FileKindError(batch)
        x, y = batch
        yield x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
