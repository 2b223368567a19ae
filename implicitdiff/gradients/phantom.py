"""Phantom gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._validate import check_int, check_real, refuse_functorch
from ._base import ExplicitInputs

__all__ = ["PhantomGradient"]

PHANTOM_MODES = ("unrolled", "neumann")


class PhantomGradient:
    r"""Phantom gradient (Geng et al., 2021, "On Training Implicit Models").

    The exact implicit gradient
    :math:`\partial z^\star/\partial\theta = (I - J)^{-1} \partial f/\partial\theta` is replaced by
    the damped, truncated Neumann series

    .. math::

        A_{k,\tau} \frac{\partial f}{\partial \theta}, \qquad
        A_{k,\tau} = \tau \sum_{i=0}^{k-1} \bigl(\tau J + (1 - \tau) I\bigr)^i ,

    which tends to :math:`(I - J)^{-1}` as :math:`k \to \infty` (for :math:`0 < \tau \le 1` and a
    contractive :math:`f`). ``k=1, tau=1`` is JFB.

    * ``mode="unrolled"``: ``k`` damped steps :math:`z \leftarrow \tau f(z, x) + (1 - \tau) z` from the
      detached :math:`z^\star`, with grad; autograd differentiates the unrolled steps. At an exact fixed
      point this is :math:`A_{k,\tau}` above; memory is ``k`` evaluations of ``f``.
    * ``mode="neumann"``: one evaluation of ``f`` with grad at :math:`z^\star`; the backward forms
      :math:`g A_{k,\tau}` from ``k - 1`` vector-Jacobian products at :math:`z^\star`. Memory is one
      evaluation of ``f`` whatever ``k``. First derivatives only: ``create_graph=True`` raises.

    Parameters
    ----------
    k : int
        Number of steps (terms), ``>= 1``.
    tau : float
        Damping in ``(0, 1]``.
    mode : {"unrolled", "neumann"}
        How the estimate is formed.
    """

    def __init__(self, k: int = 5, tau: float = 0.5, mode: str = "unrolled") -> None:
        self.k = check_int("k", k, low=1)
        self.tau = check_real("tau", tau, low=0.0, low_open=True, high=1.0)
        if not isinstance(mode, str) or mode not in PHANTOM_MODES:
            raise ValueError(f"mode must be one of {PHANTOM_MODES}, got {mode!r}")
        self.mode = mode

    def __repr__(self) -> str:
        return f"PhantomGradient(k={self.k}, tau={self.tau}, mode={self.mode!r})"

    def forward_budget(self, max_iter: int, *, training: bool) -> int:
        """The forward cap, unchanged."""
        return max_iter

    def attach(self, f_x: Callable[[Tensor], Tensor], z_star: Tensor, *, training: bool) -> Tensor:
        """Attach ``z_star`` with the phantom gradient (see the class docstring)."""
        if self.mode == "unrolled":
            z = z_star.detach()
            for _ in range(self.k):
                z = torch.lerp(z, f_x(z), self.tau) if self.tau != 1.0 else f_x(z)
            return z
        refuse_functorch(
            "PhantomGradient(mode='neumann')",
            [z_star, *(f_x.inputs if isinstance(f_x, ExplicitInputs) else ())],
            "its backward forms vector-Jacobian products of its own; use mode='unrolled', whose steps "
            "torch.func differentiates",
        )
        z_leaf = z_star.detach().requires_grad_(True)
        image = f_x(z_leaf)
        out: Tensor = _NeumannFunction.apply(image, z_leaf, self.k, self.tau)
        return out


class _NeumannFunction(torch.autograd.Function):
    """Identity forward; the backward maps ``g`` to ``g A_{k,tau}``, then autograd applies ``df/dtheta``."""

    @staticmethod
    def forward(ctx: Any, image: Tensor, z_leaf: Tensor, k: int, tau: float) -> Tensor:
        ctx.image, ctx.z_leaf, ctx.k, ctx.tau = image, z_leaf, k, tau
        return image.detach().clone()

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> Tensor:
        raise RuntimeError(
            "PhantomGradient(mode='neumann') has no forward-mode derivative (torch.autograd.forward_ad, "
            "torch.func.jvp): use mode='unrolled', whose steps forward mode differentiates"
        )

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:
        if torch.is_grad_enabled():
            # The series is formed at z* with the Jacobian held fixed: its derivative with respect to
            # the parameters is not the unrolled estimate's (it differs by 10-30% on small problems).
            raise RuntimeError(
                "PhantomGradient(mode='neumann') has no higher derivatives (create_graph=True): use "
                "mode='unrolled', whose steps autograd differentiates to any order"
            )
        term, total = g, g
        for _ in range(ctx.k - 1):
            (vjp,) = torch.autograd.grad(ctx.image, ctx.z_leaf, term, retain_graph=True)
            term = ctx.tau * vjp + (1.0 - ctx.tau) * term
            total = total + term
        return ctx.tau * total, None, None, None
