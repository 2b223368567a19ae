"""The loop of :func:`~implicitdiff.solve_chain`: sweeps, the final prefix, and the sliding window."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._chainrules import ChainRule, Sweep
from .solvers._base import residual_norm
from .solvers._driver import Evaluator

__all__ = ["Chain", "take_rows"]

#: How much of the last observed rate the next one keeps at least (``rho_s >= 0.5 min(rho_{s-1}, 1)``: the
#: rate may at most halve from one sweep to the next), as CVODE's nonlinear solver keeps its convergence
#: rate (with 0.3): a sweep that moves far less than the one before, after a sweep that did not contract,
#: is not taken for a fast contraction. On the 252 test chains (``benchmarks/parallel_error_stop.py``) 0.3
#: let ChainSecant(base="fitted") end 51 times further than ``error_tol`` at worst, 0.5 4.5 times.
RATE_MEMORY = 0.5

#: ``step(k, z)``: ``z`` the states at the steps ``k`` stacked on a new leading dimension.
StepFn = Callable[[Tensor, Tensor], Tensor]


def take_rows(state: Any, index: Tensor, rows: int) -> Any:
    """``state`` with the rows ``index`` of every tensor whose first dimension is the batch (``rows``).

    Rules keep per-sample tensors batched along dim 0 (here the steps in flight); other leaves (ints,
    scalars, shared tensors of another size) are kept as they are.
    """
    if isinstance(state, Tensor):
        return state.index_select(0, index) if state.dim() >= 1 and state.shape[0] == rows else state
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        fields = {f.name: take_rows(getattr(state, f.name), index, rows) for f in dataclasses.fields(state)}
        return dataclasses.replace(state, **fields)
    if isinstance(state, tuple):
        taken = [take_rows(leaf, index, rows) for leaf in state]
        return type(state)(*taken) if hasattr(state, "_fields") else tuple(taken)
    if isinstance(state, list):
        return [take_rows(leaf, index, rows) for leaf in state]
    if isinstance(state, dict):
        return {key: take_rows(leaf, index, rows) for key, leaf in state.items()}
    return state


class Chain:
    """The state of one :func:`~implicitdiff.solve_chain` call, and its named steps.

    Rows ``zs[: lo + 1]`` of the trajectory are final; ``z`` holds the estimates of the ``rows`` steps in
    flight, ``zs[lo + 1 : lo + rows + 1]``. A sweep evaluates them (:meth:`sweep`), finalises the prefix
    that is now exact or within the tolerance (:meth:`finalise`), lets the rule propose the next estimates
    (:meth:`propose`) and slides the window past the final prefix (:meth:`slide`). Without a tolerance
    (``tol=None``) the prefix is the one step that is exact at its image, and the host reads nothing.
    """

    def __init__(
        self,
        step: StepFn,
        z0: Tensor,
        num_steps: int,
        rule: ChainRule,
        tol: Tensor | None,
        window: int,
        stop_mode: str,
        cumulative: bool,
        max_batch: int | None = None,
        init: Tensor | None = None,
        samples: int | None = None,
        error_tol: float | None = None,
    ) -> None:
        self.evaluate = Evaluator(
            step, z0.shape, z0.dtype, name="step(k, z)", returns="the next states stacked like z"
        )
        self.rule, self.tol, self.window, self.stop_mode = rule, tol, window, stop_mode
        self.cumulative, self.num_steps, self.max_batch = cumulative, num_steps, max_batch
        self.sweeps = 0
        self.device = z0.device
        wdtype = self.evaluate.wdtype
        self.zs = z0.detach().reshape(1, -1).to(wdtype).repeat(num_steps + 1, 1)
        self.samples = samples  # z0's leading dimension (None: a pytree), shown to the rule (Sweep.samples)
        self.init = init  # the first guess, kept whole: entering steps start from their rows of it, shifted
        if init is not None:
            self.zs[1:] = init[1:]
        self.residual = torch.full((num_steps,), math.inf, dtype=wdtype, device=self.device)
        self.converged = torch.zeros(num_steps, dtype=torch.bool, device=self.device)
        self.nonfinite = torch.zeros(num_steps, dtype=torch.bool, device=self.device)
        self.per_step = torch.zeros(num_steps, dtype=torch.long, device=self.device)
        self.evaluations = 0  # counted on the host, as the sweeps are
        self.lo, self.rows = 0, min(window, num_steps)
        self.z = self.zs[1 : self.rows + 1].clone()
        self.finite = torch.ones(self.rows, dtype=torch.bool, device=self.device)  # of the last sweep
        self.state: Any = None  # the rule's state; None until the next sweep starts it
        self.error_tol = error_tol
        self.error_estimate: float | None = None
        if error_tol is not None:  # the error test's state, made only for it
            self.error_estimate = math.inf
            # Per step, the largest entry its estimate moved at its last proposal (inf: not proposed yet).
            self.moved = torch.full((num_steps,), math.inf, dtype=wdtype, device=self.device)
            self.rate = torch.ones((), dtype=wdtype, device=self.device)  # no contraction assumed at first

    def run(self, max_iter: int) -> None:
        """Sweep until every step is final, ``max_iter`` sweeps were made, or a step is not finite."""
        while self.lo < self.num_steps and self.sweeps < max_iter:
            k, prev, fz = self.sweep()
            res = residual_norm(fz, self.z, self.stop_mode)
            advance = self.finalise(fz, res)
            if self.lo + advance >= self.num_steps or self.sweeps >= max_iter or advance == 0:
                # Steps not final keep the estimates last evaluated; those never evaluated the last one.
                hi = self.lo + self.rows
                self.zs[self.lo + advance + 1 : hi + 1] = self.z[advance:]
                self.zs[hi + 1 :] = self.guess(hi + 1, self.num_steps + 1, self.zs[hi], hi)
                break
            z_next = self.propose(k, prev, fz, res, advance)
            if self.settled(z_next, fz, advance):
                break
            self.slide(advance, z_next)

    def sweep(self) -> tuple[Tensor, Tensor, Tensor]:
        """Evaluate every step in flight once: their indices ``(rows,)``, predecessors and images
        ``(rows, n)``."""
        lo, rows = self.lo, self.rows
        k = torch.arange(lo, lo + rows, device=self.device)
        prev = torch.cat([self.zs[lo : lo + 1], self.z[:-1]])  # each step's predecessor
        chunk = rows if self.max_batch is None else self.max_batch
        if chunk >= rows:
            fz = self.evaluate(prev, k)
        else:  # bounded memory: the steps in chunks, in order; still one sequential round
            fz = torch.cat(
                [self.evaluate(prev[i : i + chunk], k[i : i + chunk]) for i in range(0, rows, chunk)]
            )
        self.sweeps += 1
        self.evaluations += rows
        self.per_step[lo : lo + rows] += 1
        return k, prev, fz

    def finalise(self, fz: Tensor, res: Tensor) -> int:
        """Make final the leading run of steps within the tolerance, and the next one at its image.

        The first step that misses the tolerance but whose predecessors are final is exact at its image
        (that is the sequential value) if the image is finite. Returns how many steps became final: the
        one host read of a sweep, none without a tolerance (there exactly one step becomes final).
        """
        lo, rows = self.lo, self.rows
        finite = torch.isfinite(fz).all(dim=1)
        self.nonfinite[lo : lo + rows] = ~finite
        self.residual[lo : lo + rows] = res
        self.finite = finite
        if self.tol is None:
            advance, at_image = 1, torch.ones(1, dtype=torch.bool, device=self.device)
            before = self.converged[lo - 1] if lo else finite.new_ones(())
            self.converged[lo] = finite[0] & before
        else:
            within = torch.cumprod((res <= self.tol[lo : lo + rows]).to(torch.long), dim=0).sum()
            image_ok = finite.index_select(0, within.clamp(max=rows - 1).view(1)).squeeze(0) & (within < rows)
            advance = int(within + image_ok)
            at_image = torch.arange(advance, device=self.device) >= within
            self.converged[lo : lo + advance] = True
        if advance:
            self.zs[lo + 1 : lo + 1 + advance] = torch.where(
                at_image[:, None], fz[:advance], self.z[:advance]
            )
            self.residual[lo : lo + advance] = torch.where(at_image & finite[:advance], 0.0, res[:advance])
        if advance < rows:
            # Evaluated against the estimate its predecessor has just left (or it is non-finite).
            self.residual[lo + advance] = math.inf
        return advance

    def propose(self, k: Tensor, prev: Tensor, fz: Tensor, res: Tensor, advance: int) -> Tensor:
        """The rule's next estimates of the steps in flight; ``advance >= 1`` steps have just become final.

        A rule that produced non-finite values for a step falls back to its image and forgets it.
        """
        sweep = Sweep(
            inputs=prev,
            images=fz,
            estimates=self.z,
            residual=res,
            final=advance,
            change=self.zs[self.lo + advance] - self.z[advance - 1],
            origin=self.zs[self.lo : self.lo + 1],
            cumulative=self.cumulative,
            stop_mode=self.stop_mode,
            samples=self.samples,
            steps=k,
        )
        if self.state is None:
            self.state = self.rule.start(sweep)
        z_next, self.state = self.rule.propose(self.state, sweep)
        broken = ~torch.isfinite(z_next).all(dim=1) | ~self.finite
        if self.rule.can_restart:
            self.state = self.rule.restart(self.state, broken)
        return torch.where(broken[:, None], fz, z_next)

    def settled(self, z_next: Tensor, fz: Tensor, advance: int) -> bool:
        r"""Whether the proposal ``z_next`` is estimated within ``error_tol`` of the trajectory; if it is,
        it becomes the trajectory's rows of the steps in flight, final.

        With :math:`c_s` the largest entry by which the sweep moves a step's estimate, to the proposal
        or to its image (the larger: a rule whose model cancels a large residual has not converged),
        over the steps still in flight, and :math:`\rho_s = \max(c_s / c_{s-1}, 0.5 \min(\rho_{s-1}, 1))`
        the rate observed on the same steps (:data:`RATE_MEMORY`), the a-posteriori estimate of a
        contraction is :math:`\rho_s c_s / (1 - \rho_s)`. It needs every step to be in flight (a step
        beyond the window has no estimate) and each to have moved at the sweep before; ``rho >= 1``
        never stops. One host read.
        """
        lo, rows, error_tol = self.lo, self.rows, self.error_tol
        if error_tol is None or lo + rows < self.num_steps or advance >= rows:
            return False
        z = self.z[advance:]
        moved = torch.maximum((z_next[advance:] - z).abs(), (fz[advance:] - z).abs()).amax(dim=1)
        before = self.moved[lo + advance : lo + rows].amax()
        self.moved[lo + advance : lo + rows] = moved
        change = moved.amax()
        known = torch.isfinite(before)
        rate = torch.maximum(change / before, RATE_MEMORY * self.rate.clamp(max=1.0))
        self.rate = torch.where(known, rate, 1.0)
        estimate = torch.where(known & (rate < 1), rate / (1 - rate).clamp_min(1e-30) * change, math.inf)
        self.error_estimate = float(estimate)
        if not self.error_estimate <= error_tol:
            return False
        self.zs[lo + advance + 1 : lo + rows + 1] = z_next[advance:]
        self.converged[lo + advance :] = True
        self.residual[lo + advance :] = math.inf  # the proposal itself was never evaluated
        return True

    def guess(self, start: int, stop: int, estimate: Tensor, row: int) -> Tensor:
        """Starting estimates of the trajectory's rows ``start:stop``, not evaluated yet: with a first guess,
        its rows shifted by ``estimate - init[row]`` (the change row ``row`` has seen), else ``estimate``."""
        if self.init is None:
            return estimate.expand(stop - start, estimate.shape[0])
        return self.init[start:stop] + (estimate - self.init[row])

    def slide(self, advance: int, z_next: Tensor) -> None:
        """Move the window past the ``advance`` steps made final; entering steps start with no history.

        The kept steps move up by ``advance`` rows, each with its rows of the rule's state; an entering
        step starts from the estimate of the step before it.
        """
        rows, n = self.rows, z_next.shape[1]
        new_lo = self.lo + advance
        new_rows = min(self.window, self.num_steps - new_lo)
        kept = rows - advance
        entering = new_rows - kept
        index = torch.arange(advance, rows, device=self.device)
        start = new_lo + 1 + kept  # the row of the first entering step; the row before it was last in flight
        guess = self.guess(start, start + entering, z_next[-1] if kept else self.zs[new_lo], start - 1)
        self.z = torch.cat([z_next.index_select(0, index), guess.expand(entering, n)])
        if entering and not (self.rule.can_restart and kept):
            self.state = None  # started again at the next sweep
        elif self.state is not None:
            if entering:
                index = torch.cat([index, index.new_zeros(entering)])
            self.state = take_rows(self.state, index, rows)
            if entering:
                fresh = torch.arange(new_rows, device=self.device) >= kept
                self.state = self.rule.restart(self.state, fresh)
        self.lo, self.rows = new_lo, new_rows
