"""The gradient-estimator protocol."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["ExplicitInputs", "GradientEstimator", "StartsFromImage", "Stateful"]


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


@runtime_checkable
class StartsFromImage(Protocol):
    """The optional part of an estimator: ``starts_from_image = True`` to be given ``g(stats.z)``.

    An estimator that continues the solver's iteration with grad (:class:`~implicitdiff.SJFB`) wants
    the image ``g(z)`` of the solver's iterate, which the solver computed already: then ``n`` no-grad
    evaluations give ``n`` steps and none is evaluated twice. Estimators without the attribute get
    ``stats.z``.
    """

    starts_from_image: bool


@runtime_checkable
class ExplicitInputs(Protocol):
    """A map ``f_x(z) = f(z, x, ...)`` that says which tensors it receives explicitly.

    The layer's maps (:class:`~implicitdiff.functional.BoundMap`) are such maps: :attr:`inputs` is
    ``x`` and the tensors of ``f_kwargs``, and :meth:`with_inputs` the same map on other tensors. An
    estimator that differentiates with respect to the inputs explicitly (:class:`~implicitdiff.IFT`)
    uses them; any other callable is differentiated through the leaves its graph reaches.
    """

    @property
    def inputs(self) -> tuple[Tensor, ...]: ...

    def with_inputs(self, *tensors: Tensor) -> Callable[[Tensor], Tensor]: ...

    def __call__(self, z: Tensor) -> Tensor: ...


@runtime_checkable
class Stateful(Protocol):
    """The optional part of an estimator with state of its own (S-JFB's generator).

    :class:`~implicitdiff.DEQLayer` saves it in its own ``state_dict`` (as extra state) and restores it
    with ``load_state_dict``, so any training loop that checkpoints the model resumes the estimator
    exactly.
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
