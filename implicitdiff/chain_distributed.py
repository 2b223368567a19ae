r"""A chain's sweeps spread over the processes of a ``torch.distributed`` group.

A sweep of :func:`implicitdiff.solve_chain` is one batched call of ``step`` on every step in flight. On one
device that call runs the steps side by side; over several, :func:`distributed_step` splits it: each rank
evaluates a contiguous share of the steps of the call (``ceil(rows / world)`` of them) and the images are
gathered once (one ``all_gather``), so every rank holds the whole sweep's images, runs the same update
rule on them and makes the same decisions. The chain's arithmetic is replicated, the model calls are
not: with ``W`` ranks a sweep costs about ``1 / W`` of the model time, plus one gather of the images.

This is ParaDiGMS's use of several GPUs (Shih et al. 2023: the timesteps of a window shared over the
devices); with :func:`implicitdiff.solve_chain` it works for any rule. Spreading *samples* over ranks
instead (each rank its own chain on its own batch) needs nothing from here.

Why a wrapper of ``step`` and not an option of :func:`~implicitdiff.solve_chain`: the solve does not
change at all (its rule, tolerances, window, and its one host read per sweep are the single process's),
so the trajectory does not depend on the number of ranks beyond the rounding of the model calls on other
batch sizes; and the split composes with anything that calls a step on a batch of steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils import _pytree as pytree

from ._validate import check_int

__all__ = ["distributed_step"]


def distributed_step(
    step: Callable[[Tensor, Any], Any], group: Any = None, *, max_batch: int | None = None
) -> Callable[[Tensor, Any], Any]:
    r"""``step`` for :func:`~implicitdiff.solve_chain` with each call split over the ranks of ``group``.

    Every rank of the group must call :func:`~implicitdiff.solve_chain` with the same arguments (the same
    ``z0``, tolerances and rule) and the wrapped step: each call then reaches every rank with the same
    steps ``k``. Rank ``r`` of ``W`` evaluates rows ``[r c, (r + 1) c)`` of the call, :math:`c = \lceil
    \mathrm{rows} / W \rceil` (a rank left with fewer rows repeats its last one, or the call's last, so
    that every rank sends ``c`` rows; the repeats are dropped), and one ``all_gather`` of the images
    packed into one buffer gives every rank the whole call's images, in order. Nothing is read to the
    host.

    The ranks then run the same arithmetic on the same gathered values; for their decisions (how far the
    window slides) to agree, run them with the same code, device type and thread count, as
    ``torch.distributed`` jobs usually are. The trajectory equals one process's up to the rounding of
    the model on batches of another size.

    Parameters
    ----------
    step : callable
        ``step(k, z) -> z_next`` as :func:`~implicitdiff.solve_chain` takes it; its images must be
        tensors (or a pytree of tensors) of one dtype, on the device the group communicates on (the
        rank's GPU for NCCL, the CPU for gloo).
    group : ProcessGroup, optional
        The group whose ranks share the calls; default the whole job (``torch.distributed``'s default
        group), which must be initialised.
    max_batch : int, optional
        Most steps per call of ``step`` on a rank: a share larger than this is evaluated in chunks, in
        order (bounded memory), still gathered once. Pass it here rather than to
        :func:`~implicitdiff.solve_chain`, whose chunks would each be gathered. Default: no limit.

    Returns
    -------
    callable
        The step to pass to :func:`~implicitdiff.solve_chain`.

    Raises
    ------
    RuntimeError
        If ``torch.distributed`` is not initialised.

    Examples
    --------
    Under ``torchrun --nproc_per_node 2`` (gloo on the CPU, NCCL on GPUs), every rank runs::

        torch.distributed.init_process_group("gloo")
        out = solve_chain(distributed_step(step), z0, 100, solver=ChainSecant(), form="cumulative")
    """
    if not callable(step):
        raise TypeError(f"step must be callable as step(k, z), got {type(step).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed_step needs an initialised torch.distributed process group (e.g. "
            "torch.distributed.init_process_group('gloo') under torchrun)"
        )
    chunk = None if max_batch is None else check_int("max_batch", max_batch, low=1)
    world, rank = dist.get_world_size(group), dist.get_rank(group)

    def spread(k: Tensor, z: Any) -> Any:
        rows = k.shape[0]
        share = -(-rows // world)
        start = min(rank * share, rows - 1)
        index = torch.arange(start, start + share, device=k.device).clamp_(max=rows - 1)
        mine = _evaluate(step, k.index_select(0, index), _rows(z, index), chunk)
        leaves, spec = pytree.tree_flatten(mine)
        _check_leaves(leaves, share)
        packed = torch.cat([leaf.reshape(share, -1) for leaf in leaves], dim=1)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=group)
        whole = torch.cat(gathered)[:rows]
        sizes = [leaf[0].numel() for leaf in leaves]
        parts = whole.split(sizes, dim=1)
        return pytree.tree_unflatten(
            [part.reshape(rows, *leaf.shape[1:]) for part, leaf in zip(parts, leaves, strict=True)], spec
        )

    return spread


def _rows(z: Any, index: Tensor) -> Any:
    """The rows ``index`` of every leaf of ``z`` (its steps in flight)."""
    return pytree.tree_map(lambda leaf: leaf.index_select(0, index), z)


def _evaluate(step: Callable[[Tensor, Any], Any], k: Tensor, z: Any, chunk: int | None) -> Any:
    """``step(k, z)``, in chunks of at most ``chunk`` steps (in order) when given."""
    rows = k.shape[0]
    if chunk is None or chunk >= rows:
        return step(k, z)
    outs = [
        step(k[i : i + chunk], _rows(z, torch.arange(i, min(i + chunk, rows), device=k.device)))
        for i in range(0, rows, chunk)
    ]
    return pytree.tree_map(lambda *parts: torch.cat(parts), *outs)


def _check_leaves(leaves: list[Any], rows: int) -> None:
    if not leaves or not all(isinstance(leaf, Tensor) for leaf in leaves):
        raise TypeError("step(k, z) must return a tensor or a pytree of tensors to be gathered")
    dtypes = {leaf.dtype for leaf in leaves}
    if len(dtypes) > 1:
        raise TypeError(
            f"step(k, z) must return leaves of one dtype to be gathered, got {sorted(map(str, dtypes))}"
        )
    for leaf in leaves:
        if leaf.dim() < 1 or leaf.shape[0] != rows:
            raise ValueError(
                f"step(k, z) must return {rows} rows (one per step asked), got shape {tuple(leaf.shape)}"
            )
