"""Damped fixed-point (Picard / Krasnosel'skii-Mann) iteration."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._base import IterationTracker, SolverResult

__all__ = ["Picard"]


def _check_unit_interval(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


class Picard:
    r"""Damped fixed-point iteration.

    .. math:: z_{k+1} = (1 - \tau)\, z_k + \tau\, g(z_k)

    With ``tau = 1`` this is plain Picard iteration, which converges linearly with rate ``L`` when
    ``g`` is an ``L``-contraction. Damping (``tau < 1``) trades speed for a larger region of
    convergence (Krasnosel'skii-Mann). One evaluation of ``g`` per iteration.

    Parameters
    ----------
    tau : float
        Damping factor in ``(0, 1]``.
    """

    def __init__(self, tau: float = 1.0) -> None:
        self.tau = _check_unit_interval("tau", tau)

    def __repr__(self) -> str:
        return f"Picard(tau={self.tau})"

    def __call__(
        self,
        g: Callable[[Tensor], Tensor],
        z0: Tensor,
        *,
        max_iter: int,
        tol: float,
        stop_mode: str = "abs",
    ) -> SolverResult:
        track = IterationTracker(g, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)
        z = track.z0()
        while True:
            fz = track.g(z)
            track.record(z, fz)
            if track.done():
                break
            # Frozen samples (converged or failed) keep their state.
            z = torch.where(track.active[:, None], torch.lerp(z, fz, self.tau), z)
        return track.result()
