r"""Parallel DDIM sampling (eta = 0) for DiT and FPDM: the timesteps solved as one fixed point.

Deterministic DDIM over timesteps :math:`t_0 > \dots > t_{N-1}` is a recurrence
:math:`x_{k+1} = s(k, x_k)`, which :func:`implicitdiff.solve_chain` solves as one fixed point over the
trajectory: each *sweep* is one batched model call on all the timesteps in flight, so the sampler takes as
many sequential rounds as sweeps instead of ``N`` (ParaDiGMS's cumulative map, Shih et al. 2023; with
``solver=Anderson()`` in the spirit of ParaTAA, Tang et al. 2024). It spends more block evaluations than
the sequential sampler, in fewer rounds. ``tol`` is on the root mean square per entry of each timestep's
residual, so it does not depend on the batch size. FPDM's implicit solve at each timestep has a fixed
budget; with ``reuse=True`` it starts from the state that timestep reached in the previous sweep.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fpdm.diffusion import GaussianDiffusion
from fpdm.reverse import RunSummary, model_eps, sampling_run
from fpdm.sampling import DEFAULT_ITERS_PER_STEP, block_cost
from implicitdiff import ChainResult, Solver, solve_chain
from implicitdiff.chain import FORMS

__all__ = ["FORMS", "ParallelResult", "sample_parallel", "sample_parallel_batches"]


@dataclasses.dataclass
class ParallelResult(RunSummary):
    """Samples of :func:`sample_parallel` and what they cost.

    Attributes
    ----------
    images : Tensor
        ``(B, C, H, W)`` samples (``[-1, 1]`` for images).
    timesteps : list[int]
        The diffusion timesteps, descending.
    sweeps : int
        Sequential rounds: batched model calls (the sequential sampler takes ``len(timesteps)``).
    block_evals : int
        Transformer-block evaluations per sample over all sweeps: for each call, the timesteps it
        evaluated times the blocks the call spent (``pre + post + iterations`` for FPDM, ``depth`` for DiT).
    sequential_block_evals : int
        What the sequential DDIM sampler with the same model options spends: ``len(timesteps)`` times the
        blocks of one timestep.
    spent : list[int]
        Per timestep, block evaluations per sample spent on it over all sweeps.
    iterations : list[int]
        Per timestep, evaluations of the implicit block over all sweeps (``0`` for DiT).
    residuals : list[float]
        Per timestep, the chain's residual (root mean square per entry) of the returned trajectory.
    converged : bool
        Whether every timestep met ``tol`` (or is exact) within ``max_sweeps``.
    wall_s : float
        Wall-clock of the solve, seconds.
    batch_factor : int
        ``2`` with classifier-free guidance (the model runs on the doubled batch), else ``1``.
    options : dict
        The options of the run, for reports.
    chain : ChainResult
        The full result of :func:`implicitdiff.solve_chain` (trajectory ``xs`` included).
    """

    images: Tensor
    timesteps: list[int]
    sweeps: int
    block_evals: int
    sequential_block_evals: int
    spent: list[int]
    iterations: list[int]
    residuals: list[float]
    converged: bool
    wall_s: float
    batch_factor: int
    options: dict[str, Any]
    chain: ChainResult

    SUMMARY: ClassVar[tuple[str, ...]] = (
        "sweeps", "spent_total", "sequential_block_evals", "guided_evals", "batch_factor", "converged",
        "wall_s", "num_images", "timesteps", "spent", "iterations", "residuals",
    )  # fmt: skip

    @property
    def spent_total(self) -> int:
        """Block evaluations per sample over the run (:attr:`block_evals`)."""
        return self.block_evals

    @property
    def guided_evals(self) -> int:
        """Block evaluations per sample counting the unconditional half of guidance."""
        return self.block_evals * self.batch_factor


class _BatchedStep:
    """``step(k, x)`` for :func:`implicitdiff.solve_chain`: one model call on all the timesteps ``k``.

    Keeps FPDM's implicit states per timestep (reused across sweeps) and counts block evaluations.
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        labels: Tensor,
        timesteps: list[int],
        model_options: dict[str, Any],
        guidance: float,
        reuse: bool,
    ) -> None:
        self.model, self.diffusion, self.labels = model, diffusion, labels
        self.t = torch.tensor(timesteps, dtype=torch.long, device=labels.device)
        self.t_prev = torch.tensor([*timesteps[1:], -1], dtype=torch.long, device=labels.device)
        self.model_options, self.guidance, self.reuse = model_options, guidance, reuse
        self.implicit = "max_iter" in model_options
        self.states: Tensor | None = None  # (N, F B, T, D): each timestep's last implicit state
        self.seen = torch.zeros(len(timesteps), dtype=torch.bool)  # timesteps evaluated at least once
        self.spent = [0] * len(timesteps)
        self.iterations = [0] * len(timesteps)
        self.block_evals = 0

    def _z0(self, k: Tensor) -> Tensor | None:
        """Warm starts of the timesteps ``k``: their own last state, else the nearest earlier one seen."""
        if not (self.implicit and self.reuse) or self.states is None:
            return None
        seen = self.seen.nonzero().squeeze(1)
        source = []
        for step in k.tolist():
            earlier = seen[seen <= step]
            if earlier.numel() == 0:
                return None  # nothing to start from: every solve of this call starts cold
            source.append(int(earlier[-1]))
        index = torch.tensor(source, device=self.states.device)
        return self.states.index_select(0, index).flatten(0, 1)

    def _store(self, k: Tensor, z: Tensor) -> None:
        per_step = z.reshape(len(k), -1, *z.shape[1:])
        if self.states is None:
            self.states = per_step.new_zeros((len(self.seen), *per_step.shape[1:]))
        self.states[k] = per_step
        self.seen[k.cpu()] = True

    def __call__(self, k: Tensor, x: Tensor) -> Tensor:
        steps, batch = len(k), x.shape[1]
        z0 = self._z0(k)
        if z0 is not None and self.guidance != 1.0:
            # Stored per timestep as (2 B) = [cond, uncond]; the call wants [cond of every step, uncond ...].
            z0 = z0.reshape(steps, 2, batch, *z0.shape[1:]).transpose(0, 1).flatten(0, 2)
        t = self.t[k].repeat_interleave(batch)
        y = self.labels.repeat(steps)
        options = {**self.model_options, "z0": z0} if self.implicit else {}
        eps, state = model_eps(self.model, x.flatten(0, 1), t, y, guidance=self.guidance, **options)
        cost = int(state.block_evals)
        self.block_evals += steps * cost
        for step in k.tolist():
            self.spent[step] += cost
            self.iterations[step] += cost - block_cost(self.model)[0] if self.implicit else 0
        if self.implicit:
            z = state.z
            if self.guidance != 1.0:
                z = z.reshape(2, steps, batch, *z.shape[1:]).transpose(0, 1).flatten(0, 2)
            self._store(k, z)
        eps = eps.reshape(x.shape).to(x.dtype)
        return self.diffusion.ddim_step(x, eps, self.t[k], self.t_prev[k])


def _check(
    model: nn.Module, labels: Tensor, steps: int, iterations: int | None, tol: float, guidance: float
) -> tuple[int, bool]:
    """The model's blocks outside the solve and whether it has one; ``ValueError`` on a bad argument."""
    explicit, implicit = block_cost(model)
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.numel() == 0:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape (B,) with B >= 1, got {shape}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if iterations is not None:
        if not implicit:
            raise ValueError(f"{type(model).__name__} has no implicit block: leave iterations=None")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    return explicit, implicit


@torch.no_grad()
def sample_parallel(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    labels: Tensor,
    *,
    steps: int,
    iterations: int | None = None,
    solver: Any = None,
    tol: float = 1e-4,
    window: int | None = None,
    max_sweeps: int | None = None,
    form: str = "cumulative",
    guidance: float = 1.0,
    reuse: bool = False,
    block_solver: Solver | None = None,
    generator: torch.Generator | None = None,
) -> ParallelResult:
    r"""Sample one image per label by deterministic DDIM, all timesteps solved in parallel (see the module).

    Parameters
    ----------
    model : FPDM or DiT
        The network (``models.py``); put in eval mode for the run and restored afterwards.
    diffusion : GaussianDiffusion
        Noise schedule; the timesteps are ``diffusion.respace(steps)``.
    labels : Tensor
        ``(B,)`` class labels on the model's device.
    steps : int
        Number of DDIM timesteps :math:`N`.
    iterations : int, optional
        FPDM only: implicit-block evaluations per timestep evaluated (per sweep); default
        ``sampling.DEFAULT_ITERS_PER_STEP``.
    solver : update rule, optional
        The chain's rule (:func:`implicitdiff.solve_chain`): ``Picard()`` by default (ParaDiGMS with the
        cumulative form), ``Anderson()`` (ParaTAA-like), ``Broyden()``.
    tol : float
        Per-timestep residual, root mean square per entry, ``>= 0`` (``0``: exact, ``N`` Picard sweeps).
    window : int, optional
        Most timesteps per sweep (memory of the batched call: ``window * B`` samples); default all.
    max_sweeps : int, optional
        Cap on sweeps; default ``steps`` (always enough).
    form : {"cumulative", "step"}
        The map iterated: ParaDiGMS's cumulative map :math:`G` or Picard on the steps, :math:`F`.
    guidance : float
        Classifier-free guidance scale; ``1``: the conditional model alone.
    reuse : bool
        FPDM: warm-start each timestep's implicit solve from its state of the previous sweep. Off by
        default: on the digits it took more sweeps than cold starts (the states moving under the chain
        keep its residuals up) and its samples differ from every sequential sampler's
        (``benchmarks/fpdm_parallel.py``).
    block_solver : Solver, optional
        FPDM's solver of the implicit block; the model's own by default.
    generator : torch.Generator, optional
        CPU generator of the initial noise, drawn as :func:`fpdm.sampling.sample` draws it: same seed, same
        noise.

    Returns
    -------
    ParallelResult

    Raises
    ------
    ValueError
        Bad labels, steps, iterations (or iterations for DiT), tol, guidance, window, form or solver.
    """
    explicit, implicit = _check(model, labels, steps, iterations, tol, guidance)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if steps > diffusion.num_timesteps:
        raise ValueError(f"steps ({steps}) exceeds the diffusion's {diffusion.num_timesteps} timesteps")
    timesteps = diffusion.respace(steps)
    iters = (DEFAULT_ITERS_PER_STEP if iterations is None else iterations) if implicit else 0
    model_options: dict[str, Any] = {}
    if implicit:
        model_options = {"max_iter": iters, "tol": None, "solver": block_solver}
    step = _BatchedStep(model, diffusion, labels, timesteps, model_options, guidance, reuse)
    shape = (labels.shape[0], model.in_channels, model.input_size, model.input_size)
    with sampling_run(model) as clock:
        x = torch.randn(shape, generator=generator).to(labels.device)
        scale = math.sqrt(x.numel())
        chain = solve_chain(
            step, x, steps, solver=solver, tol=tol * scale, max_iter=max_sweeps, window=window, form=form
        )
    options = {"model": type(model).__name__, "method": "ddim", "eta": 0.0, "parallel": True}
    options.update(solver=repr(solver) if solver is not None else "Picard()", form=form, tol=tol)
    options.update(window=window, guidance=guidance, steps=steps)
    options["iterations_per_call"] = iters if implicit else None
    options.update(reuse=bool(reuse and implicit), block_solver=repr(block_solver) if block_solver else None)
    return ParallelResult(
        images=chain.xs[-1],
        timesteps=timesteps,
        sweeps=chain.sweeps,
        block_evals=step.block_evals,
        sequential_block_evals=steps * (explicit + iters),
        spent=step.spent,
        iterations=step.iterations,
        residuals=(chain.residual / scale).tolist(),
        converged=chain.all_converged,
        wall_s=clock.wall_s,
        batch_factor=1 if guidance == 1.0 else 2,
        options=options,
        chain=chain,
    )


def sample_parallel_batches(
    model: nn.Module,
    labels: Tensor,
    *,
    batch_size: int,
    seed: int = 0,
    diffusion: GaussianDiffusion | None = None,
    **options: Any,
) -> tuple[Tensor, list[ParallelResult]]:
    """:func:`sample_parallel` on ``labels`` in batches of ``batch_size`` (``sample.py --parallel``).

    One generator, seeded once, serves all batches, as in :func:`fpdm.generation.generate`: the initial
    noise is the sequential sampler's for the same seed and batch size. Returns the images on the CPU and
    each batch's result.
    """
    diffusion = GaussianDiffusion() if diffusion is None else diffusion
    generator = torch.Generator().manual_seed(seed)
    images, results = [], []
    for batch in labels.split(batch_size):
        result = sample_parallel(model, diffusion, batch, generator=generator, **options)
        images.append(result.images.cpu())
        results.append(result)
    return torch.cat(images), results
