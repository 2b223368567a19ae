r"""The budgeted sampler: a budget of transformer-block evaluations per sample, spent across timesteps.

Compute is counted as the FPDM paper counts it (Bai & Melas-Kyriazi, CVPR 2024): in transformer-block
evaluations per sample. A timestep of FPDM costs its pre and post blocks plus one evaluation of the
implicit block per fixed-point iteration; a timestep of DiT costs its depth. :func:`sample` spends a
budget ``B`` over ``S`` timesteps, :math:`\sum_i (\text{pre} + \text{post} + n_i) \le B`, with the paper's
timestep smoothing (more timesteps, fewer iterations each) and solution reuse (each solve warm-started from
the previous timestep's fixed point), allocation schedules (:func:`allocate`) and any solver of
:mod:`implicitdiff`. Fixed schedules read nothing from the device per timestep; residuals are read once,
at the end of the run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from fpdm.diffusion import METHODS, GaussianDiffusion, Generators, draw_noise, to_device
from fpdm.models import ModelState
from fpdm.reverse import RunSummary, model_eps, sampling_run
from implicitdiff import Picard, Solver
from implicitdiff.solvers import residual_norm

__all__ = [
    "DEFAULT_ITERS_PER_STEP",
    "METHODS",
    "SCHEDULES",
    "SampleResult",
    "allocate",
    "block_cost",
    "pick_steps",
    "plan_timesteps",
    "sample",
    "sample_generators",
    "sample_labels",
]

SCHEDULES = ("constant", "increasing", "decreasing", "tolerance")

#: Fixed-point iterations per timestep that ``steps=None`` aims at (timestep smoothing): with reuse, a few
#: iterations per timestep on many timesteps beat many iterations on few.
DEFAULT_ITERS_PER_STEP = 2


@dataclasses.dataclass
class SampleResult(RunSummary):
    """Samples and what they cost.

    Attributes
    ----------
    images : Tensor
        ``(B, C, H, W)`` samples, in the data's scale (``[-1, 1]`` for images).
    timesteps : list[int]
        The diffusion timesteps visited, descending.
    allocated : list[int]
        Per timestep, the cap in block evaluations per sample: explicit blocks plus the iterations the
        schedule gave it (for ``"tolerance"``, plus the savings carried over to it).
    spent : list[int]
        Per timestep, block evaluations per sample actually spent (the model's own count).
    iterations : list[int]
        Per timestep, evaluations of the implicit block (``0`` for DiT).
    residuals : list[float]
        Per timestep, the largest relative residual over the batch at the solver's best iterate (``nan``
        for DiT).
    first_residuals : list[float]
        Per timestep, the largest relative residual of the starting point (the first iteration's), which
        solution reuse lowers (``nan`` for DiT).
    budget : int
        The budget in block evaluations per sample.
    wall_s : float
        Wall-clock of the whole sampling loop, seconds.
    batch_factor : int
        ``2`` with classifier-free guidance (the model runs on the doubled batch), else ``1``.
    options : dict
        The options of the run (method, schedule, solver, reuse, guidance, tol, steps), for reports.
    """

    images: Tensor
    timesteps: list[int]
    allocated: list[int]
    spent: list[int]
    iterations: list[int]
    residuals: list[float]
    first_residuals: list[float]
    budget: int
    wall_s: float
    batch_factor: int
    options: dict[str, Any]

    SUMMARY: ClassVar[tuple[str, ...]] = (
        "budget", "spent_total", "unspent", "guided_evals", "batch_factor", "wall_s", "num_images",
        "timesteps", "allocated", "spent", "iterations", "residuals", "first_residuals",
    )  # fmt: skip

    @property
    def spent_total(self) -> int:
        """Block evaluations per sample over the whole run; never more than :attr:`budget`."""
        return sum(self.spent)

    @property
    def unspent(self) -> int:
        """``budget - spent_total``: what the run did not use."""
        return self.budget - self.spent_total

    @property
    def guided_evals(self) -> int:
        """Block evaluations per sample counting the unconditional half of guidance: ``spent_total * 2``."""
        return self.spent_total * self.batch_factor


def sample_generators(seed: int, start: int, stop: int) -> list[torch.Generator]:
    """One CPU generator for each sample index in ``range(start, stop)``, seeded by ``(seed, index)`` alone.

    The 64-bit seed of sample ``i`` comes from numpy's ``SeedSequence((seed, i))``, which mixes the pair so
    that neighbouring indices and seeds give unrelated streams. Handed to :func:`sample`, each sample's
    initial noise and per-step noise come from its own generator: the images depend on ``(seed, index)``
    only, not on the batch size nor on how the indices are spread over processes.
    """
    if start < 0 or stop < start:
        raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    generators = []
    for index in range(start, stop):
        low, high = np.random.SeedSequence((seed, index)).generate_state(2, np.uint32).tolist()
        generators.append(torch.Generator().manual_seed(low | (high << 32)))
    return generators


def sample_labels(start: int, stop: int, num_classes: int, cycle: Sequence[int] | None = None) -> Tensor:
    """The class labels of the sample indices ``range(start, stop)``: index ``i`` gets
    ``cycle[i % len(cycle)]`` (default: every class in turn, ``i % num_classes``), so a run of ``N`` samples
    is balanced over the classes and a label never needs the others to be built."""
    index = torch.arange(start, stop)
    if not cycle:
        return index % num_classes
    return torch.as_tensor(list(cycle), dtype=torch.long)[index % len(cycle)]


def block_cost(model: nn.Module) -> tuple[int, bool]:
    """Block evaluations per sample of one timestep outside the fixed-point solve, and whether it has one.

    FPDM (anything with ``pre_depth`` and ``post_depth``): ``(pre + post, True)``. DiT (anything with
    ``depth``): ``(depth, False)``.
    """
    if hasattr(model, "pre_depth") and hasattr(model, "post_depth"):
        return int(model.pre_depth) + int(model.post_depth), True
    if hasattr(model, "depth"):
        return int(model.depth), False
    raise TypeError(
        f"cannot count the blocks of {type(model).__name__}: "
        "expected FPDM (pre_depth, post_depth) or DiT (depth)"
    )


def pick_steps(
    budget: int, explicit: int, implicit: bool, iters_per_step: int = DEFAULT_ITERS_PER_STEP
) -> int:
    """Timesteps for a budget (timestep smoothing): ``budget // (explicit + iters_per_step)``, ``explicit``
    being the blocks outside the solve (FPDM's pre + post), or ``budget // depth`` for DiT; at least 1.

    Raises
    ------
    ValueError
        If the budget cannot pay for a single timestep.
    """
    per_step = explicit + (iters_per_step if implicit else 0)
    minimum = explicit + (1 if implicit else 0)
    if budget < minimum:
        raise ValueError(f"budget {budget} is below the cost of one timestep ({minimum} block evaluations)")
    return max(1, budget // per_step)


def allocate(budget: int, steps: int, explicit: int, schedule: str = "constant") -> list[int]:
    r"""Fixed-point iterations per timestep, ``n_i >= 1``, with :math:`\sum_i (\text{explicit} + n_i) = B`.

    The ``E = B - S (\text{explicit} + 1)`` iterations beyond one per timestep are shared in proportion to a
    weight: ``1`` (``"constant"`` and ``"tolerance"``), ``i + 1`` (``"increasing"``: more towards the clean
    end) or ``S - i`` (``"decreasing"``: more at the noisy end). Shares are rounded by largest remainder
    (exact fractions), so they add up to ``E`` exactly and an increasing schedule stays non-decreasing; a
    remainder among equal shares goes to evenly spaced timesteps.

    Parameters
    ----------
    budget : int
        Block evaluations per sample.
    steps : int
        Number of timesteps ``S``.
    explicit : int
        Block evaluations per timestep outside the solve (FPDM's explicit blocks, ``pre + post``).
    schedule : str
        One of :data:`SCHEDULES`.

    Raises
    ------
    ValueError
        If the budget is below ``S (explicit + 1)``, the least that gives every timestep one iteration.

    Examples
    --------
    >>> allocate(30, 6, 2, "constant")
    [3, 3, 3, 3, 3, 3]
    >>> allocate(30, 6, 2, "increasing")
    [2, 2, 3, 3, 4, 4]
    >>> allocate(22, 4, 2, "constant")  # a remainder is spread out
    [3, 4, 3, 4]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    least = steps * (explicit + 1)
    if budget < least:
        raise ValueError(
            f"budget {budget} is too small for {steps} timesteps: each costs at least {explicit + 1} block "
            f"evaluations ({explicit} explicit + 1 iteration), {least} in all; lower steps or raise the "
            "budget"
        )
    extra = budget - least
    if schedule == "increasing":
        weights = [i + 1 for i in range(steps)]
    elif schedule == "decreasing":
        weights = [steps - i for i in range(steps)]
    else:
        weights = [1] * steps
    total = sum(weights)
    shares = [Fraction(extra * weight, total) for weight in weights]
    iterations = [1 + math.floor(share) for share in shares]
    left = extra - sum(iterations) + steps
    # Largest fractional part first; among equal ones, the larger weight; among equal weights, evenly spaced.
    order = sorted(range(steps), key=lambda i: (-(shares[i] - math.floor(shares[i])), -weights[i], i))
    position = 0
    while left > 0:
        key = (shares[order[position]] % 1, weights[order[position]])
        group = [i for i in order[position:] if (shares[i] % 1, weights[i]) == key]
        chosen = (
            group
            if len(group) <= left
            else [group[(2 * j + 1) * len(group) // (2 * left)] for j in range(left)]
        )
        for i in chosen:
            iterations[i] += 1
        left -= len(chosen)
        position += len(group)
    return iterations


def plan_timesteps(
    model: nn.Module, diffusion: GaussianDiffusion, budget: int, steps: int | None, schedule: str
) -> tuple[list[int], list[int]]:
    """The timesteps of a run and the fixed-point iterations each is given (zeros for DiT).

    ``steps=None`` picks them from the budget (:func:`pick_steps`), at most the diffusion's ``T``: a budget
    beyond what ``T`` timesteps use goes to more iterations per timestep (FPDM) or stays unspent (DiT).

    Raises
    ------
    ValueError
        A budget that cannot pay for the timesteps, more timesteps than the diffusion has, or a schedule
        other than ``"constant"`` for DiT.
    """
    explicit, implicit = block_cost(model)
    if steps is None:
        steps = min(pick_steps(budget, explicit, implicit), diffusion.num_timesteps)
    elif steps > diffusion.num_timesteps:
        raise ValueError(f"steps ({steps}) exceeds the diffusion's {diffusion.num_timesteps} timesteps")
    if implicit:
        return diffusion.respace(steps), allocate(budget, steps, explicit, schedule)
    if schedule != "constant":
        raise ValueError(f"DiT has no iterations to schedule: use schedule='constant', got {schedule!r}")
    if budget < steps * explicit:
        raise ValueError(
            f"budget {budget} is too small for {steps} DiT timesteps of {explicit} blocks each "
            f"({steps * explicit}); lower steps or raise the budget"
        )
    return diffusion.respace(steps), [0] * steps


def _check_options(method: str, schedule: str, budget: int, eta: float, guidance: float, tol: float) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance}")


class _FirstResidual:
    """A solver wrapper that keeps, on the device, the largest relative residual of the starting point.

    The first evaluation of ``g`` is at the starting point; its residual is what solution reuse lowers.
    With a fixed budget the solver keeps no trace, so it is measured here (one norm per timestep, no host
    read). The wrapped solver sees the same calls.
    """

    def __init__(self, solver: Solver) -> None:
        self.solver = solver
        self.value: Tensor | None = None

    def __repr__(self) -> str:
        return repr(self.solver)

    def __call__(self, g: Callable[[Tensor], Tensor], z0: Tensor, **options: Any) -> Any:
        self.value = None

        def g_first(z: Tensor) -> Tensor:
            fz = g(z)
            if self.value is None:  # the first evaluation: at the starting point
                self.value = residual_norm(fz.flatten(1).float(), z.flatten(1).float(), "rel").max()
            return fz

        return self.solver(g_first, z0, **options)


@dataclasses.dataclass
class _Ledger:
    """What each timestep was allowed and spent, filled in as the sampler runs.

    Counts are host integers (the host decides how many evaluations happen); residuals stay on the device,
    one scalar per timestep, until :meth:`read_residuals` reads them all at once.
    """

    explicit: int
    implicit: bool
    carry_over: bool
    allocated: list[int] = dataclasses.field(default_factory=list)
    spent: list[int] = dataclasses.field(default_factory=list)
    iterations: list[int] = dataclasses.field(default_factory=list)
    device_residuals: list[Tensor] = dataclasses.field(default_factory=list)
    device_first: list[Tensor] = dataclasses.field(default_factory=list)
    carry: int = 0
    #: The last timestep's block output: the next solve's warm start under solution reuse.
    last_z: Tensor | None = None

    def record(self, t: int, cap: int, state: ModelState, first: Tensor | None) -> None:
        """Book one timestep; ``RuntimeError`` if it spent more than its cap."""
        nfe = state.stats.nfe if self.implicit else 0
        if nfe > cap or state.block_evals > self.explicit + cap:
            raise RuntimeError(
                f"timestep {t}: the solver spent {nfe} iterations ({state.block_evals} block "
                f"evaluations) where {cap} iterations were allowed"
            )
        if self.carry_over:
            self.carry = cap - nfe
        self.allocated.append(self.explicit + cap)
        self.spent.append(int(state.block_evals))
        self.iterations.append(int(nfe))
        self.last_z = state.z
        if self.implicit:
            residual = torch.as_tensor(state.stats.residual).float().max()
            self.device_residuals.append(residual)
            nan = torch.full_like(residual, math.nan)
            self.device_first.append(nan if first is None else first.to(residual.device))

    def read_residuals(self) -> tuple[list[float], list[float]]:
        """Per timestep, the largest residual and the largest first residual (``nan`` for DiT): one read."""
        if not self.device_residuals:
            nans = [math.nan] * len(self.spent)
            return nans, list(nans)
        both = torch.stack([torch.stack(self.device_residuals), torch.stack(self.device_first)]).tolist()
        return both[0], both[1]


@torch.no_grad()
def sample(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    labels: Tensor,
    *,
    budget: int,
    steps: int | None = None,
    schedule: str = "constant",
    solver: Solver | None = None,
    reuse: bool = True,
    method: str = "ddim",
    eta: float = 0.0,
    guidance: float = 1.0,
    tol: float = 1e-3,
    generator: Generators = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> SampleResult:
    """Sample one image per label under a budget of block evaluations per sample.

    Parameters
    ----------
    model : FPDM or DiT
        The network (see ``models.py``); it is put in eval mode for the run and restored afterwards.
    diffusion : GaussianDiffusion
        Noise schedule and reverse steps.
    labels : Tensor
        ``(B,)`` class labels, one image each, on the model's device (``model.null_label`` for
        unconditional samples).
    budget : int
        Transformer-block evaluations per sample, the paper's unit.
    steps : int, optional
        Number of timesteps; by default picked from the budget (:func:`plan_timesteps`).
    schedule : {"constant", "increasing", "decreasing", "tolerance"}
        How iterations are allocated across timesteps (:func:`allocate`); DiT has only ``"constant"``.
    solver : Solver, optional
        The fixed-point solver of every timestep; ``Picard()`` (the paper's) by default.
    reuse : bool
        Warm-start each timestep's solve from the previous timestep's solution. Ignored for DiT.
    method : {"ddim", "ddpm"}
        The reverse step.
    eta : float
        DDIM's noise scale (``0``: deterministic; ``1``: the DDPM posterior's variance).
    guidance : float
        Classifier-free guidance scale; ``1`` runs the conditional model alone, any other value the doubled
        batch.
    tol : float
        Relative-residual tolerance of the ``"tolerance"`` schedule (other schedules use all their
        iterations).
    generator : torch.Generator or sequence of torch.Generator, optional
        CPU generator for the initial noise and the noise of DDPM (or DDIM with ``eta > 0``), drawn in the
        same order as :meth:`GaussianDiffusion.sample`: a seeded run is reproducible. One generator per
        label (:func:`sample_generators`) draws each sample's noise from its own generator, so a sample
        does not depend on the batch it is drawn in.
    callback : callable, optional
        Called after each timestep with a dict: ``i``, ``t``, ``x`` (the new sample), ``denoised`` (the
        predicted clean sample), ``spent``, ``iterations``, ``residual`` (a float: reading it from the
        device is the one host synchronisation per timestep a callback adds).

    Returns
    -------
    SampleResult
        Images, per-timestep spent evaluations, iterations and residuals, wall-clock.

    Raises
    ------
    ValueError
        A budget too small for the timesteps, an unknown schedule or method, a non-finite or negative
        number, or a schedule other than ``"constant"`` for DiT.
    RuntimeError
        If a solver evaluated the block more often than it was allowed (the budget is never exceeded
        silently).
    """
    _check_options(method, schedule, budget, eta, guidance, tol)
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"labels must have shape (B,) with B >= 1, got {tuple(labels.shape)}")
    timesteps, plan = plan_timesteps(model, diffusion, budget, steps, schedule)
    explicit, implicit = block_cost(model)
    ledger = _Ledger(explicit, implicit, carry_over=schedule == "tolerance")
    solve_with = Picard() if solver is None else solver
    measured = _FirstResidual(solve_with)
    shape = (labels.shape[0], model.in_channels, model.input_size, model.input_size)

    def eps_at(x: Tensor, i: int, t: int) -> Tensor:
        cap = plan[i] + ledger.carry if implicit else 0
        options: dict[str, Any] = {}
        if implicit:
            # A fixed schedule spends its whole allocation: a fixed budget, with no host reads.
            early_stop = tol if schedule == "tolerance" else None
            z0 = ledger.last_z if reuse else None
            options.update(max_iter=cap, tol=early_stop, solver=measured, z0=z0)
        t_batch = torch.full((shape[0],), t, device=labels.device, dtype=torch.long)
        eps, state = model_eps(model, x, t_batch, labels, guidance=guidance, **options)
        ledger.record(t, cap, state, measured.value if implicit else None)
        return eps

    def after_step(i: int, t: int, x_t: Tensor, eps: Tensor, x_next: Tensor) -> None:
        if callback is not None:
            info = {"i": i, "t": t, "x": x_next, "denoised": diffusion.predict_x0(x_t, eps, t)}
            residual = float(ledger.device_residuals[-1]) if implicit else math.nan  # the one read asked for
            info.update(spent=ledger.spent[-1], iterations=ledger.iterations[-1], residual=residual)
            callback(info)

    with sampling_run(model) as clock:
        x = to_device(draw_noise(shape, generator), labels.device)
        images = diffusion.reverse_loop(
            eps_at, x, timesteps, method=method, eta=eta, generator=generator, callback=after_step
        )
        residuals, first_residuals = ledger.read_residuals()
    options = {"model": type(model).__name__, "method": method, "eta": eta, "schedule": schedule}
    options.update(solver=repr(solve_with) if implicit else None, reuse=bool(reuse and implicit))
    options.update(guidance=guidance, tol=tol if schedule == "tolerance" else None, steps=len(timesteps))
    return SampleResult(
        images=images,
        timesteps=timesteps,
        allocated=ledger.allocated,
        spent=ledger.spent,
        iterations=ledger.iterations,
        residuals=residuals,
        first_residuals=first_residuals,
        budget=budget,
        wall_s=clock.wall_s,
        batch_factor=1 if guidance == 1.0 else 2,
        options=options,
    )
