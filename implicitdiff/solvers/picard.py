"""Damped fixed-point (Picard / Krasnosel'skii-Mann) iteration."""

from __future__ import annotations

import torch
from torch import Tensor

from .._validate import check_real
from ._driver import UpdateRule

__all__ = ["Picard"]


class Picard(UpdateRule):
    r"""Damped fixed-point iteration.

    .. math:: z_{k+1} = (1 - \tau)\, z_k + \tau\, g(z_k)

    With ``tau = 1`` this is plain Picard iteration, which converges linearly with rate ``L`` when
    ``g`` is an ``L``-contraction. Damping (``tau < 1``) trades speed for a larger region of
    convergence (Krasnosel'skii-Mann). One evaluation of ``g`` per iteration; no state.

    Parameters
    ----------
    tau : float
        Damping factor in ``(0, 1]``.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import Picard
    >>> result = Picard()(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3), max_iter=60, tol=1e-6)
    >>> result.all_converged, round(float(result.z[0, 0]), 4)
    (True, 2.0)
    """

    def __init__(self, tau: float = 1.0) -> None:
        self.tau = check_real("tau", tau, low=0.0, low_open=True, high=1.0)

    def __repr__(self) -> str:
        return f"Picard(tau={self.tau})"

    def step(self, state: None, z: Tensor, fz: Tensor, residual: Tensor | None) -> tuple[Tensor, None]:
        """``lerp(z, g(z), tau)``; with ``tau = 1`` the image itself (no pass over the state)."""
        return (fz if self.tau == 1.0 else torch.lerp(z, fz, self.tau)), None
