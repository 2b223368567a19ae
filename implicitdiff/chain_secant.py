r"""A chain-aware rule for :func:`implicitdiff.solve_chain`: quasi-Newton along the trajectory.

Picard iteration on a chain updates every step from its predecessor's *old* estimate. The update
rules of :mod:`implicitdiff.solvers` (Anderson, Broyden) treat the steps in flight as independent
samples, which they are not: step :math:`k + 1` reads step :math:`k`, so a change to step :math:`k`
is what step :math:`k + 1` most needs to know about. :class:`ChainSecant` passes it on. With
:math:`d_k = Z_k^{\mathrm{new}} - Z_k` the change of step :math:`k`'s input, the next estimate of
its output is the linearised step

.. math::

    Z_{k+1}^{\mathrm{new}} = s(k, Z_k) + \hat J_k\, d_k,

computed down the window in order (the propagation is sequential, but it is a few small products
per step, no evaluation of :math:`s`). With the exact Jacobian :math:`\hat J_k = J_k` this is
Newton's method on the banded system :math:`Z = F(Z)` (the idea of ParaSolver, Lu et al. 2025),
with :math:`\hat J_k = I` it is the cumulative Picard iteration of ParaDiGMS (Shih et al. 2023),
with :math:`\hat J_k = 0` plain Picard on the steps. :class:`ChainSecant` models each step's
Jacobian from that step's own evaluations, without derivatives: the last ``m`` sweeps give pairs
:math:`(\Delta z, \Delta s)` of input and output changes of step :math:`k`, and

.. math::

    \hat J_k d = B d + (\Delta S - B \Delta Z)\,\gamma, \qquad
    \gamma = \arg\min_\gamma \|\Delta Z \gamma - d\|^2 + \lambda \|\gamma\|^2,

with each pair scaled to a unit input change, a multisecant model (the type-II least squares of
Anderson acceleration) on top of the base :math:`B = I` (``form="cumulative"``) or :math:`B = 0`
(``form="step"``). Along the directions the history spans it is the step's measured response;
elsewhere it is the base, so with no history the rule *is* Picard on the chosen form.

With ``base="fitted"`` the base of step :math:`k` is a multiple of the identity per block, fitted to the
same pairs, :math:`B = \beta_k I` with
:math:`\beta_k = \sum_i \langle \Delta z_i, \Delta s_i \rangle / \sum_i \|\Delta z_i\|^2` (the form's
base until the step has a pair): the directions the history does not span then follow the step's
average response instead of the form's guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._chainrules import Sweep
from ._validate import check_int, check_real
from .solvers.anderson import _gram_dtype

__all__ = ["ChainSecant"]

#: The base models :class:`ChainSecant` takes (``base=``).
BASES = ("form", "fitted")


@dataclass
class _History:
    """The secant history of the steps in flight, one row per step.

    ``X`` and ``S`` are ``(rows, m, n)`` rings of input and output differences (slot ``k % m`` the
    newest; a zero row takes no part in the fit), ``last_in`` / ``last_out`` ``(rows, n)`` the last
    evaluated input and output of each step, ``secant`` ``(rows, n)`` the part of each step's last
    proposal that came from its secant model (what the safeguard judges), ``known`` ``(rows,)``
    whether a step has been evaluated since it entered the window (its next evaluation then gives a
    pair), ``k`` the sweeps recorded.
    """

    X: Tensor
    S: Tensor
    last_in: Tensor
    last_out: Tensor
    secant: Tensor
    known: Tensor
    k: int


class ChainSecant:
    r"""Quasi-Newton along the chain for :func:`implicitdiff.solve_chain` (see the module).

    Pass it as ``solver``: ``solve_chain(step, z0, n, solver=ChainSecant(), form="cumulative")``.
    Each sweep records one secant pair per step in flight, fits each step's Jacobian on its last
    ``m`` pairs, and proposes the next trajectory by carrying every step's change down the window
    through those models. Steps that became final in the sweep pass on their final values.

    Parameters
    ----------
    m : int
        Secant pairs kept per step, ``>= 1`` (memory: ``2 m + 3`` states per step in flight).
    lam : float, optional
        Tikhonov regularisation of the fit, ``>= 0``, on pairs scaled to unit input changes: a pair
        whose direction differs from the others' by less than about :math:`\sqrt{\lambda}` adds no
        information. Default: the machine epsilon of the states' working dtype (what is left below
        it is rounding).
    safeguard : float
        A step whose residual after a proposal is more than ``safeguard`` times what the base model
        alone (Picard on the form) would have left at the same input forgets its older pairs.
        ``> 1``; ``float("inf")`` turns it off.
    blocks : int
        The state is this many independent groups of samples, in order (the samples of a batch that
        the steps move together, as a diffusion sampler's images): each group gets its own secant
        model, so the changes of one sample do not blur the model of another. ``>= 1``. The samples
        are the leading dimension of a tensor ``z0`` (each entry of a 1-D one), and ``blocks`` must
        divide it: a block that cut a sample would model its part of the step's Jacobian without the
        rest, and the rule could take up to ``num_steps`` sweeps where Picard takes a few, so the
        rule refuses it (``ValueError`` from :func:`~implicitdiff.solve_chain` when the rule starts,
        after the first sweep), as it refuses ``blocks > 1`` for a pytree ``z0``, whose packed state
        holds its leaves one after another.
    base : {"form", "fitted"}
        The model of a step outside the directions its pairs span. ``"form"``: the form's Jacobian,
        ``I`` (cumulative) or ``0`` (step). ``"fitted"``: :math:`\beta I` per step and block, with
        :math:`\beta` the least-squares fit of the step's pairs
        (:math:`\sum_i \langle \Delta z_i, \Delta s_i\rangle / \sum_i \|\Delta z_i\|^2`), the form's
        until the step has a pair; the secant model then fits what :math:`\beta I` leaves, and the
        safeguard judges it against :math:`\beta I` alone. Measured
        (``benchmarks/parallel_step_model.py``): never more sweeps than Picard on the 252 test chains
        and 21% fewer than ``"form"`` in all (more on 59 of them); on the digits diffusion models one
        round fewer on FPDM and none on DiT.

    Notes
    -----
    Measured against Picard on the same chains (``benchmarks/chain.py``): never more sweeps on the
    252 test chains of ``tests/test_chain.py`` (contracting and affine, both forms, full and sliding
    windows), and fewer where the steps have structure to learn; on a linear chain of dimension
    ``n <= m`` it is Newton's method once each step has ``n`` pairs, so it ends after about ``n + 3``
    sweeps however long the chain. The propagation costs about seven small kernels per step in flight
    and sweep, and no host read.
    """

    #: A rule written for chains: :func:`~implicitdiff.solve_chain` shows it the chain's structure.
    reads_chain = True
    #: It forgets the history of the steps :meth:`restart` names.
    can_restart = True

    def __init__(
        self,
        m: int = 3,
        lam: float | None = None,
        safeguard: float = 4.0,
        blocks: int = 1,
        base: str = "form",
    ) -> None:
        if base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {base!r}")
        self.base = base
        self.m = check_int("m", m, low=1)
        self.blocks = check_int("blocks", blocks, low=1)
        self.lam = None if lam is None else check_real("lam", lam, low=0.0)
        self.safeguard = check_real("safeguard", safeguard, low=1.0, low_open=True, finite=False)

    def __repr__(self) -> str:
        fitted = ", base='fitted'" if self.base == "fitted" else ""
        options = f"m={self.m}, lam={self.lam}, safeguard={self.safeguard}, blocks={self.blocks}{fitted}"
        return f"ChainSecant({options})"

    def start(self, sweep: Sweep) -> _History:
        """An empty history for the ``(rows, n)`` steps in flight."""
        z = sweep.estimates
        rows, n = z.shape
        self._check_blocks(sweep.samples)
        empty = z.new_zeros(rows, self.m, n)
        known = torch.zeros(rows, dtype=torch.bool, device=z.device)
        return _History(empty, empty.clone(), z.clone(), z.clone(), torch.zeros_like(z), known, 0)

    def _check_blocks(self, samples: int | None) -> None:
        """Refuse a state that ``blocks`` would cut inside a sample (``ValueError``)."""
        if self.blocks == 1:
            return
        if samples is None:
            raise ValueError(
                f"ChainSecant(blocks={self.blocks}) needs z0 as one tensor whose leading dimension holds the "
                "samples, got a pytree: its state is packed leaf after leaf, so its blocks would cut the "
                "samples; stack each sample's leaves into one row, or use blocks=1"
            )
        if samples % self.blocks:
            raise ValueError(
                f"ChainSecant(blocks={self.blocks}) must divide z0's leading dimension (its {samples} "
                "samples): a block that cuts a sample misses the coupling of its entries, and the rule may "
                f"take up to num_steps sweeps; use a divisor of {samples}"
            )

    def record(self, state: _History, prev: Tensor, fz: Tensor, z: Tensor) -> None:
        r"""Judge the last proposals, then write this sweep's pair ``(prev - last_in, fz - last_out)``.

        The safeguard: a step whose residual :math:`\|s(k, Z_k) - Z_{k+1}\|` is larger than it would
        have been without its secant correction (the base model's proposal, Picard's, at the same
        input) forgets its older pairs, so its next proposal leans on the new pair alone.
        """
        zero = torch.zeros((), dtype=fz.dtype, device=fz.device)
        residual = fz - z
        base_residual = torch.linalg.vector_norm(residual + state.secant, dim=1)
        worse = torch.linalg.vector_norm(residual, dim=1) > self.safeguard * base_residual
        self._forget(state, worse & state.known)
        slot = state.k % self.m
        known = state.known[:, None]
        state.X[:, slot] = torch.where(known, prev - state.last_in, zero)
        state.S[:, slot] = torch.where(known, fz - state.last_out, zero)
        state.last_in.copy_(prev)
        state.last_out.copy_(fz)
        state.known.fill_(True)
        state.k += 1

    def fitted_base(self, state: _History, prior: float) -> Tensor:
        r"""``(rows, blocks)``: :math:`\beta = \sum_i \langle\Delta z_i, \Delta s_i\rangle / \sum_i
        \|\Delta z_i\|^2` over each step's pairs in each block, ``prior`` where it has none."""
        rows, m = state.X.shape[:2]
        X = state.X.view(rows, m, self.blocks, -1)
        S = state.S.view(rows, m, self.blocks, -1)
        xx, xs = X.square().sum((1, 3)), (X * S).sum((1, 3))
        fitted = xs / xx.clamp_min(torch.finfo(xx.dtype).tiny)
        return torch.where(xx > 0, fitted, torch.full_like(fitted, prior))

    def models(self, state: _History, base: float | Tensor) -> tuple[Tensor, Tensor]:
        r"""Per step and block, :math:`P = (\hat Z \hat Z^\top + \lambda I)^{-1} \hat Z` and
        :math:`C^\top = (\hat S - B \hat Z)^\top`, so that :math:`\hat J d = B d + C^\top (P d)`;
        ``base`` is :math:`B` as a number (times ``I``) or ``(rows, blocks)`` multiples of ``I``.

        Each pair is scaled to a unit input change first (:math:`\hat Z_i = \Delta Z_i / \|\Delta Z_i\|`,
        :math:`\hat S_i = \Delta S_i / \|\Delta Z_i\|`: the same secant): a chain's changes shrink by
        orders of magnitude from sweep to sweep, and a shift relative to the largest pair would drown
        the small, recent ones.
        """
        rows, m = state.X.shape[:2]
        # (rows, blocks, m, n / blocks): each block of the state has its own pairs.
        X = state.X.view(rows, m, self.blocks, -1).transpose(1, 2)
        S = state.S.view(rows, m, self.blocks, -1).transpose(1, 2)
        scale = torch.linalg.vector_norm(X, dim=3, keepdim=True).clamp_min_(torch.finfo(X.dtype).tiny)
        X, S = X / scale, S / scale
        gram = torch.matmul(X, X.transpose(2, 3)).to(_gram_dtype(X.device))
        lam = torch.finfo(X.dtype).eps if self.lam is None else self.lam
        gram.diagonal(dim1=2, dim2=3).add_(lam + torch.finfo(gram.dtype).tiny)
        P = torch.linalg.solve_ex(gram, X.to(gram.dtype))[0].to(X.dtype)
        if isinstance(base, Tensor):
            C = S - base[:, :, None, None] * X
        else:
            C = S if base == 0.0 else torch.add(S, X, alpha=-base)
        return P, C.transpose(2, 3)

    def propose(self, state: _History, sweep: Sweep) -> tuple[Tensor, _History]:
        """The next estimates of the steps in flight (rows ``sweep.final`` on; earlier rows are final).

        The change ``sweep.change`` of the first row in flight's input is carried down the window
        through each step's model on top of the form's Jacobian ``B`` (``I`` cumulative, ``0`` step).
        Rows before ``sweep.final`` are returned as their images (the caller drops them).
        """
        prev, fz, z, d = sweep.inputs, sweep.images, sweep.estimates, sweep.change
        prior = 1.0 if sweep.cumulative else 0.0
        self.record(state, prev, fz, z)
        fitted = self.fitted_base(state, prior) if self.base == "fitted" else None
        P, Ct = self.models(state, prior if fitted is None else fitted)
        out = fz.clone()
        state.secant.zero_()
        blocks = (self.blocks, -1, 1)
        # (rows, n): each entry's multiple of the identity, its block's
        scale = None if fitted is None else fitted.repeat_interleave(fz.shape[1] // self.blocks, dim=1)
        for j in range(sweep.final, fz.shape[0]):
            secant = torch.bmm(Ct[j], torch.bmm(P[j], d.view(blocks))).view(-1)
            state.secant[j] = secant
            if scale is not None:
                out[j] = torch.addcmul(fz[j], scale[j], d).add_(secant)
            else:
                out[j] = torch.add(fz[j], d, alpha=prior).add_(secant) if prior else fz[j] + secant
            d = out[j] - z[j]
        return out, state

    def restart(self, state: _History, mask: Tensor) -> _History:
        """Forget the history of the steps in ``mask``; their next evaluation gives no pair."""
        self._forget(state, mask)
        state.known = state.known & ~mask
        return state

    def _forget(self, state: _History, mask: Tensor) -> None:
        # In place: this runs every sweep, and a mask rarely set should not cost three new histories.
        state.X.masked_fill_(mask[:, None, None], 0.0)
        state.S.masked_fill_(mask[:, None, None], 0.0)
        state.secant.masked_fill_(mask[:, None], 0.0)
