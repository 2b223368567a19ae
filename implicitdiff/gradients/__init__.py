"""Gradient estimators: how the output of an implicit layer passes gradients back."""

from ._base import ExplicitInputs, GradientEstimator, StartsFromImage, Stateful
from .ift import IFT, BackwardSolveError, BackwardSolveWarning
from .jfb import JFB
from .phantom import PhantomGradient
from .sjfb import SJFB

__all__ = [
    "IFT",
    "JFB",
    "SJFB",
    "BackwardSolveError",
    "BackwardSolveWarning",
    "ExplicitInputs",
    "GradientEstimator",
    "PhantomGradient",
    "StartsFromImage",
    "Stateful",
]
