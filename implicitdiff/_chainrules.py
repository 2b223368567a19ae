"""The rule protocol of ``solve_chain``: what a sweep shows a rule, and update rules adapted to it.

The chain's loop speaks to every rule in one way: :meth:`ChainRule.start` makes the rule's state for
the steps in flight, :meth:`ChainRule.propose` returns their next estimates from a :class:`Sweep`, and
:meth:`ChainRule.restart` forgets the steps in a mask. A rule declares what it is, in class attributes:

* ``reads_chain``: the rule is written for chains and reads their structure (the inputs of the steps,
  the steps made final in the sweep, the change passed down the window), as
  :class:`~implicitdiff.ChainSecant` does. Any other rule is an update rule of :mod:`implicitdiff.solvers`
  and is run on the steps in flight as its batch (:class:`StepsAsBatch`);
* an update rule's ``per_sample_history`` (Anderson, Broyden): its history fits each row on that row's
  own past, as if the rows were independent samples. The steps of a chain are not, so such a rule is
  run with a :class:`ChainRuleWarning`.

A rule refuses a state it cannot model in :meth:`ChainRule.start`, from what the sweep shows it (e.g.
:attr:`Sweep.samples`: :class:`~implicitdiff.ChainSecant` refuses ``blocks`` that would cut a sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from ._validate import refuse_class, warn_caller
from .solvers import Picard
from .solvers._base import residual_norm
from .solvers._driver import UpdateRule, as_update_rule

__all__ = ["ChainRule", "ChainRuleWarning", "StepsAsBatch", "Sweep", "as_chain_rule"]


class ChainRuleWarning(UserWarning):
    """A rule that treats the steps of a chain as independent samples (Anderson, Broyden).

    Their history fits each step on its own past, blind to the step before it, so on chains they
    often take more sweeps than Picard: on the 252 test chains of ``benchmarks/chain.py``
    ``Anderson(m=3)`` took more on 78 (up to 38 more) and ``Broyden(memory=4)`` on 59, where
    :class:`~implicitdiff.ChainSecant`, which couples the steps, took more on none.
    Silence it with ``warnings.simplefilter("ignore", ChainRuleWarning)`` where that is measured.
    """


@dataclass
class Sweep:
    r"""What one sweep of :func:`~implicitdiff.solve_chain` shows a rule: the steps in flight, in order.

    Every ``(rows, n)`` tensor has one row per step in flight, as flat states in the working dtype.

    Attributes
    ----------
    inputs : Tensor
        :math:`X_k`, the input each step was evaluated at (its predecessor's estimate, or its final value).
    images : Tensor
        :math:`s(k, X_k)`, the step's image.
    estimates : Tensor
        :math:`X_{k+1}`, the estimates of the steps' outputs that were evaluated against the images.
    residual : Tensor
        ``(rows,)``: :math:`\|s(k, X_k) - X_{k+1}\|` (the chain's ``stop_mode``).
    final : int
        How many rows at the front the sweep made final (at least one); the rule's proposal for them is
        dropped.
    change : Tensor
        ``(n,)``: the change of the first row still in flight's input, its predecessor's final value
        minus the estimate it was evaluated at.
    origin : Tensor
        ``(1, n)``: the final state before the first row, the constant term of the cumulative map.
    cumulative : bool
        Whether the rule iterates the cumulative map :math:`G` (``form="cumulative"``) or the step map
        :math:`F`.
    stop_mode : str
        ``"abs"`` or ``"rel"``, for a rule that measures residuals of its own.
    samples : int or None
        The leading dimension of ``z0`` (the samples of a batch that the steps move together; ``1`` for a
        0-d ``z0``), or ``None`` for a pytree ``z0``, whose flat state holds its leaves one after another.
    steps : Tensor or None
        ``(rows,)`` long: the index :math:`k` of each step in flight (what ``step(k, z)`` was called
        with), for a rule with a model of each step (``None`` where the caller does not say).
    """

    inputs: Tensor
    images: Tensor
    estimates: Tensor
    residual: Tensor
    final: int
    change: Tensor
    origin: Tensor
    cumulative: bool
    stop_mode: str
    samples: int | None = None
    steps: Tensor | None = None


@runtime_checkable
class ChainRule(Protocol):
    """How the chain's loop speaks to a rule (see the module docstring)."""

    #: The rule reads the chain's structure (``True`` for rules written for chains).
    reads_chain: bool
    #: The rule can forget the history of some steps (:meth:`restart`).
    can_restart: bool

    def start(self, sweep: Sweep) -> Any:
        """The rule's state for the steps in flight, before its first proposal."""
        ...

    def propose(self, state: Any, sweep: Sweep) -> tuple[Tensor, Any]:
        """The next estimates ``(rows, n)`` of the steps in flight, and the rule's new state."""
        ...

    def restart(self, state: Any, mask: Tensor) -> Any:
        """The state with the history of the steps in ``mask`` ``(rows,)`` forgotten."""
        ...


class StepsAsBatch:
    """An update rule of :mod:`implicitdiff.solvers` on a chain: the steps in flight are its batch.

    It iterates :math:`F` (the images) or :math:`G` (the final state before the window plus the running
    sum of the increments :math:`s(k, X_k) - X_k`), and its per-sample state follows the steps when the
    window slides.
    """

    reads_chain = False

    def __init__(self, rule: UpdateRule) -> None:
        self.rule = rule
        self.can_restart = rule.can_restart

    def __repr__(self) -> str:
        return repr(self.rule)

    def _image(self, sweep: Sweep) -> tuple[Tensor, Tensor]:
        if not sweep.cumulative:
            return sweep.images, sweep.residual
        gz = (sweep.images - sweep.inputs).cumsum(dim=0).add_(sweep.origin)
        return gz, residual_norm(gz, sweep.estimates, sweep.stop_mode)

    def start(self, sweep: Sweep) -> Any:
        return self.rule.init(sweep.estimates, self._image(sweep)[0])

    def propose(self, state: Any, sweep: Sweep) -> tuple[Tensor, Any]:
        gz, residual = self._image(sweep)
        return self.rule.step(state, sweep.estimates, gz, residual)

    def restart(self, state: Any, mask: Tensor) -> Any:
        return self.rule.restart(state, mask)


def as_chain_rule(solver: object) -> ChainRule:
    """``solver`` itself if it reads the chain, an update rule run on the steps as a batch otherwise.

    ``None`` is Picard. Update rules that judge trial steps are refused (their judge compares residuals
    that the chain's moving predecessors make stale); those whose history treats the rows as independent
    samples warn (:class:`ChainRuleWarning`).
    """
    refuse_class("solver", solver)
    if isinstance(solver, ChainRule) and solver.reads_chain:
        return solver
    rule = Picard() if solver is None else as_update_rule(solver, "solver")
    if rule.judges_trials:
        raise TypeError(
            f"solver {solver!r} has accept(): trial steps are judged against a residual that the chain's "
            "moving predecessors make stale, so rules with accept are not supported by solve_chain"
        )
    if rule.per_sample_history:
        warn_caller(
            f"{rule!r} treats the steps of a chain as independent samples and often takes more sweeps "
            "than Picard on chains; ChainSecant couples the steps (see ChainRuleWarning)",
            ChainRuleWarning,
        )
    return StepsAsBatch(rule)
