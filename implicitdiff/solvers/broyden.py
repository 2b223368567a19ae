"""Limited-memory good Broyden's method, batched."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .._compile import write_into
from .._validate import check_int
from ._driver import UpdateRule
from .anderson import _check_restart_factor

__all__ = ["Broyden"]


@dataclass
class BroydenState:
    r"""Broyden's rank-one terms and the last step.

    ``UV`` is ``(B, 2, memory + 1, n)``: ``UV[:, 0, i]`` and ``UV[:, 1, i]`` are the terms
    :math:`u_i, v_i` of :math:`H = -I + \sum_i u_i v_i^\top` (rows past ``used`` are unwritten; the extra
    row of ``V`` holds the newest :math:`y` beside the newest :math:`v`, so that one product gives the
    three dot products the update needs).
    """

    UV: Tensor
    s_prev: Tensor  # (B, n): the last step taken, -H F_prev
    F_prev: Tensor  # (B, n)
    used: int  # terms written since the last restart from -I; -1 before the first step
    has_prev: Tensor | None = None  # (B,) bool after a restart: False for the samples that restarted


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

    #: Each sample's history is fitted on its own past alone (see :attr:`UpdateRule.per_sample_history`).
    per_sample_history = True

    def __init__(self, memory: int = 20, restart_factor: float = 1e3) -> None:
        self.memory = check_int("memory", memory, low=1)
        self.restart_factor = _check_restart_factor(restart_factor)

    def __repr__(self) -> str:
        return f"Broyden(memory={self.memory}, restart_factor={self.restart_factor})"

    def init(self, z: Tensor, fz: Tensor) -> BroydenState:
        """``H = -I`` and no last step."""
        batch, n = z.shape
        # Not zeroed: only the first ``used`` terms are ever read.
        return BroydenState(UV=z.new_empty(batch, 2, self.memory + 1, n), s_prev=z, F_prev=z, used=-1)

    def step(
        self, state: BroydenState, z: Tensor, fz: Tensor, residual: Tensor | None
    ) -> tuple[Tensor, BroydenState]:
        r"""Update :math:`H` with the last secant pair, then move by :math:`-H F(z)`: sixteen kernels.

        With :math:`s = -H F_{\text{prev}}` the last step, :math:`y = F - F_{\text{prev}}` and
        :math:`\sigma = -H F`, the update's numerator is :math:`s - H y = \sigma`, so the new term is
        :math:`u = \sigma / (w^\top y)`, :math:`v = w` with :math:`w = -H^\top s`, and the new step is
        :math:`\sigma - u\,(w^\top F)`. An update whose denominator vanishes relative to
        :math:`\|w\|\,\|y\|` (or is not finite) is skipped for that sample.
        """
        F = fz - z
        used, UV = state.used, state.UV
        if used < 0 or used == self.memory:
            # The first step, or every slot holds a term: restart from H = -I (dropping the oldest term
            # instead breaks the secant conditions of the rest and can diverge). The Picard step z + F.
            return fz, BroydenState(UV, F, F, 0)
        U, V = UV[:, 0], UV[:, 1]
        # sigma = -H F = F - U^T (V F)
        sigma = torch.baddbmm(
            F.unsqueeze(1), torch.bmm(F.unsqueeze(1), V[:, :used].transpose(1, 2)), U[:, :used], alpha=-1.0
        )
        # w = -H^T s = s - V^T (U s), written as the new v; y beside it.
        s = state.s_prev.unsqueeze(1)
        write_into(
            V[:, used : used + 1],
            torch.baddbmm,
            s,
            torch.bmm(s, U[:, :used].transpose(1, 2)),
            V[:, :used],
            alpha=-1.0,
        )
        write_into(V[:, used + 1], torch.sub, F, state.F_prev)
        pair = V[:, used : used + 2]
        gram = torch.bmm(pair, pair.transpose(1, 2))  # [[w.w, w.y], [w.y, y.y]]
        denom = gram[:, 0, 1]
        eps = torch.finfo(z.dtype).eps
        ok = torch.addcmul(denom * denom, gram[:, 0, 0], gram[:, 1, 1], value=-(eps**2)) > 0  # NaN: False
        if state.has_prev is not None:
            ok = ok & state.has_prev
        scale = torch.where(ok, denom.reciprocal(), self._zero(denom))
        u = UV[:, 0, used]
        write_into(u, torch.mul, sigma.squeeze(1), scale[:, None])
        # The new step -H_new F = sigma - u (w . F)
        wF = torch.bmm(V[:, used : used + 1], F.unsqueeze(2)).squeeze(2)
        step = torch.addcmul(sigma.squeeze(1), u, wF, value=-1.0)
        return z + step, BroydenState(UV, step, F, used + 1)

    def restart(self, state: BroydenState, mask: Tensor) -> BroydenState:
        """Back to ``H = -I`` for the samples in ``mask``: their terms become zero, and their next secant
        pair (which spans the jump to the best iterate, not a step of the method) is skipped."""
        write_into(state.UV, torch.where, mask[:, None, None, None], self._zero(state.UV), state.UV)
        return replace(state, has_prev=~mask)

    def _zero(self, like: Tensor) -> Tensor:
        return torch.zeros((), dtype=like.dtype, device=like.device)
