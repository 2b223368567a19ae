"""implicitdiff: implicit (deep equilibrium) layers for PyTorch.

Any solver meets any gradient estimator around any ``f(z, x)``.
"""

from . import diagnostics, nn, regularizers
from .chain import ChainResult, ChainRuleWarning, solve_chain
from .chain_distributed import distributed_step
from .chain_secant import ChainSecant
from .functional import DEQOutput, fixed_point
from .gradients import (
    IFT,
    JFB,
    SJFB,
    BackwardSolveError,
    BackwardSolveWarning,
    GradientEstimator,
    PhantomGradient,
)
from .layer import DEQLayer
from .solvers import Anderson, Broyden, Picard, Solver, SolverResult

__version__ = "0.3.0"

__all__ = [
    "IFT",
    "JFB",
    "SJFB",
    "Anderson",
    "BackwardSolveError",
    "BackwardSolveWarning",
    "Broyden",
    "ChainResult",
    "ChainRuleWarning",
    "ChainSecant",
    "DEQLayer",
    "DEQOutput",
    "GradientEstimator",
    "PhantomGradient",
    "Picard",
    "Solver",
    "SolverResult",
    "diagnostics",
    "distributed_step",
    "fixed_point",
    "nn",
    "regularizers",
    "solve_chain",
]
