"""Solvers and gradient estimators by name: the one table every command line of the example uses.

``SOLVERS`` maps a name to a class of :mod:`implicitdiff` built with its default options; ``ESTIMATORS``
maps a name to a factory that takes the run's settings (any object with the attributes it reads, such as
``train.TrainConfig``). A name added here is a new choice of ``--solver`` or ``--grad`` everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from implicitdiff import IFT, JFB, SJFB, Anderson, Broyden, GradientEstimator, PhantomGradient, Picard, Solver

__all__ = ["ESTIMATORS", "ESTIMATOR_OPTIONS", "SOLVERS", "make_estimator", "make_solver"]

#: Fixed-point solvers by name, each built with its default options.
SOLVERS: dict[str, Callable[[], Solver]] = {"picard": Picard, "anderson": Anderson, "broyden": Broyden}


def _sjfb(settings: Any) -> GradientEstimator:
    return SJFB(
        no_grad_iters=tuple(settings.sjfb_no_grad), grad_iters=tuple(settings.sjfb_grad), seed=settings.seed
    )


def _ift(settings: Any) -> GradientEstimator:
    # The backward solve gets twice the forward cap (at least 20): the adjoint converges more slowly.
    return IFT(max_iter=max(2 * settings.max_iter, 20), tol=settings.tol, stop_mode="rel")


def _phantom(settings: Any) -> GradientEstimator:
    return PhantomGradient(k=settings.phantom_k, tau=settings.phantom_tau)


#: Gradient estimators by name: a factory of the run's settings.
ESTIMATORS: dict[str, Callable[[Any], GradientEstimator]] = {
    "sjfb": _sjfb,
    "jfb": lambda settings: JFB(),
    "ift": _ift,
    "phantom": _phantom,
}

#: The settings only one estimator reads (the others ignore them): a run refuses them with another.
ESTIMATOR_OPTIONS: dict[str, tuple[str, ...]] = {
    "sjfb": ("sjfb_no_grad", "sjfb_grad"),
    "phantom": ("phantom_k", "phantom_tau"),
}


def make_solver(name: str) -> Solver:
    """The solver ``name`` of :data:`SOLVERS` with default options."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose from {sorted(SOLVERS)}")
    return SOLVERS[name]()


def make_estimator(name: str, settings: Any) -> GradientEstimator:
    """The gradient estimator ``name`` of :data:`ESTIMATORS`, configured from ``settings``."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown gradient estimator {name!r}; choose from {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](settings)
