"""Anderson acceleration (type II, in the difference form of Walker & Ni), batched."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._base import IterationTracker, SolverResult
from .picard import _check_unit_interval

__all__ = ["Anderson"]


def _check_memory(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_restart_factor(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"restart_factor must be a float > 1, got {type(value).__name__} {value!r}")
    if not 1.0 < value:
        raise ValueError(f"restart_factor must be > 1 (use float('inf') to never restart), got {value}")
    return float(value)


def _gram_dtype(device: torch.device) -> torch.dtype:
    # The m x m normal equations are tiny: solve them in float64 wherever it exists.
    return torch.float32 if device.type == "mps" else torch.float64


class Anderson:
    r"""Anderson acceleration for ``z = g(z)``, batched over the first dimension.

    With residual :math:`f_k = g(z_k) - z_k` and the last ``m`` differences
    :math:`\Delta Z = [z_{i+1} - z_i]`, :math:`\Delta F = [f_{i+1} - f_i]`, each step solves the
    regularised least-squares problem

    .. math::

        \gamma_k = \arg\min_\gamma \|f_k - \Delta F \gamma\|^2
                   + \lambda\, \max_i \|\Delta F_i\|^2 \, \|\gamma\|^2

    and moves to :math:`z_{k+1} = z_k + \beta f_k - (\Delta Z + \beta \Delta F)\gamma_k`
    (Walker & Ni, 2011). This is algebraically the classical constrained form
    :math:`\min_\alpha \|\sum_i \alpha_i f_i\|,\ \sum_i \alpha_i = 1`.

    The regulariser is *relative* to the scale of the history. An absolute :math:`\lambda` (as in
    torchdeq) dominates :math:`\Delta F^\top \Delta F` once residuals are small and turns the method
    back into slow damped iteration, which is why such solvers stall at tight tolerances.
    The Gram matrix is updated one row per step (``O(m n)``, not ``O(m^2 n)``) and the small
    system is solved in float64.

    Parameters
    ----------
    m : int
        Number of past differences kept (memory is ``2 m`` states per sample, whatever ``max_iter``).
    lam : float
        Relative Tikhonov regularisation, ``>= 0``.
    beta : float
        Mixing (damping) parameter in ``(0, 1]``; ``1`` is undamped.
    restart_factor : float
        Safeguard: a sample whose residual exceeds this multiple of the best it has seen drops its
        history and restarts from its best iterate (> 1; ``float('inf')`` disables it).
    """

    def __init__(self, m: int = 6, lam: float = 1e-8, beta: float = 1.0, restart_factor: float = 1e3) -> None:
        self.m = _check_memory("m", m)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise TypeError(f"lam must be a float >= 0, got {type(lam).__name__} {lam!r}")
        if not 0.0 <= lam < float("inf"):
            raise ValueError(f"lam must be a finite float >= 0, got {lam}")
        self.lam = float(lam)
        self.beta = _check_unit_interval("beta", beta)
        self.restart_factor = _check_restart_factor(restart_factor)

    def __repr__(self) -> str:
        return f"Anderson(m={self.m}, lam={self.lam}, beta={self.beta}, restart_factor={self.restart_factor})"

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
        batch, n = z.shape
        m, beta = self.m, self.beta
        gdtype = _gram_dtype(z.device)
        # History of residual differences dF and of the update directions dG = dZ + beta dF: the
        # step needs only dG, so keeping it (not dZ) saves one pass over the history per step.
        dF = z.new_zeros(batch, m, n)
        dG = z.new_zeros(batch, m, n)
        gram = torch.zeros(batch, m, m, dtype=gdtype, device=z.device)
        rhs = torch.zeros(batch, m, dtype=gdtype, device=z.device)
        eye = torch.eye(m, dtype=gdtype, device=z.device)

        f = track.g(z) - z
        track.record(z, f + z)
        k = 0
        while not track.done():
            used = min(k, m)
            active = track.active[:, None]
            every = bool(track.active.all())
            z_new = torch.add(z, f, alpha=beta)
            if used > 0:
                gamma = self._coefficients(gram[:, :used, :used], rhs[:, :used], eye[:used, :used])
                # z_new -= gamma^T dG, written into z_new: no temporary the size of the state.
                z_new.unsqueeze(1).baddbmm_(gamma.to(z.dtype).unsqueeze(1), dG[:, :used], alpha=-1.0)
            if not every:
                z_new = torch.where(active, z_new, z)
            fz_new = track.g(z_new)
            f_new = fz_new - z_new
            res = track.record(z_new, fz_new, diff=f_new)
            # The history is a ring: slot order does not matter to the least-squares problem.
            slot = k % m
            if every and bool(torch.isfinite(res).all()):
                # The common case: every sample moved and stayed finite. Write the new differences
                # straight into the history, with no masking passes.
                torch.sub(f_new, f, out=dF[:, slot])
                torch.sub(z_new, z, out=dG[:, slot])
                dG[:, slot].add_(dF[:, slot], alpha=beta)
                z, f = z_new, f_new
            else:
                # Frozen samples contribute zero differences, which keeps their Gram rows finite.
                df = torch.where(active, f_new - f, 0.0).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                dF[:, slot] = df
                dG[:, slot] = torch.where(active, z_new - z, 0.0) + beta * df
                z, f = z_new, torch.where(active, f_new, f)
            blown = track.diverged(res, self.restart_factor)
            if bool(blown.any()):
                dF[blown] = 0.0
                dG[blown] = 0.0
                gram[blown] = 0.0
                z = torch.where(blown[:, None], track.best_z, z)
                f = torch.where(blown[:, None], track.best_fz - track.best_z, f)
            # One pass over the history gives both the new Gram row and the next right-hand side.
            # The products run in the state's dtype (the history never gets cast: that pass would
            # cost more than the map itself on large states); only the m x m system is in float64.
            pair = torch.stack([dF[:, slot], f], dim=1)  # (B, 2, n)
            dots = torch.bmm(pair, dF.transpose(1, 2)).to(gdtype)  # (B, 2, m)
            gram[:, slot, :] = dots[:, 0]
            gram[:, :, slot] = dots[:, 0]
            rhs = dots[:, 1]
            k += 1
        return track.result()

    def _coefficients(self, gram: Tensor, rhs: Tensor, eye: Tensor) -> Tensor:
        """Solve the regularised normal equations for gamma, ``(B, used)``."""
        scale = gram.diagonal(dim1=1, dim2=2).amax(dim=1)  # (B,)
        shift = self.lam * scale + torch.finfo(gram.dtype).tiny
        system = gram + shift[:, None, None] * eye
        gamma, info = torch.linalg.solve_ex(system, rhs.unsqueeze(2))
        gamma = torch.where((info == 0)[:, None, None], gamma, 0.0)
        return torch.nan_to_num(gamma.squeeze(2), nan=0.0, posinf=0.0, neginf=0.0)
