"""The gradient-estimator protocol."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["GradientEstimator"]


@runtime_checkable
class GradientEstimator(Protocol):
    """How the output of an implicit layer is attached to autograd.

    An estimator decides two things:

    * ``forward_budget(max_iter, training=...)``: the iteration cap of the no-grad forward solve
      (most estimators return ``max_iter``; stochastic JFB draws it in training);
    * ``attach(f_x, z_star, training=...)``: given ``f_x(z) = f(z, x)`` (with grad) and the detached
      solution ``z_star``, return a tensor equal to ``z_star`` up to applications of ``f_x`` whose
      graph carries the estimator's gradient to ``x`` and to ``f``'s parameters.

    ``attach`` is called only when autograd needs a gradient; otherwise the layer returns the plain
    solution and no estimator adds work.
    """

    def forward_budget(self, max_iter: int, *, training: bool) -> int: ...

    def attach(self, f_x: Callable[[Tensor], Tensor], z_star: Tensor, *, training: bool) -> Tensor: ...
