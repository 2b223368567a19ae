"""The budgeted sampler: accounting, schedules, reuse, tolerance, seeds, agreement with plain DDIM."""

import itertools
import math

import pytest
import torch
from fpdm.diffusion import GaussianDiffusion
from fpdm.models import DiTBlock, create_model
from fpdm.reverse import model_eps
from fpdm.sampling import SCHEDULES, allocate, pick_steps, sample

from implicitdiff import Anderson, Broyden, Picard, SolverResult

SOLVERS = {"picard": Picard, "anderson": Anderson, "broyden": Broyden}


def contractive_model(name: str = "FPDM-Digits/2", seed: int = 0, **overrides):
    """A tiny model whose every weight is N(0, 0.05^2): its implicit block is a strong contraction, and
    unlike the adaLN-Zero initialisation (zero noise everywhere) its predictions depend on x, t and y."""
    torch.manual_seed(seed)
    options = {"hidden_size": 32, "num_heads": 2, "class_dropout_prob": 0.0, **overrides}
    model = create_model(name, **options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def fpdm():
    return contractive_model()


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class BlockCounter:
    """Counts calls of every DiTBlock (pre, implicit and post) with forward hooks: an independent tally."""

    def __init__(self, model):
        self.calls = 0
        self.handles = [
            m.register_forward_pre_hook(self.hook) for m in model.modules() if isinstance(m, DiTBlock)
        ]

    def hook(self, module, args):
        self.calls += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("budget,steps,fixed", [(30, 6, 2), (37, 12, 2), (100, 7, 3), (12, 4, 2), (61, 1, 2)])
def test_allocation_gives_every_step_an_iteration_and_sums_to_the_budget(schedule, budget, steps, fixed):
    iterations = allocate(budget, steps, fixed, schedule)
    assert len(iterations) == steps and min(iterations) >= 1
    assert sum(iterations) + steps * fixed == budget
    pairs = list(itertools.pairwise(iterations))
    if schedule == "increasing":
        assert all(a <= b for a, b in pairs)
    elif schedule == "decreasing":
        assert all(a >= b for a, b in pairs)
    else:
        assert max(iterations) - min(iterations) <= 1


def test_increasing_and_decreasing_schedules_differ_from_constant():
    assert allocate(60, 10, 2, "increasing") == [2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert allocate(60, 10, 2, "decreasing") == allocate(60, 10, 2, "increasing")[::-1]
    assert allocate(60, 10, 2, "constant") == [4] * 10


def test_a_budget_too_small_for_the_steps_is_a_clear_error(fpdm):
    labels = torch.arange(2)
    with pytest.raises(ValueError, match="too small for 5 timesteps"):
        sample(fpdm, GaussianDiffusion(), labels, budget=14, steps=5)
    with pytest.raises(ValueError, match="below the cost of one timestep"):
        sample(fpdm, GaussianDiffusion(), labels, budget=2)
    with pytest.raises(ValueError, match="schedule"):
        sample(fpdm, GaussianDiffusion(), labels, budget=20, schedule="adaptive")


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_budget_is_never_exceeded_and_fully_accounted_for(fpdm, schedule, solver):
    budget, steps, fixed = 41, 8, 2
    counter = BlockCounter(fpdm)
    try:
        result = sample(
            fpdm,
            GaussianDiffusion(),
            torch.arange(3),
            budget=budget,
            steps=steps,
            schedule=schedule,
            solver=SOLVERS[solver](),
            guidance=2.0,
            tol=0.05,
            generator=seeded(),
        )
    finally:
        counter.remove()
    # The independent tally of block calls (one batched call counts once per sample) is what was reported.
    assert counter.calls == result.spent_total
    assert result.spent_total + result.unspent == budget and result.unspent >= 0
    assert all(s <= a for s, a in zip(result.spent, result.allocated))
    assert [s - fixed for s in result.spent] == result.iterations
    assert result.guided_evals == 2 * result.spent_total
    if schedule == "tolerance":
        # What a step did not use raised the next step's cap; what is left at the end is unspent.
        plan = allocate(budget, steps, fixed, "constant")
        carry = 0
        for i, (spent, allocated) in enumerate(zip(result.spent, result.allocated)):
            assert allocated == fixed + plan[i] + carry
            carry = allocated - spent
        assert carry == result.unspent
    else:
        assert result.spent == result.allocated
        assert [s - fixed for s in result.spent] == allocate(budget, steps, fixed, schedule)
        assert result.unspent == 0


def test_reuse_lowers_the_first_iteration_residual(fpdm):
    options = {"budget": 20 * 8, "steps": 20, "guidance": 2.0, "generator": None}
    warm = sample(
        fpdm, GaussianDiffusion(), torch.arange(4), reuse=True, **{**options, "generator": seeded()}
    )
    cold = sample(
        fpdm, GaussianDiffusion(), torch.arange(4), reuse=False, **{**options, "generator": seeded()}
    )
    # Six iterations per step converge both runs, so they visit the same states; the first step has
    # nothing to reuse.
    torch.testing.assert_close(warm.images, cold.images, atol=1e-4, rtol=0)
    assert warm.first_residuals[0] == pytest.approx(cold.first_residuals[0], rel=1e-4)
    for w, c in zip(warm.first_residuals[1:], cold.first_residuals[1:]):
        assert w < 0.1 * c


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_reuse_starts_each_solve_from_the_previous_timesteps_fixed_point(fpdm, monkeypatch, guidance):
    calls = []
    forward = fpdm.forward

    def spy(*args, z0=None, **kwargs):
        eps, state = forward(*args, z0=z0, **kwargs)
        calls.append((z0, state.z))
        return eps, state

    monkeypatch.setattr(fpdm, "forward", spy)
    result = sample(fpdm, GaussianDiffusion(), torch.arange(3), budget=24, steps=6, guidance=guidance,
                    generator=seeded())  # fmt: skip
    assert len(calls) == len(result.timesteps) == 6
    assert calls[0][0] is None  # nothing to reuse at the first timestep
    for i in range(1, 6):
        assert torch.equal(calls[i][0], calls[i - 1][1]), f"timestep {i} did not start from timestep {i - 1}"
        if i >= 2:  # the fixed points move with the timestep: the first one is not the previous one
            assert not torch.equal(calls[i][0], calls[0][1])
    # Without reuse, every solve starts from the pre blocks' output.
    calls.clear()
    sample(fpdm, GaussianDiffusion(), torch.arange(3), budget=24, steps=6, reuse=False, generator=seeded())
    assert all(z0 is None for z0, _ in calls)


def test_tolerance_schedule_spends_less_than_its_cap_when_residuals_are_small(fpdm):
    diffusion, labels, budget = GaussianDiffusion(), torch.arange(3), 60
    loose = sample(
        fpdm, diffusion, labels, budget=budget, steps=10, schedule="tolerance", tol=0.3, generator=seeded()
    )
    assert loose.spent_total < budget
    # After the first step, a warm start is already within 0.3: one evaluation each, the rest carried over.
    assert loose.iterations[1:] == [1] * 9
    assert all(r <= 0.3 for r in loose.residuals[1:])
    assert loose.allocated[-1] > loose.allocated[1]
    tight = sample(
        fpdm, diffusion, labels, budget=budget, steps=10, schedule="tolerance", tol=1e-9, generator=seeded()
    )
    assert tight.spent_total == budget


def test_tolerance_savings_go_to_the_next_step_that_needs_them(fpdm):
    # A custom solver reports convergence on the first evaluation at even steps only.
    calls = {"n": 0}

    def every_other(g, z0, *, max_iter, tol, stop_mode="abs"):
        calls["n"] += 1
        used = 1 if calls["n"] % 2 else max_iter
        z = z0
        for _ in range(used):
            z = g(z)
        batch = z0.shape[0]
        return SolverResult(z, torch.zeros(batch), torch.ones(batch, dtype=torch.bool), used, [0.0])

    result = sample(fpdm, GaussianDiffusion(), torch.arange(2), budget=40, steps=5, schedule="tolerance",
                    solver=every_other)  # fmt: skip
    # Plan: 6 iterations per step. Steps 1, 3, 5 stop after one; steps 2 and 4 use everything carried over.
    assert result.iterations == [1, 11, 1, 11, 1]
    assert result.unspent == 5


def test_one_iteration_per_step_applies_the_implicit_block_once(fpdm):
    diffusion, labels = GaussianDiffusion(), torch.arange(2)
    result = sample(fpdm, diffusion, labels, budget=3, steps=1, generator=seeded())
    x = torch.randn((2, 1, 8, 8), generator=seeded())
    t = torch.full((2,), 999)
    with torch.no_grad():
        h, c = fpdm.embed(x, t, labels)
        h = fpdm.blocks_pre[0](h, c)
        z = fpdm.implicit_block(h, fpdm.injection(h), c)
        eps = fpdm.head(fpdm.blocks_post[0](z, c), c)
    torch.testing.assert_close(result.images, diffusion.ddim_step(x, eps, 999, -1))
    assert result.spent == [3] and result.iterations == [1]


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_a_fixed_seed_gives_identical_images(fpdm, method):
    options = {"budget": 24, "method": method, "eta": 0.5, "guidance": 2.0, "solver": Anderson()}
    first = sample(fpdm, GaussianDiffusion(), torch.arange(4), generator=seeded(3), **options)
    again = sample(fpdm, GaussianDiffusion(), torch.arange(4), generator=seeded(3), **options)
    other = sample(fpdm, GaussianDiffusion(), torch.arange(4), generator=seeded(4), **options)
    assert torch.equal(first.images, again.images)
    assert first.spent == again.spent and first.residuals == again.residuals
    assert not torch.allclose(first.images, other.images, atol=1e-3)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ddim_with_all_steps_and_enough_iterations_matches_the_unbudgeted_model(fpdm, guidance):
    # A 40-step diffusion, sampled at all 40 timesteps; 10 Picard iterations reach float precision here.
    diffusion, labels, iters = GaussianDiffusion(num_timesteps=40), torch.arange(3), 10
    budgeted = sample(fpdm, diffusion, labels, budget=40 * (2 + iters), steps=40, guidance=guidance,
                      generator=seeded(5))  # fmt: skip
    assert budgeted.timesteps == list(range(39, -1, -1))

    def eps_fn(x, t):
        return model_eps(fpdm, x, t, labels, guidance=guidance, max_iter=30, tol=1e-6)[0]

    reference = diffusion.sample(eps_fn, (3, 1, 8, 8), 40, method="ddim", generator=seeded(5))
    torch.testing.assert_close(budgeted.images, reference, atol=1e-5, rtol=0)
    assert max(budgeted.residuals) < 1e-5


def test_dit_baseline_takes_budget_over_depth_steps():
    dit = contractive_model("DiT-Digits/2", depth=3)
    counter = BlockCounter(dit)
    result = sample(dit, GaussianDiffusion(), torch.arange(2), budget=32, guidance=2.0, generator=seeded())
    counter.remove()
    assert len(result.timesteps) == 32 // 3 == pick_steps(32, 3, implicit=False)
    assert result.spent == [3] * 10 and result.unspent == 2 and counter.calls == 30
    assert all(math.isnan(r) for r in result.residuals)
    with pytest.raises(ValueError, match="DiT has no iterations"):
        sample(dit, GaussianDiffusion(), torch.arange(2), budget=32, schedule="increasing")


def test_steps_are_picked_from_the_budget_for_smoothing(fpdm):
    result = sample(fpdm, GaussianDiffusion(), torch.arange(2), budget=40, generator=seeded())
    assert len(result.timesteps) == pick_steps(40, 2, implicit=True) == 10
    assert result.iterations == [2] * 10


def test_a_solver_that_overspends_is_caught(fpdm):
    def greedy(g, z0, *, max_iter, tol, stop_mode="abs"):
        z = z0
        for _ in range(max_iter + 1):
            z = g(z)
        batch = z0.shape[0]
        return SolverResult(z, torch.zeros(batch), torch.ones(batch, dtype=torch.bool), max_iter + 1, [0.0])

    with pytest.raises(RuntimeError, match="spent 4 iterations"):
        sample(fpdm, GaussianDiffusion(), torch.arange(2), budget=10, steps=2, solver=greedy)


def test_callback_sees_every_step_and_the_model_mode_is_restored(fpdm):
    seen = []
    fpdm.train()
    result = sample(
        fpdm, GaussianDiffusion(), torch.arange(2), budget=20, callback=seen.append, generator=seeded()
    )
    assert fpdm.training
    fpdm.eval()
    assert [info["i"] for info in seen] == list(range(len(result.timesteps)))
    assert [info["t"] for info in seen] == result.timesteps
    assert [info["spent"] for info in seen] == result.spent
    assert torch.equal(seen[-1]["x"], result.images)
    assert seen[-1]["denoised"].shape == result.images.shape


def test_the_docstring_examples_hold():
    import doctest

    from fpdm import sampling

    failures, attempted = doctest.testmod(sampling)
    assert failures == 0 and attempted >= 3


@pytest.mark.parametrize("name", ["FPDM-Digits/2", "DiT-Digits/2"])
def test_a_fixed_schedule_makes_at_most_one_host_sync_per_timestep(name):
    from implicitdiff.diagnostics import SyncCounter

    model = contractive_model(name, **({"depth": 4} if name.startswith("DiT") else {}))
    diffusion, labels = GaussianDiffusion(), torch.arange(4)  # the schedule's host tables are built here
    with SyncCounter() as syncs:
        result = sample(model, diffusion, labels, budget=40, steps=10, schedule="constant", guidance=2.0,
                        generator=seeded())  # fmt: skip
    assert len(result.timesteps) == 10
    # The residuals are read once, at the end (18 reads per timestep before the driver's fixed budget).
    assert syncs.count / 10 <= 1, dict(syncs.by_op)
    if name.startswith("FPDM"):
        assert syncs.count == 1 and all(math.isfinite(r) for r in result.residuals + result.first_residuals)
    else:
        assert syncs.count == 0
    # A callback that asks for the residual costs one read per timestep, no more.
    with SyncCounter() as syncs:
        sample(model, diffusion, labels, budget=40, steps=10, callback=lambda info: None, generator=seeded())
    assert syncs.count <= 10 + 1, dict(syncs.by_op)
