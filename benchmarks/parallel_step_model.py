"""A better model of each DDIM step for the parallel sampler: the step's own linear part, windows, stopping.

::

    python -m benchmarks.parallel_step_model            # ~25 min on 2 busy cores (models cached)
    python -m benchmarks.parallel_step_model --quick    # a smoke run; its numbers mean nothing

Deterministic DDIM from :math:`t_k` to :math:`t_{k+1}` is

.. math:: x_{k+1} = r_k x_k + c_k \\hat x_0(x_k) = a_k x_k + b_k \\hat\\epsilon(x_k),

with :math:`r_k = \\sigma_{k+1}/\\sigma_k` (:math:`\\sigma = \\sqrt{1 - \\bar\\alpha}`) and
:math:`a_k = \\sqrt{\\bar\\alpha_{k+1}/\\bar\\alpha_k}`: linear in the state plus a part the model
predicts. Each row runs ``fpdm.parallel.sample_parallel`` on the digits models of
:func:`benchmarks.fpdm_chains.trained_model` (16 samples, 100 trailing DDIM timesteps, FPDM with 2 Picard
iterations per timestep from cold starts, float32 as the sampler runs) with a rule whose model of step
:math:`k`'s Jacobian is a base :math:`\\beta_k I` plus, for the secant rules, ChainSecant's multisecant
correction fitted to the rest of the step (pairs :math:`(\\Delta x, \\Delta s - \\beta_k\\Delta x)`, one
model per sample):

* ``beta = 1``: the cumulative map (Picard: ParaDiGMS; with secants: ``ChainSecant``, the sampler's
  default);
* ``beta = r_k``: the predicted clean image is the nonlinear part (:math:`\\hat x_0` parametrisation);
* ``beta = a_k``: the predicted noise is the nonlinear part (:math:`\\hat\\epsilon` parametrisation).

Every sweep's proposal of the final sample is compared with the sequential sampler's samples
(``fpdm.sampling.sample``, ``reuse=False``, same noise), at no extra model call: ``oracle_sweeps`` is the
first sweep whose proposal is within ``MAX_DIFF`` (max over pixels, scale [-1, 1]) and stays so,
``sweeps`` is where the stopping test (noise-scaled ``tau sigma_{t_k}``) ended the solve, and the
evaluations are timesteps evaluated, per sample, against the sequential sampler's ``steps``.
Written to ``benchmarks/results/parallel_step_model.json``.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from fpdm.diffusion import GaussianDiffusion
from fpdm.parallel import sample_parallel
from fpdm.sampling import block_cost, sample
from torch import Tensor, nn

from benchmarks import harness
from benchmarks.chain_grid import GRID, grid_sweeps
from benchmarks.fpdm_chains import ITERATIONS, STEPS, TRAIN, trained_model
from implicitdiff import ChainRuleWarning, ChainSecant

MAX_DIFF = 1e-3
SAMPLES = 16
DIFFUSION = GaussianDiffusion()
MODELS = ("DiT-Digits/2", "FPDM-Digits/2")


def linear_parts(steps: int) -> dict[str, Tensor]:
    """Per timestep, the coefficient of the state in each parametrisation (float64 ``(steps,)``)."""
    timesteps = DIFFUSION.respace(steps)
    abar = DIFFUSION.alpha_bar(torch.tensor(timesteps)).double()
    abar_next = DIFFUSION.alpha_bar(torch.tensor([*timesteps[1:], -1])).double()
    return {"x0": ((1 - abar_next) / (1 - abar)).sqrt(), "eps": (abar_next / abar).sqrt()}


@dataclass
class Trace:
    """Per sweep: timesteps evaluated so far and the proposal's distance to the sequential samples."""

    reference: Tensor
    steps: int
    evaluations: list[int] = field(default_factory=list)
    distance: list[float] = field(default_factory=list)

    def __call__(self, sweep: Any, proposal: Tensor) -> None:
        spent = (self.evaluations[-1] if self.evaluations else 0) + sweep.images.shape[0]
        self.evaluations.append(spent)
        last = sweep.steps is not None and int(sweep.steps[-1]) == self.steps - 1
        final = proposal[-1] if last and sweep.final < proposal.shape[0] else None
        if final is None:  # the last step is final (its image) or not in flight yet
            final = sweep.images[-1] if last else None
        dist = float("inf") if final is None else float((final - self.reference).abs().max())
        self.distance.append(dist)


class Modelled(ChainSecant):
    r"""ChainSecant whose base model of step ``k`` (and sample ``b``) is ``beta I`` instead of ``I``.

    ``beta`` is the prior (a number, one per step, or ``None``: the form's, ``1`` or ``0``); with ``fit``
    it is fitted to the step's secant pairs of each sample,
    :math:`\beta = \sum_i \langle\Delta x_i, \Delta s_i\rangle / \sum_i \|\Delta x_i\|^2`, the prior
    standing until the first pair. With ``secant`` ChainSecant's multisecant correction is fitted to what
    the base leaves, :math:`(\Delta x, \Delta s - \beta\Delta x)`;
    without, the base alone carries the change down the window.
    """

    def __init__(
        self,
        beta: Tensor | float | None,
        secant: bool,
        trace: Trace | None,
        blocks: int,
        m: int = 3,
        fit: bool = False,
    ) -> None:
        super().__init__(m=m, blocks=blocks, safeguard=4.0 if secant else float("inf"))
        self.beta, self.secant_on, self.trace, self.fit = beta, secant, trace, fit

    def propose(self, state: Any, sweep: Any) -> tuple[Tensor, Any]:
        prev, fz, z, d = sweep.inputs, sweep.images, sweep.estimates, sweep.change
        self.record(state, prev, fz, z)
        rows, m, n = state.X.shape
        X = state.X.view(rows, m, self.blocks, -1).transpose(1, 2)  # (rows, blocks, m, n / blocks)
        S = state.S.view(rows, m, self.blocks, -1).transpose(1, 2)
        if self.beta is None or isinstance(self.beta, float):
            prior = (1.0 if sweep.cumulative else 0.0) if self.beta is None else self.beta
            beta = X.new_full((rows, self.blocks), prior)
        else:
            assert sweep.steps is not None
            beta = self.beta.to(X.dtype)[sweep.steps][:, None].expand(rows, self.blocks)
        if self.fit:
            xx, xs = (X * X).sum((2, 3)), (X * S).sum((2, 3))
            beta = torch.where(xx > 0, xs / xx.clamp_min(torch.finfo(xx.dtype).tiny), beta)
        scale = torch.linalg.vector_norm(X, dim=3, keepdim=True).clamp_min_(torch.finfo(X.dtype).tiny)
        X, S = X / scale, S / scale
        gram = torch.matmul(X, X.transpose(2, 3)).double()  # ChainSecant's fit on the CPU
        gram.diagonal(dim1=2, dim2=3).add_(torch.finfo(X.dtype).eps + torch.finfo(gram.dtype).tiny)
        P = torch.linalg.solve_ex(gram, X.double())[0].to(X.dtype)
        Ct = (S - beta[..., None, None] * X).transpose(2, 3)
        if not self.secant_on:
            Ct = torch.zeros_like(Ct)
        out = fz.clone()
        state.secant.zero_()
        per_entry = beta.repeat_interleave(n // self.blocks, dim=1)
        for j in range(sweep.final, rows):
            secant = torch.bmm(Ct[j], torch.bmm(P[j], d.view(self.blocks, -1, 1))).view(-1)
            state.secant[j] = secant
            out[j] = fz[j] + per_entry[j] * d + secant
            d = out[j] - z[j]
        if self.trace is not None:
            self.trace(sweep, out)
        return out, state


class Traced:
    """A rule of the library, its proposals traced."""

    reads_chain = True
    can_restart = True

    def __init__(self, rule: ChainSecant, trace: Trace) -> None:
        self.rule, self.trace = rule, trace

    def start(self, sweep: Any) -> Any:
        return self.rule.start(sweep)

    def propose(self, state: Any, sweep: Any) -> tuple[Tensor, Any]:
        out, state = self.rule.propose(state, sweep)
        self.trace(sweep, out)
        return out, state

    def restart(self, state: Any, mask: Tensor) -> Any:
        return self.rule.restart(state, mask)


#: label: (base, secants, options); base "library" is ChainSecant itself with the options.
RULES: dict[str, tuple[Any, ...]] = {
    "Picard: I (ParaDiGMS)": ("1", False),
    "Picard: r_k I (x0 part nonlinear)": ("x0", False),
    "Picard: a_k I (eps part nonlinear)": ("eps", False),
    "ChainSecant: I + secants": ("1", True),
    "r_k I + secants of the x0 part": ("x0", True),
    "a_k I + secants of the eps part": ("eps", True),
    "ChainSecant(m=6): I + 6 secants": ("1", True, {"m": 6}),
    "fitted scalar (from r_k)": ("x0", False, {"fit": True}),
    "fitted scalar (from 1)": ("1", False, {"fit": True}),
    "fitted scalar (from r_k) + secants": ("x0", True, {"fit": True}),
    "ChainSecant(base='fitted')": ("library", True, {"base": "fitted"}),
}


def oracle(trace: Trace) -> int | None:
    """The first sweep from which every proposal is within ``MAX_DIFF``."""
    first = None
    for s, dist in enumerate(trace.distance, start=1):
        if dist <= MAX_DIFF:
            first = s if first is None else first
        else:
            first = None
    return first


def run(
    model: nn.Module, labels: Tensor, reference: Tensor, steps: int, rule: str, **options: Any
) -> dict[str, Any]:
    base, secant, *extra = RULES[rule]
    trace = Trace(reference.reshape(-1).double(), steps)
    options_of_rule = extra[0] if extra else {}
    if base == "library":
        solver: Any = Traced(ChainSecant(blocks=labels.shape[0], **options_of_rule), trace)
    else:
        beta = 1.0 if base == "1" else linear_parts(steps)[base]
        solver = Modelled(beta, secant, trace, labels.shape[0], **options_of_rule)
    kwargs = {"iterations": ITERATIONS} if block_cost(model)[1] else {}
    out = sample_parallel(
        model,
        DIFFUSION,
        labels,
        steps=steps,
        solver=solver,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
        **options,
    )
    found = oracle(trace)
    row = {"rule": rule, "sweeps": out.sweeps, "evaluations": out.chain.total_evaluations / steps}
    row.update(max_diff=float((out.images - reference).abs().max()), converged=out.converged)
    row.update(
        oracle_sweeps=found,
        oracle_evaluations=None if found is None else trace.evaluations[found - 1] / steps,
    )
    row.update(trace=trace.distance, options={k: v for k, v in options.items()})
    return row


#: Stopping tests and windows, for Picard (ParaDiGMS) and the sampler's default rule.
BASELINES = ("Picard: I (ParaDiGMS)", "ChainSecant: I + secants")
STOPS = [{"tau": 1e-6}, {"tau": 3e-6}, {"tau": 1e-5}, {"tol": 1e-6}, {"tol": 3e-6}, {"tol": 1e-5}]
WINDOWS = (16, 25, 33, 50)


def gain_summary() -> dict[str, Any] | None:
    """The measured gain of a defect at each timestep on the final sample (``fpdm_chain_analysis.json``,
    DiT-Digits/2, float64) and how far the noise-scaled tolerances spread: the tolerance an error bound
    would give timestep ``k`` is proportional to ``1 / gain_k``."""
    path = harness.RESULTS / "fpdm_chain_analysis.json"
    if not path.exists():
        return None
    gains = torch.tensor(json.loads(path.read_text())["perturbation"]["gains"])
    timesteps = DIFFUSION.respace(STEPS)
    sigma = (1 - DIFFUSION.alpha_bar(torch.tensor(timesteps)).double()).sqrt()
    return {
        "gain_min": float(gains.min()),
        "gain_max": float(gains.max()),
        "gain_spread": float(gains.max() / gains.min()),
        "noise_scaled_spread": float(sigma.max() / sigma.min()),
    }


def grid_rows(quick: bool) -> dict[str, Any]:
    """``ChainSecant(base="fitted")`` against Picard and ChainSecant on the chains of
    ``benchmarks.chain_grid`` (every one checked against its rollout): how often it takes more sweeps."""
    cases = GRID[::42] if quick else GRID
    counts = {"chains": len(cases), "more_than_picard": 0, "more_than_chain_secant": 0}
    counts.update(fewer_than_chain_secant=0, picard=0, chain_secant=0, fitted=0, worst=[])
    for case in cases:
        picard = grid_sweeps(case, None).sweeps
        secant = grid_sweeps(case, ChainSecant()).sweeps
        fitted = grid_sweeps(case, ChainSecant(base="fitted")).sweeps
        counts["more_than_picard"] += fitted > picard
        counts["more_than_chain_secant"] += fitted > secant
        counts["fewer_than_chain_secant"] += fitted < secant
        counts["picard"] += picard
        counts["chain_secant"] += secant
        counts["fitted"] += fitted
        if fitted > picard:
            counts["worst"].append({**case, "picard": picard, "chain_secant": secant, "fitted": fitted})
    return counts


def sections(quick: bool) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Per section, the runs: (rule, ``sample_parallel`` options)."""
    rules = [*list(RULES)[:4], "ChainSecant(base='fitted')"] if quick else list(RULES)
    return {
        "rules": [(rule, {}) for rule in rules],
        "stopping": [(rule, stop) for rule in BASELINES for stop in (STOPS[1:2] if quick else STOPS)],
        "windows": [(rule, {"window": w}) for rule in BASELINES for w in (WINDOWS[:1] if quick else WINDOWS)],
    }


def main(argv: list[str] | None = None) -> int:
    args = harness.parser(__doc__, "parallel_step_model.json").parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ChainRuleWarning)
    started = harness.start()
    samples, steps = (4, 12) if args.quick else (SAMPLES, STEPS)
    labels = torch.arange(samples) % 10
    rows = []
    for name in MODELS:
        model = trained_model(name, args.quick)
        explicit, implicit = block_cost(model)
        reference = sample(
            model, DIFFUSION, labels, budget=steps * (explicit + (ITERATIONS if implicit else 0)),
            steps=steps, reuse=False, generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip
        for section, runs in sections(args.quick).items():
            for rule, options in runs:
                measured = run(model, labels, reference, steps, rule, **options)
                row = {"model": name, "section": section, **measured}
                rows.append(row)
                print(
                    f"{name:14} {section:9} {rule:34} {options} sweeps {row['sweeps']:3} "
                    f"evals {row['evaluations']:5.2f}x diff {row['max_diff']:.1e} | oracle "
                    f"{row['oracle_sweeps']} | " + " ".join(f"{d:.0e}" for d in row["trace"]),
                    flush=True,
                )
    record = {"steps": steps, "samples": samples, "iterations": ITERATIONS, "train": TRAIN}
    record.update(max_diff=MAX_DIFF, gains=gain_summary(), rows=rows, grid=grid_rows(args.quick))
    return harness.finish(args, "parallel_step_model.json", record, started)


if __name__ == "__main__":
    sys.exit(main())
