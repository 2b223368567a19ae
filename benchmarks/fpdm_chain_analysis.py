"""What the DDIM chain of the digits models does with a defect, and what a better rule could gain.

::

    python -m benchmarks.fpdm_chain_analysis           # writes benchmarks/results/fpdm_chain_analysis.json
    python -m benchmarks.fpdm_chain_analysis --quick   # 4 samples, 12 timesteps, the 3-step models

On DiT-Digits/2 and FPDM-Digits/2 as :func:`benchmarks.fpdm_chains.trained_model` trains them (the
models of ``benchmarks.fpdm_parallel``), 16 samples, 100 trailing DDIM timesteps, no guidance:

* ``perturbation``: a defect ``d`` of RMS ``1e-3`` per entry added to the sequential trajectory's state
  entering timestep ``k`` moves the final sample by ``gain_k ||d||`` (2-norms over the batch), for every
  ``k``: how much an early defect matters against a late one (DiT, float64).
* ``uniform_tolerance``: the parallel sampler with the noise-scaled tolerances ``tau sigma_{t_k}``
  against one uniform tolerance ``tau`` (``sample_parallel(tol=tau)``), Picard and the default
  ChainSecant, ``tau`` from 1e-3 to 1e-5: sweeps and the largest pixel difference from the sequential
  samples (DiT, float32 as the sampler runs).
* ``newton``: Newton's method on the trajectory (the exact Jacobian of each step, its products by central
  differences in float64; one sequential model call per product, so not a usable rule) against Picard
  and ChainSecant on the same float64 chain and tolerances: rounds (batched evaluations of every
  timestep) until every timestep is within ``tau sigma_{t_k}``.
* ``contraction``: FPDM's implicit block along its sequential trajectory (2 Picard iterations per
  timestep, cold starts): at every timestep, a Picard solve of 8 iterations records its residuals, and
  the table gives the ratio of each residual to the next (how much one Picard iteration contracts).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from fpdm.diffusion import GaussianDiffusion
from fpdm.parallel import noise_levels
from fpdm.reverse import model_eps
from fpdm.sampling import block_cost, sample
from torch import Tensor, nn

from benchmarks import harness
from benchmarks.fpdm_chains import CONFIGS, ITERATIONS, STEPS, run_parallel, trained_model
from implicitdiff import ChainRuleWarning, ChainSecant, Picard, solve_chain

SAMPLES, DEFECT = 16, 1e-3
TAUS = (1e-3, 1e-4, 1e-5)
NEWTON_TAUS = (1e-4, 1e-5)
PROBE_ITERATIONS = 8

Step = Callable[[Tensor, Tensor], Tensor]


def ddim_chain(
    model: nn.Module, labels: Tensor, steps: int, dtype: torch.dtype
) -> tuple[Step, Tensor, Tensor]:
    """DiT's DDIM step ``s(k, x)`` for :func:`implicitdiff.solve_chain` (``x`` of shape ``(K, B, ...)``),
    the sampler's initial noise and the noise levels ``sigma_{t_k}``."""
    diffusion = GaussianDiffusion()
    timesteps = diffusion.respace(steps)
    t = torch.tensor(timesteps)
    t_prev = torch.tensor([*timesteps[1:], -1])
    model = model.to(dtype)
    model.t_embedder.float()  # it embeds the timestep in float32 whatever the weights: a constant per step
    batch = labels.shape[0]

    @torch.no_grad()
    def step(k: Tensor, x: Tensor) -> Tensor:
        eps, _ = model_eps(model, x.flatten(0, 1), t[k].repeat_interleave(batch), labels.repeat(len(k)))
        return diffusion.ddim_step(x, eps.reshape(x.shape).to(x.dtype), t[k], t_prev[k])

    shape = (batch, model.in_channels, model.input_size, model.input_size)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    return step, x0, noise_levels(diffusion, timesteps).to(dtype)


def rollout(step: Step, x0: Tensor, steps: int) -> Tensor:
    xs = [x0]
    for k in range(steps):
        xs.append(step(torch.tensor([k]), xs[-1][None])[0])
    return torch.stack(xs)


def perturbation(step: Step, xs: Tensor) -> dict[str, Any]:
    """Gain of a defect entering each timestep: all the perturbed trajectories advance as one batch."""
    steps = xs.shape[0] - 1
    gen = torch.Generator().manual_seed(1)
    perturbed, defects = xs[:0], []
    for k in range(steps):
        defect = DEFECT * torch.randn(xs.shape[1:], generator=gen, dtype=xs.dtype)
        perturbed = torch.cat([perturbed, (xs[k] + defect)[None]])
        perturbed = step(torch.full((k + 1,), k), perturbed)
        defects.append(defect)
    gains = (perturbed - xs[-1]).flatten(1).norm(dim=1) / torch.stack(defects).flatten(1).norm(dim=1)
    quarter = max(steps // 4, 1)
    summary = [
        {"timesteps": f"{lo}-{min(lo + quarter, steps) - 1}", "min": float(g.min()), "max": float(g.max())}
        for lo in range(0, steps, quarter)
        if (g := gains[lo : lo + quarter]).numel()
    ]
    summary.append(
        {"timesteps": f"all (0-{steps - 1})", "min": float(gains.min()), "max": float(gains.max())}
    )
    return {"size": DEFECT, "gains": gains.tolist(), "summary": summary}


def uniform_tolerance(
    model: nn.Module, labels: Tensor, steps: int, taus: tuple[float, ...]
) -> dict[str, Any]:
    explicit, implicit = block_cost(model)
    budget = steps * (explicit + (ITERATIONS if implicit else 0))
    reference = sample(model, GaussianDiffusion(), labels, budget=budget, steps=steps,
                       generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    rows = []
    for config in CONFIGS[:2]:  # Picard and the sampler's default, every timestep in flight
        for tau in taus:
            scaled = run_parallel(model, labels, config, False, steps=steps, tau=tau)
            uniform = run_parallel(model, labels, config, False, steps=steps, tol=tau)
            row = {"rule": config.method, "tau": tau, "scaled_sweeps": scaled.sweeps}
            row.update(uniform_sweeps=uniform.sweeps)
            row["scaled_max_diff"] = float((scaled.images - reference).abs().max())
            row["uniform_max_diff"] = float((uniform.images - reference).abs().max())
            rows.append(row)
    return {"rows": rows}


def newton_rounds(step: Step, x0: Tensor, tol: Tensor, max_rounds: int) -> tuple[int, Tensor]:
    """Newton's method on ``x_{k+1} = s(k, x_k)`` from the guess ``x_k = x_0``: one batched evaluation of
    every step per round, then ``x'_{k+1} = s(k, x_k) + J_k (x'_k - x_k)`` down the chain."""
    steps = tol.shape[0]
    xs = x0[None].repeat(steps + 1, *[1] * x0.dim())
    k_all = torch.arange(steps)
    for rounds in range(1, max_rounds + 1):
        images = step(k_all, xs[:-1])
        residual = (xs[1:] - images).flatten(1).norm(dim=1)
        if bool((residual <= tol).all()):
            return rounds, xs
        new = xs.clone()
        for k in range(steps):
            v = new[k] - xs[k]
            norm = float(v.norm())
            if norm == 0:
                new[k + 1] = images[k]
                continue
            h = 1e-6 * max(1.0, float(xs[k].norm())) / norm
            k_one = torch.tensor([k])
            ahead, behind = step(k_one, (xs[k] + h * v)[None])[0], step(k_one, (xs[k] - h * v)[None])[0]
            new[k + 1] = images[k] + (ahead - behind) / (2 * h)
        xs = new
    return max_rounds, xs


def newton(step: Step, x0: Tensor, sigma: Tensor, xs_seq: Tensor, taus: tuple[float, ...]) -> dict[str, Any]:
    steps, scale = sigma.shape[0], math.sqrt(x0.numel())
    rows = []
    for tau in taus:
        tol = tau * sigma * scale
        rounds, xs = newton_rounds(step, x0, tol, steps)
        rows.append({"tau": tau, "rule": "Newton (exact Jacobian)", "sweeps": rounds})
        rows[-1]["max_diff"] = float((xs[-1] - xs_seq[-1]).abs().max())
        for rule, solver in (
            ("Picard (ParaDiGMS)", Picard()),
            ("ChainSecant", ChainSecant(blocks=x0.shape[0])),
        ):
            out = solve_chain(step, x0, steps, solver=solver, tol=tol, form="cumulative")
            rows.append({"tau": tau, "rule": rule, "sweeps": out.sweeps})
            rows[-1]["max_diff"] = float((out.zs[-1] - xs_seq[-1]).abs().max())
    return {"rows": rows}


@torch.no_grad()
def contraction(model: nn.Module, labels: Tensor, steps: int) -> dict[str, Any]:
    """Per Picard iteration of FPDM's implicit block: the ratio of its residual to the next one's."""
    diffusion = GaussianDiffusion()
    timesteps = diffusion.respace(steps)
    x = torch.randn(labels.shape[0], model.in_channels, model.input_size, model.input_size,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    ratios = []
    for i, t in enumerate(timesteps):
        t_batch = torch.full_like(labels, t)
        _, probe = model(x, t_batch, labels, max_iter=PROBE_ITERATIONS, tol=1e-30, solver=Picard())
        trace = probe.stats.trace.double()
        ratios.append(trace[:-1] / trace[1:])
        eps, _ = model(x, t_batch, labels, max_iter=ITERATIONS, tol=None)
        x = diffusion.ddim_step(x, eps, t, timesteps[i + 1] if i + 1 < len(timesteps) else -1)
    by_iteration = torch.stack(ratios).T  # (iteration, timestep)
    rows = [
        {
            "iteration": i + 1,
            "median": float(r.median()),
            "low": float(r.quantile(0.1)),
            "high": float(r.quantile(0.9)),
        }
        for i, r in enumerate(by_iteration)
    ]
    return {"iterations": PROBE_ITERATIONS, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = harness.parser(__doc__, "fpdm_chain_analysis.json").parse_args(argv)
    started = harness.start()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ChainRuleWarning)
    samples, steps = (4, 12) if args.quick else (SAMPLES, STEPS)
    labels = torch.arange(samples) % 10
    dit = trained_model("DiT-Digits/2", args.quick)
    record: dict[str, Any] = {"model": "DiT-Digits/2 (FPDM-Digits/2 for the contraction)", "samples": samples}
    record.update(steps=steps, uniform_tolerance=uniform_tolerance(dit, labels, steps, TAUS))
    step, x0, sigma = ddim_chain(dit, labels, steps, torch.float64)
    xs = rollout(step, x0, steps)
    record.update(perturbation=perturbation(step, xs), newton=newton(step, x0, sigma, xs, NEWTON_TAUS))
    record["contraction"] = contraction(trained_model("FPDM-Digits/2", args.quick), labels, steps)
    return harness.finish(args, "fpdm_chain_analysis.json", record, started)


if __name__ == "__main__":
    sys.exit(main())
