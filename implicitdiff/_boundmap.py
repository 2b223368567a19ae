"""The bound map ``z -> f(z, x, **f_kwargs)`` that solvers and estimators evaluate, checked at every call."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from ._onefunction import Held, caching_active, holding
from ._tree import PyTree, TreeSpec, tensor_leaves
from ._validate import warn_caller

__all__ = ["BoundMap"]


def autocast_on(device_type: str) -> bool:
    """Whether ``torch.autocast`` is active for ``device_type``."""
    return bool(torch.is_autocast_enabled(device_type))


class _Calls:
    """The evaluations of ``f`` counted by a map and every map made from it by ``with_inputs``."""

    def __init__(self) -> None:
        self.count = 0


class BoundMap:
    """``z -> f(z, x, **f_kwargs)`` with the inputs bound, checking each output against the state ``z0``.

    The state keeps ``z0``'s dtype. Under ``torch.autocast`` an ``f`` ending in a matrix product returns
    the autocast dtype (bfloat16, float16); its output is cast back to the state's dtype (differentiably),
    so the solver and every estimator work on states of one dtype. Outside autocast another dtype is an
    error. Every call adds one to :attr:`calls`.

    A structured state (``spec`` given) is packed: the map takes and returns flat ``(B, n)`` rows,
    unpacks them into the structure of the user's ``z0`` for ``f`` (views, no copy), checks what ``f``
    returns leaf by leaf (naming the path of a leaf that differs) and packs it (one copy).

    An estimator that differentiates with respect to the inputs explicitly (:class:`~implicitdiff.IFT`)
    reads :attr:`inputs` (the tensor leaves of ``x``, then those of ``f_kwargs``'s values, in that
    order) and calls :meth:`with_inputs` for the same map on other tensors.

    Parameters
    ----------
    f : callable
        ``f(z, x, **f_kwargs)``.
    x : Tensor or pytree of Tensor
        The input, passed to ``f`` as it is.
    z0 : Tensor
        The working state the outputs are checked against (packed rows for a structured state).
    f_kwargs : mapping, optional
        Keyword arguments for ``f``.
    spec : TreeSpec, optional
        How a structured state is packed; ``None`` for a single tensor.
    held : dict, optional
        The parametrized weights of the layer call the map belongs to (see :class:`~implicitdiff.DEQLayer`).
    """

    def __init__(
        self,
        f: Callable[..., Any],
        x: PyTree,
        z0: Tensor,
        f_kwargs: Mapping[str, Any] | None = None,
        *legacy: Any,
        spec: TreeSpec | None = None,
        held: Held | None = None,
    ) -> None:
        if legacy:
            warn_caller(
                "BoundMap's fifth argument (a one-element list counting the calls) is deprecated and "
                "ignored: the map counts its own calls (BoundMap.calls)"
            )
        self.f, self.x, self.z0 = f, x, z0
        # Kept as a tuple of pairs: dynamo before torch 2.5 fails to guard a dict that it also sees in the
        # caller's frame.
        self._items = tuple((f_kwargs or {}).items())
        self._calls = _Calls()
        self._name = getattr(f, "__name__", type(f).__name__)
        self.spec, self.held = spec, held

    @property
    def calls(self) -> int:
        """Evaluations of ``f`` by this map and every map made from it by :meth:`with_inputs`."""
        return self._calls.count

    def reset_calls(self) -> None:
        """Start :attr:`calls` from zero again."""
        self._calls.count = 0

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        """The tensors ``f`` receives explicitly: the tensor leaves of ``x``, then of ``f_kwargs``."""
        return tuple(tensor_leaves((self.x, tuple(value for _, value in self._items))))

    def with_inputs(self, *tensors: Tensor) -> BoundMap:
        """The same map with :attr:`inputs` replaced by ``tensors`` (same order); it shares :attr:`calls`."""
        leaves, treedef = pytree.tree_flatten((self.x, tuple(value for _, value in self._items)))
        expected = sum(isinstance(leaf, Tensor) for leaf in leaves)
        if len(tensors) != expected:
            raise ValueError(f"with_inputs takes {expected} tensors (the map's inputs), got {len(tensors)}")
        replacements = iter(tensors)
        leaves = [next(replacements) if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        x, values = pytree.tree_unflatten(leaves, treedef)
        kwargs = dict(zip((key for key, _ in self._items), values, strict=True))
        other = BoundMap(self.f, x, self.z0, kwargs, spec=self.spec, held=self.held)
        other._calls = self._calls
        return other

    def __call__(self, z: Tensor) -> Tensor:
        if self.held and not _in_cache(self.held):
            # Called after the layer's call ended (IFT's backward with create_graph): the call's weights.
            with holding(self.held):
                return self._evaluate(z)
        return self._evaluate(z)

    def _evaluate(self, z: Tensor) -> Tensor:
        state = z if self.spec is None else self.spec.unpack(z)
        out = self.f(state, self.x, **dict(self._items)) if self._items else self.f(state, self.x)
        self._calls.count += 1
        if self.spec is not None:
            autocast = autocast_on(z.device.type)
            return self.spec.pack(self.spec.leaves_of(out, z.shape[0], f"f ({self._name})", autocast))
        return self._checked(out)

    def _checked(self, out: object) -> Tensor:
        z0 = self.z0
        if not isinstance(out, Tensor):
            raise TypeError(
                f"f ({self._name}) must return a Tensor, got {type(out).__name__} (for a structured state, "
                "pass z0 with that structure)"
            )
        if (
            out.dtype != z0.dtype
            and out.dtype.is_floating_point
            and out.device == z0.device
            and autocast_on(out.device.type)
        ):
            out = out.to(z0.dtype)
        if out.shape != z0.shape:
            raise ValueError(
                f"f ({self._name}) must return a tensor shaped like z {tuple(z0.shape)}, got shape "
                f"{tuple(out.shape)}. If the state is not shaped like x, pass z0."
            )
        if out.dtype != z0.dtype or out.device != z0.device:
            raise ValueError(
                f"f ({self._name}) must return a tensor of the state's dtype and device ({z0.dtype} on "
                f"{z0.device}), got {out.dtype} on {out.device}. The state takes the dtype of z0 (of "
                "x when z0 is not given): pass a z0 of the dtype f computes in, or cast f's output; "
                "under torch.autocast the output is cast back for you."
            )
        return out


def _in_cache(held: Held) -> bool:
    key, tensor = next(iter(held.items()))
    return caching_active() and parametrize._cache.get(key) is tensor
