"""Jacobian-free backpropagation."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["JFB"]


class JFB:
    r"""Jacobian-free backpropagation (Fung et al., 2022).

    Returns :math:`f(z^\star, x)` with :math:`z^\star` detached, so the gradient is

    .. math:: \frac{\partial L}{\partial \theta} \approx
              \frac{\partial L}{\partial z} \frac{\partial f(z^\star, x)}{\partial \theta},

    i.e. the exact implicit gradient with :math:`(I - J_f)^{-1}` replaced by :math:`I`. It costs one
    evaluation of ``f`` with grad, and memory independent of the forward iterations.
    """

    def __repr__(self) -> str:
        return "JFB()"

    def forward_budget(self, max_iter: int, *, training: bool) -> int:
        """The forward cap, unchanged."""
        return max_iter

    def attach(self, f_x: Callable[[Tensor], Tensor], z_star: Tensor, *, training: bool) -> Tensor:
        """One differentiable application of ``f`` at the detached solution."""
        return f_x(z_star.detach())
