r"""One driver for every solver: solvers are update rules, :func:`iterate` owns the loop.

An update rule (a subclass of :class:`UpdateRule`) says how to start and how to take a step, on
tensors only:

* ``init(z, fz) -> state``: the state after the first evaluation :math:`g(z_0)`;
* ``step(state, z, fz, residual) -> (z_next, state)``: the next point to evaluate;

and, where the rule needs them, the optional parts that :class:`UpdateRule` declares with defaults:

* ``accept(state, residual, trial_residual) -> (accepted, state)``: a per-sample verdict on the point
  ``step`` proposed, once it has been evaluated (line searches, trust regions). A rejected sample stays
  where it was and ``step`` is asked again;
* ``restart(state, mask) -> state``: forget the history of the masked samples; the driver calls it when a
  sample's residual grows past ``restart_factor`` times the best it has seen, after moving that sample
  back to its best iterate;
* ``restart_factor`` and ``needs_residual``, plain class attributes.

The driver evaluates ``g``, computes per-sample residuals, freezes converged samples with
``torch.where``, keeps per sample the best iterate and its image, detects non-finite values, and counts
evaluations per sample, all on the device. The host reads one flag, "is any sample still iterating?",
every ``check_every`` iterations; with ``tol=None`` (a fixed budget) it reads nothing at all.

**What a rule's state may hold.** The state is the rule's own object: a tensor, or a tuple, list, dict
or dataclass of tensors and host numbers (a step counter); the driver only hands it back. Three rules
apply to it. Tensors whose first dimension is the batch are per sample: :func:`~implicitdiff.solve_chain`
selects their rows when its window slides, and keeps anything else as it is. A step reads no value from
the device (no ``.item()``, no boolean indexing), so that the loop never waits for it. And host numbers
may change from step to step, because a solve runs eagerly, outside ``torch.compile``; only a captured
fixed-budget solve (:class:`~implicitdiff.solvers.Captured`) fixes them, by replaying the steps it
recorded.

On a GPU every operation of the loop is a kernel launch; the bookkeeping of an iteration is five of them
(:class:`Progress`) and the residual one or two, beside the rule's own step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from .._compile import call_watching_input, outside_compile, write_into
from ._base import SolverResult, check_solve_args, residual_norm, working_dtype

__all__ = ["Evaluator", "Progress", "UpdateRule", "as_update_rule", "iterate"]


class Evaluator:
    """A map on flat ``(rows, n)`` states in the working dtype, with the checks every solve needs.

    The map sees states of their own shape: ``fn(*leading, x)`` with ``x`` of shape ``(rows, *item)``
    in ``dtype``; what it returns must have the same shape. Counts batched evaluations in :attr:`nfe` (a
    host integer: the host decides how many calls happen). A map that writes into its input is refused:
    it would make the residual compare ``g(z)`` with a ``z`` that ``g`` itself changed, and report a false
    convergence. The driver evaluates ``g(z)`` on ``(B, ...)`` states; :func:`~implicitdiff.solve_chain`
    evaluates ``step(k, z)`` on the steps in flight.
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        item: torch.Size,
        dtype: torch.dtype,
        *,
        name: str = "the fixed-point map",
        returns: str = "a tensor shaped like z0",
        argument: str = "z",
    ) -> None:
        self._fn = fn
        self.item = item
        self.dtype = dtype
        self.wdtype = working_dtype(dtype)
        self.nfe = 0
        self._name, self._returns, self._argument = name, returns, argument

    @classmethod
    def of_map(cls, g: Callable[[Tensor], Tensor], z0: Tensor) -> Evaluator:
        """The evaluator of a batched fixed-point map ``g`` started from ``z0`` ``(B, ...)``."""
        if not isinstance(z0, Tensor):
            raise TypeError(f"z0 must be a Tensor, got {type(z0).__name__}")
        if z0.dim() < 1 or z0.shape[0] == 0:
            raise ValueError(f"z0 must have shape (B, ...) with B >= 1, got {tuple(z0.shape)}")
        return cls(g, z0.shape[1:], z0.dtype)

    def flat(self, z: Tensor) -> Tensor:
        """States of the original shape as a flat ``(rows, n)`` tensor in the working dtype."""
        return z.detach().reshape(z.shape[0], -1).to(self.wdtype)

    def unflat(self, z: Tensor) -> Tensor:
        """Flat working states back in their own shape and dtype."""
        return z.reshape(z.shape[0], *self.item).to(self.dtype)

    def __call__(self, z: Tensor, *leading: Any) -> Tensor:
        z_in = self.unflat(z)
        out, modified = call_watching_input(self._fn, z_in, *leading)
        self.nfe += 1
        if not isinstance(out, Tensor) or out.shape != z_in.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{self._name} must return {self._returns} {tuple(z_in.shape)}, got {got}")
        if modified:
            raise ValueError(
                f"{self._name} modified its input {self._argument} in place (e.g. {self._argument}.mul_(...) "
                f"or nn.ReLU(inplace=True) applied to {self._argument}); the residual cannot be measured "
                "then. Compute on a copy or out of place."
            )
        # Detached: under forward-mode AD (torch.func.jvp, forward_ad) the solve's iterates carry no
        # tangent, as under no_grad they carry no graph; an estimator attaches the solution afterwards.
        return out.detach().reshape(z.shape[0], -1).to(self.wdtype)


def residual(fz: Tensor, z: Tensor, stop_mode: str) -> Tensor:
    r"""Per-sample residual of flat states: :func:`residual_norm`, but NaN where it is not finite.

    ``abs`` is one fused kernel (``cdist`` of each row with its image). Coding a non-finite residual as
    NaN (not ``inf``) lets one comparison both test the tolerance and stop a sample that went non-finite:
    NaN compares false with everything.
    """
    if stop_mode == "abs":
        res = torch.cdist(fz.unsqueeze(1), z.unsqueeze(1)).view(-1)
    else:
        res = residual_norm(fz, z, stop_mode)
    return torch.nan_to_num(res, nan=math.nan, posinf=math.nan)


class Progress:
    """Per-sample bookkeeping of a solve, on the device: best iterate, active samples, what each step saw.

    Used by :func:`iterate` and by adapters of external solvers, which call :meth:`record` for every
    evaluation and read :meth:`any_active` on the host when they must. On a GPU each operation is a kernel
    launch, which costs about as much as a small map, so :meth:`record` is five of them: one row of the
    step log (the residual of each sample still iterating), and the best residual, iterate and image. The
    trace, the per-sample evaluation counts and the non-finite flags are read off the log at the end.
    Memory grows with the evaluations done (one ``(B,)`` row each), never with ``max_iter``.
    """

    #: Rows of the step log; a full log is reduced into the trace and the counts, and reused.
    CHUNK = 64

    def __init__(self, z0: Tensor, tol: float | None) -> None:
        batch = z0.shape[0]
        self.tol = tol
        # A sample that never sees a finite value keeps its start (and its start as "image").
        self.best_z, self.best_fz = z0, z0
        self.best_res = torch.full((batch,), math.inf, dtype=z0.dtype, device=z0.device)
        self.active = torch.ones(batch, dtype=torch.bool, device=z0.device)
        # Per evaluation, each sample's residual if it was still iterating, else -1 (NaN: non-finite).
        self._log = z0.new_empty(self.CHUNK, batch)
        self._frozen = torch.full((), -1.0, dtype=z0.dtype, device=z0.device)
        self._trace: list[Tensor] = []
        self._evaluations = torch.zeros(batch, dtype=torch.long, device=z0.device)
        self._retired = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        self.count = 0

    def _row(self) -> Tensor:
        index = self.count % self.CHUNK
        if index == 0 and self.count:
            self._flush(self.CHUNK)
        self.count += 1
        return self._log[index]

    def _flush(self, rows: int) -> None:
        """Reduce the first ``rows`` rows of the log into the trace and the per-sample counts."""
        log = self._log[:rows]
        self._trace.append(log.nan_to_num(nan=math.inf).amax(dim=1).clamp(min=0.0))
        self._evaluations += (~(log < 0)).sum(dim=0)

    def record(self, z: Tensor, fz: Tensor, res: Tensor) -> None:
        """Take the evaluation ``fz = g(z)`` with residual ``res`` (NaN if not finite) into account.

        No host reads. A sample stops iterating once its residual is within ``tol`` or not finite; a
        frozen sample's residual does not change (neither does its iterate), so it never counts as better.
        """
        row = self._row()
        write_into(row, torch.where, self.active, res, self._frozen)
        better = res < self.best_res  # NaN never improves
        self.best_res = torch.where(better, res, self.best_res)
        self.best_z = torch.where(better[:, None], z, self.best_z)
        self.best_fz = torch.where(better[:, None], fz, self.best_fz)
        # Without a tolerance (a rule that judges trials) only a non-finite value stops a sample.
        self.active = row > self.tol if self.tol is not None else row >= 0

    def any_active(self) -> bool:
        """Whether a sample is still iterating: the one host read of a tolerance-mode solve."""
        return bool(self.active.any())

    def retire(self, mask: Tensor) -> None:
        """Stop the samples in ``mask`` where they are, neither converged nor failed (an external
        solver gave up on them)."""
        mask = mask & self.active  # a sample that already stopped keeps its reason
        self.active = self.active & ~mask
        self._retired = self._retired | mask

    @property
    def converged(self) -> Tensor:
        """``(B,)`` bool: the best residual is within the tolerance (all ``False`` without one)."""
        return self.best_res <= self.tol if self.tol is not None else torch.zeros_like(self.active)

    @property
    def nonfinite(self) -> Tensor:
        """``(B,)`` bool: stopped by a non-finite value (a sample stops early only by converging, by
        going non-finite, or by being retired)."""
        return ~self.active & ~self.converged & ~self._retired

    def result(self, unflat: Callable[[Tensor], Tensor], nfe: int) -> SolverResult:
        """The :class:`SolverResult` of the best iterates."""
        if self.count:
            self._flush((self.count - 1) % self.CHUNK + 1)
        return SolverResult(
            z=unflat(self.best_z),
            residual=self.best_res,
            converged=self.converged,
            nfe=nfe,
            trace=torch.cat(self._trace) if self._trace else self.best_res.new_zeros(0),
            nonfinite=self.nonfinite,
            fz=unflat(self.best_fz),
            evaluations=self._evaluations,
        )


class UpdateRule:
    """Base class of solvers written as update rules; calling one runs :func:`iterate`.

    Subclasses implement :meth:`step`, and :meth:`init` when they keep a history. The optional parts
    are declared here with defaults that do nothing, so the driver reads them directly:

    * :meth:`accept`, for rules that judge trial steps; a subclass that defines it has
      :attr:`judges_trials` set to ``True`` when the class is created;
    * :meth:`restart`, for rules with a history to forget; defining it sets :attr:`can_restart`;
    * :attr:`restart_factor` (``> 1``): a sample whose residual grows past this multiple of its best
      is sent back to its best iterate and restarted (``inf``, the default, never);
    * :attr:`needs_residual`: :meth:`step` reads the residual even with a fixed budget;
    * :attr:`per_sample_history`: the rule's history fits each row of the batch on that row's own past,
      as if the rows were independent samples (Anderson, Broyden). The driver does not read it;
      :func:`~implicitdiff.solve_chain`, whose rows are the steps of a chain and depend on each other,
      warns when given such a rule.
    """

    restart_factor: float = math.inf
    needs_residual: bool = False
    per_sample_history: ClassVar[bool] = False
    #: Whether the class defines :meth:`accept` (set when a subclass is created).
    judges_trials: ClassVar[bool] = False
    #: Whether the class defines :meth:`restart` (set when a subclass is created).
    can_restart: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.judges_trials = cls.accept is not UpdateRule.accept
        cls.can_restart = cls.restart is not UpdateRule.restart

    def init(self, z: Tensor, fz: Tensor) -> Any:
        """The rule's state after the first evaluation ``fz = g(z)``; ``None`` by default."""
        return None

    def step(self, state: Any, z: Tensor, fz: Tensor, residual: Tensor | None) -> tuple[Tensor, Any]:
        """The next point to evaluate, from the current ``z`` and ``fz = g(z)``, flat ``(B, n)``."""
        raise NotImplementedError

    def accept(self, state: Any, residual: Tensor, trial_residual: Tensor) -> tuple[Tensor, Any]:
        """Per sample, whether to keep the trial point ``step`` proposed; every one by default."""
        return torch.ones_like(residual, dtype=torch.bool), state

    def restart(self, state: Any, mask: Tensor) -> Any:
        """Forget the history of the samples in ``mask`` ``(B,)``; the default keeps the state."""
        return state

    def __call__(
        self,
        g: Callable[[Tensor], Tensor],
        z0: Tensor,
        *,
        max_iter: int,
        tol: float | None,
        stop_mode: str = "abs",
        check_every: int | None = None,
    ) -> SolverResult:
        """Solve ``z = g(z)`` with this rule; see :func:`iterate`."""
        return iterate(self, g, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, check_every=check_every)


@runtime_checkable
class _RuleLike(Protocol):
    def init(self, z: Tensor, fz: Tensor) -> Any: ...

    def step(self, state: Any, z: Tensor, fz: Tensor, residual: Tensor | None) -> tuple[Tensor, Any]: ...


class _Wrapped(UpdateRule):
    """An object with just ``init`` and ``step`` (duck-typed) as an :class:`UpdateRule`."""

    def __init__(self, rule: _RuleLike) -> None:
        self.rule = rule

    def init(self, z: Tensor, fz: Tensor) -> Any:
        return self.rule.init(z, fz)

    def step(self, state: Any, z: Tensor, fz: Tensor, residual: Tensor | None) -> tuple[Tensor, Any]:
        return self.rule.step(state, z, fz, residual)


def as_update_rule(rule: object, name: str = "rule") -> UpdateRule:
    """``rule`` itself if it is an :class:`UpdateRule`; an object with ``init`` and ``step`` wrapped as one.

    Only subclasses of :class:`UpdateRule` can have the optional parts (``accept``, ``restart``,
    ``restart_factor``): a plain object is taken as having none.
    """
    if isinstance(rule, UpdateRule):
        return rule
    if isinstance(rule, _RuleLike):
        return _Wrapped(rule)
    raise TypeError(
        f"{name} must be an update rule with init(z, fz) and step(state, z, fz, residual) (Picard(), "
        f"Anderson(), Broyden() or a subclass of implicitdiff.solvers.UpdateRule), got {rule!r}"
    )


def _select(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Per sample ``a`` where ``mask`` ``(B,)`` else ``b``; ``a`` and ``b`` are ``(B, ...)``."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def iterate(
    rule: UpdateRule | Any,
    g: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    max_iter: int,
    tol: float | None,
    stop_mode: str = "abs",
    check_every: int | None = None,
) -> SolverResult:
    r"""Solve :math:`z = g(z)` for a batch with the update rule ``rule``.

    Parameters
    ----------
    rule : UpdateRule
        The solver's maths (see the module docstring); an object with only ``init`` and ``step`` is
        taken as a rule without the optional parts.
    g : callable
        The batched map, ``(B, ...) -> (B, ...)``; samples are independent along dim 0.
    z0 : Tensor
        Starting point ``(B, ...)``, floating point. The rule works in ``z0``'s dtype promoted to at
        least float32; results come back in ``z0``'s dtype.
    max_iter : int
        Cap on evaluations of ``g`` (rejected trial steps count).
    tol : float or None
        Tolerance on the per-sample residual. ``None`` is a fixed budget: exactly ``max_iter``
        evaluations, no per-step checks, no best-iterate bookkeeping, no restarts and no host reads;
        the result is the last iterate, with the residual of the last evaluation, and
        ``nonfinite`` marks the samples whose last residual is not finite. (A rule with ``accept``
        keeps its books in both modes: it needs them to judge its trial steps.)
    stop_mode : {"abs", "rel"}
        ``"abs"``: :math:`\|g(z) - z\|_2` per sample; ``"rel"``: divided by :math:`\|g(z)\|_2 + 10^{-9}`.
    check_every : int, optional
        In tolerance mode, the host reads "is any sample still iterating?" after the first evaluation
        and then every ``check_every`` evaluations (default :data:`DEFAULT_CHECK_EVERY`). Results do not
        depend on it: a sample stops moving the moment it converges (its extra evaluations are
        reported by :attr:`SolverResult.frozen_evaluations`).

    Returns
    -------
    SolverResult
        Its tensors carry no autograd history: the solve runs under ``torch.no_grad()`` (gradients
        through a solution come from an estimator, never from the solver's iterations).
    """
    max_iter, tol, stop_mode, check_every = check_solve_args(max_iter, tol, stop_mode, check_every)
    with torch.no_grad():
        return _run(as_update_rule(rule), g, z0, max_iter, tol, stop_mode, check_every)


@outside_compile
def _run(
    rule: UpdateRule,
    g: Callable[[Tensor], Tensor],
    z0: Tensor,
    max_iter: int,
    tol: float | None,
    stop_mode: str,
    check_every: int,
) -> SolverResult:
    """:func:`iterate` on checked arguments."""
    evaluate = Evaluator.of_map(g, z0)
    judges = rule.judges_trials
    # A fixed budget keeps no books (no best iterate, so no restarts either) unless the rule asks.
    track = tol is not None or judges
    restart_factor = rule.restart_factor if track else math.inf
    need_res = track or rule.needs_residual
    # A state stored in less than float32 is iterated on its own grid, so that the residual the solve
    # reports is the one of the z it returns (rounding a float32 iterate afterwards would change it).
    rounds = evaluate.dtype != evaluate.wdtype

    z = evaluate.flat(z0)
    fz = evaluate(z)
    res = residual(fz, z, stop_mode) if need_res else None
    progress = Progress(z, tol) if track else None
    if progress is not None:
        assert res is not None
        progress.record(z, fz, res)
    state = rule.init(z, fz)
    while evaluate.nfe < max_iter:
        if tol is not None and progress is not None and (evaluate.nfe - 1) % check_every == 0:
            if not progress.any_active():
                break
        z_next, state = rule.step(state, z, fz, res)
        if progress is not None and tol is not None:
            z_next = _select(progress.active, z_next, z)  # frozen samples do not move
        if rounds:
            z_next = z_next.to(evaluate.dtype).to(evaluate.wdtype)
        fz_next = evaluate(z_next)
        res_next = residual(fz_next, z_next, stop_mode) if need_res else None
        if judges:
            assert res is not None and res_next is not None
            accepted, state = rule.accept(state, res, res_next)
            z, fz = _select(accepted, z_next, z), _select(accepted, fz_next, fz)
            res = torch.where(accepted, res_next, res)
        else:
            z, fz, res = z_next, fz_next, res_next
        if progress is not None:
            assert res is not None
            progress.record(z, fz, res)
            if restart_factor < math.inf:
                # Back to the best iterate, without its history, once the residual has blown up.
                blown = res > progress.best_res * restart_factor
                z, fz = _select(blown, progress.best_z, z), _select(blown, progress.best_fz, fz)
                if judges or rule.needs_residual:  # the rule reads the residual of where it stands
                    res = torch.where(blown, progress.best_res, res)
                state = rule.restart(state, blown)
    if progress is not None:
        return progress.result(evaluate.unflat, evaluate.nfe)
    # Once per solve: the residual of the returned iterate by the public rule (inf where not finite).
    res = residual_norm(fz, z, stop_mode)
    return SolverResult(
        z=evaluate.unflat(z),
        residual=res,
        converged=torch.zeros_like(res, dtype=torch.bool),
        nfe=evaluate.nfe,
        nonfinite=~torch.isfinite(res),
        fz=evaluate.unflat(fz),
    )
