r"""Structured states: a pytree of tensors packed into one flat ``(B, n)`` working tensor and back.

Solvers and the driver see flat rows; ``f`` sees the user's structure. A :class:`TreeSpec` records the
tree structure (``torch.utils._pytree``: tuples, lists, dicts, named tuples, nested), and per leaf its
path, its shape after the leading dimension and its offset in the packed row, so that

.. math:: \operatorname{pack}(z) = [\,\operatorname{vec}(z_1) \;\; \operatorname{vec}(z_2) \;\; \cdots\,]
          \in \mathbb R^{B \times n}, \qquad n = \textstyle\sum_i \prod \text{shape}_i ,

and :meth:`TreeSpec.unpack` returns views of the packed rows. Packing is one copy (``torch.cat``);
unpacking copies nothing.

**One working dtype.** Every leaf of a state must have the same floating dtype and device: the solver
iterates on one tensor, and a residual summed over leaves of several precisions would mix their rounding
(a float32 leaf never gets below its own epsilon while a float64 one does). Cast the leaves yourself when
they differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["PyTree", "TreeSpec", "tensor_leaves", "tree_paths"]

#: A tensor, or a tuple, list, dict or named tuple (nested) of them.
PyTree = Any


def tree_paths(tree: PyTree, root: str) -> tuple[list[str], list[Any], pytree.TreeSpec]:
    """The paths of ``tree``'s leaves (``root`` then the keys, e.g. ``"z[1]['h']"``), the leaves, the spec."""
    with_path, treedef = pytree.tree_flatten_with_path(tree)
    return [root + pytree.keystr(path) for path, _ in with_path], [leaf for _, leaf in with_path], treedef


def tensor_leaves(tree: PyTree) -> list[Tensor]:
    """The tensors among the leaves of ``tree``, in flattening order."""
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, Tensor)]


@dataclass(frozen=True)
class TreeSpec:
    """How a pytree of ``(R, ...)`` tensors maps to flat ``(R, n)`` rows (``R``: the leading dimension).

    Attributes
    ----------
    treedef : torch.utils._pytree.TreeSpec
        The structure.
    root : str
        The name of the whole tree in messages (``"z"``, ``"z0"``).
    keys : tuple of str
        Each leaf's keys from the root, e.g. ``"[1]['h']"``; :attr:`paths` adds the root's name.
    shapes : tuple of torch.Size
        Each leaf's shape after the leading dimension.
    offsets : tuple of int
        Where each leaf starts in a packed row; ``offsets[i + 1] - offsets[i]`` is its size.
    dtype, device
        The one dtype and device of every leaf.
    """

    treedef: pytree.TreeSpec
    root: str
    keys: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def paths(self) -> tuple[str, ...]:
        """Each leaf's path, e.g. ``"z[1]['h']"``, for error messages."""
        return tuple(self.root + key for key in self.keys)

    def named(self, root: str) -> TreeSpec:
        """The same spec, its tree called ``root`` in messages."""
        return dataclasses.replace(self, root=root)

    @property
    def width(self) -> int:
        """``n``, the length of a packed row."""
        return self.offsets[-1]

    @classmethod
    def of(cls, tree: PyTree, root: str, rows: int | None = None) -> TreeSpec:
        """The spec of ``tree``, whose leaves must be floating tensors of one dtype and device.

        ``rows`` is the leading dimension every leaf must have; ``None`` takes each leaf whole (a leaf
        of any shape, as one row). Errors name the argument ``root`` and the leaf's path.
        """
        paths, leaves, treedef = tree_paths(tree, root)
        if not leaves:
            raise ValueError(f"{root} must hold at least one tensor, got {tree!r}")
        shapes, offsets = [], [0]
        first = leaves[0]
        for path, leaf in zip(paths, leaves, strict=True):
            _check_leaf(path, leaf, first, paths[0], rows)
            shape = leaf.shape if rows is None else leaf.shape[1:]
            shapes.append(shape)
            offsets.append(offsets[-1] + shape.numel())
        return cls(
            treedef,
            root,
            tuple(path[len(root) :] for path in paths),
            tuple(shapes),
            tuple(offsets),
            first.dtype,
            first.device,
        )

    def pack(self, leaves: Sequence[Tensor]) -> Tensor:
        """Leaves ``(R, *shape_i)`` (checked by the caller) as one ``(R, n)`` tensor: one copy."""
        rows = leaves[0].shape[0]
        return torch.cat([leaf.reshape(rows, -1) for leaf in leaves], dim=1)

    def pack_whole(self, tree: PyTree) -> Tensor:
        """A tree of this spec taken whole (no leading dimension) as one ``(n,)`` vector."""
        return torch.cat([leaf.reshape(-1) for leaf in pytree.tree_leaves(tree)])

    def unpack(self, flat: Tensor) -> PyTree:
        """Flat ``(R, n)`` rows as the tree, each leaf a view ``(R, *shape_i)`` of ``flat``."""
        rows = flat.shape[0]
        leaves = [
            flat[:, start:end].reshape(rows, *shape)
            for start, end, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes, strict=True)
        ]
        return pytree.tree_unflatten(leaves, self.treedef)

    def leaves_of(self, tree: PyTree, rows: int, who: str, autocast: bool = False) -> list[Tensor]:
        """The leaves of ``tree``, which ``who`` returned, checked against this spec with ``rows`` rows.

        A ``ValueError`` names the first leaf whose path, shape, dtype or device differs. Under autocast
        (``autocast=True``) a floating leaf of another dtype is cast back to the state's dtype.
        """
        leaves, treedef = pytree.tree_flatten(tree)
        if treedef != self.treedef:
            raise ValueError(_structure_message(self, tree, who))
        out = []
        for path, shape, leaf in zip(self.paths, self.shapes, leaves, strict=True):
            if not isinstance(leaf, Tensor):
                raise ValueError(
                    f"{who} returned {type(leaf).__name__} at {path}, where the state has a tensor"
                )
            if autocast and leaf.dtype != self.dtype and leaf.dtype.is_floating_point:
                leaf = leaf.to(self.dtype)
            if leaf.shape[1:] != shape or leaf.shape[0] != rows:
                raise ValueError(
                    f"{who} returned shape {tuple(leaf.shape)} at {path}, where the state has shape "
                    f"{(rows, *shape)}"
                )
            if leaf.dtype != self.dtype or leaf.device != self.device:
                raise ValueError(
                    f"{who} returned {leaf.dtype} on {leaf.device} at {path}; every leaf of the state has "
                    f"the state's dtype and device ({self.dtype} on {self.device})"
                )
            out.append(leaf)
        return out


def _check_leaf(path: str, leaf: object, first: Tensor | object, first_path: str, rows: int | None) -> None:
    if not isinstance(leaf, Tensor):
        raise TypeError(f"every leaf of the state must be a Tensor, got {type(leaf).__name__} at {path}")
    if not leaf.dtype.is_floating_point:
        raise TypeError(f"every leaf of the state must be floating point, got {leaf.dtype} at {path}")
    assert isinstance(first, Tensor)
    if leaf.dtype != first.dtype:
        raise TypeError(
            f"every leaf of the state must have one dtype: {first_path} is {first.dtype} but {path} is "
            f"{leaf.dtype}. The solver iterates on one working tensor; cast the leaves to one dtype."
        )
    if leaf.device != first.device:
        raise ValueError(
            f"every leaf of the state must be on one device: {first_path} is on {first.device} but "
            f"{path} is on {leaf.device}"
        )
    if rows is not None and (leaf.dim() < 1 or leaf.shape[0] != rows):
        raise ValueError(
            f"every leaf of the state must have shape (B, ...) with the batch size B = {rows}, got shape "
            f"{tuple(leaf.shape)} at {path}"
        )


def _structure_message(spec: TreeSpec, tree: PyTree, who: str) -> str:
    """Which leaf path is missing from (or extra in) ``tree``, for a structure mismatch."""
    got, _, treedef = tree_paths(tree, spec.root)
    missing = [path for path in spec.paths if path not in got]
    extra = [path for path in got if path not in spec.paths]
    if missing:
        where = f"it has no leaf {missing[0]}"
    elif extra:
        where = f"it has a leaf {extra[0]} that the state does not have"
    else:
        where = f"its containers differ (expected {spec.treedef}, got {treedef})"
    return (
        f"{who} must return a state with the structure of z0, but {where} "
        f"(expected leaves {list(spec.paths)}, got {got})"
    )
