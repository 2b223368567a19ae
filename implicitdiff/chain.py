r"""Parallel in time: a recurrence solved as one fixed point over its whole trajectory.

A recurrence :math:`x_{k+1} = s(k, x_k)`, :math:`k = 0, \dots, N - 1` (the timesteps of a diffusion
sampler, an RNN over a sequence, an ODE integrator) is also the fixed point of the map that applies
every step at once,

.. math::

    X = F(X), \qquad F(X)_{k+1} = s(k, X_k), \qquad X_0 = x_0,

over the trajectory :math:`X = (X_1, \dots, X_N)`. :math:`F` is strictly lower triangular along the
step axis (step :math:`k + 1` reads only step :math:`k`), so Picard iteration :math:`X \leftarrow F(X)`
is exact after at most :math:`N` sweeps: each sweep makes at least one more step exact. Every sweep
evaluates all the steps of the window in one batched call of :math:`s`, so when the steps converge
in far fewer sweeps than there are steps, the chain costs fewer *sequential* rounds than the
recurrence. ParaDiGMS (Shih et al., 2023) is Picard iteration with a sliding window (on the map
:math:`G` below), ParaTAA (Tang et al., 2024) accelerates it with Anderson-type updates, and DEQ-DDIM
solved the DDIM chain with Anderson (Pokle et al., 2022).

The same fixed point is also that of the *cumulative* map, which sums the increments of the steps,

.. math::

    G(X)_{k+1} = x_0 + \sum_{i \le k} \bigl(s(i, X_i) - X_i\bigr),

which costs the same evaluations. The two differ in how fast Picard iteration converges: the error
of a sweep on :math:`F` moves one step down the chain multiplied by the step's Jacobian :math:`J_k`,
so it fades only when the steps contract; on :math:`G` it is multiplied by :math:`J_k - I`, which is
small when the steps are close to the identity, as the steps of an ODE integrator or a diffusion
sampler are (this is the Picard iteration of ParaDiGMS, the discrete Picard-Lindelof iteration).

:func:`solve_chain` runs any update rule of :mod:`implicitdiff.solvers` (or a user's) on :math:`F` or
:math:`G`, treating the steps in flight as the rule's batch.

References
----------
Shih, Belkhale, Ermon, Sadigh, Anari. *Parallel Sampling of Diffusion Models*. NeurIPS 2023.
Tang, Tang, Luo, Wang, Chang. *Accelerating Parallel Sampling of Diffusion Models*. ICML 2024.
Pokle, Geng, Kolter. *Deep Equilibrium Approaches to Diffusion Models*. NeurIPS 2022.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from ._tree import PyTree, TreeSpec
from ._validate import check_int, check_real
from .chain_secant import ChainSecant
from .solvers._base import check_stop_mode, residual_norm, working_dtype
from .solvers._driver import Evaluator, UpdateRule, as_update_rule
from .solvers.anderson import Anderson
from .solvers.broyden import Broyden
from .solvers.picard import Picard

__all__ = ["ChainResult", "ChainRuleWarning", "solve_chain"]

StepFn = Callable[[Tensor, Any], Any]

#: The fixed-point maps :func:`solve_chain` can hand to the rule (same fixed point, same evaluations).
FORMS = ("cumulative", "step")


@dataclass
class ChainResult:
    r"""What :func:`solve_chain` returns.

    Step :math:`k` is the transition from ``xs[k]`` to ``xs[k + 1]``; every per-step tensor has
    ``num_steps`` entries and stays on the device of ``x0``.

    Attributes
    ----------
    xs : Tensor or pytree of Tensor
        ``(num_steps + 1, *x0.shape)`` in ``x0``'s dtype: the trajectory, ``xs[0]`` is ``x0``. A step
        that did not converge (the sweep budget ran out, or a step returned non-finite values) holds
        its latest estimate. For a pytree ``x0``, the same structure with each leaf
        ``(num_steps + 1, *leaf.shape)``.
    residual : Tensor
        ``(num_steps,)``: :math:`\|s(k, x_k) - x_{k+1}\|` of the returned trajectory (divided by
        :math:`\|s(k, x_k)\| + 10^{-9}` for ``stop_mode="rel"``), as last evaluated. ``inf`` where it
        is not known: a step never evaluated, or one whose predecessor changed after its evaluation.
    converged : Tensor
        ``(num_steps,)`` bool: the step is final, i.e. every earlier step is final and its own
        residual is at most ``tol``. Always a prefix of the steps.
    sweeps : int
        Sequential rounds: batched calls of ``step``.
    evaluations : int
        Evaluations of ``step`` counted per step: a call on 7 steps counts 7.
    evaluations_per_step : Tensor
        ``(num_steps,)`` int: how often each step was evaluated; sums to :attr:`evaluations`.
    nonfinite : Tensor
        ``(num_steps,)`` bool: the last evaluation of this step returned a non-finite value. A
        non-finite step whose predecessors are final stops the solve.
    """

    xs: PyTree
    residual: Tensor
    converged: Tensor
    sweeps: int
    evaluations: int
    evaluations_per_step: Tensor
    nonfinite: Tensor

    @property
    def all_converged(self) -> bool:
        """Whether every step is final (reads one flag from the device)."""
        return bool(self.converged.all())

    def summary(self) -> str:
        """One line for logs: steps converged, sweeps, evaluations, max residual."""
        steps = self.converged.numel()
        worst = float(self.residual.max()) if steps else 0.0
        return (
            f"converged {int(self.converged.sum())}/{steps} steps, sweeps {self.sweeps}, "
            f"evaluations {self.evaluations}, max residual {worst:.3e}"
        )


def _default_tol(wdtype: torch.dtype) -> float:
    # About 100 ulps at unit scale: 1e-5 for float32 (and bf16/fp16 states, which run in float32).
    return 1e-10 if wdtype == torch.float64 else 1e-5


def _packed_step(step: StepFn, spec: TreeSpec) -> StepFn:
    """``step`` on packed rows ``(rows, n)``: it sees, and returns, the structure of ``x0``."""

    def packed(k: Tensor, x: Tensor) -> Tensor:
        out = step(k, spec.unpack(x))
        return spec.pack(spec.leaves_of(out, x.shape[0], "step(k, x)"))

    return packed


def _take_rows(state: Any, index: Tensor, rows: int) -> Any:
    """``state`` with the rows ``index`` of every tensor whose first dimension is the batch (``rows``).

    Update rules keep per-sample tensors batched along dim 0 (the driver's samples, here the steps in
    flight); other leaves (ints, scalars, shared tensors of another size) are kept as they are.
    """
    if isinstance(state, Tensor):
        return state.index_select(0, index) if state.dim() >= 1 and state.shape[0] == rows else state
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        fields = {f.name: _take_rows(getattr(state, f.name), index, rows) for f in dataclasses.fields(state)}
        return dataclasses.replace(state, **fields)
    if isinstance(state, tuple):
        taken = [_take_rows(leaf, index, rows) for leaf in state]
        return type(state)(*taken) if hasattr(state, "_fields") else tuple(taken)
    if isinstance(state, list):
        return [_take_rows(leaf, index, rows) for leaf in state]
    if isinstance(state, dict):
        return {key: _take_rows(leaf, index, rows) for key, leaf in state.items()}
    return state


class ChainRuleWarning(UserWarning):
    """A rule that treats the steps of a chain as independent samples (Anderson, Broyden).

    Their history fits each step on its own past, blind to the step before it, so on chains they
    often take more sweeps than Picard: on the 252 test chains of ``benchmarks/chain.py``
    ``Anderson(m=3)`` took more on 78 (up to 38 more) and ``Broyden(memory=4)`` on 59, where
    :class:`~implicitdiff.ChainSecant`, which couples the steps, took more on none.
    Silence it with ``warnings.simplefilter("ignore", ChainRuleWarning)`` where that is measured.
    """


def _check_solver(solver: object) -> UpdateRule | ChainSecant:
    if isinstance(solver, ChainSecant):
        return solver
    if isinstance(solver, (Anderson, Broyden)):
        warnings.warn(
            f"{type(solver).__name__} treats the steps of a chain as independent samples and often takes "
            "more sweeps than Picard on chains; ChainSecant couples the steps (see ChainRuleWarning)",
            ChainRuleWarning,
            stacklevel=3,
        )
    rule = Picard() if solver is None else as_update_rule(solver, "solver")
    if rule.judges_trials:
        raise TypeError(
            f"solver {solver!r} has accept(): trial steps are judged against a residual that the chain's "
            "moving predecessors make stale, so rules with accept are not supported by solve_chain"
        )
    return rule


def solve_chain(
    step: StepFn,
    x0: PyTree,
    num_steps: int,
    *,
    solver: Any = None,
    tol: float | Tensor | Sequence[float] | None = None,
    max_iter: int | None = None,
    window: int | None = None,
    stop_mode: str = "abs",
    form: str = "step",
    max_batch: int | None = None,
    init: Any = None,
) -> ChainResult:
    r"""Run the recurrence :math:`x_{k+1} = s(k, x_k)` as one fixed point over its trajectory.

    With :math:`X = (X_1, \dots, X_N)`, :math:`X_0 = x_0` and the map :math:`F(X)_{k+1} = s(k, X_k)`
    (``form="step"``) or :math:`G(X)_{k+1} = x_0 + \sum_{i \le k} (s(i, X_i) - X_i)`
    (``form="cumulative"``), each sweep evaluates ``step`` once, on all the steps in flight, and lets
    the update rule ``solver`` propose the next estimates from :math:`X` and its image.
    Step :math:`k` is *final* once every earlier step is final and

    .. math:: r_k = \|s(k, X_k) - X_{k+1}\| \le \mathrm{tol}.

    The first step that misses the tolerance but whose predecessors are final is final too, at its
    image :math:`s(k, X_k)`: that is exactly the sequential value, with residual 0. Each sweep thus
    finalises at least one step, whatever the rule, so the solve ends after at most ``num_steps``
    sweeps (the guarantee of ParaDiGMS, Shih et al. 2023) and never costs more sequential rounds than the
    recurrence. Final steps are not evaluated again; at most ``window`` steps are in flight, and the
    window slides past the final prefix.

    The returned trajectory satisfies :math:`x_{k+1} = s(k, x_k) + d_k` with
    :math:`\|d_k\| = r_k \le \mathrm{tol}` (``stop_mode="abs"``), so if each step is
    :math:`L`-Lipschitz its distance to the sequential rollout is at most
    :math:`\mathrm{tol}\,\sum_{i < k} L^i` at step :math:`k`.

    Parameters
    ----------
    step : callable
        ``step(k, x) -> x_next``: ``k`` is a 1-D LongTensor of step indices, ``x`` the states at those
        steps stacked on a new leading dimension, ``(len(k), *x0.shape)`` in ``x0``'s dtype (for a
        pytree ``x0``, its structure with each leaf ``(len(k), *leaf.shape)``); it returns the next
        states stacked the same way. It is called on many steps at once, must not
        modify ``x`` in place, and runs under ``torch.no_grad()``.
    x0 : Tensor or pytree of Tensor
        The initial state, any shape, floating point; or a tuple, list or dict (nested) of such tensors,
        all of one dtype and device, packed into one vector per step (the residual is then over every
        leaf at once). The rule works in ``x0``'s dtype promoted to at least float32.
    num_steps : int
        :math:`N \ge 0`, the number of steps.
    solver : ChainSecant or update rule, optional
        :class:`~implicitdiff.ChainSecant`, the rule made for chains: it models each step's Jacobian
        from that step's evaluations and carries every change down the window (quasi-Newton on the
        trajectory; on the chains measured it never took more sweeps than Picard, and fewer on
        diffusion samplers). Or any update rule with ``init(z, fz)`` and
        ``step(state, z, fz, residual)`` working on flat ``(B, n)`` batches, whose rows here are the
        steps in flight: :class:`~implicitdiff.Picard` (the default),
        :class:`~implicitdiff.Anderson`, :class:`~implicitdiff.Broyden` or a
        :class:`~implicitdiff.solvers.UpdateRule` of your own. Anderson and Broyden treat the steps
        as independent samples and warn so (:class:`ChainRuleWarning`). A rule's per-sample history
        follows the steps when the window slides; a step entering the window starts with no
        history (through the rule's ``restart``, or by re-initialising the rule when it has no
        ``restart`` of its own). Rules with ``accept`` (trial steps) are refused.
    tol : float or sequence of float, optional
        Tolerance on the per-step residual, ``>= 0``; default ``1e-5``, or ``1e-10`` for float64.
        ``0`` finalises a step only when it is exact: Picard then takes the full ``num_steps``
        sweeps. A tensor or sequence of ``num_steps`` values gives each step its own tolerance
        (``tol[k]`` for the residual of step ``k``), e.g. proportional to a diffusion sampler's noise
        level at that step; the bound below then reads :math:`\sum_{i < k} \mathrm{tol}_i L^{k-1-i}`.
    max_iter : int, optional
        Cap on sweeps, ``>= 1``; default ``num_steps`` (always enough to finish).
    window : int, optional
        Most steps in flight (evaluated per sweep), ``>= 1``; default all of them. Bounds the memory of
        the batched call and of the rule's history.
    stop_mode : {"abs", "rel"}
        ``"abs"``: :math:`r_k = \|s(k, X_k) - X_{k+1}\|_2` over all of a state's entries; ``"rel"``:
        divided by :math:`\|s(k, X_k)\|_2 + 10^{-9}`.
    max_batch : int, optional
        Most states per call of ``step``: a sweep over more steps than this calls ``step`` on chunks of
        at most ``max_batch`` of them (in order), so that memory is bounded whatever the window.
        Results do not depend on it; one sweep still counts as one sequential round. Default: no limit.
    init : Tensor, pytree of Tensor or callable, optional
        A first guess of the trajectory, shaped like :attr:`ChainResult.xs` (``(num_steps + 1,
        *x0.shape)``, each leaf so for a pytree ``x0``), or a callable ``init(x0)`` returning one; its
        first row is ignored (the chain starts at ``x0``). The steps in flight start from their rows of
        it instead of from ``x0``, and a step entering the window starts from its row shifted by the
        change the last step in flight has made to its own row (by the estimate of the step before it,
        without ``init``). The solve is the same fixed point whatever the guess; a good one (a coarse
        run of the recurrence, a model's extrapolation) saves sweeps, a bad one costs at most the
        guarantee's ``num_steps`` sweeps. Default: every step at ``x0``.
    form : {"step", "cumulative"}
        The map the rule iterates; both have the trajectory as their fixed point and cost the same
        evaluations, and the residual that decides convergence is the per-step one above in both.
        ``"step"``: :math:`F`, for steps that contract (an RNN, a stable discrete map).
        ``"cumulative"``: :math:`G`, for steps close to the identity (an ODE integrator, a diffusion
        sampler's timesteps), where an error on :math:`F` would travel down the chain without fading;
        with Picard this is ParaDiGMS (Shih et al., 2023).

    Returns
    -------
    ChainResult

    Notes
    -----
    The host reads one number per sweep: how many steps became final (how far the window slides).

    :class:`~implicitdiff.ChainSecant` keeps per step its last ``m`` secant pairs and proposes the
    trajectory in order down the window, about seven small kernels per step in flight and sweep.

    For an update rule, the steps in flight are its batch. When the window slides, each step keeps
    its own history (every tensor of the rule's state whose first dimension is the batch follows its
    step), and a step that enters starts with none. Re-initialising the whole rule at each slide
    instead (the window slides at every sweep) would turn Anderson and Broyden into Picard, whose
    step is their first.

    References
    ----------
    Shih et al., *Parallel Sampling of Diffusion Models*, NeurIPS 2023 (ParaDiGMS: Picard with a
    sliding window). Tang et al., *Accelerating Parallel Sampling of Diffusion Models*, ICML 2024
    (ParaTAA: Anderson-type acceleration). Lu et al., *ParaSolver*, ICLR 2025 (Newton-type updates
    on the banded system). Pokle, Geng and Kolter, *Deep Equilibrium Approaches to
    Diffusion Models*, NeurIPS 2022 (DEQ-DDIM).

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import solve_chain
    >>> step = lambda k, x: 0.5 * x + 1.0   # x_{k+1} = x_k / 2 + 1
    >>> out = solve_chain(step, torch.zeros(3), 8)
    >>> out.all_converged, out.sweeps <= 8, round(float(out.xs[-1, 0]), 4)
    (True, True, 1.9922)

    The chain-aware rule, on a linear chain whose steps do not contract: each step's Jacobian is
    learnt from two secant pairs, so Newton's method on the trajectory finishes in a few sweeps
    where Picard needs one per step.

    >>> from implicitdiff import ChainSecant
    >>> A = torch.tensor([[1.0, 0.5], [-0.5, 1.0]], dtype=torch.float64)  # |A| > 1: no contraction
    >>> step = lambda k, x: x @ A.T + 1.0
    >>> x0 = torch.zeros(2, dtype=torch.float64)
    >>> solve_chain(step, x0, 40, solver=ChainSecant(m=2)).sweeps < solve_chain(step, x0, 40).sweeps
    True
    """
    if not callable(step):
        raise TypeError(f"step must be callable as step(k, x), got {type(step).__name__}")
    check_state = getattr(solver, "check_state", None)
    if callable(check_state):
        check_state(x0)  # e.g. ChainSecant's blocks must not cut a sample
    if not isinstance(x0, Tensor):
        # A pytree: packed into one vector, the step sees (and returns) the structure.
        spec = TreeSpec.of(x0, "x0")
        result = solve_chain(
            _packed_step(step, spec.named("x")),
            spec.pack_whole(x0),
            num_steps,
            solver=solver,
            tol=tol,
            max_iter=max_iter,
            window=window,
            stop_mode=stop_mode,
            form=form,
            max_batch=max_batch,
            init=_packed_init(init, x0, spec, num_steps),
        )
        return dataclasses.replace(result, xs=spec.unpack(result.xs))
    if x0.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "x0 requires grad, but solve_chain's trajectory carries no gradient (the sweeps run without "
            "grad): pass x0.detach(), or differentiate through a sequential rollout"
        )
    wdtype = working_dtype(x0.dtype)
    num_steps = check_int("num_steps", num_steps, low=0)
    rule = _check_solver(solver)
    tols = _check_tol(tol, num_steps, wdtype, x0.device)
    max_batch = None if max_batch is None else check_int("max_batch", max_batch, low=1)
    max_iter = max(num_steps, 1) if max_iter is None else check_int("max_iter", max_iter, low=1)
    window = num_steps if window is None else check_int("window", window, low=1)
    stop_mode = check_stop_mode(stop_mode)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    with torch.no_grad():
        guess = _check_init(init, x0, num_steps)
        chain = _Chain(
            step, x0, num_steps, rule, tols, window, stop_mode, form == "cumulative", max_batch, guess
        )
        return chain.run(max_iter)


def _packed_init(init: Any, x0: PyTree, spec: TreeSpec, num_steps: int) -> Any:
    """A pytree ``init`` (or what a callable returns for the pytree ``x0``) as packed rows."""
    if init is None:
        return None
    if callable(init):
        with torch.no_grad():
            init = init(x0)
    return spec.pack(spec.named("init").leaves_of(init, num_steps + 1, "init"))


def _check_init(init: Any, x0: Tensor, num_steps: int) -> Tensor | None:
    """``init`` (a tensor, or what a callable returns) as ``(num_steps + 1, n)`` rows in the working dtype."""
    if init is None:
        return None
    if callable(init) and not isinstance(init, Tensor):
        init = init(x0)
    shape = (num_steps + 1, *x0.shape)
    if not isinstance(init, Tensor):
        raise TypeError(
            f"init must be a Tensor shaped like the trajectory {shape} (or a callable returning one), got "
            f"{type(init).__name__}"
        )
    if init.shape != shape or init.dtype != x0.dtype or init.device != x0.device:
        raise ValueError(
            f"init must have the trajectory's shape {shape}, dtype {x0.dtype} and device {x0.device}, got "
            f"shape {tuple(init.shape)}, {init.dtype} on {init.device}"
        )
    guess = init.detach().reshape(num_steps + 1, -1).to(working_dtype(x0.dtype))
    if not bool(torch.isfinite(guess[1:]).all()):
        raise ValueError("init must be finite: a first guess with nan or inf would never leave the window")
    return guess


def _check_tol(tol: object, num_steps: int, wdtype: torch.dtype, device: torch.device) -> Tensor:
    """The per-step tolerances as a ``(num_steps,)`` tensor; one number is every step's."""
    if tol is None:
        return torch.full((num_steps,), _default_tol(wdtype), dtype=wdtype, device=device)
    if isinstance(tol, (Tensor, Sequence)) and not isinstance(tol, str):
        tols = torch.as_tensor(tol, dtype=wdtype).to(device)
        if tols.dim() != 1 or tols.shape[0] != num_steps:
            raise ValueError(
                f"tol must be a number or one tolerance per step (shape ({num_steps},)), got shape "
                f"{tuple(tols.shape)}"
            )
        if not bool(torch.isfinite(tols).all() and (tols >= 0).all()):
            raise ValueError(f"tol must hold finite values >= 0, got {tols.tolist()}")
        return tols
    return torch.full((num_steps,), check_real("tol", tol, low=0.0), dtype=wdtype, device=device)


class _Chain:
    """The state of one :func:`solve_chain` call and its named steps.

    Rows ``xs[: lo + 1]`` of the trajectory are final; ``z`` holds the estimates of the ``rows`` steps in
    flight, ``xs[lo + 1 : lo + rows + 1]``. A sweep evaluates them (:meth:`sweep`), finalises the prefix
    that is now exact or within the tolerance (:meth:`finalise`), lets the rule propose the next estimates
    (:meth:`propose`) and slides the window past the final prefix (:meth:`slide`).
    """

    def __init__(
        self,
        step: StepFn,
        x0: Tensor,
        num_steps: int,
        rule: UpdateRule | ChainSecant,
        tol: Tensor,
        window: int,
        stop_mode: str,
        cumulative: bool,
        max_batch: int | None = None,
        init: Tensor | None = None,
    ) -> None:
        self.evaluate = Evaluator(
            step,
            x0.shape,
            x0.dtype,
            name="step(k, x)",
            returns="the next states stacked like x",
            argument="x",
        )
        self.rule, self.tol, self.window, self.stop_mode = rule, tol, window, stop_mode
        self.cumulative, self.num_steps, self.max_batch = cumulative, num_steps, max_batch
        self.sweeps = 0
        self.shape, self.dtype, self.device = x0.shape, x0.dtype, x0.device
        wdtype = self.evaluate.wdtype
        self.xs = x0.detach().reshape(1, -1).to(wdtype).repeat(num_steps + 1, 1)
        # The first guess, kept whole: entering steps start from their rows of it, shifted.
        self.init = init
        if init is not None:
            self.xs[1:] = init[1:]
        self.residual = torch.full((num_steps,), math.inf, dtype=wdtype, device=self.device)
        self.converged = torch.zeros(num_steps, dtype=torch.bool, device=self.device)
        self.nonfinite = torch.zeros(num_steps, dtype=torch.bool, device=self.device)
        self.per_step = torch.zeros(num_steps, dtype=torch.long, device=self.device)
        self.evaluations = 0
        self.lo, self.rows = 0, min(window, num_steps)
        self.can_restart = isinstance(rule, ChainSecant) or rule.can_restart
        self.z = self.xs[1 : self.rows + 1].clone()
        self.state: Any = None  # the rule's state; None until the next sweep initialises it

    def run(self, max_iter: int) -> ChainResult:
        while self.lo < self.num_steps and self.sweeps < max_iter:
            prev, fz = self.sweep()
            res = residual_norm(fz, self.z, self.stop_mode)
            advance = self.finalise(fz, res)
            if self.lo + advance >= self.num_steps or self.sweeps >= max_iter or advance == 0:
                # Steps not final keep the estimates last evaluated; those never evaluated the last one.
                hi = self.lo + self.rows
                self.xs[self.lo + advance + 1 : hi + 1] = self.z[advance:]
                self.xs[hi + 1 :] = self._guess(hi + 1, self.num_steps + 1, self.xs[hi], hi)
                break
            self.slide(advance, self.propose(prev, fz, res, advance))
        return ChainResult(
            xs=self.xs.reshape(self.num_steps + 1, *self.shape).to(self.dtype),
            residual=self.residual,
            converged=self.converged,
            sweeps=self.sweeps,
            evaluations=self.evaluations,
            evaluations_per_step=self.per_step,
            nonfinite=self.nonfinite,
        )

    def sweep(self) -> tuple[Tensor, Tensor]:
        """Evaluate every step in flight once: their predecessors and images ``(rows, n)``."""
        lo, rows = self.lo, self.rows
        k = torch.arange(lo, lo + rows, device=self.device)
        prev = torch.cat([self.xs[lo : lo + 1], self.z[:-1]])  # each step's predecessor
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
        return prev, fz

    def finalise(self, fz: Tensor, res: Tensor) -> int:
        """Make final the leading run of steps within the tolerance, and the next one at its image.

        The first step that misses the tolerance but whose predecessors are final is exact at its image
        (that is the sequential value) if the image is finite. Returns how many steps became final: the
        one host read of a sweep.
        """
        lo, rows, z = self.lo, self.rows, self.z
        finite = torch.isfinite(fz).all(dim=1)
        within = torch.cumprod((res <= self.tol[lo : lo + rows]).to(torch.long), dim=0).sum()
        image_ok = finite.index_select(0, within.clamp(max=rows - 1).view(1)).squeeze(0) & (within < rows)
        advance = int(within + image_ok)
        at_image = torch.arange(rows, device=self.device) >= within
        self.nonfinite[lo : lo + rows] = ~finite
        self.residual[lo : lo + rows] = res
        self.finite = finite
        if advance:
            self.xs[lo + 1 : lo + 1 + advance] = torch.where(at_image[:, None], fz, z)[:advance]
            self.residual[lo : lo + advance] = torch.where(at_image, 0.0, res)[:advance]
            self.converged[lo : lo + advance] = True
        if advance < rows:
            # Evaluated against the estimate its predecessor has just left (or it is non-finite).
            self.residual[lo + advance] = math.inf
        return advance

    def propose(self, prev: Tensor, fz: Tensor, res: Tensor, advance: int) -> Tensor:
        """The rule's next estimates of the steps in flight, from their images under ``F`` or ``G``.

        ``advance >= 1`` steps have just become final; a chain-aware rule starts from their values.
        """
        if isinstance(self.rule, ChainSecant):
            if self.state is None:
                self.state = self.rule.init(self.z)
            # The change of the first step still in flight's input: its predecessor's final value
            # minus the estimate it was evaluated at (zero unless that step was finalised at its image).
            d = self.xs[self.lo + advance] - self.z[advance - 1]
            base = 1.0 if self.cumulative else 0.0
            z_next = self.rule.propose(self.state, prev, fz, self.z, advance, d, base)
        else:
            z_next = self._rule_step(prev, fz, res)
        # A rule that produced non-finite values for a step falls back to its image and forgets it.
        broken = ~torch.isfinite(z_next).all(dim=1) | ~self.finite
        if self.can_restart:
            self.state = self.rule.restart(self.state, broken)
        return torch.where(broken[:, None], fz, z_next)

    def _rule_step(self, prev: Tensor, fz: Tensor, res: Tensor) -> Tensor:
        """An update rule's step on the map ``F`` or ``G``: the steps in flight are its batch."""
        rule = cast(UpdateRule, self.rule)
        if self.cumulative:
            # The image under G: the final state plus the running sum of the increments s(k, X_k) - X_k.
            gz = torch.cumsum(fz - prev, dim=0).add_(self.xs[self.lo : self.lo + 1])
            gres = residual_norm(gz, self.z, self.stop_mode)
        else:
            gz, gres = fz, res
        if self.state is None:
            self.state = rule.init(self.z, gz)
        z_next, self.state = rule.step(self.state, self.z, gz, gres)
        return z_next

    def _guess(self, start: int, stop: int, estimate: Tensor, row: int) -> Tensor:
        """Starting estimates of the trajectory's rows ``start:stop``, not yet evaluated: with a first
        guess, their rows of it shifted by ``estimate - init[row]`` (the change row ``row`` has seen),
        else ``estimate`` itself."""
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
        last = new_lo + kept  # the row of the last step kept in flight (or the last final one)
        start = new_lo + 1 + kept
        guess = self._guess(start, start + entering, z_next[-1] if kept else self.xs[new_lo], last)
        self.z = torch.cat([z_next.index_select(0, index), guess.expand(entering, n)])
        if entering and not (self.can_restart and kept):
            self.state = None  # re-initialised at the next sweep
        elif self.state is not None:
            if entering:
                index = torch.cat([index, index.new_zeros(entering)])
            self.state = _take_rows(self.state, index, rows)
            if entering:
                fresh = torch.arange(new_rows, device=self.device) >= kept
                self.state = self.rule.restart(self.state, fresh)
        self.lo, self.rows = new_lo, new_rows
