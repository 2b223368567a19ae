"""Anderson acceleration (type II, in the difference form of Walker & Ni), batched."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._validate import check_int, check_real
from ._driver import UpdateRule, write_into

__all__ = ["Anderson"]


def _check_restart_factor(value: object) -> float:
    return check_real("restart_factor", value, low=1.0, low_open=True, finite=False)


def _gram_dtype(device: torch.device) -> torch.dtype:
    # The m x m normal equations are tiny: solve them in float64 wherever it exists.
    return torch.float32 if device.type == "mps" else torch.float64


class AndersonState(NamedTuple):
    """Anderson's history: a ring of ``m`` differences, tensors only (and the step count)."""

    dF: Tensor  # (B, m, n) residual differences f_{i+1} - f_i
    dG: Tensor  # (B, m, n) update directions g_{i+1} - g_i, with g_i = z_i + beta f_i
    gram: Tensor  # (B, m, m) dF dF^T, float64
    rhs: Tensor  # (B, m) f_prev dF^T, float64
    valid: Tensor  # (B, m) bool: slot holds a difference of this sample's current run
    f_prev: Tensor  # (B, n)
    g_prev: Tensor  # (B, n)
    has_prev: Tensor  # (B,) bool: f_prev, g_prev belong to this sample's current run
    k: int  # steps taken; the next difference goes to slot k % m


class Anderson(UpdateRule):
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
    system is solved in float64. The history is a ring of ``m`` slots with a per-sample validity mask,
    so a restart or a sample's first step needs no Python branch and no host read.

    Parameters
    ----------
    m : int
        Number of past differences kept (memory is ``2 m + 2`` states per sample, whatever ``max_iter``).
    lam : float
        Relative Tikhonov regularisation, ``>= 0``.
    beta : float
        Mixing (damping) parameter in ``(0, 1]``; ``1`` is undamped.
    restart_factor : float
        Safeguard: a sample whose residual exceeds this multiple of the best it has seen drops its
        history and restarts from its best iterate (> 1; ``float('inf')`` disables it, and with it the
        residual bookkeeping of a fixed-budget solve).
    """

    def __init__(self, m: int = 6, lam: float = 1e-8, beta: float = 1.0, restart_factor: float = 1e3) -> None:
        self.m = check_int("m", m, low=1)
        self.lam = check_real("lam", lam, low=0.0)
        self.beta = check_real("beta", beta, low=0.0, low_open=True, high=1.0)
        self.restart_factor = _check_restart_factor(restart_factor)

    def __repr__(self) -> str:
        return f"Anderson(m={self.m}, lam={self.lam}, beta={self.beta}, restart_factor={self.restart_factor})"

    def init(self, z: Tensor, fz: Tensor) -> AndersonState:
        """An empty history."""
        batch, n = z.shape
        gdtype = _gram_dtype(z.device)
        return AndersonState(
            # Not zeroed: a slot is read only once written (``used`` below), which spares a pass over
            # fresh memory as large as the whole history.
            dF=z.new_empty(batch, self.m, n),
            dG=z.new_empty(batch, self.m, n),
            gram=torch.zeros(batch, self.m, self.m, dtype=gdtype, device=z.device),
            rhs=torch.zeros(batch, self.m, dtype=gdtype, device=z.device),
            valid=torch.zeros(batch, self.m, dtype=torch.bool, device=z.device),
            f_prev=z.new_zeros(batch, n),
            g_prev=z.new_zeros(batch, n),
            has_prev=torch.zeros(batch, dtype=torch.bool, device=z.device),
            k=0,
        )

    def step(
        self, state: AndersonState, z: Tensor, fz: Tensor, residual: Tensor | None
    ) -> tuple[Tensor, AndersonState]:
        """Record the newest differences, solve for ``gamma``, mix.

        Memory traffic is what the maths needs: the new differences are written straight into their
        slot, one pass over ``dF`` gives the new Gram row, and one pass over ``dG`` mixes. The
        right-hand side :math:`f_k^\top \\Delta F_j` is updated rather than recomputed, since
        :math:`f_k = f_{k-1} + \\Delta F_{\text{new}}` makes it the last one plus the new Gram row.
        """
        slot, used = state.k % self.m, min(state.k + 1, self.m)
        dF, dG = state.dF[:, :used], state.dG[:, :used]
        f = fz - z
        # The plain mixing step z + beta f; undamped it is g(z) itself, which costs nothing.
        g = fz if self.beta == 1.0 else torch.add(z, f, alpha=self.beta)
        new_dF, new_dG = state.dF[:, slot], state.dG[:, slot]
        write_into(new_dF, torch.sub, f, state.f_prev)
        write_into(new_dG, torch.sub, g, state.g_prev)
        valid = state.valid.clone()
        valid[:, slot] = state.has_prev
        # The new Gram row in the state's dtype (casting the history would cost more than the map on
        # large states); the m x m system is solved in float64.
        row = torch.bmm(new_dF.unsqueeze(1), dF.transpose(1, 2)).squeeze(1).to(state.gram.dtype)
        gram = state.gram.clone()
        gram[:, slot, :used] = row
        gram[:, :used, slot] = row
        rhs = state.rhs.clone()
        rhs[:, slot] = torch.bmm(state.f_prev.unsqueeze(1), new_dF.unsqueeze(2)).view(-1).to(rhs.dtype)
        rhs[:, :used] += row
        gamma = self._coefficients(gram[:, :used, :used], rhs[:, :used], valid[:, :used])
        # z_next = g - gamma^T dG
        z_next = torch.baddbmm(g.unsqueeze(1), gamma.to(z.dtype).unsqueeze(1), dG, alpha=-1.0).squeeze(1)
        has_prev = torch.ones_like(state.has_prev)
        return z_next, AndersonState(state.dF, state.dG, gram, rhs, valid, f, g, has_prev, state.k + 1)

    def restart(self, state: AndersonState, mask: Tensor) -> AndersonState:
        """Drop the history of the samples in ``mask``."""
        return state._replace(valid=state.valid & ~mask[:, None], has_prev=state.has_prev & ~mask)

    def _coefficients(self, gram: Tensor, rhs: Tensor, valid: Tensor) -> Tensor:
        """Solve the regularised normal equations over the valid slots; ``gamma`` is 0 elsewhere."""
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        system = torch.where(pair, gram, 0.0)
        rhs = torch.where(valid, rhs, 0.0)
        scale = system.diagonal(dim1=1, dim2=2).amax(dim=1)  # (B,)
        shift = self.lam * scale + torch.finfo(gram.dtype).tiny
        eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
        gamma, info = torch.linalg.solve_ex(system + shift[:, None, None] * eye, rhs.unsqueeze(2))
        gamma = torch.where((info == 0)[:, None, None], gamma, 0.0)
        return torch.nan_to_num(gamma.squeeze(2), nan=0.0, posinf=0.0, neginf=0.0)
