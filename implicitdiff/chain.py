r"""Parallel in time: a recurrence solved as one fixed point over its whole trajectory.

A recurrence :math:`z_{k+1} = s(k, z_k)`, :math:`k = 0, \dots, N - 1` (the timesteps of a diffusion
sampler, an RNN over a sequence, an ODE integrator) is also the fixed point of the map that applies
every step at once,

.. math::

    Z = F(Z), \qquad F(Z)_{k+1} = s(k, Z_k), \qquad Z_0 = z_0,

over the trajectory :math:`Z = (Z_1, \dots, Z_N)`. :math:`F` is strictly lower triangular along the
step axis (step :math:`k + 1` reads only step :math:`k`), so Picard iteration :math:`Z \leftarrow F(Z)`
is exact after at most :math:`N` sweeps: each sweep makes at least one more step exact. Every sweep
evaluates all the steps of the window in one batched call of :math:`s`, so when the steps converge
in far fewer sweeps than there are steps, the chain costs fewer *sequential* rounds than the
recurrence. ParaDiGMS (Shih et al., 2023) is Picard iteration with a sliding window (on the map
:math:`G` below), ParaTAA (Tang et al., 2024) accelerates it with Anderson-type updates, and DEQ-DDIM
solved the DDIM chain with Anderson (Pokle et al., 2022).

The same fixed point is also that of the *cumulative* map, which sums the increments of the steps,

.. math::

    G(Z)_{k+1} = z_0 + \sum_{i \le k} \bigl(s(i, Z_i) - Z_i\bigr),

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

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ._chainloop import Chain
from ._chainrules import ChainRuleWarning, as_chain_rule
from ._tree import PyTree, TreeSpec
from ._validate import check_int, check_real, renamed_argument, warn_caller
from .solvers._base import check_stop_mode, working_dtype

if TYPE_CHECKING:
    import numpy as np

__all__ = ["FORMS", "ChainResult", "ChainRuleWarning", "solve_chain"]

StepFn = Callable[[Tensor, Any], Any]

#: The fixed-point maps :func:`solve_chain` can hand to the rule (same fixed point, same evaluations).
FORMS = ("cumulative", "step")


@dataclass
class ChainResult:
    r"""What :func:`solve_chain` returns.

    Step :math:`k` is the transition from ``zs[k]`` to ``zs[k + 1]``; every per-step tensor has
    ``num_steps`` entries and stays on the device of ``z0``.

    Attributes
    ----------
    zs : Tensor or pytree of Tensor
        ``(num_steps + 1, *z0.shape)`` in ``z0``'s dtype: the trajectory, ``zs[0]`` is ``z0``. A step
        that is not final (the sweep budget ran out, or a step returned non-finite values) holds
        its latest estimate. For a pytree ``z0``, the same structure with each leaf
        ``(num_steps + 1, *leaf.shape)``.
    residual : Tensor
        ``(num_steps,)``: :math:`\|s(k, z_k) - z_{k+1}\|` of the returned trajectory (divided by
        :math:`\|s(k, z_k)\| + 10^{-9}` for ``stop_mode="rel"``), as last evaluated. ``inf`` where it
        is not known: a step never evaluated, one whose predecessor changed after its evaluation, or
        one that ``error_tol`` made final at the rule's proposal.
    converged : Tensor
        ``(num_steps,)`` bool: the step is final, i.e. every earlier step is final and its own
        residual is at most ``tol`` (with ``tol=None``: it is exact at its image), or ``error_tol``
        ended the solve with the step in flight (its residual is then ``inf``). Always a prefix of the
        steps.
    sweeps : int
        Sequential rounds: batched calls of ``step``.
    total_evaluations : int
        Evaluations of ``step`` counted per step: a call on 7 steps counts 7.
    evaluations_per_step : Tensor
        ``(num_steps,)`` int: how often each step was evaluated; sums to :attr:`total_evaluations`.
    nonfinite : Tensor
        ``(num_steps,)`` bool: the last evaluation of this step returned a non-finite value. A
        non-finite step whose predecessors are final stops a solve with a tolerance.
    error_estimate : float or None
        With ``error_tol``: the last estimate of the returned trajectory's distance to the exact one
        (largest entry; ``inf`` before it could be made), at most ``error_tol`` when the error test
        ended the solve. ``None`` without ``error_tol``.
    """

    zs: PyTree
    residual: Tensor
    converged: Tensor
    sweeps: int
    total_evaluations: int
    evaluations_per_step: Tensor
    nonfinite: Tensor
    error_estimate: float | None = None

    @property
    def all_converged(self) -> bool:
        """Whether every step is final (reads one flag from the device)."""
        return bool(self.converged.all())

    @property
    def xs(self) -> PyTree:
        """Deprecated name of :attr:`zs`."""
        warn_caller("ChainResult.xs is deprecated: the trajectory is ChainResult.zs")
        return self.zs

    @property
    def evaluations(self) -> int:
        """Deprecated name of :attr:`total_evaluations` (``evaluations`` is per sample in a SolverResult)."""
        warn_caller(
            "ChainResult.evaluations is deprecated: the total is ChainResult.total_evaluations, the "
            "count of each step ChainResult.evaluations_per_step"
        )
        return self.total_evaluations

    def summary(self) -> str:
        """One line for logs: steps converged, sweeps, evaluations, max residual."""
        steps = self.converged.numel()
        worst = float(self.residual.max()) if steps else 0.0
        return (
            f"converged {int(self.converged.sum())}/{steps} steps, sweeps {self.sweeps}, "
            f"evaluations {self.total_evaluations}, max residual {worst:.3e}"
        )


@renamed_argument("x0", "z0")
def solve_chain(
    step: StepFn,
    z0: PyTree,
    num_steps: int,
    *,
    solver: Any = None,
    tol: float | Sequence[float] | Tensor | np.ndarray | Literal["auto"] | None = "auto",
    max_iter: int | None = None,
    window: int | None = None,
    stop_mode: str = "abs",
    form: str = "step",
    max_batch: int | None = None,
    init: PyTree | Callable[[PyTree], PyTree] | None = None,
    error_tol: float | None = None,
) -> ChainResult:
    r"""Run the recurrence :math:`z_{k+1} = s(k, z_k)` as one fixed point over its trajectory.

    With :math:`Z = (Z_1, \dots, Z_N)`, :math:`Z_0 = z_0` and the map :math:`F(Z)_{k+1} = s(k, Z_k)`
    (``form="step"``) or :math:`G(Z)_{k+1} = z_0 + \sum_{i \le k} (s(i, Z_i) - Z_i)`
    (``form="cumulative"``), each sweep evaluates ``step`` once, on all the steps in flight, and lets
    the update rule ``solver`` propose the next estimates from :math:`Z` and its image.
    Step :math:`k` is *final* once every earlier step is final and

    .. math:: r_k = \|s(k, Z_k) - Z_{k+1}\| \le \mathrm{tol}.

    The first step that misses the tolerance but whose predecessors are final is final too, at its
    image :math:`s(k, Z_k)`: that is exactly the sequential value, with residual 0. Each sweep thus
    finalises at least one step, whatever the rule, so the solve ends after at most ``num_steps``
    sweeps (the guarantee of ParaDiGMS, Shih et al. 2023) and never costs more sequential rounds than the
    recurrence. Final steps are not evaluated again; at most ``window`` steps are in flight, and the
    window slides past the final prefix.

    The returned trajectory satisfies :math:`z_{k+1} = s(k, z_k) + d_k` with
    :math:`\|d_k\| = r_k \le \mathrm{tol}` (``stop_mode="abs"``), so if each step is
    :math:`L`-Lipschitz its distance to the sequential rollout is at most
    :math:`\mathrm{tol}\,\sum_{i < k} L^i` at step :math:`k`.

    Parameters
    ----------
    step : callable
        ``step(k, z) -> z_next``: ``k`` is a 1-D LongTensor of step indices, ``z`` the states at those
        steps stacked on a new leading dimension, ``(len(k), *z0.shape)`` in ``z0``'s dtype (for a
        pytree ``z0``, its structure with each leaf ``(len(k), *leaf.shape)``); it returns the next
        states stacked the same way. It is called on many steps at once, must not
        modify ``z`` in place, and runs under ``torch.no_grad()``.
    z0 : Tensor or pytree of Tensor
        The initial state, any shape, floating point; or a tuple, list or dict (nested) of such tensors,
        all of one dtype and device, packed into one vector per step (the residual is then over every
        leaf at once). The rule works in ``z0``'s dtype promoted to at least float32. (``x0=``, its
        name before 0.3, still works and warns.)
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
    tol : float, array-like of float, "auto" or None
        Tolerance on the per-step residual, ``>= 0``. ``"auto"`` (the default) is the working dtype's
        default: ``1e-5`` (float32 and below), or ``1e-10`` for float64. ``0`` finalises a step only
        when it is exact: Picard then takes the full ``num_steps`` sweeps. A sequence, numpy array or
        tensor of ``num_steps`` values gives each step its own tolerance (``tol[k]`` for the residual
        of step ``k``), e.g. proportional to a diffusion sampler's noise level at that step; the bound
        below then reads :math:`\sum_{i < k} \mathrm{tol}_i L^{k-1-i}`. ``None`` is a fixed budget, as
        in :func:`~implicitdiff.fixed_point`: exactly ``max_iter`` sweeps (at most ``num_steps``) and
        no host reads. Each sweep makes one more step final, exact at its image (its predecessor was
        final), so the window slides one step per sweep; ``converged`` marks those steps (up to the
        first non-finite one) and the others hold their latest estimates.
    max_iter : int, optional
        Cap on sweeps, ``>= 1``; default ``num_steps`` (always enough to finish).
    window : int, optional
        Most steps in flight (evaluated per sweep), ``>= 1``; default all of them. Bounds the memory of
        the batched call and of the rule's history.
    stop_mode : {"abs", "rel"}
        ``"abs"``: :math:`r_k = \|s(k, Z_k) - Z_{k+1}\|_2` over all of a state's entries; ``"rel"``:
        divided by :math:`\|s(k, Z_k)\|_2 + 10^{-9}`.
    max_batch : int, optional
        Most states per call of ``step``: a sweep over more steps than this calls ``step`` on chunks of
        at most ``max_batch`` of them (in order), so that memory is bounded whatever the window.
        Results do not depend on it; one sweep still counts as one sequential round. Default: no limit.
    init : Tensor, pytree of Tensor or callable, optional
        A first guess of the trajectory, shaped like :attr:`ChainResult.zs` (``(num_steps + 1,
        *z0.shape)``, each leaf so for a pytree ``z0``), in ``z0``'s dtype and on its device, or a callable
        ``init(z0)`` returning one; its first row is ignored (the chain starts at ``z0``). The steps in
        flight start from their rows of it instead of from ``z0``, and a step entering the window starts
        from its row shifted by the change the step before it has made to its own row (without ``init``:
        at the estimate of the step before it). The solve has the same fixed point whatever the guess; a
        good one (a coarse run of the recurrence, a model's extrapolation) saves sweeps, a bad one costs
        at most the ``num_steps`` sweeps of the guarantee. Default: every step at ``z0``.
    error_tol : float, optional
        Also stop as soon as the rule's latest proposal is *estimated* within ``error_tol`` of the exact
        trajectory, in the largest entry of any step, and return that proposal (one sweep's work that
        the residual test would only see at the next sweep). With :math:`c_s` the largest entry by
        which sweep :math:`s` moves the steps in flight, to the proposal or to their images (the larger:
        a proposal that cancels a large residual is a model's guess), and :math:`\rho` the rate observed
        on the same steps, :math:`c_s / c_{s-1}` but at least half the previous rate (at most 1), as
        CVODE keeps its nonlinear solver's rate, the estimate is the a-posteriori bound of a contraction,

        .. math:: \|Z^{s+1} - Z^*\|_\infty \lesssim \frac{\rho}{1 - \rho}\, c_s,

        exact for a linear rate :math:`\rho`; the rate is observed, not known, so this is an estimate,
        not a bound (it may be low after a sweep that moved unusually little). It is tested once every
        step is in flight and has moved twice; ``rho >= 1`` never stops. The steps it makes final have
        ``residual`` ``inf`` (the proposal was not evaluated) and the estimate is
        :attr:`ChainResult.error_estimate`. One more host read per sweep. Default: off.
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
    The host reads one number per sweep: how many steps became final (how far the window slides);
    with ``tol=None``, none; with ``error_tol``, one more.

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
    >>> step = lambda k, z: 0.5 * z + 1.0   # z_{k+1} = z_k / 2 + 1
    >>> out = solve_chain(step, torch.zeros(3), 8)
    >>> out.all_converged, out.sweeps <= 8, round(float(out.zs[-1, 0]), 4)
    (True, True, 1.9922)

    The chain-aware rule, on a linear chain whose steps do not contract: each step's Jacobian is
    learnt from two secant pairs, so Newton's method on the trajectory finishes in a few sweeps
    where Picard needs one per step.

    >>> from implicitdiff import ChainSecant
    >>> A = torch.tensor([[1.0, 0.5], [-0.5, 1.0]], dtype=torch.float64)  # |A| > 1: no contraction
    >>> step = lambda k, z: z @ A.T + 1.0
    >>> z0 = torch.zeros(2, dtype=torch.float64)
    >>> solve_chain(step, z0, 40, solver=ChainSecant(m=2)).sweeps < solve_chain(step, z0, 40).sweeps
    True
    """
    if not callable(step):
        raise TypeError(f"step must be callable as step(k, z), got {type(step).__name__}")
    flat, spec = _initial_state(z0)
    wdtype = working_dtype(flat.dtype)
    num_steps = check_int("num_steps", num_steps, low=0)
    rule = as_chain_rule(solver)
    tols = _check_tol(tol, num_steps, wdtype, flat.device)
    max_batch = None if max_batch is None else check_int("max_batch", max_batch, low=1)
    max_iter = max(num_steps, 1) if max_iter is None else check_int("max_iter", max_iter, low=1)
    window = num_steps if window is None else check_int("window", window, low=1)
    error_tol = None if error_tol is None else check_real("error_tol", error_tol, low=0.0)
    stop_mode = check_stop_mode(stop_mode)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    run_step = step if spec is None else _packed_step(step, spec.named("z"))
    with torch.no_grad():
        guess = _check_init(init, z0, flat, spec, num_steps, wdtype)
        samples = None if spec is not None else (flat.shape[0] if flat.dim() else 1)
        cumulative = form == "cumulative"
        chain = Chain(
            run_step, flat, num_steps, rule, tols, window, stop_mode, cumulative, max_batch, guess, samples,
            error_tol,
        )  # fmt: skip
        chain.run(max_iter)
    zs = chain.zs.reshape(num_steps + 1, *flat.shape).to(flat.dtype)
    return ChainResult(
        zs=zs if spec is None else spec.unpack(zs),
        residual=chain.residual,
        converged=chain.converged,
        sweeps=chain.sweeps,
        total_evaluations=chain.evaluations,
        evaluations_per_step=chain.per_step,
        nonfinite=chain.nonfinite,
        error_estimate=chain.error_estimate,
    )


def _initial_state(z0: PyTree) -> tuple[Tensor, TreeSpec | None]:
    """``z0`` as one tensor (a pytree packed into one vector) and the spec that unpacks it."""
    spec = None
    if not isinstance(z0, Tensor):
        spec = TreeSpec.of(z0, "z0")
        z0 = spec.pack_whole(z0)
    if z0.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "z0 requires grad, but solve_chain's trajectory carries no gradient (the sweeps run without "
            "grad): pass z0.detach(), or differentiate through a sequential rollout"
        )
    return z0, spec


def _check_init(
    init: object, z0: PyTree, flat: Tensor, spec: TreeSpec | None, num_steps: int, wdtype: torch.dtype
) -> Tensor | None:
    """``init`` (or what a callable returns for ``z0``) as ``(num_steps + 1, n)`` rows, working dtype."""
    if init is None:
        return None
    if callable(init) and not isinstance(init, Tensor):
        init = init(z0)
    if spec is not None:
        init = spec.pack(spec.named("init").leaves_of(init, num_steps + 1, "init"))
        shape: tuple[int, ...] = (num_steps + 1, flat.shape[0])
    else:
        shape = (num_steps + 1, *flat.shape)
        if not isinstance(init, Tensor):
            raise TypeError(
                f"init must be a Tensor shaped like the trajectory {shape} (or a callable returning one), "
                f"got {type(init).__name__}"
            )
    if init.shape != shape or init.dtype != flat.dtype or init.device != flat.device:
        raise ValueError(
            f"init must have the trajectory's shape {shape}, dtype {flat.dtype} and device {flat.device}, "
            f"got shape {tuple(init.shape)}, {init.dtype} on {init.device}"
        )
    guess = init.detach().reshape(num_steps + 1, -1).to(wdtype)
    if not bool(torch.isfinite(guess[1:]).all()):
        raise ValueError("init must be finite: a first guess with nan or inf would never leave the window")
    return guess


def _packed_step(step: StepFn, spec: TreeSpec) -> StepFn:
    """``step`` on packed rows ``(rows, n)``: it sees, and returns, the structure of ``z0``."""

    def packed(k: Tensor, z: Tensor) -> Tensor:
        out = step(k, spec.unpack(z))
        return spec.pack(spec.leaves_of(out, z.shape[0], "step(k, z)"))

    return packed


def _default_tol(wdtype: torch.dtype) -> float:
    # About 100 ulps at unit scale: 1e-5 for float32 (and bf16/fp16 states, which run in float32).
    return 1e-10 if wdtype == torch.float64 else 1e-5


def _check_tol(tol: object, num_steps: int, wdtype: torch.dtype, device: torch.device) -> Tensor | None:
    """The per-step tolerances as a ``(num_steps,)`` tensor (``None``: a fixed budget)."""
    if tol is None:
        return None
    if isinstance(tol, str) and tol == "auto":
        tol = _default_tol(wdtype)
    if isinstance(tol, numbers.Real):
        return torch.full((num_steps,), check_real("tol", tol, low=0.0), dtype=wdtype, device=device)
    allowed = "a number >= 0, one per step (a sequence, numpy array or tensor), 'auto' or None"
    if isinstance(tol, str):
        raise TypeError(f"tol must be {allowed}, got str {tol!r}")
    try:
        tols = torch.as_tensor(tol, dtype=wdtype).to(device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"tol must be {allowed}, got {type(tol).__name__}") from None
    if tols.dim() == 0:
        return _check_tol(float(tols), num_steps, wdtype, device)
    if tols.dim() != 1 or tols.shape[0] != num_steps:
        raise ValueError(
            f"tol must be a number or one tolerance per step (shape ({num_steps},)), got shape "
            f"{tuple(tols.shape)}"
        )
    bad = ~(torch.isfinite(tols) & (tols >= 0))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"tol must hold finite values >= 0: tol[{first}] is {float(tols[first])} "
            f"({int(bad.sum())} of {num_steps} values are not)"
        )
    return tols
