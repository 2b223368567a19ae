"""Training of FPDM and DiT: :class:`TrainConfig` (one field per command-line flag) and :func:`train`.

One loop from a laptop to a cluster: AdamW, an EMA of the weights, S-JFB by default (any estimator of
:mod:`fpdm.registry`), bf16 autocast and TF32 on CUDA, DistributedDataParallel under ``torchrun``. A run
folder is never overwritten unless asked (``--resume`` continues it exactly, ``--overwrite`` starts
again), and ``--resume`` refuses a change of what the checkpoint's weights, estimator state and data
order belong to (:data:`REFUSED_ON_RESUME`). A non-finite loss stops training and keeps the last good
checkpoint; Ctrl-C or SIGTERM writes a checkpoint after the current step and stops (:class:`StopSignals`);
one run at a time owns a folder (:class:`run_folder.RunLock`). The model's counts come back with its
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
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fpdm.cli import (
    Interrupted,
    OneLineParser,
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
from fpdm.registry import ESTIMATOR_OPTIONS, ESTIMATORS, SOLVERS, make_estimator, make_solver
from fpdm.run_folder import (
    CHECKPOINT_NAME,
    LOG_NAME,
    RunLock,
    clear_run_folder,
    compare_configs,
    load_checkpoint,
    open_run_folder,
    save_checkpoint,
    stored_config,
)

__all__ = [
    "CHECKPOINT_NAME",
    "LOG_NAME",
    "REFUSED_ON_RESUME",
    "NonFiniteLossError",
    "TrainConfig",
    "build_model",
    "compare_configs",
    "ema_multi_avg_fn",
    "load_checkpoint",
    "main",
    "make_optimizer",
    "parse_args",
    "save_checkpoint",
    "stored_config",
    "train",
]

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


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite; the last good checkpoint is left in place."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is left in place.

    An ``OSError`` whose ``strerror`` is one line naming what failed and the checkpoint that is kept.
    """

    def __init__(self, run: Any, step: int, error: OSError) -> None:
        path = run.checkpoint_path
        kept = (
            f"{path} (step {run.saved_step}) is kept" if run.saved_step else "no checkpoint was written yet"
        )
        reason = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        super().__init__(error.errno, f"could not write the checkpoint of step {step} ({reason}); {kept}")


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


# ----------------------------------------------------------------------------------------------------
# Data order: a function of (seed, step), so that resuming needs no iterator state
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


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM, turned into a request to stop after the current step.

    While installed (``with``; main thread only, elsewhere it does nothing) the first signal only sets
    :attr:`requested`; the loop then writes a checkpoint and stops, so that ``--resume`` loses no step. A
    second signal stops at once (``KeyboardInterrupt``); checkpoints are atomic, so the last one is whole.
    Under ``torchrun`` the ranks agree on it (:attr:`agreed`, set by each step's check of the loss).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = 0
        self.agreed = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def flags(self) -> list[float]:
        """This rank's request, as the two entries the ranks sum: (SIGINT, SIGTERM)."""
        return [float(self.requested == signum) for signum in self.SIGNALS]

    def agree(self, summed: list[float]) -> None:
        """Every rank's requests summed: stop if any rank was asked to (SIGINT wins)."""
        self.agreed = next((int(s) for s, n in zip(self.SIGNALS, summed, strict=True) if n > 0), 0)


@dataclasses.dataclass
class _Run:
    """The objects of one training run."""

    cfg: TrainConfig
    runtime: Runtime
    dataset: Any
    model: nn.Module
    net: nn.Module  # the model, wrapped in DistributedDataParallel when distributed
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    noise_gen: torch.Generator
    use_bf16: bool
    diffusion: GaussianDiffusion = dataclasses.field(default_factory=GaussianDiffusion)
    #: The step of the last checkpoint written or restored (0: none yet).
    saved_step: int = 0
    #: Ctrl-C and SIGTERM, caught while the loop runs.
    stop: StopSignals = dataclasses.field(default_factory=lambda: StopSignals())
    #: This rank's batches, from the step the loop starts at (:func:`training_batches`).
    batches: Generator[tuple[Tensor, Tensor], None, None] | None = None

    @property
    def estimator(self) -> Any:
        return self.model.deq.grad if isinstance(self.model, FPDM) else None

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.cfg.out) / CHECKPOINT_NAME


def _load_data(cfg: TrainConfig) -> Any:
    try:
        return load_dataset(cfg.data, cfg.image_size)
    except FileKindError as error:
        raise UsageError(str(error)) from None
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--data {cfg.data!r}: {error}") from None


def _build_run(cfg: TrainConfig, runtime: Runtime) -> _Run:
    if cfg.batch_size % runtime.world_size:
        raise UsageError(
            f"--batch-size {cfg.batch_size} is not divisible by the {runtime.world_size} processes"
        )
    device = runtime.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dataset = _load_data(cfg)
    batch_indices(len(dataset), cfg.batch_size, cfg.seed, 0)  # a batch larger than the data: refused now
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
    return _Run(cfg, runtime, dataset, model, net, ema, optimizer, noise_gen, use_bf16)


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


def _rng_state(run: _Run) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "noise": run.noise_gen.get_state()}
    if run.runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(run.runtime.device)
    return state


def _restore(run: _Run, ckpt: dict[str, Any]) -> int:
    """Load a checkpoint into the run; the optimizer takes the request's ``lr`` and ``weight_decay``."""
    ranks = len(ckpt["rng"])
    if ranks != run.runtime.world_size:
        raise UsageError(
            f"{run.checkpoint_path} was written by {ranks} processes, this run has {run.runtime.world_size}: "
            "an exact resume needs the same number"
        )
    run.model.load_state_dict(ckpt["model"])
    run.ema.load_state_dict(ckpt["ema"])
    # The implementation (fused, foreach) is this machine's choice, not the checkpoint's.
    chosen = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in run.optimizer.param_groups]
    run.optimizer.load_state_dict(ckpt["optimizer"])
    for group, implementation in zip(run.optimizer.param_groups, chosen, strict=True):
        group.update(lr=run.cfg.lr, weight_decay=run.cfg.weight_decay, **implementation)
    state = ckpt["rng"][run.runtime.rank]
    torch.set_rng_state(state["torch"])
    run.noise_gen.set_state(state["noise"])
    if run.runtime.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], run.runtime.device)
    if run.estimator is not None and ckpt.get("estimator") is not None:
        run.estimator.load_state_dict(ckpt["estimator"])
    run.saved_step = int(ckpt["step"])
    return run.saved_step


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
            save_checkpoint(payload, run.checkpoint_path)
        except OSError as error:
            raise CheckpointWriteError(run, step, error) from None
    if run.runtime.distributed:
        dist.barrier()
    run.saved_step = step


def _train_step(run: _Run, step: int, last_good: int | None) -> tuple[Tensor, Tensor, Any]:
    """One optimisation step; returns the loss, the gradient norm before clipping and the model's state.

    The model's counts (block evaluations, the estimator's evaluations) and its solve's statistics come back
    with its output (DDP passes the tuple through), never through attributes that
    the forward pass sets on the module.
    """
    cfg, runtime = run.cfg, run.runtime
    run.model.train()
    if run.batches is None:
        run.batches = training_batches(run.dataset, cfg, runtime, start=step)
    x, y = next(run.batches)
    with torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
        loss, state = run.diffusion.training_loss(run.net, x, y, generator=run.noise_gen)
    # One reduction for two questions: a non-finite loss on any rank, a stop signal on any rank.
    checks = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, *run.stop.flags()], device=runtime.device)
    if runtime.distributed:
        dist.all_reduce(checks)
    bad, *stops = checks.tolist()
    run.stop.agree(stops)
    if bad > 0:
        where = (
            f"{run.checkpoint_path} (step {last_good})"
            if last_good is not None
            else "none (no checkpoint yet)"
        )
        raise NonFiniteLossError(
            f"non-finite training loss ({loss.item()}) at step {step + 1} on {int(bad)} of "
            f"{runtime.world_size} rank(s); training stopped. The last good checkpoint is {where}. Try a "
            "lower --lr or --grad-clip, or check the data."
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.ema.update_parameters(run.model)
    return loss, grad_norm, state


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


def _check_replicas(run: _Run) -> dict[str, Any] | None:
    """DDP keeps replicas in lockstep; check it rather than assume it (rank 0 gets the record)."""
    flat = torch.cat([p.detach().float().flatten().cpu() for p in run.model.parameters()])
    replicas = gather_objects(run.runtime, flat)
    spread = max(float((r - replicas[0]).abs().max()) for r in replicas)
    if not run.runtime.is_main:
        return None
    return {"step": run.cfg.steps, "world_size": run.runtime.world_size, "rank_param_max_abs_diff": spread}


def _loop(run: _Run, start_step: int, log: Any) -> dict[str, Any]:
    cfg, is_main = run.cfg, run.runtime.is_main
    bar = None
    if is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", dynamic_ncols=True)
    summary: dict[str, Any] = {"step": start_step}
    last_good = start_step if start_step > 0 else None
    tick, last_logged = time.perf_counter(), start_step
    for step in range(start_step, cfg.steps):
        loss, grad_norm, state = _train_step(run, step, last_good)
        done = step + 1
        if is_main and (done % cfg.log_every == 0 or done == cfg.steps):
            now = time.perf_counter()
            summary = {"step": done, "loss": loss.item(), "grad_norm": float(grad_norm)}
            summary.update(sec_per_step=(now - tick) / (done - last_logged), **_solve_record(state))
            tick, last_logged = now, done
            log.write(json.dumps(summary) + "\n")
            log.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{summary['loss']:.4f}", evals=summary.get("block_evals", "-"))
        if bar is not None:
            bar.update(1)
        if done % cfg.ckpt_every == 0 or done == cfg.steps or run.stop.agreed:
            _write_checkpoint(run, done)
            last_good = done
        if run.stop.agreed and done < cfg.steps:
            if bar is not None:
                bar.close()
            name = signal.Signals(run.stop.agreed).name
            raise Interrupted(
                f"stopped by {name} after step {done} of {cfg.steps}; {run.checkpoint_path} (step {done}) "
                "holds it: continue with --resume",
                run.stop.agreed,
            )
    if bar is not None:
        bar.close()
    return summary


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns a summary of the last step.

    Raises
    ------
    ValueError
        A field out of its allowed values (:meth:`TrainConfig.check`).
    cli.UsageError
        The run folder's rules (:func:`open_run_folder`), data that cannot be read, model options that do not
        fit together.
    NonFiniteLossError
        If the loss becomes NaN or infinite on any rank; nothing is saved after the last good checkpoint.
    cli.Interrupted
        After Ctrl-C or SIGTERM (in the main thread): the step under way is finished and checkpointed, and
        the message names the checkpoint; its ``signum`` is the signal's number.
    OSError
        A file that could not be written (:class:`CheckpointWriteError` for a checkpoint: the previous one
        is kept).
    """
    cfg.check()
    runtime = setup_runtime(cfg.device)
    ended_well = False
    try:
        summary = _train(cfg, runtime)
        ended_well = True
        return summary
    finally:
        # The DDP wrapper's reducer holds the process group: let it go before the group is destroyed.
        gc.collect()
        shutdown_runtime(runtime, wait=ended_well)


def _take_folder(cfg: TrainConfig, runtime: Runtime) -> RunLock | None:
    """Rank 0 takes the run folder's lock (:class:`run_folder.RunLock`); every rank learns the outcome, so
    that a refusal stops them all. Returns the lock (rank 0) or ``None``."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    lock, refusal = None, None
    if runtime.is_main:
        lock = RunLock(out)
        try:
            lock.acquire()
        except (UsageError, OSError) as error:
            refusal = error
    outcomes = gather_objects(runtime, None if refusal is None else (type(refusal), str(refusal)))
    if refusal is not None:
        raise refusal
    if outcomes[0] is not None:
        kind, message = outcomes[0]
        raise UsageError(message) if kind is UsageError else OSError(message)
    return lock


def _train(cfg: TrainConfig, runtime: Runtime) -> dict[str, Any]:
    """The run, in a frame of its own: its model and DDP wrapper are freed when it returns."""
    existed = Path(cfg.out).is_dir()
    lock = _take_folder(cfg, runtime)
    try:
        ckpt = open_run_folder(cfg, runtime)
        run = _build_run(cfg, runtime)
        start_step = _restore(run, ckpt) if ckpt is not None else 0
    except BaseException:
        _give_back(lock, Path(cfg.out), remove_folder=not existed)
        raise
    try:
        return _train_in_folder(run, start_step)
    finally:
        _give_back(lock, Path(cfg.out), remove_folder=False)


def _give_back(lock: RunLock | None, out: Path, remove_folder: bool) -> None:
    """Release the lock; a folder this run created and left empty (a refused start) is removed, so that it
    is no obstacle to the corrected command."""
    if lock is None:
        return
    lock.release()
    if remove_folder:
        with contextlib.suppress(OSError):
            out.rmdir()  # only when empty


def _train_in_folder(run: _Run, start_step: int) -> dict[str, Any]:
    cfg, runtime = run.cfg, run.runtime
    clear_run_folder(cfg, runtime, start_step)
    if runtime.distributed:
        dist.barrier()  # the folder is ready before any rank writes to it
    log_path = Path(cfg.out) / LOG_NAME
    with open(log_path, "a") if runtime.is_main else contextlib.nullcontext() as log, run.stop:
        try:
            summary = _loop(run, start_step, log)
        finally:
            if run.batches is not None:
                run.batches.close()  # stops the DataLoader's workers
        if runtime.distributed:
            record = _check_replicas(run)
            if record is not None:
                log.write(json.dumps(record) + "\n")
                summary = {**summary, **record}
    summary["step"] = max(int(summary.get("step", 0)), start_step)
    return summary


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


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


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line into a checked :class:`TrainConfig` (a bad value exits with status 2)."""
    parser = build_parser()
    cfg = config_from_args(TrainConfig, parser.parse_args(argv))
    try:
        cfg.check()
    except ValueError as error:
        parser.error(str(error))
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, train, report; exit status 0 done, 1 a non-finite loss, 2 a usage error, 3 a file
    that could not be written, 128 + the signal's number when stopped by Ctrl-C or SIGTERM (see
    :func:`cli.run_command`)."""
    cfg = parse_args(argv)

    def command() -> int:
        try:
            summary = train(cfg)
        except FileKindError as error:
            raise UsageError(str(error)) from None
        except NonFiniteLossError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(summary))
        return 0

    return run_command(build_parser(), command)
