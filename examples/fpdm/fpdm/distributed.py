"""Where a training process runs: alone or as a rank of a ``torchrun`` launch (gloo on CPU, NCCL on GPU).

:func:`setup_runtime` joins the process group when ``torchrun`` set ``RANK`` and ``WORLD_SIZE`` and picks the
device; :func:`shutdown_runtime` leaves it cleanly, which a process must do before it exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from fpdm.cli import UsageError

__all__ = [
    "Runtime",
    "gather_objects",
    "joined",
    "on_main_then_all",
    "resolve_device",
    "run_on_main",
    "setup_runtime",
    "shutdown_runtime",
]

T = TypeVar("T")


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


def resolve_device(requested: str, option: str = "--device") -> torch.device:
    """The device ``requested`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``) of one process; a
    ``UsageError`` naming ``option`` for a malformed name, CUDA on a machine without it, or a GPU index
    this machine does not have."""
    return _device(requested, 0, option)


def _device(requested: str, local_rank: int, option: str = "--device") -> torch.device:
    """The device asked for; ``UsageError`` for a malformed name, CUDA on a machine without it, or a GPU
    index this machine does not have."""
    use_cuda = torch.cuda.is_available() if requested == "auto" else requested.startswith("cuda")
    if requested != "auto":
        try:
            torch.device(requested)
        except RuntimeError:
            raise UsageError(
                f"{option} {requested!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
            ) from None
    if use_cuda and not torch.cuda.is_available():
        raise UsageError(f"{option} {requested!r}: CUDA is not available here; use {option} cpu")
    if not use_cuda:
        return torch.device("cpu" if requested == "auto" else requested)
    device = torch.device("cuda", local_rank) if requested in ("auto", "cuda") else torch.device(requested)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(
            f"{option} {requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def setup_runtime(requested: str) -> Runtime:
    """Join the process group if launched by torchrun (``RANK`` set) and pick the device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Runtime(rank=0, world_size=1, device=_device(requested, 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _device(requested, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def shutdown_runtime(runtime: Runtime, *, wait: bool) -> None:
    """Leave the process group cleanly: after a run that ended well, wait for every rank; then destroy the
    group (a process that exits with it alive is aborted by the collective library's threads). After an
    error no rank waits: its peers may be stuck in another collective."""
    if runtime.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def joined(requested: str) -> Iterator[Runtime]:
    """:func:`setup_runtime` for the block, then :func:`shutdown_runtime`: waiting for every rank when the
    block ended well, not after an error (a peer may be stuck in another collective)."""
    runtime = setup_runtime(requested)
    ended_well = False
    try:
        yield runtime
        ended_well = True
    finally:
        shutdown_runtime(runtime, wait=ended_well)


def gather_objects(runtime: Runtime, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a list of one without a process group)."""
    if not runtime.distributed:
        return [obj]
    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def on_main_then_all(runtime: Runtime, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only; every rank returns its result, or raises the error it raised.

    For what one process must do for all (check and prepare an output folder) while the others wait: a
    refusal on rank 0 stops every rank with the same exception (``UsageError``, ``OSError``, ... : any
    exception that pickles; others arrive as a ``RuntimeError`` with its message).
    """
    if not runtime.distributed:
        return work()
    outcome: Any = None
    if runtime.is_main:
        try:
            outcome = ("ok", work())
        except Exception as error:
            outcome = ("error", error if _pickles(error) else RuntimeError(str(error)))
    shared = [outcome]  # broadcast_object_list fills it in place on the other ranks
    dist.broadcast_object_list(shared, src=0)
    kind, value = shared[0]
    if kind == "error":
        raise value
    return value


def _pickles(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:
        return False
    return True


def run_on_main(runtime: Runtime, action: Callable[[], T]) -> T | None:
    """``action()`` on rank 0 alone, its result kept there: for what only rank 0 may hold (a lock).

    A refusal stops every rank as in :func:`on_main_then_all`; returns the result on rank 0 and ``None`` on
    the other ranks (nothing is sent to them but the outcome).
    """
    kept: list[T] = []
    on_main_then_all(runtime, lambda: kept.append(action()))
    return kept[0] if kept else None
