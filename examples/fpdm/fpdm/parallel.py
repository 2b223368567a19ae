r"""Parallel DDIM sampling (eta = 0) for DiT and FPDM: the timesteps solved as one fixed point.

Deterministic DDIM over timesteps :math:`t_0 > \dots > t_{N-1}` is a recurrence
:math:`x_{k+1} = s(k, x_k)`, which :func:`implicitdiff.solve_chain` solves as one fixed point over the
trajectory: each *sweep* is one batched model call on all the timesteps in flight, so the sampler takes as
many sequential rounds as sweeps instead of ``N``. The default rule is :class:`implicitdiff.ChainSecant`
on the cumulative map: ParaDiGMS's iteration (Shih et al. 2023) with each timestep's response to its
input learnt from its own evaluations and every change carried down the trajectory, one secant model per
sample. ``solver=Picard()`` is ParaDiGMS itself. It spends more block evaluations than the sequential
sampler, in fewer rounds.

Tolerances are on the root mean square (RMS) per entry of each timestep's residual, so they do not depend
on the batch size. By default they follow the noise (ParaDiGMS's rule): timestep :math:`k`, the step from
:math:`t_k` to :math:`t_{k+1}`, gets

.. math:: \mathrm{tol}_k = \tau\,\sigma_{t_k}, \qquad \sigma_t = \sqrt{1 - \bar\alpha_t},

the noise level of the state the step starts from: an error of :math:`\tau\sigma_t` per entry is a
fraction :math:`\tau` of the noise that state still carries, so the high-noise timesteps stop sooner.
Deterministic DDIM does carry early defects to the samples (one to six hundred times :math:`\tau` on the
digits), which is why the default is small. (The DDPM posterior standard deviation,
the other common scale, vanishes at the last step and depends on the number of steps; the marginal
:math:`\sigma_t` depends on the timestep only.) ``tol=`` gives every timestep one RMS tolerance instead.
:data:`DEFAULT_TAU` was chosen by measurement (``docs/fpdm-measurements.md``).

How far the samples are from the sequential ones: the returned trajectory satisfies
:math:`x_{k+1} = s(k, x_k) + d_k` with :math:`\|d_k\|_2 \le \sqrt{n}\,\mathrm{tol}_k` (:math:`n`
entries of the state, the batch included), so if each step is :math:`L`-Lipschitz the final samples are
within :math:`\sqrt{n}\,\sum_k \mathrm{tol}_k L^{N-1-k}` of the sequential sampler's (2-norm)
(:func:`implicitdiff.solve_chain`); ``benchmarks/fpdm_parallel.py`` measures the distance itself.

FPDM's implicit solve at each timestep has a fixed budget; with ``reuse=True`` it starts from the state
that timestep reached in the previous sweep. ``max_batch`` bounds the timesteps per model call (memory);
by default (``"auto"``) it is chosen from the free memory on CUDA, and unlimited on the CPU.
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
from implicitdiff import ChainResult, ChainSecant, Solver, distributed_step, solve_chain
from implicitdiff.chain import FORMS
from implicitdiff.chain_secant import BASES

__all__ = [
    "DEFAULT_TAU",
    "FORMS",
    "ParallelResult",
    "auto_max_batch",
    "chunk_for_memory",
    "guess_rows",
    "noise_levels",
    "paradigms_tolerances",
    "sample_parallel",
    "sample_parallel_batches",
]

#: Default scale of the noise-scaled tolerances, :math:`\mathrm{tol}_k = \tau\sigma_{t_k}` (RMS per entry):
#: the largest :math:`\tau` of the sweep in ``docs/fpdm-measurements.md`` (``benchmarks/fpdm_parallel.py
#: --tau-sweep``: 1e-1 down to 1e-6, 100 DDIM steps, Picard on the cumulative map, every timestep in flight)
#: whose samples were within ``1e-3`` of the sequential sampler's on both digits models, FD unchanged.
#: FD was already unchanged from 3e-4 (13-14 sweeps instead of 16): pass a larger ``tau`` when samples of
#: the same quality, not the same samples, are what matters.
DEFAULT_TAU = 1e-6

#: Share of the free device memory that ``max_batch="auto"`` gives the model calls of a sweep; the rest
#: is left for the chain's trajectory, the rule's history, the images and the allocator's fragmentation.
MEMORY_FRACTION = 0.5


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
        Sequential rounds: the first guess's model calls and the chain's sweeps (batched model calls);
        the sequential sampler takes ``len(timesteps)``.
    block_evals : int
        Transformer-block evaluations per sample over the run, first guess included: each timestep
        evaluated counts the blocks of one timestep (``pre + post + iterations`` for FPDM, ``depth`` for
        DiT), on whichever rank evaluated it. With ``group``, a rank whose share of a sweep is a timestep
        short evaluates a repeat of one to keep the gather even (:func:`implicitdiff.distributed_step`);
        those repeats are not counted: at most ``world - 1`` timesteps per sweep, over all ranks.
    sequential_block_evals : int
        What the sequential DDIM sampler with the same model options spends: ``len(timesteps)`` times the
        blocks of one timestep.
    spent : list[int]
        Per timestep, block evaluations per sample spent on it over all sweeps.
    iterations : list[int]
        Per timestep, evaluations of the implicit block over all sweeps (``0`` for DiT).
    residuals : list[float]
        Per timestep, the chain's residual (root mean square per entry) of the returned trajectory;
        ``inf`` where it was not evaluated (a timestep that ``error_tol`` made final at the proposal).
    tolerances : list[float]
        Per timestep, the tolerance its residual had to meet (root mean square per entry):
        ``tau * sigma_t`` (noise-scaled) or ``tol`` for every timestep.
    converged : bool
        Whether every timestep met its tolerance (or is exact) within ``max_sweeps``.
    wall_s : float
        Wall-clock of the solve, seconds.
    batch_factor : int
        ``2`` with classifier-free guidance (the model runs on the doubled batch), else ``1``.
    options : dict
        The options of the run, for reports.
    chain : ChainResult
        The full result of :func:`implicitdiff.solve_chain` (trajectory ``zs`` included).
    """

    images: Tensor
    timesteps: list[int]
    sweeps: int
    block_evals: int
    sequential_block_evals: int
    spent: list[int]
    iterations: list[int]
    residuals: list[float]
    tolerances: list[float]
    converged: bool
    wall_s: float
    batch_factor: int
    options: dict[str, Any]
    chain: ChainResult

    SUMMARY: ClassVar[tuple[str, ...]] = (
        "sweeps", "spent_total", "sequential_block_evals", "guided_evals", "batch_factor", "converged",
        "wall_s", "num_images", "timesteps", "spent", "iterations", "residuals", "tolerances",
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

    Keeps FPDM's implicit states per timestep (with reuse across sweeps) and the last call's predicted
    noise (for the first guess).
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
        self.states: Tensor | None = None  # (N, F B, T, D): each timestep's last state (reuse only)
        self.seen = torch.zeros(len(timesteps), dtype=torch.bool)  # timesteps evaluated at least once
        self.eps: Tensor | None = None  # the last call's predicted noise, shaped like its x

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
        if self.implicit and self.reuse:  # the states are kept only to warm-start the next sweep
            z = state.z
            if self.guidance != 1.0:
                z = z.reshape(2, steps, batch, *z.shape[1:]).transpose(0, 1).flatten(0, 2)
            self._store(k, z)
        eps = eps.reshape(x.shape).to(x.dtype)
        self.eps = eps
        return self.diffusion.ddim_step(x, eps, self.t[k], self.t_prev[k])


def _check(
    model: nn.Module, labels: Tensor, steps: int, iterations: int | None, guidance: float
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
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    return explicit, implicit


def _check_scale(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_max_batch(max_batch: object) -> int | str | None:
    if max_batch is None or max_batch == "auto":
        return max_batch  # type: ignore[return-value]
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be 'auto', None (no limit) or an int >= 1, got {max_batch!r}")
    return max_batch


def noise_levels(diffusion: GaussianDiffusion, timesteps: list[int]) -> Tensor:
    r""":math:`\sigma_t = \sqrt{1 - \bar\alpha_t}` of each timestep, float64 ``(len(timesteps),)``.

    The standard deviation of the noise in :math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sigma_t\,\epsilon`;
    it grows with :math:`t`, so it falls along the sampler's descending timesteps.
    """
    return (1.0 - diffusion.alpha_bar(torch.tensor(timesteps, dtype=torch.long))).sqrt()


def chunk_for_memory(free_bytes: int, per_timestep_bytes: int, steps: int) -> int:
    """Timesteps per model call that fit ``MEMORY_FRACTION`` of ``free_bytes``, between 1 and ``steps``.

    A call on ``c`` timesteps runs the model on ``c`` times the batch, so its peak is about ``c`` times
    that of one timestep (``per_timestep_bytes``).
    """
    fits = int(MEMORY_FRACTION * free_bytes) // max(int(per_timestep_bytes), 1)
    return max(1, min(int(steps), fits))


def auto_max_batch(probe: Any, device: torch.device, steps: int) -> int | None:
    """``max_batch="auto"``: ``None`` (no limit) off CUDA; on CUDA, :func:`chunk_for_memory` of the free
    memory (:func:`torch.cuda.mem_get_info`, plus what the caching allocator holds unused) and the peak
    that one call of ``probe()`` (the model on one timestep) adds (:func:`torch.cuda.max_memory_allocated`;
    this resets the device's peak statistics)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    probe()
    torch.cuda.synchronize(device)
    per_timestep = torch.cuda.max_memory_allocated(device) - before
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return chunk_for_memory(free, per_timestep, steps)


def paradigms_tolerances(
    diffusion: GaussianDiffusion, timesteps: list[int], tolerance: float = 0.1
) -> Tensor:
    r"""Per-timestep RMS tolerances equal to ParaDiGMS's criterion with its ``tolerance`` (float64, ``(N,)``).

    ParaDiGMS (Shih et al. 2023; diffusers' ``StableDiffusionParadigmsPipeline``, ``tolerance=0.1`` by
    default) accepts the state after timestep :math:`k`, at :math:`t_{k+1}`, when its change :math:`d`
    over a sweep has :math:`\|d\|^2 / (D\,\tilde\beta_{t_{k+1}}) \le \mathrm{tolerance}^2`, per sample of
    :math:`D` entries, where

    .. math:: \tilde\beta_t = \frac{1 - \bar\alpha_{t'}}{1 - \bar\alpha_t}
              \Bigl(1 - \frac{\bar\alpha_t}{\bar\alpha_{t'}}\Bigr)

    is the DDPM posterior variance of the step from :math:`t` to the next timestep :math:`t'` (zero into
    :math:`t' = -1`: the last two states are accepted only when exact). At the first timestep of the
    window that change is this chain's residual, so the same test on the root mean square of step
    :math:`k`'s residual is

    .. math:: \mathrm{tol}_k = \mathrm{tolerance}\,\sqrt{\tilde\beta_{t_{k+1}}},

    which :func:`sample_parallel` takes as ``tol`` (a sequence). Its own noise-scaled default
    :math:`\tau\sigma_{t_k}` is thus ParaDiGMS's with :math:`\mathrm{tolerance}_k = \tau\sigma_{t_k} /
    \sqrt{\tilde\beta_{t_{k+1}}}`. Two differences remain: ParaDiGMS tests each sample and sums the
    changes from the window's start, this chain tests the RMS over the batch, step by step.
    """
    t = torch.tensor([*timesteps, -1, -1], dtype=torch.long)
    abar, abar_next = diffusion.alpha_bar(t[1:-1]), diffusion.alpha_bar(t[2:])
    posterior = (1 - abar_next) / (1 - abar).clamp_min(1e-300) * (1 - abar / abar_next)
    return tolerance * posterior.clamp_min(0.0).sqrt()


def paradigms_equivalent(diffusion: GaussianDiffusion, timesteps: list[int], tau: float) -> Tensor:
    r"""ParaDiGMS's tolerance, per timestep, that is the noise-scaled RMS tolerance :math:`\tau\sigma_{t_k}`.

    Step :math:`k`'s residual :math:`d` (``D`` entries) passes ours when
    :math:`\|d\|^2 / D \le \tau^2 \sigma_{t_k}^2` and ParaDiGMS's when
    :math:`\|d\|^2 / (D\,\tilde\beta_{t_{k+1}}) \le \mathrm{tolerance}^2`
    (:func:`paradigms_tolerances`); the two tests are one where

    .. math:: \mathrm{tolerance}_k = \tau\,\sigma_{t_k} / \sqrt{\tilde\beta_{t_{k+1}}}.

    Float64 ``(len(timesteps),)``; ``inf`` for the last two steps, into :math:`t = -1`, whose posterior
    variance is zero (ParaDiGMS accepts them only when exact).
    """
    per_unit = paradigms_tolerances(diffusion, timesteps, 1.0)
    ours = tau * noise_levels(diffusion, timesteps)
    return torch.where(per_unit > 0, ours / per_unit.clamp_min(1e-300), math.inf)


def guess_rows(steps: int, warmup: int = 0, coarse: int = 0) -> list[int]:
    """The timesteps the first guess evaluates one after another: the first ``warmup`` and ``coarse``
    evenly spaced over the rest (``warmup`` included), ascending and distinct."""
    spaced = [warmup + round(i * (steps - warmup) / coarse) for i in range(coarse)] if coarse else []
    return sorted({*range(min(warmup, steps)), *(r for r in spaced if r < steps)})


def _first_guess(step: _BatchedStep, diffusion: GaussianDiffusion, x: Tensor, rows: list[int]) -> Tensor:
    """The trajectory ``(N + 1, *x.shape)`` guessed by DDIM jumps: the model is evaluated at each of
    ``rows`` in turn, and the states from there to the next one are DDIM steps from it with its noise
    prediction (its predicted clean image, clipped), so consecutive rows are exact sequential steps."""
    n = len(step.t)
    t = torch.cat([step.t, step.t.new_full((1,), -1)])
    trajectory = x.new_empty((n + 1, *x.shape))
    trajectory[0] = x
    for i, row in enumerate(rows):
        stop = rows[i + 1] if i + 1 < len(rows) else n
        step(t.new_tensor([row]), trajectory[row][None])
        assert step.eps is not None
        span = stop - row
        ahead = t[row + 1 : stop + 1]
        trajectory[row + 1 : stop + 1] = diffusion.ddim_step(
            trajectory[row].expand(span, *x.shape),
            step.eps.expand(span, *x.shape),
            t[row].repeat(span),
            ahead,
        )
    return trajectory


def _sweep_cap(max_evals: int, cost: int, spent: int, steps: int, window: int | None) -> int:
    """The most sweeps that cannot spend more than ``max_evals`` block evaluations per sample in all.

    ``spent`` went to the first guess; a sweep evaluates at most ``window`` steps and each sweep makes at
    least one more final, so sweep ``s`` costs at most ``min(window, steps - s + 1) * cost``.
    """
    left, sweeps = max_evals - spent, 0
    while sweeps < steps and min(window or steps, steps - sweeps) * cost <= left:
        left -= min(window or steps, steps - sweeps) * cost
        sweeps += 1
    if sweeps == 0 and steps:
        raise ValueError(
            f"max_evals={max_evals} block evaluations per sample does not pay for the first guess ({spent}) "
            f"and one sweep ({min(window or steps, steps) * cost}); raise it, or pass a window"
        )
    return sweeps


def _chain_rule(solver: Any, secant_base: str, samples: int) -> Any:
    """The chain's rule: ``solver``, or the default ``ChainSecant`` with one model per sample and the base
    ``secant_base``; ``ValueError`` on a bad ``secant_base`` or one beside a ``solver``."""
    if secant_base not in BASES:
        raise ValueError(f"secant_base must be one of {BASES}, got {secant_base!r}")
    if solver is None:
        return ChainSecant(blocks=samples, base=secant_base)
    if secant_base != "form":
        raise ValueError(
            f"secant_base={secant_base!r} sets the default rule's base: with solver={solver!r} of your own, "
            "give it the base (e.g. ChainSecant(blocks=B, base='fitted'))"
        )
    return solver


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _tolerances(
    diffusion: GaussianDiffusion, timesteps: list[int], tol: object, tau: object
) -> tuple[Tensor, float | None, Any]:
    """Per-timestep RMS tolerances (float64) from ``tol`` (a number or one per timestep) or ``tau``."""
    if tol is not None and tau is not None:
        raise ValueError(
            f"give tol (one tolerance for every timestep) or tau (noise-scaled), not both: got tol={tol!r}, "
            f"tau={tau!r}"
        )
    if tol is None:
        scale_tau = _check_scale("tau", DEFAULT_TAU if tau is None else tau)
        return scale_tau * noise_levels(diffusion, timesteps), scale_tau, None
    if isinstance(tol, (Tensor, list, tuple)):
        tols = torch.as_tensor(tol, dtype=torch.float64).cpu()
        if tols.shape != (len(timesteps),) or not bool(torch.isfinite(tols).all() and (tols >= 0).all()):
            raise ValueError(
                f"tol must be a finite number >= 0 or {len(timesteps)} of them (one per timestep), got "
                f"shape {tuple(tols.shape)}"
            )
        return tols, None, "per timestep"
    uniform = _check_scale("tol", tol)
    return torch.full((len(timesteps),), uniform, dtype=torch.float64), None, uniform


@torch.no_grad()
def sample_parallel(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    labels: Tensor,
    *,
    steps: int,
    iterations: int | None = None,
    solver: Any = None,
    secant_base: str = "form",
    tol: float | list[float] | Tensor | None = None,
    tau: float | None = None,
    window: int | None = None,
    max_sweeps: int | None = None,
    max_evals: int | None = None,
    error_tol: float | None = None,
    form: str = "cumulative",
    max_batch: int | str | None = "auto",
    guidance: float = 1.0,
    reuse: bool = False,
    block_solver: Solver | None = None,
    warmup: int = 0,
    coarse: int = 0,
    group: Any = None,
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
    solver : ChainSecant or update rule, optional
        The chain's rule (:func:`implicitdiff.solve_chain`). Default: ``ChainSecant(blocks=B)``, one
        secant model per sample (fewer rounds than Picard on the digits at the same tolerances;
        ``benchmarks/fpdm_parallel.py``). ``Picard()`` with the cumulative form is ParaDiGMS;
        ``Anderson()`` and ``Broyden()`` treat the timesteps as independent and warn so.
    secant_base : {"form", "fitted"}
        The ``base`` of the default rule, ``ChainSecant(blocks=B, base=secant_base)``: ``"fitted"``
        models each timestep's response outside its secants by a multiple of the identity fitted to them
        (one round fewer on the FPDM digits model, as many on DiT; ``benchmarks/parallel_step_model.py``).
        Only with the default rule: give ``solver`` a ``ChainSecant`` of your own otherwise.
    tol : float or sequence of float, optional
        Root mean square tolerance of the timesteps' residuals, ``>= 0``: one for every timestep (``0``:
        exact, ``N`` Picard sweeps) or one per timestep, e.g. ParaDiGMS's criterion
        (:func:`paradigms_tolerances`). Give ``tol`` or ``tau``, not both.
    tau : float, optional
        Noise-scaled tolerances (the default, with :data:`DEFAULT_TAU`): timestep :math:`k` stops at a
        root mean square residual of :math:`\tau\sigma_{t_k}`, :math:`\sigma_t = \sqrt{1 - \bar\alpha_t}`
        (:func:`noise_levels`), ``>= 0``.
    window : int, optional
        Most timesteps per sweep; default all.
    max_sweeps : int, optional
        Cap on the chain's sweeps; default ``steps`` (always enough).
    max_evals : int, optional
        Cap on the block evaluations per sample of the whole run (the first guess included): the chain
        stops after the most sweeps that cannot spend more (each sweep counted at its most, every step in
        flight evaluated), and reports ``converged=False`` if it had not finished. Default: no cap.
    error_tol : float, optional
        Also stop once the chain's latest proposal is estimated within ``error_tol`` of the samples the
        chain converges to, in the largest entry (pixels in ``[-1, 1]``, or latents), and return that
        proposal (:func:`implicitdiff.solve_chain`'s ``error_tol``: the a-posteriori estimate of a
        contraction, from the rate each sweep moves the trajectory; an estimate, not a bound: measured
        by ``benchmarks/parallel_error_stop.py``, figures in the parallel guide). Default: off (the
        residual test alone).
    form : {"cumulative", "step"}
        The map iterated: ParaDiGMS's cumulative map :math:`G` or Picard on the steps, :math:`F`.
    max_batch : int, "auto" or None
        Most timesteps per model call (a call runs the model on ``max_batch * B`` samples, twice that with
        guidance): a sweep over more timesteps calls the model on chunks of them, in order, one sequential
        round still. ``None``: no limit. ``"auto"`` (default): no limit off CUDA; on CUDA the most that fit
        half the free memory, from the peak of one probe call of the model on one timestep
        (:func:`auto_max_batch`). The samples do not depend on it, except that with ``reuse=True`` a
        timestep's first warm start may come from a chunk of the same sweep.
    guidance : float
        Classifier-free guidance scale; ``1``: the conditional model alone.
    reuse : bool
        FPDM: warm-start each timestep's implicit solve from its state of the previous sweep. This is
        not the sequential sampler's reuse (each timestep warm-started from the timestep before it): the
        samples are those of no sequential sampler. Off by default, and the samples are then those of
        ``fpdm.sampling.sample`` with ``reuse=False``; on the digits reuse also took more sweeps.
    block_solver : Solver, optional
        FPDM's solver of the implicit block; the model's own by default.
    warmup, coarse : int
        The first guess (default none: every timestep starts at the initial noise, as in ParaDiGMS). The
        model is evaluated on the first ``warmup`` timesteps one after another (exact sequential steps)
        and on ``coarse`` timesteps evenly spaced over the rest; every other timestep's state is the DDIM
        step to it from the last one evaluated, with that one's predicted clean image (ParaSolver's
        initialisation, Lu et al. 2025, for ``warmup=1``; a coarse run interpolated onto the timesteps, as
        in parareal or SRDS, for ``coarse > 0``). Each of those evaluations is one sequential round and
        one timestep's evaluation, counted in :attr:`ParallelResult.sweeps` and the block evaluations;
        the chain then starts after the warm-up.
    group : ProcessGroup, optional
        Spread each sweep's model call over the ranks of this :mod:`torch.distributed` group
        (:func:`implicitdiff.distributed_step`): every rank must call with the same arguments (labels,
        generator seed) and gets the same samples, each evaluating about ``1 / world`` of the timesteps in
        flight. Not with ``reuse=True`` (each timestep's state would stay on the rank that evaluated it).
    generator : torch.Generator, optional
        CPU generator of the initial noise, drawn as :func:`fpdm.sampling.sample` draws it: same seed, same
        noise.

    Returns
    -------
    ParallelResult

    Raises
    ------
    ValueError
        Bad labels, steps, iterations (or iterations for DiT), tol, tau (or both given), max_batch,
        max_evals, error_tol, warmup, coarse, guidance, window, form, solver or secant_base (or both of
        the last two); ``reuse`` with ``group``.
    """
    explicit, implicit = _check(model, labels, steps, iterations, guidance)
    max_batch = _check_max_batch(max_batch)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if steps > diffusion.num_timesteps:
        raise ValueError(f"steps ({steps}) exceeds the diffusion's {diffusion.num_timesteps} timesteps")
    warmup, coarse = _check_count("warmup", warmup), _check_count("coarse", coarse)
    if warmup > steps:
        raise ValueError(f"warmup ({warmup}) exceeds steps ({steps})")
    rule = _chain_rule(solver, secant_base, labels.shape[0])
    if group is not None and reuse and implicit:
        raise ValueError(
            "reuse=True keeps each timestep's implicit state where it was evaluated: not with group"
        )
    timesteps = diffusion.respace(steps)
    tolerances, scale_tau, uniform = _tolerances(diffusion, timesteps, tol, tau)
    iters = (DEFAULT_ITERS_PER_STEP if iterations is None else iterations) if implicit else 0
    cost = explicit + iters
    model_options: dict[str, Any] = {}
    if implicit:
        model_options = {"max_iter": iters, "tol": None, "solver": block_solver}
    step = _BatchedStep(model, diffusion, labels, timesteps, model_options, guidance, reuse)
    rows = guess_rows(steps, warmup, coarse)
    max_iter = max_sweeps
    if max_evals is not None:
        cap = _sweep_cap(_check_count("max_evals", max_evals), cost, len(rows) * cost, steps - warmup, window)
        max_iter = cap if max_iter is None else min(max_iter, cap)
    shape = (labels.shape[0], model.in_channels, model.input_size, model.input_size)
    with sampling_run(model) as clock:
        x = torch.randn(shape, generator=generator).to(labels.device)
        if max_batch == "auto":

            def probe() -> None:  # the model on one timestep, as a sweep calls it
                t = torch.full_like(labels, timesteps[0])
                model_eps(model, x, t, labels, guidance=guidance, **model_options)

            max_batch = auto_max_batch(probe, x.device, steps)
        guess = _first_guess(step, diffusion, x, rows) if rows else None
        start = x if guess is None else guess[warmup]
        chain_step: Any = _Shifted(step, warmup)
        if group is not None:
            chain_step, max_batch = distributed_step(chain_step, group, max_batch=max_batch), None
        scale = math.sqrt(x.numel())
        chain = solve_chain(
            chain_step,
            start,
            steps - warmup,
            solver=rule,
            tol=tolerances[warmup:] * scale,
            max_iter=max_iter,
            window=window,
            form=form,
            max_batch=max_batch,
            init=None if guess is None else guess[warmup:],
            error_tol=error_tol,
        )
    counts = _evaluations_per_timestep(steps, rows, warmup, chain)
    residuals = [0.0] * warmup + (chain.residual / scale).tolist()
    options = {"model": type(model).__name__, "method": "ddim", "eta": 0.0, "parallel": True}
    # "solver" is FPDM's fixed-point solver of each timestep, as in the sequential sampler's summary.
    options.update(chain_rule=repr(rule), form=form, tol=uniform, tau=scale_tau, window=window)
    options.update(max_batch=max_batch, guidance=guidance, steps=steps, warmup=warmup, coarse=coarse)
    options.update(guess_rows=rows, max_evals=max_evals, ranks=1 if group is None else _world(group))
    options.update(error_tol=error_tol, error_estimate=chain.error_estimate)
    options["iterations_per_call"] = iters if implicit else None
    options.update(reuse=bool(reuse and implicit), solver=repr(block_solver) if block_solver else None)
    # The sequential sampler whose samples these are (none with reuse across sweeps).
    options["reproduces"] = None if reuse and implicit else REPRODUCES
    return ParallelResult(
        images=chain.zs[-1],
        timesteps=timesteps,
        sweeps=len(rows) + chain.sweeps,
        block_evals=sum(counts) * cost,
        sequential_block_evals=steps * cost,
        spent=[count * cost for count in counts],
        iterations=[count * iters for count in counts],
        residuals=residuals,
        tolerances=tolerances.tolist(),
        converged=chain.all_converged,
        wall_s=clock.wall_s,
        batch_factor=1 if guidance == 1.0 else 2,
        options=options,
        chain=chain,
    )


#: The sequential sampler whose samples the parallel sampler gives (without FPDM's reuse across sweeps).
REPRODUCES = "sampling.sample(method='ddim', eta=0, reuse=False)"


def _evaluations_per_timestep(steps: int, rows: list[int], warmup: int, chain: ChainResult) -> list[int]:
    """How often each timestep was evaluated: once per first-guess row, then by the chain (after warm-up)."""
    counts = [0] * steps
    for row in rows:
        counts[row] += 1
    for k, count in enumerate(chain.evaluations_per_step.tolist()):
        counts[warmup + k] += count
    return counts


class _Shifted:
    """``step`` on the timesteps after the first ``offset`` (the chain after a warm-up)."""

    def __init__(self, step: _BatchedStep, offset: int) -> None:
        self.step, self.offset = step, offset

    def __call__(self, k: Tensor, x: Tensor) -> Tensor:
        return self.step(k + self.offset, x)


def _world(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


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
