"""Parallel DDIM runs shared by the FPDM benchmarks: the models, the parallel rows, the GPU wall-clock rows.

* :func:`trained_model`: FPDM-Digits/2 or DiT-Digits/2 trained by the example's ``train.py`` for a few
  hundred steps (kept under ``runs/bench-parallel`` and reused);
* :data:`CONFIGS` and :func:`run_parallel`: the parallel sampler's rows (rule, form, window), all with
  the default noise-scaled tolerances unless told otherwise;
* :func:`mixture_chain`: a held-out DDIM chain (a Gaussian mixture with its exact noise prediction);
* :func:`parallel_gpu_rows`: the wall-clock comparison of parallel and sequential DDIM for a GPU
  (``benchmarks.gpu``'s ``chain`` section).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from fpdm.diffusion import GaussianDiffusion
from fpdm.models import create_model
from fpdm.parallel import sample_parallel
from fpdm.sampling import block_cost, sample
from torch import Tensor, nn

from benchmarks import harness
from implicitdiff import Anderson, Picard

RUNS = harness.ROOT / "runs" / "bench-parallel"
STEPS = 100
ITERATIONS = 2  # FPDM's implicit-block evaluations per timestep, as in the demo (timestep smoothing)
TRAIN = {"steps": 400, "lr": 2e-3, "batch_size": 128, "ema_warmup": True, "data": "digits-train"}


def trained_model(name: str, quick: bool) -> nn.Module:
    """The preset ``name`` trained with ``train.py`` (``TRAIN``), loaded with its EMA weights; cached."""
    from fpdm import generation
    from fpdm.training import CHECKPOINT_NAME, TrainConfig, train

    steps = 3 if quick else TRAIN["steps"]
    out = RUNS / f"{name.split('-')[0].lower()}-{steps}"
    if not (out / CHECKPOINT_NAME).exists():
        options = {**TRAIN, "steps": steps, "ckpt_every": steps, "log_every": max(steps // 4, 1)}
        train(TrainConfig(out=str(out), model=name, device="cpu", progress=False, **options))
    return generation.load_model(out / CHECKPOINT_NAME)


def _sampler_default() -> None:
    """``sample_parallel``'s default rule: ``ChainSecant(blocks=B)``, one secant model per sample."""
    return None


@dataclasses.dataclass(frozen=True)
class Config:
    """One parallel row: the rule's label, a factory of the rule, the map iterated and the window
    (``None``: every timestep in flight). A new rule is one more entry of ``CONFIGS``."""

    method: str
    rule: Callable[[], Any]
    form: str = "cumulative"
    window: int | None = None


#: The parallel rows; the step form takes every timestep's sweep anyway, so its rows run a window of 16
#: to spend fewer evaluations on the same answer.
CONFIGS = [
    Config("Picard", Picard),
    Config("ChainSecant", _sampler_default),
    Config("Anderson(m=6)", functools.partial(Anderson, m=6)),
    Config("Picard", Picard, window=16),
    Config("ChainSecant", _sampler_default, window=16),
    Config("Anderson(m=6)", functools.partial(Anderson, m=6), window=16),
    Config("Picard", Picard, "step", 16),
    Config("Anderson(m=6)", functools.partial(Anderson, m=6), "step", 16),
]


def run_parallel(model: nn.Module, labels: torch.Tensor, config: Config, reuse: bool, **options: Any) -> Any:
    """``sample_parallel`` with the rule, form and window of ``config`` (FPDM: ``ITERATIONS`` per call)."""
    kwargs = {"iterations": ITERATIONS, "reuse": reuse} if block_cost(model)[1] else {}
    return sample_parallel(
        model,
        GaussianDiffusion(),
        labels,
        steps=options.pop("steps", STEPS),
        solver=config.rule(),
        form=config.form,
        window=config.window,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
        **options,
    )


def random_model(name: str, device: torch.device, quick: bool) -> nn.Module:
    """A preset with random weights N(0, 0.02^2): unlike adaLN-Zero's initialisation (zero noise
    predicted everywhere), its predictions depend on the input, so the chain has work to do."""
    torch.manual_seed(0)
    model = create_model(name, **({"hidden_size": 32, "num_heads": 2} if quick else {}))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model.to(device).eval()


def parallel_gpu_rows(device: str | torch.device = "cuda", quick: bool = False) -> list[dict[str, Any]]:
    """Wall-clock of parallel DDIM against sequential DDIM at batch 1, 4 and 16 (one row per case and rule).

    FPDM-XL/2 and DiT-XL/2 with random weights, 100 DDIM timesteps, no guidance (``quick``: the digits
    presets, small, and 20 timesteps: a CPU smoke run of the same code); FPDM with 2 Picard iterations per
    timestep and cold starts (its step is then one fixed function, the sequential sampler's with
    ``reuse=False``). The parallel sampler runs the full-window entries of ``CONFIGS`` (Picard, ChainSecant
    and Anderson on the cumulative map, every timestep in flight) with its defaults: noise-scaled tolerances
    and ``max_batch="auto"`` (reported as ``max_batch``). Per row: median wall-clock over 3 runs of each
    sampler (2 at batch 16) after a warm-up (one sweep for the parallel sampler), the speed-up, sweeps
    (sequential rounds), the chain's evaluations (timesteps evaluated), block evaluations per sample of
    both samplers, and the largest difference between the two samples. Random weights make a sensitive
    chain (a defect at a noisy timestep can move the sample far), so ``max_diff`` here says how well the
    tolerances hold the trajectory, not image quality.
    """
    device = torch.device(device)
    names = ("FPDM-Digits/2", "DiT-Digits/2") if quick else ("FPDM-XL/2", "DiT-XL/2")
    steps = 20 if quick else STEPS
    rows = []
    for name in names:
        model = random_model(name, device, quick)
        explicit, implicit = block_cost(model)
        per_step = explicit + (ITERATIONS if implicit else 0)
        for batch in (1, 4, 16):
            repeats = 1 if quick else (2 if batch >= 16 else 3)
            labels = torch.arange(batch, device=device) % model.num_classes
            sequential = functools.partial(
                sample, model, GaussianDiffusion(), labels, budget=steps * per_step, steps=steps, reuse=False,
                generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
            sequential()  # warm-up
            seq_s, seq = harness.timed(sequential, repeats, device=device)
            for config in (c for c in CONFIGS if c.form == "cumulative" and c.window is None):
                parallel = functools.partial(run_parallel, model, labels, config, False, steps=steps)
                parallel(max_sweeps=1)  # warm-up: one sweep, the largest call
                par_s, par = harness.timed(parallel, repeats, device=device)
                row = {"model": name, "batch": batch, "solver": config.method, "device": str(device)}
                row.update(steps=steps, tau=par.options["tau"], max_batch=par.options["max_batch"])
                row.update(sequential_s=seq_s, parallel_s=par_s, speedup=seq_s / par_s, sweeps=par.sweeps)
                row.update(block_evals=par.block_evals, sequential_block_evals=seq.spent_total)
                row.update(evaluations=par.chain.total_evaluations, converged=par.converged)
                row["max_diff"] = float((par.images - seq.images).abs().max())
                rows.append(row)
    return rows


def mixture_chain(
    seed: int = 11, samples: int = 48, dim: int = 12, components: int = 8, var: float = 0.03
) -> Any:
    """DDIM (100 trailing timesteps, eta 0) on a Gaussian mixture whose noise prediction is exact: ``step``,
    ``x0`` ``(samples, dim)`` float64, and the noise levels ``sigma_k`` of the timesteps."""
    generator = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(components, dim, generator=generator, dtype=torch.float64)
    diffusion = GaussianDiffusion()
    timesteps = diffusion.respace(STEPS)
    abar = diffusion.alpha_bar(torch.tensor(timesteps))
    abar_next = diffusion.alpha_bar(torch.tensor([*timesteps[1:], -1]))

    def step(k: Tensor, x: Tensor) -> Tensor:
        a, a_next = abar[k][:, None, None], abar_next[k][:, None, None]
        offset = x[:, :, None] - a[..., None].sqrt() * means  # (K, samples, components, dim)
        variance = (a * var + 1 - a)[..., None]
        weights = torch.softmax(-(offset**2).sum(-1) / (2 * variance[..., 0]), dim=-1)
        eps = (1 - a).sqrt() * (weights[..., None] * offset).sum(2) / variance[..., 0]
        clean = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a_next.sqrt() * clean + (1 - a_next).sqrt() * eps

    x0 = torch.randn(samples, dim, generator=generator, dtype=torch.float64)
    return step, x0, (1 - abar).sqrt()
