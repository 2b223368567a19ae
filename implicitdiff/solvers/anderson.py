"""Anderson acceleration (type II, in the difference form of Walker & Ni), batched."""

from __future__ import annotations

from dataclasses import dataclass, replace

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


@dataclass
class AndersonState:
    """Anderson's history: a ring of ``m`` differences (tensors), and where it stands (Python ints)."""

    dF: Tensor  # (B, m, n) residual differences f_{i+1} - f_i
    dG: Tensor  # (B, m, n) update directions g_{i+1} - g_i, with g_i = z_i + beta f_i
    gram: Tensor  # (B, m, m) dF dF^T, float64
    rhs: Tensor  # (B, m) f_prev dF^T, float64
    valid: Tensor  # (B, m) bool: slot holds a difference of this sample's current run
    f_prev: Tensor  # (B, n)
    g_prev: Tensor  # (B, n)
    has_prev: Tensor  # (B,) bool: f_prev, g_prev belong to this sample's current run
    k: int  # steps taken; the k-th difference goes to slot (k - 1) % m
    masked: bool  # some sample has restarted: the validity mask must be applied


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
            valid=torch.ones(batch, self.m, dtype=torch.bool, device=z.device),
            f_prev=z,
            g_prev=z,
            has_prev=torch.ones(batch, dtype=torch.bool, device=z.device),
            k=0,
            masked=False,
        )

    def step(
        self, state: AndersonState, z: Tensor, fz: Tensor, residual: Tensor | None
    ) -> tuple[Tensor, AndersonState]:
        """Record the newest differences, solve for ``gamma``, mix.

        Memory traffic is what the maths needs: the new differences are written straight into their
        slot, one pass over ``dF`` gives the new Gram row, and one pass over ``dG`` mixes. The
        right-hand side :math:`f_k^\top \\Delta F_j` is updated rather than recomputed, since
        :math:`f_k = f_{k-1} + \\Delta F_{\text{new}}` makes it the last one plus the new Gram row.
        The small bookkeeping is done in place, since on a GPU each operation costs a kernel launch.
        """
        f = fz - z
        # The plain mixing step z + beta f; undamped it is g(z) itself, which costs nothing.
        g = fz if self.beta == 1.0 else torch.add(z, f, alpha=self.beta)
        if state.k == 0:  # no difference yet: the mixing step
            return g, replace(state, f_prev=f, g_prev=g, k=1)
        slot, used = (state.k - 1) % self.m, min(state.k, self.m)
        dF, dG = state.dF[:, :used], state.dG[:, :used]
        new_dF, new_dG = state.dF[:, slot], state.dG[:, slot]
        write_into(new_dF, torch.sub, f, state.f_prev)
        write_into(new_dG, torch.sub, g, state.g_prev)
        # The new Gram row in the state's dtype (casting the history would cost more than the map on
        # large states); the m x m system is solved in float64.
        row = torch.bmm(new_dF.unsqueeze(1), dF.transpose(1, 2)).squeeze(1).to(state.gram.dtype)
        state.gram[:, slot, :used] = row
        state.gram[:, :used, slot] = row
        state.rhs[:, slot] = torch.bmm(state.f_prev.unsqueeze(1), new_dF.unsqueeze(2)).view(-1)
        state.rhs[:, :used] += row
        valid = None
        if state.masked:
            state.valid[:, slot] = state.has_prev
            valid = state.valid[:, :used]
        gamma = self._coefficients(state.gram[:, :used, :used], state.rhs[:, :used], valid)
        # z_next = g - gamma^T dG
        z_next = torch.baddbmm(g.unsqueeze(1), gamma.to(z.dtype).unsqueeze(1), dG, alpha=-1.0).squeeze(1)
        has_prev = torch.ones_like(state.has_prev) if state.masked else state.has_prev
        return z_next, replace(state, f_prev=f, g_prev=g, has_prev=has_prev, k=state.k + 1)

    def restart(self, state: AndersonState, mask: Tensor) -> AndersonState:
        """Drop the history of the samples in ``mask``."""
        return replace(
            state, valid=state.valid & ~mask[:, None], has_prev=state.has_prev & ~mask, masked=True
        )

    def _coefficients(self, gram: Tensor, rhs: Tensor, valid: Tensor | None) -> Tensor:
        """Solve the regularised normal equations (over the valid slots; ``gamma`` is 0 elsewhere)."""
        if valid is None:
            system = gram.clone()
        else:
            system = torch.where(valid.unsqueeze(2) & valid.unsqueeze(1), gram, 0.0)
            rhs = torch.where(valid, rhs, 0.0)
        diagonal = system.diagonal(dim1=1, dim2=2)
        # Relative Tikhonov shift: lam times the largest ||dF_i||^2; tiny keeps an all-zero system solvable.
        diagonal += self.lam * diagonal.amax(dim=1, keepdim=True) + torch.finfo(gram.dtype).tiny
        gamma, _ = torch.linalg.solve_ex(system, rhs.unsqueeze(2))
        # A singular system (info > 0) leaves inf or NaN: those coefficients become 0, a mixing step.
        return torch.nan_to_num(gamma.squeeze(2), nan=0.0, posinf=0.0, neginf=0.0)
