"""Limited-memory good Broyden's method, batched."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._base import IterationTracker, SolverResult
from .anderson import _check_memory, _check_restart_factor

__all__ = ["Broyden"]


def _apply(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
    """``(-I + U^T V) x`` for a batch: ``U, V`` are ``(B, r, n)``, ``x`` is ``(B, n)``."""
    # (B, 1, n) @ (B, n, r) is several times faster than (B, r, n) @ (B, n, 1) on the CPU.
    coeff = torch.bmm(x.unsqueeze(1), V.transpose(1, 2))  # (B, 1, r)
    return torch.bmm(coeff, U).squeeze(1) - x


def _apply_transposed(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
    """``(-I + U^T V)^T x = -x + V^T U x``."""
    coeff = torch.bmm(x.unsqueeze(1), U.transpose(1, 2))  # (B, 1, r)
    return torch.bmm(coeff, V).squeeze(1) - x


class Broyden:
    r"""Limited-memory good Broyden's method for the root of :math:`F(z) = g(z) - z`.

    The inverse Jacobian of :math:`F` is approximated by :math:`H = -I + \sum_i u_i v_i^\top`
    (``-I`` is exact when ``g`` is constant, so the first step is a Picard step). Each step moves by
    :math:`s = -H F(z)` and applies the good Broyden update (Broyden, 1965) in its inverse,
    Sherman-Morrison form, with :math:`y = F(z + s) - F(z)`:

    .. math::

        H \leftarrow H + \frac{(s - H y)\, s^\top H}{s^\top H y}.

    At most ``memory`` rank-one terms are kept: when they are used up the approximation restarts
    from ``-I`` (overwriting the oldest term instead breaks the secant conditions of the rest and
    diverges on hard problems), so memory is ``2 * memory`` states per sample whatever
    ``max_iter``. An update whose denominator is not finite or vanishes is skipped for that
    sample, and a sample whose residual grows past ``restart_factor`` times its best restarts from
    its best iterate.

    Parameters
    ----------
    memory : int
        Number of rank-one updates kept.
    restart_factor : float
        A sample restarts once its residual exceeds this multiple of the best it has seen (> 1).
    """

    def __init__(self, memory: int = 20, restart_factor: float = 1e3) -> None:
        self.memory = _check_memory("memory", memory)
        self.restart_factor = _check_restart_factor(restart_factor)

    def __repr__(self) -> str:
        return f"Broyden(memory={self.memory}, restart_factor={self.restart_factor})"

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
        U = z.new_zeros(batch, self.memory, n)
        V = z.new_zeros(batch, self.memory, n)
        F = track.g(z) - z
        track.record(z, F + z)
        HF = -F  # H F with H = -I; carried from step to step so H is applied once per step
        k = 0
        while not track.done():
            active = track.active[:, None]
            z_new = torch.where(active, z - HF, z)
            fz_new = track.g(z_new)
            F_new = fz_new - z_new
            res = track.record(z_new, fz_new)
            s = torch.where(active, z_new - z, 0.0)
            F_safe = torch.nan_to_num(torch.where(active, F_new, F), nan=0.0, posinf=0.0, neginf=0.0)
            y = F_safe - F
            slot = k % self.memory
            if slot == 0 and k > 0:
                # Limited memory: restart from -I rather than dropping the oldest term, which breaks
                # the secant conditions the remaining terms were built on and can diverge.
                U.zero_()
                V.zero_()
                HF_new = -F_safe
            else:
                HF_new = _apply(U, V, F_safe)
                Hy = HF_new - HF  # H is linear: H y = H F_new - H F, with H F from the last step
                sH = _apply_transposed(U, V, s)
                denom = (sH * y).sum(dim=1, keepdim=True)
                tiny = torch.finfo(z.dtype).eps * sH.norm(dim=1, keepdim=True) * y.norm(dim=1, keepdim=True)
                ok = active & torch.isfinite(denom) & (denom.abs() > tiny)
                u = torch.where(ok, (s - Hy) / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
                v = torch.where(ok, sH, 0.0)
                U[:, slot] = u
                V[:, slot] = v
                HF_new = HF_new + u * (v * F_safe).sum(dim=1, keepdim=True)  # the updated H times F_new
            z, F, HF = z_new, F_safe, HF_new
            # Safeguard: a sample whose residual blew up restarts from its best iterate with H = -I.
            blown = track.diverged(res, self.restart_factor)
            if bool(blown.any()):
                U[blown] = 0.0
                V[blown] = 0.0
                z = torch.where(blown[:, None], track.best_z, z)
                F = torch.where(blown[:, None], track.best_fz - track.best_z, F)
                HF = torch.where(blown[:, None], -F, HF)
            k += 1
        return track.result()
