"""Damped Picard iteration with a backtracking line search: a solver in one small file."""

import torch
from torch import Tensor

from implicitdiff.solvers import UpdateRule


class BacktrackingPicard(UpdateRule):
    """``z + t (g(z) - z)`` per sample, with ``t`` halved until the residual falls.

    A trial step is kept only if it lowers the residual by the factor ``1 - c t``
    (sufficient decrease); a rejected sample stays where it was and tries again with
    half the step. After an accepted step ``t`` grows back towards 1.
    """

    def __init__(self, c: float = 1e-4, shrink: float = 0.5) -> None:
        if not 0.0 <= c < 1.0 or not 0.0 < shrink < 1.0:
            raise ValueError(f"need 0 <= c < 1 and 0 < shrink < 1, got {c}, {shrink}")
        self.c, self.shrink = c, shrink

    def init(self, z: Tensor, fz: Tensor) -> Tensor:
        return torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)  # t

    def step(self, t: Tensor, z: Tensor, fz: Tensor, residual: Tensor) -> tuple:
        return torch.lerp(z, fz, t), t  # the trial point

    def accept(self, t: Tensor, residual: Tensor, trial: Tensor) -> tuple:
        ok = trial <= (1.0 - self.c * t[:, 0]) * residual
        grown = torch.clamp(t / self.shrink, max=1.0)
        return ok, torch.where(ok[:, None], grown, t * self.shrink)
