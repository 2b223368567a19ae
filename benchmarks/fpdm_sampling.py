"""Does the solver machinery cost anything in sampling? The budgeted sampler against a hand-written loop.

Run::

    python -m benchmarks.fpdm_sampling                  # writes benchmarks/results/fpdm_sampling.json
    python -m benchmarks.fpdm_sampling --quick          # 1 repetition, batches 4 and 8
    python -m benchmarks.fpdm_sampling --checkpoint runs/demo/train/checkpoint.pt   # trained weights

Per configuration (batch, budget, guidance), two ways to compute the same samples:

* ``sampler``: :func:`sampling.sample` with Picard, a constant schedule and solution reuse: every fixed-point
  solve goes through ``FPDM.forward`` -> ``DEQLayer`` -> ``fixed_point`` -> ``Picard`` and its bookkeeping
  (residuals, best iterate, convergence masks, trace, the budget checks);
* ``hand``: the same block evaluations written out as a plain loop over the model's parts (embed, pre
  blocks, injection, ``n`` calls of the implicit block from the previous step's state, post blocks, head,
  guidance, DDIM step), with nothing else.

Both run under ``torch.no_grad`` on the same weights and noise; the script checks that they give the same
images (``max_abs_diff``) and reports the median wall-clock of ``--reps`` interleaved repetitions (after one
warm-up each) and ``ratio = sampler / hand``. The target is ``ratio <= 1.05``. ``syncs_per_timestep``
counts the sampler's host synchronisations (:class:`implicitdiff.diagnostics.SyncCounter`; a fixed
schedule reads the residuals once at the end of the run, so it is about ``1 / steps``). ``cpu_ratio`` is
the same with the process's CPU time, which a busy machine disturbs less (with one thread). Wall-clock on
a shared machine is noise: the JSON records the load average at the start and the end; re-run on a quiet
machine for figures to quote. The weights do not change the cost (a constant schedule never stops early);
random ones are used unless ``--checkpoint`` is given.
"""

from __future__ import annotations

import sys

import torch
from fpdm.diffusion import GaussianDiffusion
from fpdm.models import FPDM, create_model
from fpdm.sampling import allocate, block_cost, pick_steps, sample
from torch import Tensor

from benchmarks import harness
from implicitdiff.diagnostics import SyncCounter


def random_fpdm(seed: int = 0) -> FPDM:
    """The demo's FPDM (hidden 64, 1 pre, 1 implicit, 1 post block) with N(0, 0.05^2) weights."""
    torch.manual_seed(seed)
    model = create_model("FPDM-Digits/2", hidden_size=64, num_heads=4, class_dropout_prob=0.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


@torch.no_grad()
def hand_loop(
    model: FPDM,
    diffusion: GaussianDiffusion,
    labels: Tensor,
    timesteps: list[int],
    iterations: list[int],
    guidance: float,
    generator: torch.Generator,
) -> Tensor:
    """The sampler's block evaluations as a plain loop: DDIM, Picard from the last step's state, guidance."""
    shape = (labels.shape[0], model.in_channels, model.input_size, model.input_size)
    guided = guidance != 1.0
    y = torch.cat([labels, torch.full_like(labels, model.null_label)]) if guided else labels
    x = torch.randn(shape, generator=generator)
    z = None
    for i, t in enumerate(timesteps):
        x_in = torch.cat([x, x]) if guided else x
        h, c = model.embed(x_in, torch.full((x_in.shape[0],), t, dtype=torch.long), y)
        for block in model.blocks_pre:
            h = block(h, c)
        x_inj = model.injection(h)
        z = h if z is None else z
        for _ in range(iterations[i]):
            z = model.implicit_block(z, x_inj, c)
        out = z
        for block in model.blocks_post:
            out = block(out, c)
        eps = model.head(out, c)
        if guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x = diffusion.ddim_step(x, eps, t, t_prev)
    return x


def bench_config(
    model: FPDM, batch: int, budget: int, guidance: float, reps: int, seed: int = 0
) -> dict[str, float | int]:
    """Time the sampler and the hand loop on one configuration, interleaved; check they agree."""
    diffusion = GaussianDiffusion()
    labels = torch.arange(batch) % model.num_classes
    fixed, implicit = block_cost(model)
    steps = pick_steps(budget, fixed, implicit)
    iterations = allocate(budget, steps, fixed, "constant")
    timesteps = diffusion.respace(steps)

    def run_sampler() -> Tensor:
        result = sample(model, diffusion, labels, budget=budget, guidance=guidance,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
        if result.spent_total != budget or result.iterations != iterations:
            raise RuntimeError(f"the sampler spent {result.spent_total} of {budget} ({result.iterations})")
        return result.images

    def run_hand() -> Tensor:
        return hand_loop(model, diffusion, labels, timesteps, iterations, guidance,
                         torch.Generator().manual_seed(seed))  # fmt: skip

    images_sampler = run_sampler()
    images_hand = run_hand()
    timings = harness.interleaved({"sampler": run_sampler, "hand": run_hand}, reps, warmup=0)
    with SyncCounter() as sampler_syncs:
        run_sampler()
    with SyncCounter() as hand_syncs:
        run_hand()
    sampler, hand = timings["sampler"], timings["hand"]
    sampler_s, hand_s, sampler_cpu, hand_cpu = sampler.wall, hand.wall, sampler.cpu, hand.cpu
    return {
        "batch": batch,
        "guidance": guidance,
        "budget": budget,
        "steps": steps,
        "iterations_per_step": iterations[0],
        "sampler_s": sampler_s,
        "hand_s": hand_s,
        "sampler_min_s": min(sampler.walls),
        "hand_min_s": min(hand.walls),
        "ratio": sampler_s / hand_s,
        "ratio_of_min": min(sampler.walls) / min(hand.walls),
        "sampler_cpu_s": sampler_cpu,
        "hand_cpu_s": hand_cpu,
        "cpu_ratio": sampler_cpu / hand_cpu,
        "max_abs_diff": float((images_sampler - images_hand).abs().max()),
        "syncs_per_timestep": sampler_syncs.count / steps,
        "hand_syncs_per_timestep": hand_syncs.count / steps,
        "syncs_by_op": dict(sampler_syncs.by_op),
    }


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "fpdm_sampling.json")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", default=None, help="a train.py checkpoint (default: random weights)")
    args = parser.parse_args(argv)
    started = harness.start()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        from fpdm.generation import load_model

        model = load_model(args.checkpoint)
        if not isinstance(model, FPDM):
            raise SystemExit("the benchmark needs an FPDM checkpoint")
    else:
        model = random_fpdm()
    reps = 1 if args.quick else args.reps
    # (batch, budget, guidance): the demo's setting (100 digits, guidance 2) and a small unguided batch.
    configs = [(4, 48, 1.0), (8, 48, 2.0)] if args.quick else [(16, 48, 1.0), (100, 48, 2.0), (100, 96, 2.0)]
    rows = [bench_config(model, batch, budget, guidance, reps) for batch, budget, guidance in configs]
    name = "checkpoint " + args.checkpoint if args.checkpoint else "FPDM-Digits/2 hidden 64, random weights"
    record = {"model": name, "reps": reps, "results": rows}
    return harness.finish(args, "fpdm_sampling.json", record, started)


if __name__ == "__main__":
    sys.exit(main())
