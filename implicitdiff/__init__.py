"""implicitdiff: implicit (deep equilibrium) layers for PyTorch.

Any solver meets any gradient estimator around any ``f(z, x)``.
"""

from .functional import DEQOutput, fixed_point
from .gradients import JFB, GradientEstimator
from .layer import DEQLayer
from .solvers import Anderson, Broyden, Picard, Solver, SolverResult

__version__ = "0.1.0"

__all__ = [
    "JFB",
    "Anderson",
    "Broyden",
    "DEQLayer",
    "DEQOutput",
    "GradientEstimator",
    "Picard",
    "Solver",
    "SolverResult",
    "fixed_point",
]
