"""Gradient estimators: how the output of an implicit layer passes gradients back."""

from ._base import GradientEstimator
from .jfb import JFB

__all__ = ["JFB", "GradientEstimator"]
