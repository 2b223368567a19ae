"""Limited-memory good Broyden's method, batched."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .._validate import check_int
from ._driver import UpdateRule, write_into
from .anderson import _check_restart_factor

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


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample dot product ``(B, 1)`` of ``(B, n)`` tensors, with no temporary of size ``n``."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).squeeze(2)


@dataclass
class BroydenState:
    """Broyden's rank-one terms and the last point."""

    U: Tensor  # (B, r, n); rows past ``used`` are unwritten
    V: Tensor  # (B, r, n)
    z_prev: Tensor  # (B, n)
    F_prev: Tensor  # (B, n)
    HF_prev: Tensor  # (B, n): H F_prev, with the H of the last step
    has_prev: Tensor  # (B,) bool
    used: int  # terms written since the last restart from -I; -1 before the first step


class Broyden(UpdateRule):
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
        self.memory = check_int("memory", memory, low=1)
        self.restart_factor = _check_restart_factor(restart_factor)

    def __repr__(self) -> str:
        return f"Broyden(memory={self.memory}, restart_factor={self.restart_factor})"

    def init(self, z: Tensor, fz: Tensor) -> BroydenState:
        """``H = -I`` and no last point."""
        batch, n = z.shape
        return BroydenState(
            # Not zeroed: only the first ``used`` terms are ever read.
            U=z.new_empty(batch, self.memory, n),
            V=z.new_empty(batch, self.memory, n),
            z_prev=z,
            F_prev=z.new_zeros(batch, n),
            HF_prev=z.new_zeros(batch, n),
            has_prev=torch.zeros(batch, dtype=torch.bool, device=z.device),
            used=-1,
        )

    def step(
        self, state: BroydenState, z: Tensor, fz: Tensor, residual: Tensor | None
    ) -> tuple[Tensor, BroydenState]:
        """Update ``H`` with the secant pair of the last step, then move by ``-H F(z)``."""
        F = torch.nan_to_num(fz - z, nan=0.0, posinf=0.0, neginf=0.0)
        used = state.used
        has_prev = torch.ones_like(state.has_prev)
        if used < 0:  # the first step: no secant pair yet, H = -I
            return z + F, replace(state, z_prev=z, F_prev=F, HF_prev=-F, has_prev=has_prev, used=0)
        if used == self.memory:
            # Limited memory: once every slot holds a term, restart from -I rather than dropping the
            # oldest term, which breaks the secant conditions of the rest and can diverge. The pair of
            # this step was made with the old H, so it is not used either.
            return z + F, replace(state, z_prev=z, F_prev=F, HF_prev=-F, has_prev=has_prev, used=0)
        U, V = state.U[:, :used], state.V[:, :used]
        HF = _apply(U, V, F)
        s = z - state.z_prev
        y = F - state.F_prev
        sH = _apply_transposed(U, V, s)
        denom = _dot(sH, y)  # (B, 1)
        tiny = torch.finfo(z.dtype).eps * torch.linalg.vector_norm(sH, dim=1, keepdim=True)
        tiny = tiny * torch.linalg.vector_norm(y, dim=1, keepdim=True)
        ok = state.has_prev[:, None] & torch.isfinite(denom) & (denom.abs() > tiny)
        # A skipped update is a zero term: u = v = 0 (where, not a product, keeps NaN out).
        scale = torch.where(ok, 1.0 / torch.where(ok, denom, 1.0), 0.0)
        u, v = state.U[:, used], state.V[:, used]
        Hy = HF - state.HF_prev  # H is linear: H y = H F - H F_prev, both with the current H
        write_into(u, torch.mul, torch.where(ok, s - Hy, 0.0), scale)
        write_into(v, torch.where, ok, sH, sH.new_zeros(()))
        HF = torch.addcmul(HF, u, _dot(v, F))  # the updated H times F
        return z - HF, BroydenState(state.U, state.V, z, F, HF, has_prev, used + 1)

    def restart(self, state: BroydenState, mask: Tensor) -> BroydenState:
        """Back to ``H = -I`` for the samples in ``mask``: their terms become zero."""
        keep = (~mask).to(state.U.dtype)[:, None, None]
        used = state.used
        state.U[:, :used].mul_(keep)
        state.V[:, :used].mul_(keep)
        return replace(state, has_prev=state.has_prev & ~mask)
