"""Solvers for ``z = g(z)``: Picard, Anderson, Broyden, and the protocol any solver follows."""

from ._base import Solver, SolverResult, residual_norm
from .anderson import Anderson
from .broyden import Broyden
from .external import ScipySolver, TorchDEQSolver
from .picard import Picard

__all__ = [
    "Anderson",
    "Broyden",
    "Picard",
    "ScipySolver",
    "Solver",
    "SolverResult",
    "TorchDEQSolver",
    "residual_norm",
]
