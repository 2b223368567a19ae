"""Anderson acceleration (type II, in the difference form of Walker & Ni), batched."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._compile import write_into
from .._validate import check_int, check_real
from ._driver import UpdateRule

__all__ = ["Anderson"]


def _check_restart_factor(value: object) -> float:
    return check_real("restart_factor", value, low=1.0, low_open=True, finite=False)


def _gram_dtype(device: torch.device) -> torch.dtype:
    # The m x m normal equations are tiny: solve them in float64 wherever it exists.
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class AndersonState:
    r"""Anderson's history in one buffer, and where it stands.

    ``H`` is ``(B, 2 + 2m, n)``: rows 0 and 1 hold the last two residuals :math:`f` (row ``k % 2`` the
    newest), rows ``2 .. 2 + m`` the ring of residual differences :math:`\Delta F`, rows
    ``2 + m .. 2 + 2m`` the ring of update differences :math:`\Delta G`. Keeping the residuals beside
    :math:`\Delta F` lets one batched product give both the Gram matrix and the right-hand side.
    ``k`` counts the steps taken (a host integer: which slot the next difference goes to).
    """

    H: Tensor
    g_prev: Tensor  # (B, n): the last mixing point g = z + beta f
    k: int


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

    #: Each sample's history is fitted on its own past alone (see :attr:`UpdateRule.per_sample_history`).
    per_sample_history = True

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
        # Not zeroed: a row is read only once written, which spares a pass over memory as large as the
        # whole history.
        return AndersonState(H=z.new_empty(batch, 2 + 2 * self.m, n), g_prev=z, k=0)

    def step(
        self, state: AndersonState, z: Tensor, fz: Tensor, residual: Tensor | None
    ) -> tuple[Tensor, AndersonState]:
        r"""Record the newest differences, solve for :math:`\gamma`, mix: eleven kernels.

        The new residual and differences are written straight into the history, one batched product
        of the residuals and differences with the differences gives the Gram matrix and the right-hand
        side together, the regulariser is added to its diagonal in place, and one ``baddbmm`` mixes.
        Recomputing the ``m x m`` Gram matrix reads the history once, as updating one row of it would.
        """
        H, m, k = state.H, self.m, state.k
        f = H[:, k % 2]
        write_into(f, torch.sub, fz, z)
        # The plain mixing step z + beta f; undamped it is g(z) itself, which costs nothing.
        g = fz if self.beta == 1.0 else torch.add(z, f, alpha=self.beta)
        if k == 0:  # no difference yet: the mixing step
            return g, AndersonState(H, g, 1)
        slot, used = 2 + (k - 1) % m, min(k, m)
        write_into(H[:, slot], torch.sub, f, H[:, (k + 1) % 2])
        write_into(H[:, slot + m], torch.sub, g, state.g_prev)
        # Rows 0, 1 against the differences: f^T dF (the right-hand side); rows 2.. : dF dF^T (Gram).
        products = torch.bmm(H[:, : 2 + used], H[:, 2 : 2 + used].transpose(1, 2)).to(_gram_dtype(z.device))
        gamma = self._coefficients(products[:, 2:], products[:, k % 2])
        # z_next = g - gamma^T dG
        z_next = torch.baddbmm(
            g.unsqueeze(1), gamma.to(z.dtype).unsqueeze(1), H[:, 2 + m : 2 + m + used], alpha=-1.0
        ).squeeze(1)
        return z_next, AndersonState(H, g, k + 1)

    def restart(self, state: AndersonState, mask: Tensor) -> AndersonState:
        """Forget the differences of the samples in ``mask``: zero rows take no part in the fit.

        The restarted sample moves to its best iterate, so its next difference is the secant between
        the point it left and that iterate: a pair of evaluated points like any other.
        """
        history = state.H[:, 2:]
        write_into(history, torch.where, mask[:, None, None], self._zero(history), history)
        return state

    def _zero(self, like: Tensor) -> Tensor:
        return torch.zeros((), dtype=like.dtype, device=like.device)

    def _coefficients(self, gram: Tensor, rhs: Tensor) -> Tensor:
        r"""Solve :math:`(G + \lambda \max_i G_{ii} I)\gamma = r` (the diagonal is shifted in place)."""
        diagonal = gram.diagonal(dim1=1, dim2=2)
        # Relative Tikhonov shift; tiny keeps an all-zero system (no history, or a forgotten one) solvable.
        largest = diagonal.amax(dim=1, keepdim=True)
        diagonal += torch.add(torch.finfo(gram.dtype).tiny, largest, alpha=self.lam)
        solution: Tensor = torch.linalg.solve_ex(gram, rhs.unsqueeze(2))[0]
        gamma = solution.squeeze(2)
        if self.lam == 0.0:
            # Without regularisation a singular system (info > 0) leaves inf or NaN: a mixing step.
            gamma = torch.nan_to_num(gamma, nan=0.0, posinf=0.0, neginf=0.0)
        return gamma
