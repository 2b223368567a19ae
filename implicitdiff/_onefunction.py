r"""``f`` stays one function for the length of a layer call.

A solver looks for :math:`z^\star = f(z^\star, x)`; if ``f`` changes between its evaluations there is
no such point. Three things inside an ``nn.Module`` change it, in training mode:

* **parametrizations** (``torch.nn.utils.parametrize``): ``spectral_norm`` runs a step of its power
  method at every access of the weight, so every evaluation sees another weight. The layer computes
  every parametrized tensor once per call, under ``parametrize.cached()``, with grad when a gradient is
  needed, and the solve, the estimator and IFT's backward all use that one tensor;
* **dropout** (``nn.Dropout`` and its relatives) draws a new mask at every evaluation: the layer warns
  once per ``f`` and points to :class:`~implicitdiff.nn.VariationalDropout`, whose mask the layer resets
  once per call;
* **batch normalisation** normalises with the statistics of each evaluation's input and moves its running
  statistics at every evaluation (documented on :class:`~implicitdiff.DEQLayer`; not changed here).

What the layer needs to know about ``f`` is found by one walk of ``f.modules()``, the first time a
module is called, and kept (weakly) per module: a call costs a dictionary look-up, not a walk. A module
added to ``f`` after its first call is not seen; call :func:`forget` on ``f`` after such a change.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["FParts", "Held", "PerCall", "forget", "holding", "parts_of"]

#: The dropout modules that draw a new mask at every call.
DROPOUTS = (nn.modules.dropout._DropoutNd,)


class PerCall(nn.Module):
    """A module inside ``f`` with state that lasts one call of the layer (a dropout mask).

    The layer calls :meth:`reset` at the start of each call, so that every evaluation of ``f`` in that
    call (the solve, the estimator, IFT's backward) sees the same state.
    """

    def reset(self) -> None:
        """Forget the state of the last call."""
        raise NotImplementedError


#: The parametrized tensors of one call, as ``parametrize.cached()`` keys them: ``(id(module), name)``.
Held = dict[tuple[int, str], Tensor]


@dataclass
class FParts:
    """What the layer must handle inside one ``f``: its parametrized tensors and its dropouts."""

    parametrized: list[tuple[Any, str]] = field(default_factory=list)  # (module, tensor name)
    variational: list[PerCall] = field(default_factory=list)
    dropouts: list[tuple[str, nn.Module]] = field(default_factory=list)
    warned: bool = False

    @property
    def active(self) -> bool:
        """Whether a call must do anything at all (else the layer runs as if the module were plain)."""
        return bool(self.parametrized or self.variational or (self.dropouts and not self.warned))

    def begin_call(self, with_grad: bool) -> Held:
        """Start a call: reset variational masks, warn about dropout, compute parametrized tensors.

        Must run inside ``parametrize.cached()``; the tensors computed here (with grad if ``with_grad``)
        are the ones every evaluation of the call uses.
        """
        for dropout in self.variational:
            dropout.reset()
        if self.dropouts and not self.warned:
            self._warn_dropout()
        held: Held = {}
        with torch.set_grad_enabled(with_grad):
            for module, name in self.parametrized:
                key = (id(module), name)
                cached = parametrize._cache.get(key)
                # An enclosing call (a DEQ inside another's f) computed it already: one weight for both.
                # Otherwise, what the parametrized attribute computes on its first access when cached.
                held[key] = module.parametrizations[name]() if cached is None else cached
        parametrize._cache.update(held)
        return held

    def _warn_dropout(self) -> None:
        active = [f"{path} ({type(m).__name__})" for path, m in self.dropouts if m.training and _rate(m) > 0]
        if not active:
            return
        self.warned = True
        warnings.warn(
            f"f contains dropout in training mode: {', '.join(active)}. It draws a new mask at every "
            "evaluation of f, so f changes at every iteration of the solver and has no fixed point. Use "
            "implicitdiff.nn.VariationalDropout (or VariationalDropout2d), whose mask the layer draws "
            "once per call. This warning is shown once per f.",
            UserWarning,
            stacklevel=4,
        )


def _rate(module: nn.Module) -> float:
    assert isinstance(module, DROPOUTS)
    return float(module.p)


_PARTS: weakref.WeakKeyDictionary[nn.Module, FParts] = weakref.WeakKeyDictionary()


def _walk(f: nn.Module) -> FParts:
    parts = FParts()
    for path, module in f.named_modules(prefix="f"):
        if parametrize.is_parametrized(module):
            parts.parametrized.extend((module, name) for name in module.parametrizations)
        if isinstance(module, PerCall):
            parts.variational.append(module)
        elif isinstance(module, DROPOUTS):
            parts.dropouts.append((path, module))
    return parts


def parts_of(f: nn.Module) -> FParts:
    """The parts of ``f`` found by one walk of its modules, at its first call (kept per module)."""
    parts = _PARTS.get(f)
    if parts is None:
        parts = _PARTS[f] = _walk(f)
    return parts


def forget(f: nn.Module) -> None:
    """Walk ``f`` again at its next call (after modules were added to it or removed)."""
    _PARTS.pop(f, None)


@contextmanager
def holding(held: Held) -> Iterator[None]:
    """Make the parametrized tensors of a call the ones ``f`` sees (inside IFT's backward).

    ``parametrize.cached()`` looks up ``(id(module), name)`` in its cache before computing; filling the
    cache with the call's tensors makes a later evaluation (after the call's own cache was cleared)
    see the same weights as the forward solve.
    """
    with parametrize.cached():
        parametrize._cache.update(held)
        yield


def caching_active() -> bool:
    """Whether a ``parametrize.cached()`` block is open (then the call's tensors are in the cache)."""
    return bool(parametrize._cache_enabled)
