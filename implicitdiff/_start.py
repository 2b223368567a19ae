"""The starting state of a solve: the checks of ``x`` and ``z0``, and the packing of a structured ``z0``."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._tree import PyTree, TreeSpec, tree_paths

__all__ = ["initial_state"]


def initial_state(x: PyTree, z0: PyTree | None) -> tuple[Tensor, TreeSpec | None]:
    """The working state (detached) and, for a structured ``z0``, the spec that packs it.

    A single-tensor state is not packed; ``z0`` defaults to zeros shaped like ``x`` when ``x`` is a
    tensor. Every error names ``x`` or ``z0`` and, inside a pytree, the leaf's path.
    """
    if isinstance(x, Tensor) and (z0 is None or isinstance(z0, Tensor)):
        if x.dim() < 1 or x.shape[0] < 1:
            raise ValueError(f"x must have shape (B, ...) with B >= 1, got {tuple(x.shape)}")
        return _initial_tensor(x, z0, x.shape[0], x.device), None
    batch, device = _batch_of(x)
    if z0 is None:
        raise ValueError(
            f"z0 is required when x is not a single tensor (x is a {type(x).__name__}): pass z0, the "
            "starting state, with the structure f returns"
        )
    if isinstance(z0, Tensor):
        return _initial_tensor(None, z0, batch, device), None
    spec = TreeSpec.of(z0, "z0", rows=batch)
    if spec.device != device:
        raise ValueError(f"z0 is on {spec.device} but x is on {device}")
    # Called z in what f returns (f(z, x)); z0 in the checks of the starting point above.
    return spec.pack(pytree.tree_leaves(z0)).detach(), spec.named("z")


def _batch_of(x: PyTree) -> tuple[int, torch.device]:
    paths, leaves, _ = tree_paths(x, "x")
    tensors = [(path, leaf) for path, leaf in zip(paths, leaves, strict=True) if isinstance(leaf, Tensor)]
    if not tensors:
        raise TypeError(f"x must be a Tensor or a pytree holding tensors, got {type(x).__name__}")
    first_path, first = tensors[0]
    if first.dim() < 1 or first.shape[0] < 1:
        raise ValueError(f"x must have shape (B, ...) with B >= 1, got {tuple(first.shape)} at {first_path}")
    for path, leaf in tensors[1:]:
        if leaf.dim() < 1 or leaf.shape[0] != first.shape[0]:
            raise ValueError(
                f"every tensor in x must have shape (B, ...) with one batch size B = {first.shape[0]} "
                f"({first_path}), got {tuple(leaf.shape)} at {path}"
            )
    return first.shape[0], first.device


def _initial_tensor(x: Tensor | None, z0: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """The checks of a single-tensor state (a tensor ``x`` gives the zeros default when ``z0`` is None)."""
    if z0 is None:
        assert x is not None
        if not x.dtype.is_floating_point:
            raise TypeError(f"x has dtype {x.dtype}; pass a floating-point z0 to start from")
        return torch.zeros_like(x, memory_format=torch.contiguous_format)
    if z0.dim() < 1 or z0.shape[0] != batch:
        raise ValueError(
            f"z0 must have the batch size of x ({batch}) in its first dimension, got shape {tuple(z0.shape)}"
        )
    if not z0.dtype.is_floating_point:
        raise TypeError(f"z0 must have a floating-point dtype, got {z0.dtype}")
    if z0.device != device:
        raise ValueError(f"z0 is on {z0.device} but x is on {device}")
    return z0.detach()
