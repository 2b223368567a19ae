"""Train FPDM (or DiT) on digits, an image folder or VAE latents; one command line from a laptop to a cluster.

Laptop (CPU, the bundled digits)::

    python examples/fpdm/train.py --out runs/fpdm-digits --steps 5000

Several processes or GPUs (DistributedDataParallel; gloo on CPU, NCCL on GPU)::

    torchrun --nproc_per_node 8 examples/fpdm/train.py --model FPDM-XL/2 --data latents:imagenet256.pt \\
        --batch-size 256 --lr 1e-4 --out runs/fpdm-xl

What it does: AdamW; an EMA of the weights (``torch.optim.swa_utils.AveragedModel``); S-JFB by default
(``--grad`` picks any estimator of ``implicitdiff``); bf16 autocast and TF32 on CUDA; a tqdm bar; a JSONL log
(``OUT/log.jsonl``) of loss, block evaluations, solver iterations and residuals; a checkpoint
``OUT/checkpoint.pt`` written atomically (temporary file, then ``os.replace``) and read with
``weights_only=True``. ``--resume`` continues exactly where the checkpoint stopped: model, EMA, optimizer,
every rank's RNG states, the estimator's own generator (S-JFB) and the data order (a function of the seed and
the step). A non-finite loss stops training with an error and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import TensorPairs, load_dataset
from diffusion import GaussianDiffusion
from models import FPDM, create_model

__all__ = [
    "CHECKPOINT_NAME",
    "LOG_NAME",
    "NonFiniteLossError",
    "TrainConfig",
    "ema_multi_avg_fn",
    "load_checkpoint",
    "main",
    "make_estimator",
    "make_solver",
    "parse_args",
    "save_checkpoint",
    "train",
]

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"


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


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; the command-line flags map one to one onto these fields."""

    out: str = "runs/fpdm"
    model: str = "FPDM-Digits/2"
    hidden_size: int | None = None
    num_heads: int | None = None
    depth: int | None = None
    pre_depth: int | None = None
    post_depth: int | None = None
    data: str = "digits"
    image_size: int = 32
    batch_size: int = 128
    steps: int = 5000
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = False
    class_dropout: float = 0.1
    grad: str = "sjfb"
    solver: str = "picard"
    max_iter: int = 8
    tol: float = 1e-3
    sjfb_no_grad: tuple[int, int] = (0, 6)
    sjfb_grad: tuple[int, int] = (1, 3)
    phantom_k: int = 5
    phantom_tau: float = 0.5
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 10
    resume: bool = False
    device: str = "auto"
    bf16: bool | None = None
    progress: bool = True

    def model_overrides(self) -> dict[str, Any]:
        """The preset's constructor arguments this run replaces."""
        names = {
            "hidden_size": "hidden_size",
            "num_heads": "num_heads",
            "depth": "depth",
            "pre_depth": "pre_depth",
            "post_depth": "post_depth",
        }
        overrides = {
            arg: getattr(self, field) for field, arg in names.items() if getattr(self, field) is not None
        }
        overrides["class_dropout_prob"] = self.class_dropout
        return overrides


def make_solver(name: str) -> Any:
    """``picard``, ``anderson`` or ``broyden`` from :mod:`implicitdiff` with default options."""
    from implicitdiff import Anderson, Broyden, Picard

    solvers = {"picard": Picard, "anderson": Anderson, "broyden": Broyden}
    if name not in solvers:
        raise ValueError(f"unknown solver {name!r}; choose from {sorted(solvers)}")
    return solvers[name]()


def make_estimator(cfg: TrainConfig) -> Any:
    """The gradient estimator named by ``cfg.grad``: ``sjfb``, ``jfb``, ``ift`` or ``phantom``."""
    import implicitdiff.gradients as gradients

    if cfg.grad == "jfb":
        return gradients.JFB()
    wanted = {"sjfb": "SJFB", "ift": "IFT", "phantom": "PhantomGradient"}
    if cfg.grad not in wanted:
        raise ValueError(
            f"unknown gradient estimator {cfg.grad!r}; choose from ['ift', 'jfb', 'phantom', 'sjfb']"
        )
    cls = getattr(gradients, wanted[cfg.grad], None)
    if cls is None:
        raise ImportError(f"implicitdiff.gradients has no {wanted[cfg.grad]} in this version; use --grad jfb")
    if cfg.grad == "sjfb":
        return cls(no_grad_iters=tuple(cfg.sjfb_no_grad), grad_iters=tuple(cfg.sjfb_grad), seed=cfg.seed)
    if cfg.grad == "ift":
        return cls(max_iter=max(2 * cfg.max_iter, 20), tol=cfg.tol, stop_mode="rel")
    return cls(k=cfg.phantom_k, tau=cfg.phantom_tau)


def build_model(cfg: TrainConfig, in_channels: int, input_size: int, num_classes: int) -> nn.Module:
    """The preset with the run's overrides and the data's shape; for FPDM, the run's solver and estimator."""
    overrides = cfg.model_overrides()
    overrides.update(in_channels=in_channels, input_size=input_size, num_classes=num_classes)
    if cfg.model.startswith("FPDM"):
        overrides.update(
            solver=make_solver(cfg.solver), grad=make_estimator(cfg), max_iter=cfg.max_iter, tol=cfg.tol
        )
    else:
        for name in ("pre_depth", "post_depth"):
            overrides.pop(name, None)
    return create_model(cfg.model, **overrides)


# ----------------------------------------------------------------------------------------------------
# Distributed set-up
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runtime:
    """Where this process runs: rank, world size, device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(requested: str) -> Runtime:
    """Join the process group if launched by torchrun (``RANK`` set) and pick the device."""
    use_cuda = torch.cuda.is_available() if requested == "auto" else requested.startswith("cuda")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    else:
        rank, world = 0, 1
        device = (
            torch.device("cuda" if use_cuda else "cpu") if requested == "auto" else torch.device(requested)
        )
    return Runtime(rank=rank, world_size=world, device=device)


def gather_objects(runtime: Runtime, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a list of one without a process group)."""
    if not runtime.distributed:
        return [obj]
    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


# ----------------------------------------------------------------------------------------------------
# Data order: a function of (seed, step), so that resuming needs no iterator state
# ----------------------------------------------------------------------------------------------------


def batch_indices(num_items: int, batch_size: int, seed: int, step: int) -> Tensor:
    """The global batch of training step ``step``: epochs are seeded permutations, the last partial
    batch of an epoch is dropped."""
    per_epoch = num_items // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the dataset ({num_items} items)")
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[k * batch_size : (k + 1) * batch_size]


def fetch(dataset: Any, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Stack the items ``indices`` of a dataset (fast path for in-memory tensors)."""
    if isinstance(dataset, TensorPairs):
        return dataset.images[indices], dataset.labels[indices]
    items = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` atomically: a reader sees the old file or the new one, never a partial one.

    The data goes to ``path.tmp``, is flushed to disk (``fsync``), and replaces ``path`` by ``os.replace``
    (atomic on POSIX and Windows); a process killed mid-write leaves at most a stale ``.tmp``.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain containers only, no pickled code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng_state(noise_gen: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "noise": noise_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Tensor], noise_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    noise_gen.set_state(state["noise"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log records after ``last_step`` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line and json.loads(line).get("step", 0) <= last_step
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns a summary of the last step.

    Raises
    ------
    NonFiniteLossError
        If the loss becomes NaN or infinite on any rank; nothing is saved after the last good checkpoint.
    """
    runtime = setup_runtime(cfg.device)
    try:
        return _train(cfg, runtime)
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, runtime: Runtime) -> dict[str, Any]:
    device = runtime.device
    out = Path(cfg.out)
    ckpt_path, log_path = out / CHECKPOINT_NAME, out / LOG_NAME
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.batch_size % runtime.world_size:
        raise ValueError(
            f"batch size {cfg.batch_size} is not divisible by the world size {runtime.world_size}"
        )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_bf16 = device.type == "cuda" if cfg.bf16 is None else cfg.bf16

    dataset = load_dataset(cfg.data, cfg.image_size)
    sample_x, _ = dataset[0]
    # Same seed on every rank: identical initial weights (DDP also broadcasts them from rank 0).
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, sample_x.shape[0], sample_x.shape[-1], dataset.num_classes).to(device)
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(cfg.ema_decay, cfg.ema_warmup), use_buffers=True)
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    diffusion = GaussianDiffusion()
    # Per-rank randomness (timesteps, noise, label dropout) differs across ranks; the estimator's draws
    # (S-JFB) come from its own generator, seeded alike on every rank.
    noise_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + runtime.rank)
    torch.manual_seed(cfg.seed * 1_000_003 + runtime.rank + 7)
    estimator = model.deq.grad if isinstance(model, FPDM) else None

    start_step = 0
    if cfg.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if len(ckpt["rng"]) != runtime.world_size:
            raise ValueError(
                f"{ckpt_path} was written by {len(ckpt['rng'])} processes, this run has "
                f"{runtime.world_size}: "
                "an exact resume needs the same world size"
            )
        _set_rng_state(ckpt["rng"][runtime.rank], noise_gen, device)
        if estimator is not None and ckpt.get("estimator") is not None:
            estimator.load_state_dict(ckpt["estimator"])
        start_step = int(ckpt["step"])
        if runtime.is_main:
            _truncate_log(log_path, start_step)
    elif runtime.is_main and log_path.exists():
        log_path.unlink()

    ddp_model: nn.Module = model
    if runtime.distributed:
        ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    def checkpoint_payload(step: int) -> dict[str, Any] | None:
        rng_states = gather_objects(runtime, _rng_state(noise_gen, device))
        if not runtime.is_main:
            return None
        return {
            "step": step,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng_states,
            "estimator": estimator.state_dict() if hasattr(estimator, "state_dict") else None,
            "config": dataclasses.asdict(cfg),
        }

    def write_checkpoint(step: int) -> None:
        payload = checkpoint_payload(step)
        if payload is not None:
            save_checkpoint(payload, ckpt_path)
        if runtime.distributed:
            dist.barrier()

    last_good = start_step if start_step > 0 else None
    local_batch = cfg.batch_size // runtime.world_size
    bar = None
    if runtime.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", dynamic_ncols=True)
    summary: dict[str, Any] = {"step": start_step}
    log_handle = open(log_path, "a") if runtime.is_main else contextlib.nullcontext()
    with log_handle as log:
        tick = time.perf_counter()
        for step in range(start_step, cfg.steps):
            model.train()
            indices = batch_indices(len(dataset), cfg.batch_size, cfg.seed, step)
            indices = indices[runtime.rank * local_batch : (runtime.rank + 1) * local_batch]
            x, y = fetch(dataset, indices)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = diffusion.training_loss(ddp_model, x, y, generator=noise_gen)
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device)
            if runtime.distributed:
                dist.all_reduce(bad)
            if bad.item() > 0:
                where = (
                    f"{ckpt_path} (step {last_good})" if last_good is not None else "none (no checkpoint yet)"
                )
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss.item()}) at step {step + 1} on "
                    f"{int(bad.item())} of {runtime.world_size} rank(s); training stopped. The last good "
                    f"checkpoint is {where}. Try a lower --lr or --grad-clip, or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            ema.update_parameters(model)
            done = step + 1

            if runtime.is_main and (done % cfg.log_every == 0 or done == cfg.steps):
                now = time.perf_counter()
                record: dict[str, Any] = {
                    "step": done,
                    "loss": loss.item(),
                    "grad_norm": float(grad_norm),
                    "sec_per_step": (now - tick) / max(1, done - summary["step"]),
                }
                tick = now
                state = getattr(model, "last_state", None)
                if state is not None and state.stats is not None:
                    residual = state.stats.residual.float()
                    record.update(
                        block_evals=state.block_evals,
                        nfe=state.stats.nfe,
                        residual_max=_finite_or_none(float(residual.max())),
                        residual_mean=_finite_or_none(float(residual.mean())),
                        converged=float(state.stats.converged.float().mean()),
                    )
                log.write(json.dumps(record) + "\n")
                log.flush()
                summary = record
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", evals=record.get("block_evals", "-"))
            if bar is not None:
                bar.update(1)
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                write_checkpoint(done)
                last_good = done

        if runtime.distributed:
            # DDP keeps replicas in lockstep; check it rather than assume it.
            flat = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
            replicas = gather_objects(runtime, flat)
            spread = max(float((r - replicas[0]).abs().max()) for r in replicas)
            if runtime.is_main:
                record = {
                    "step": cfg.steps,
                    "world_size": runtime.world_size,
                    "rank_param_max_abs_diff": spread,
                }
                log.write(json.dumps(record) + "\n")
                summary = {**summary, **record}
    if bar is not None:
        bar.close()
    summary["step"] = max(int(summary.get("step", 0)), start_step)
    return summary


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line into a :class:`TrainConfig`."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--out", default=defaults.out, help="run folder: checkpoint.pt and log.jsonl")
    add("--model", default=defaults.model, help="preset name (models.PRESETS)")
    add("--hidden-size", type=int, default=None)
    add("--num-heads", type=int, default=None)
    add("--depth", type=int, default=None, help="DiT depth")
    add("--pre-depth", type=int, default=None, help="FPDM explicit blocks before the implicit block")
    add("--post-depth", type=int, default=None, help="FPDM explicit blocks after the implicit block")
    add("--data", default=defaults.data, help="'digits', 'folder:PATH' or 'latents:FILE'")
    add("--image-size", type=int, default=defaults.image_size, help="for folder: datasets")
    add("--batch-size", type=int, default=defaults.batch_size, help="global batch, split over ranks")
    add("--steps", type=int, default=defaults.steps)
    add("--lr", type=float, default=defaults.lr)
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--grad-clip", type=float, default=defaults.grad_clip)
    add("--ema-decay", type=float, default=defaults.ema_decay)
    add(
        "--ema-warmup",
        action=argparse.BooleanOptionalAction,
        default=defaults.ema_warmup,
        help="decay min(ema_decay, (1 + n) / (10 + n)) after n updates: an EMA that does not lag short runs",
    )
    add("--class-dropout", type=float, default=defaults.class_dropout)
    add("--grad", default=defaults.grad, choices=["sjfb", "jfb", "ift", "phantom"], help="gradient estimator")
    add("--solver", default=defaults.solver, choices=["picard", "anderson", "broyden"])
    add("--max-iter", type=int, default=defaults.max_iter, help="forward solve cap (not S-JFB's draws)")
    add("--tol", type=float, default=defaults.tol)
    add("--sjfb-no-grad", type=int, nargs=2, default=list(defaults.sjfb_no_grad), metavar=("MIN", "MAX"))
    add("--sjfb-grad", type=int, nargs=2, default=list(defaults.sjfb_grad), metavar=("MIN", "MAX"))
    add("--phantom-k", type=int, default=defaults.phantom_k)
    add("--phantom-tau", type=float, default=defaults.phantom_tau)
    add("--seed", type=int, default=defaults.seed)
    add("--ckpt-every", type=int, default=defaults.ckpt_every)
    add("--log-every", type=int, default=defaults.log_every)
    add("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    add("--device", default=defaults.device, help="'auto', 'cpu', 'cuda'")
    add(
        "--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)"
    )
    add("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["sjfb_no_grad"] = tuple(values["sjfb_no_grad"])
    values["sjfb_grad"] = tuple(values["sjfb_grad"])
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, train, report; exit status 1 on a non-finite loss."""
    cfg = parse_args(argv)
    try:
        summary = train(cfg)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
