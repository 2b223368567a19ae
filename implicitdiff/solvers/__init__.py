"""Solvers for ``z = g(z)``: update rules run by one driver, and the protocol any solver follows.

Our solvers (:class:`Picard`, :class:`Anderson`, :class:`Broyden`) are :class:`UpdateRule` objects: they
say how to start and how to take a step, and :func:`iterate` runs the loop (evaluations, residuals,
convergence, the best iterate, non-finite values, counts) without waiting for the device. A new solver
is one small class; any callable with the :class:`Solver` call works too.
"""

from ._base import DEFAULT_CHECK_EVERY, Solver, SolverResult, residual_norm
from ._driver import UpdateRule, iterate
from .anderson import Anderson
from .broyden import Broyden
from .captured import Captured, CaptureWarning
from .picard import Picard

__all__ = [
    "DEFAULT_CHECK_EVERY",
    "Anderson",
    "Broyden",
    "CaptureWarning",
    "Captured",
    "Picard",
    "Solver",
    "SolverResult",
    "UpdateRule",
    "iterate",
    "residual_norm",
]
