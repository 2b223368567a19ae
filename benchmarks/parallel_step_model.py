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
from benchmarks.fpdm_chains import ITERATIONS, STEPS, TRAIN, trained_model
from implicitdiff import ChainRuleWarning, ChainSecant
from implicitdiff._chainrules import Sweep

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

    def __call__(self, sweep: Sweep, proposal: Tensor) -> None:
        spent = (self.evaluations[-1] if self.evaluations else 0) + sweep.images.shape[0]
        self.evaluations.append(spent)
        last = sweep.steps is not None and int(sweep.steps[-1]) == self.steps - 1
        final = proposal[-1] if last and sweep.final < proposal.shape[0] else None
        if final is None:  # the last step is final (its image) or not in flight yet
            final = sweep.images[-1] if last else None
        dist = float("inf") if final is None else float((final - self.reference).abs().max())
        self.distance.append(dist)


class Modelled(ChainSecant):
    """ChainSecant with the base model ``beta_k I`` of step ``k`` (``secant=False``: the base alone)."""

    def __init__(self, beta: Tensor | float, secant: bool, trace: Trace, blocks: int) -> None:
        super().__init__(blocks=blocks, safeguard=4.0 if secant else float("inf"))
        self.beta, self.secant_on, self.trace = beta, secant, trace

    def _base(self, sweep: Sweep) -> float | Tensor:
        if isinstance(self.beta, float):
            return self.beta
        assert sweep.steps is not None
        return self.beta.to(sweep.images.dtype)[sweep.steps]

    def models(self, state: Any, base: float | Tensor) -> tuple[Tensor, Tensor]:
        P, C = super().models(state, base)
        return (P, C) if self.secant_on else (P, torch.zeros_like(C))

    def propose(self, state: Any, sweep: Sweep) -> tuple[Tensor, Any]:
        out, state = super().propose(state, sweep)
        self.trace(sweep, out)
        return out, state


class Fitted(Modelled):
    """The base ``beta_{k,b} I`` of step ``k`` and sample ``b`` fitted to that step's secant pairs,
    :math:`\beta = \sum_i \langle\Delta x_i, \Delta s_i\rangle / \sum_i \|\Delta x_i\|^2`
    (``beta`` the prior before the first pair), and the multisecant correction on top if ``secant``."""

    def propose(self, state: Any, sweep: Sweep) -> tuple[Tensor, Any]:
        prev, fz, z, d = sweep.inputs, sweep.images, sweep.estimates, sweep.change
        self.record(state, prev, fz, z)
        rows, m, n = state.X.shape
        X = state.X.view(rows, m, self.blocks, -1).transpose(1, 2)
        S = state.S.view(rows, m, self.blocks, -1).transpose(1, 2)
        xx, xs = (X * X).sum((2, 3)), (X * S).sum((2, 3))
        prior = self._base(sweep)
        prior = prior[:, None] if isinstance(prior, Tensor) else torch.full_like(xx[:, :1], prior)
        beta = torch.where(xx > 0, xs / xx.clamp_min(torch.finfo(xx.dtype).tiny), prior)
        scale = torch.linalg.vector_norm(X, dim=3, keepdim=True).clamp_min_(torch.finfo(X.dtype).tiny)
        X, S = X / scale, S / scale
        gram = torch.matmul(X, X.transpose(2, 3))
        gram.diagonal(dim1=2, dim2=3).add_(torch.finfo(X.dtype).eps)
        P = torch.linalg.solve_ex(gram, X)[0]
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
        self.trace(sweep, out)
        return out, state


RULES: dict[str, tuple[Any, ...]] = {
    "Picard (beta 1, ParaDiGMS)": ("1", False),
    "Picard, beta r_k (x0 part)": ("x0", False),
    "Picard, beta a_k (eps part)": ("eps", False),
    "ChainSecant (beta 1)": ("1", True),
    "Secant on x0 part (beta r_k)": ("x0", True),
    "Secant on eps part (beta a_k)": ("eps", True),
    "Fitted scalar (prior r_k)": ("x0", False, Fitted),
    "Fitted scalar (prior 1)": ("1", False, Fitted),
    "Fitted scalar + secant (prior r_k)": ("x0", True, Fitted),
    "Fitted scalar + secant (prior 1)": ("1", True, Fitted),
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
    base, secant, *kind = RULES[rule]
    cls = kind[0] if kind else Modelled
    beta = 1.0 if base == "1" else linear_parts(steps)[base]
    trace = Trace(reference.reshape(-1).double(), steps)
    kwargs = {"iterations": ITERATIONS} if block_cost(model)[1] else {}
    out = sample_parallel(
        model,
        DIFFUSION,
        labels,
        steps=steps,
        solver=cls(beta, secant, trace, labels.shape[0]),
        generator=torch.Generator().manual_seed(0),
        **kwargs,
        **options,
    )
    found = oracle(trace)
    row = {"rule": rule, "sweeps": out.sweeps, "evaluations": out.chain.total_evaluations / steps}
    row.update(max_diff=float((out.images - reference).abs().max()), converged=out.converged)
    row.update(oracle_sweeps=found, oracle_evaluations=None if found is None else trace.evaluations[found - 1] / steps)
    row.update(trace=trace.distance, options={k: v for k, v in options.items()})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "parallel_step_model.json")
    parser.add_argument("--rules", nargs="*", default=list(RULES))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--windows", type=int, nargs="*", default=[0], help="0: every timestep")
    parser.add_argument("--taus", type=float, nargs="*", default=[0.0], help="0: the default")
    parser.add_argument("--tols", type=float, nargs="*", default=[], help="uniform RMS tolerances")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ChainRuleWarning)
    started = harness.start()
    samples, steps = (4, 12) if args.quick else (SAMPLES, STEPS)
    labels = torch.arange(samples) % 10
    rows = []
    for name in args.models:
        model = trained_model(name, args.quick)
        explicit, implicit = block_cost(model)
        reference = sample(
            model, DIFFUSION, labels, budget=steps * (explicit + (ITERATIONS if implicit else 0)),
            steps=steps, reuse=False, generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip
        grid = [{"tau": tau or None} for tau in args.taus] + [{"tol": tol} for tol in args.tols]
        for rule, window, stop in ((r, w, s) for r in args.rules for w in args.windows for s in grid):
            row = run(model, labels, reference, steps, rule, window=window or None, **stop)
            row["model"] = name
            rows.append(row)
            print(
                f"{name:14} {rule:32} {row['options']} sweeps {row['sweeps']:3} evals {row['evaluations']:5.2f}x "
                f"diff {row['max_diff']:.1e} | oracle {row['oracle_sweeps']} sweeps "
                f"{row['oracle_evaluations']}x | trace "
                + " ".join(f"{d:.0e}" for d in row["trace"]),
                flush=True,
            )
    record = {"steps": steps, "samples": samples, "iterations": ITERATIONS, "train": TRAIN}
    record.update(max_diff=MAX_DIFF, rows=rows)
    out = harness.out_path(args)
    if out is not None:
        harness.write_results(out, record, started=started, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
