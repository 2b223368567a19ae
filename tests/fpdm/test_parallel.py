"""Parallel DDIM (parallel.py): agreement with sequential DDIM, sweeps, warm starts, accounting, per-step
tolerances, bounded memory, errors."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from fpdm import generation as sample_cli
from fpdm import parallel
from fpdm.diffusion import GaussianDiffusion
from fpdm.models import DiTBlock, ModelState
from fpdm.parallel import DEFAULT_TAU, auto_max_batch, chunk_for_memory, sample_parallel
from fpdm.sampling import sample
from spawned import gloo_group, run_workers
from test_sampling import contractive_model
from torch import nn

from implicitdiff import Anderson, ChainSecant, Picard

# Anderson is run on chains on purpose here (the library's tests check its warning).
pytestmark = pytest.mark.filterwarnings("ignore::implicitdiff.ChainRuleWarning")

STEPS = 12
DIFFUSION = GaussianDiffusion()


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread runs them faster than two, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dit():
    return contractive_model("DiT-Digits/2", depth=2)


@pytest.fixture(scope="module")
def fpdm():
    return contractive_model()


#: How far a parallel sample that should equal the sequential one may be from it in float64: half the
#: digits. The two evaluate the same steps in batches of other sizes, so they round differently (a few
#: ulps, about 1e-16, per step); a wrong timestep, noise draw or guidance moves a sample by O(1).
EXACT_IN_FLOAT64 = math.sqrt(torch.finfo(torch.float64).eps)


@pytest.fixture(scope="module")
def models64(dit, fpdm):
    """Float64 copies of the DiT and the FPDM, with the FPDM's options for an exact chain."""
    return (
        (copy.deepcopy(dit).double(), {}),
        (copy.deepcopy(fpdm).double(), {"iterations": 2, "reuse": False}),
    )


def sequential(model, labels, *, iterations=2, reuse=True, guidance=1.0, trajectory=None):
    """Sequential DDIM with the budgeted sampler: ``iterations`` per timestep (FPDM), same noise (seed 0)."""
    per_step = model.depth if hasattr(model, "depth") else model.pre_depth + model.post_depth + iterations
    callback = None if trajectory is None else (lambda info: trajectory.append(info["x"]))
    return sample(
        model,
        DIFFUSION,
        labels,
        budget=STEPS * per_step,
        steps=STEPS,
        reuse=reuse,
        guidance=guidance,
        generator=seeded(),
        callback=callback,
    )


def lipschitz_bound(model, labels, trajectory, factor=2.0):
    """Largest finite-difference Lipschitz estimate of the DDIM steps along the sequential trajectory
    (times a safety ``factor``): the chain's contraction (here an expansion) that amplifies a defect."""
    t = torch.tensor(DIFFUSION.respace(STEPS))
    t_prev = torch.tensor([*t[1:].tolist(), -1])
    gen, worst = seeded(1), 0.0
    for k, x in enumerate(trajectory):
        x = x.detach()
        delta = torch.randn(x.shape, generator=gen) * 1e-2
        with torch.no_grad():
            eps_a, eps_b = (model(z, t[k].repeat(x.shape[0]), labels)[0] for z in (x, x + delta))
        a, b = (
            DIFFUSION.ddim_step(z[None], e[None], t[k : k + 1], t_prev[k : k + 1])
            for z, e in ((x, eps_a), (x + delta, eps_b))
        )
        worst = max(worst, float((b - a).norm() / delta.norm()))
    return factor * worst


def default_rule() -> None:
    return None  # sample_parallel's own: ChainSecant with one secant model per sample


def fitted_rule() -> ChainSecant:
    return ChainSecant(blocks=3, base="fitted")  # the same with a base fitted per timestep and sample


@pytest.mark.parametrize("form", ["cumulative", "step"])
@pytest.mark.parametrize("solver", [default_rule, fitted_rule, Picard, Anderson])
def test_dit_matches_sequential_ddim_within_the_chains_bound(dit, solver, form):
    labels = torch.arange(3)
    trajectory = []
    reference = sequential(dit, labels, trajectory=trajectory)
    tol = 1e-6
    out = sample_parallel(
        dit, DIFFUSION, labels, steps=STEPS, solver=solver(), tol=tol, form=form, generator=seeded()
    )
    assert out.converged and out.sweeps <= STEPS
    # Each step's defect is at most tol * sqrt(n) (2-norm); a defect grows by at most L per later step.
    x0 = torch.randn(reference.images.shape, generator=seeded())
    lip = lipschitz_bound(dit, labels, [x0, *trajectory[:-1]])
    n = reference.images.numel()
    bound = tol * math.sqrt(n) * sum(lip**i for i in range(STEPS)) + 1e-5  # + float32 rounding
    assert float((out.images - reference.images).norm()) <= bound
    assert out.block_evals >= reference.spent_total  # never cheaper in evaluations than the recurrence


def test_tol_zero_reproduces_the_sequential_sampler_and_picard_takes_at_most_steps_sweeps(
    dit, models64, float64
):
    labels = torch.arange(2)
    for model, kwargs in models64:
        reference = sequential(model, labels, reuse=False)
        for form in ("cumulative", "step"):
            out = sample_parallel(
                model, DIFFUSION, labels, steps=STEPS, tol=0.0, form=form, generator=seeded(), **kwargs
            )
            assert out.converged and out.sweeps <= STEPS
            assert float((out.images - reference.images).abs().max()) < EXACT_IN_FLOAT64
    # Picard on the step map finalises exactly one timestep per sweep when nothing is exact sooner.
    dit64 = models64[0][0]
    out = sample_parallel(dit64, DIFFUSION, labels, steps=STEPS, tol=0.0, form="step", generator=seeded())
    assert out.sweeps == STEPS


def test_cumulative_picard_takes_far_fewer_sweeps_than_steps(dit):
    out = sample_parallel(
        dit, DIFFUSION, torch.arange(2), steps=40, solver=Picard(), tol=1e-4, generator=seeded()
    )
    assert out.converged and out.sweeps <= 40 // 2


def test_the_default_rule_couples_the_timesteps_per_sample_and_takes_no_more_sweeps_than_picard(dit):
    labels = torch.arange(3)
    options = {"steps": 40, "tol": 1e-5, "generator": seeded()}
    default = sample_parallel(dit, DIFFUSION, labels, **options)
    options["generator"] = seeded()
    picard = sample_parallel(dit, DIFFUSION, labels, solver=Picard(), **options)
    assert (
        default.options["chain_rule"].startswith("ChainSecant(")
        and "blocks=3" in default.options["chain_rule"]
    )
    assert default.converged and picard.converged
    assert default.sweeps <= picard.sweeps


def test_fpdm_with_cold_starts_matches_the_sequential_sampler_with_cold_starts(fpdm):
    labels = torch.arange(3)
    reference = sequential(fpdm, labels, iterations=3, reuse=False)
    for solver in (Picard(), Anderson()):
        out = sample_parallel(
            fpdm,
            DIFFUSION,
            labels,
            steps=STEPS,
            iterations=3,
            reuse=False,
            solver=solver,
            tol=1e-7,
            generator=seeded(),
        )
        assert out.converged
        assert float((out.images - reference.images).abs().max()) < 1e-4


def test_fpdm_with_reuse_lands_near_the_sequential_sampler_with_reuse(fpdm):
    # With reuse the map changes from sweep to sweep; the samples land near the sequential sampler's with
    # reuse (the same number of iterations, warm-started), much nearer than cold starts do.
    labels = torch.arange(3)
    reference = sequential(fpdm, labels, iterations=1).images
    warm = sample_parallel(
        fpdm, DIFFUSION, labels, steps=STEPS, iterations=1, tol=1e-7, reuse=True, generator=seeded()
    )
    cold = sample_parallel(
        fpdm, DIFFUSION, labels, steps=STEPS, iterations=1, tol=1e-7, reuse=False, generator=seeded()
    )
    assert warm.converged and cold.converged
    warm_err = float((warm.images - reference).abs().max())
    cold_err = float((cold.images - reference).abs().max())
    assert warm_err < cold_err / 5
    # With enough iterations per timestep every state is at its fixed point, and reuse changes nothing.
    reference = sequential(fpdm, labels, iterations=10).images
    warm = sample_parallel(
        fpdm, DIFFUSION, labels, steps=STEPS, iterations=10, tol=1e-7, reuse=True, generator=seeded()
    )
    assert float((warm.images - reference).abs().max()) < 1e-4


class CallRecorder:
    """Wraps FPDM's forward: records each call's warm start and returned state, per timestep."""

    def __init__(self, model, batch):
        self.model, self.batch, self.calls = model, batch, []
        self.forward = model.forward

    def __enter__(self):
        def forward(x, t, y, **options):
            eps, state = self.forward(x, t, y, **options)
            steps = x.shape[0] // self.batch
            z0 = options["z0"]
            self.calls.append(
                (
                    t[:: self.batch].tolist(),
                    None if z0 is None else z0.reshape(steps, self.batch, -1),
                    state.z.reshape(steps, self.batch, -1),
                )
            )
            return eps, state

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


@pytest.mark.parametrize("window", [None, 4])
def test_fpdm_warm_starts_each_timestep_from_its_previous_sweeps_state(fpdm, window):
    labels = torch.arange(2)
    with CallRecorder(fpdm, 2) as recorder:
        out = sample_parallel(
            fpdm,
            DIFFUSION,
            labels,
            steps=STEPS,
            iterations=2,
            tol=1e-6,
            window=window,
            reuse=True,
            generator=seeded(),
        )
    assert len(recorder.calls) == out.sweeps >= 3
    assert recorder.calls[0][1] is None  # the first sweep starts cold, every later one warm
    assert all(z0 is not None for _, z0, _ in recorder.calls[1:])
    last: dict[int, torch.Tensor] = {}
    for timesteps, z0, z in recorder.calls:
        for j, t in enumerate(timesteps):
            if z0 is not None:
                # Its own state from the previous sweep, or (first visit) the nearest earlier timestep's.
                source = last[t] if t in last else last[min(s for s in last if s > t)]
                assert torch.equal(z0[j], source)
        last.update({t: z[j] for j, t in enumerate(timesteps)})


def test_guidance_matches_the_sequential_sampler(models64, float64):
    labels = torch.arange(2)
    for model, kwargs in models64:
        reference = sequential(model, labels, reuse=False, guidance=2.0)
        out = sample_parallel(
            model, DIFFUSION, labels, steps=STEPS, tol=0.0, guidance=2.0, generator=seeded(), **kwargs
        )
        assert float((out.images - reference.images).abs().max()) < EXACT_IN_FLOAT64
        assert out.guided_evals == 2 * out.block_evals


def test_guided_warm_starts_keep_the_conditional_and_unconditional_halves_apart(fpdm):
    # Guided, a call's rows are [cond of every timestep, uncond of every timestep]: the second sweep's warm
    # starts are the first sweep's states of the same timesteps, halves kept apart.
    labels = torch.arange(2)
    calls, forward = [], fpdm.forward

    def recorded(x, t, y, **options):
        eps, state = forward(x, t, y, **options)
        calls.append((options["z0"], state.z))
        return eps, state

    fpdm.forward = recorded
    try:
        sample_parallel(
            fpdm, DIFFUSION, labels, steps=STEPS, tol=1e-6, guidance=2.0, reuse=True, generator=seeded()
        )
    finally:
        del fpdm.forward
    first = calls[0][1].reshape(2, STEPS, 2, -1)
    warm = calls[1][0]
    steps = warm.shape[0] // 4
    assert calls[0][0] is None and torch.equal(warm.reshape(2, steps, 2, -1), first[:, STEPS - steps :])


class RowCounter:
    """Counts every DiTBlock call (pre, implicit, post) with the rows it ran on: an independent tally."""

    def __init__(self, model):
        self.rows = 0
        self.handles = [
            m.register_forward_pre_hook(self.hook) for m in model.modules() if isinstance(m, DiTBlock)
        ]

    def hook(self, module, args):
        self.rows += args[0].shape[0]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def sample_counting_rows(request, name: str, **options) -> tuple[parallel.ParallelResult, int]:
    """``sample_parallel`` on the fixture ``name`` for 3 labels (``tol=1e-5``, FPDM with 2 iterations),
    and the block rows an independent tally counted."""
    model = request.getfixturevalue(name)
    kwargs = {"iterations": 2} if name == "fpdm" else {}
    counter = RowCounter(model)
    try:
        out = sample_parallel(
            model, DIFFUSION, torch.arange(3), steps=STEPS, tol=1e-5, generator=seeded(), **kwargs, **options
        )
    finally:
        counter.remove()
    return out, counter.rows


@pytest.mark.parametrize("name", ["dit", "fpdm"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_block_evaluations_counted_match_the_calls(name, guidance, request):
    out, rows = sample_counting_rows(request, name, window=5, guidance=guidance, solver=Anderson())
    assert rows == out.guided_evals * 3  # block rows = per-sample evaluations x batch (x 2 guided)
    assert sum(out.spent) == out.block_evals
    per_step = 2 + 2 if name == "fpdm" else 2
    assert out.block_evals == per_step * out.chain.total_evaluations
    assert out.sequential_block_evals == STEPS * per_step
    if name == "fpdm":
        assert out.iterations == [2 * int(n) for n in out.chain.evaluations_per_step]


def test_max_sweeps_caps_the_rounds_and_reports_no_convergence(dit):
    out = sample_parallel(
        dit, DIFFUSION, torch.arange(2), steps=STEPS, tol=0.0, max_sweeps=3, form="step", generator=seeded()
    )
    assert out.sweeps == 3 and not out.converged


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"steps": 0}, ValueError, "steps must be an int >= 1"),
        ({"steps": 2000}, ValueError, "exceeds the diffusion's 1000 timesteps"),
        ({"tol": -1.0}, ValueError, "tol must be a finite number >= 0"),
        ({"tol": float("nan")}, ValueError, "tol must be"),
        ({"tau": -0.1}, ValueError, "tau must be a finite number >= 0, got -0.1"),
        ({"tau": float("inf")}, ValueError, "tau must be a finite number >= 0"),
        ({"tau": "1e-3"}, ValueError, "tau must be a finite number >= 0, got '1e-3'"),
        ({"tol": 1e-4, "tau": 1e-3}, ValueError, "give tol .* or tau .*, not both"),
        ({"max_batch": 0}, ValueError, r"max_batch must be 'auto', None \(no limit\) or an int >= 1, got 0"),
        ({"max_batch": "all"}, ValueError, "max_batch must be 'auto'.*got 'all'"),
        ({"max_batch": True}, ValueError, "max_batch must be 'auto'.*got True"),
        ({"max_batch": 2.5}, ValueError, "max_batch must be 'auto'.*got 2.5"),
        ({"guidance": float("inf")}, ValueError, "guidance must be a finite number"),
        ({"form": "sum"}, ValueError, "form must be one of"),
        ({"window": 0}, ValueError, "window"),
        ({"max_sweeps": 0}, ValueError, "max_iter"),
        ({"solver": "picard"}, TypeError, "solver must be an update rule"),
        ({"iterations": 0}, ValueError, "iterations must be an int >= 1"),
        ({"labels": torch.zeros(2, 2, dtype=torch.long)}, ValueError, r"labels must have shape \(B,\)"),
        (
            {"tol": [1e-3] * 3},
            ValueError,
            r"tol must be a finite number >= 0 or 4 of them .* got shape \(3,\)",
        ),
        ({"tol": [1e-3, 1e-3, -1.0, 1e-3]}, ValueError, "tol must be a finite number >= 0 or 4 of them"),
        ({"warmup": -1}, ValueError, "warmup must be an int >= 0, got -1"),
        ({"warmup": 5}, ValueError, r"warmup \(5\) exceeds steps \(4\)"),
        ({"coarse": 1.5}, ValueError, "coarse must be an int >= 0, got 1.5"),
        ({"max_evals": 3}, ValueError, "max_evals=3 block evaluations per sample does not pay for"),
        ({"reuse": True, "group": object()}, ValueError, "reuse=True .* not with group"),
        (
            {"secant_base": "newton"},
            ValueError,
            r"secant_base must be one of \('form', 'fitted'\), got 'newton'",
        ),
        (
            {"secant_base": "fitted", "solver": Picard()},
            ValueError,
            "secant_base='fitted' sets the default rule",
        ),
    ],
)
def test_bad_arguments_are_clear_errors(fpdm, changes, error, message):
    options = {"labels": torch.arange(2), "steps": 4, **changes}
    labels = options.pop("labels")
    with pytest.raises(error, match=message):
        sample_parallel(fpdm, DIFFUSION, labels, **options)


def test_dit_refuses_iterations(dit):
    with pytest.raises(ValueError, match="DiT has no implicit block"):
        sample_parallel(dit, DIFFUSION, torch.arange(2), steps=4, iterations=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from fpdm.training import CHECKPOINT_NAME, TrainConfig, train

    out = tmp_path_factory.mktemp("train")
    cfg = TrainConfig(
        out=str(out),
        hidden_size=16,
        num_heads=2,
        batch_size=32,
        steps=2,
        ckpt_every=2,
        device="cpu",
        progress=False,
        log_every=1,
    )
    train(cfg)
    return out / CHECKPOINT_NAME


def test_sample_cli_parallel_mode(checkpoint, tmp_path, capsys):
    common = [
        str(checkpoint),
        *"--num 3 --batch-size 2 --budget 24 --steps 6 --guidance 1 --no-progress".split(),
    ]
    assert sample_cli.main([*common, "--out", str(tmp_path / "seq"), "--no-reuse"]) == 0
    argv = [
        *common,
        "--out",
        str(tmp_path / "par"),
        *"--parallel --chain-rule anderson --chain-tol 0".split(),
    ]
    assert sample_cli.main(argv) == 0
    assert str(tmp_path / "par" / "samples.npz") in capsys.readouterr().out
    seq, par = (np.load(tmp_path / name / "samples.npz") for name in ("seq", "par"))
    assert np.abs(seq["images"] - par["images"]).max() < 1e-5  # same noise, same model, exact chain
    summary = json.loads((tmp_path / "par" / "summary.json").read_text())
    assert (
        summary["parallel"] is True
        and summary["batches"] == 2
        and summary["chain_rule"].startswith("Anderson")
    )
    assert summary["reuse"] is False  # cold starts by default in the parallel mode
    assert summary["reproduces"] == "sampling.sample(method='ddim', eta=0, reuse=False)"
    assert summary["spent_total"] > summary["sequential_block_evals"] == 6 * 4  # side by side, per sample
    assert summary["iterations_per_call"] == 2 and 1 <= summary["sweeps"] <= 6  # 24 // 6 - (1 pre + 1 post)


@pytest.mark.parametrize(("rule", "named"), [("secant", "blocks=2)"), ("secant-fitted", "base='fitted')")])
def test_sample_cli_chain_rules_secant_and_secant_fitted_are_chain_secant_with_their_base(
    checkpoint, tmp_path, rule, named
):
    common = [str(checkpoint), *"--num 2 --batch-size 2 --budget 24 --steps 6 --no-progress".split()]
    assert sample_cli.main([*common, "--out", str(tmp_path / "seq"), "--no-reuse"]) == 0
    argv = [*common, "--out", str(tmp_path / "par"), "--parallel", "--chain-rule", rule, "--chain-tol", "0"]
    assert sample_cli.main(argv) == 0
    summary = json.loads((tmp_path / "par" / "summary.json").read_text())
    assert summary["chain_rule"].startswith("ChainSecant(") and summary["chain_rule"].endswith(named)
    seq, par = (np.load(tmp_path / name / "samples.npz") for name in ("seq", "par"))
    assert np.abs(seq["images"] - par["images"]).max() < 1e-5  # tol 0: the sequential samples


def test_sample_cli_max_evals_caps_what_the_parallel_sampler_spends(checkpoint, tmp_path):
    # --budget 24 is the sequential run reproduced (6 timesteps of 4 blocks); the exact chain spends more,
    # and --max-evals caps the block evaluations per sample actually spent, whatever the chain needed.
    common = [str(checkpoint), *"--num 2 --budget 24 --steps 6 --guidance 1 --no-progress".split()]
    free = [*common, "--out", str(tmp_path / "free"), "--parallel", "--chain-tol", "0"]
    assert sample_cli.main(free) == 0
    spent = json.loads((tmp_path / "free" / "summary.json").read_text())["spent_total"]
    assert spent > 44
    capped = [*common, "--out", str(tmp_path / "cap"), "--parallel", "--chain-tol", "0", "--max-evals", "44"]
    assert sample_cli.main(capped) == 0
    summary = json.loads((tmp_path / "cap" / "summary.json").read_text())
    assert summary["max_evals"] == 44 and 24 <= summary["spent_total"] <= 44


def test_sample_cli_parallel_defaults_to_noise_scaled_tolerances_and_records_them(checkpoint, tmp_path):
    common = [
        str(checkpoint),
        *"--num 3 --batch-size 3 --budget 24 --steps 6 --guidance 1 --no-progress".split(),
    ]
    runs = {}
    for name, extra in (("default", []), ("chunked", ["--max-batch", "2", "--chain-tau", "1e-2"])):
        assert sample_cli.main([*common, "--out", str(tmp_path / name), "--parallel", *extra]) == 0
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        runs[name] = summary
    summary = runs["default"]
    assert summary["tau"] == DEFAULT_TAU and summary["tol"] is None and summary["max_batch"] is None
    timesteps = summary["per_step_first_batch"]["timesteps"]
    expected = [DEFAULT_TAU * noise_level(t) for t in timesteps]
    np.testing.assert_allclose(summary["per_step_first_batch"]["tolerances"], expected, rtol=1e-12)
    chunked = runs["chunked"]
    assert chunked["tau"] == 1e-2 and chunked["max_batch"] == 2
    expected = [1e-2 * noise_level(t) for t in timesteps]
    np.testing.assert_allclose(chunked["per_step_first_batch"]["tolerances"], expected, rtol=1e-12)


def test_sample_cli_parallel_refuses_ddpm_and_eta(checkpoint, tmp_path, capsys):
    base = [str(checkpoint), "--budget", "8", "--out", str(tmp_path / "s"), "--no-progress", "--parallel"]
    for extra, message in (
        (["--method", "ddpm"], "--parallel is deterministic DDIM"),
        (["--eta", "0.5"], "--parallel is deterministic DDIM"),
        (["--chain-tol", "-1"], "--chain-tol"),
        (["--chain-tau", "-1"], "--chain-tau"),
        (["--chain-tol", "1e-4", "--chain-tau", "1e-3"], "give one"),
        (["--max-batch", "0"], "expected 'auto', 'none' or an int >= 1, got '0'"),
        (["--max-batch", "many"], "expected 'auto', 'none' or an int >= 1, got 'many'"),
        (["--window", "0"], "--window"),
        (["--form", "sum"], "invalid choice"),
        (["--error-tol", "-1"], "--error-tol"),
        (["--reuse"], "the parallel sampler reproduces sequential sampling with --no-reuse"),
    ):
        try:
            status = sample_cli.main([*base, *extra])
        except SystemExit as stop:
            status = stop.code
        err = capsys.readouterr().err
        assert status == 2 and message in err, (extra, err)
    assert not (tmp_path / "s").exists()


class ChainTolerances:
    """Replaces ``parallel.solve_chain`` for one call: records the ``tol`` and ``max_batch`` it receives."""

    def __init__(self, monkeypatch):
        self.calls = []
        solve_chain = parallel.solve_chain

        def recorded(step, x, num_steps, **options):
            self.calls.append({"numel": x.numel(), **options})
            return solve_chain(step, x, num_steps, **options)

        monkeypatch.setattr(parallel, "solve_chain", recorded)


def noise_level(t: int) -> float:
    """sqrt(1 - abar_t) from the betas of the default schedule, computed apart from the sampler."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return float(np.sqrt(1.0 - np.prod(1.0 - betas[: t + 1])))


@pytest.mark.parametrize("tau", [None, 1e-2])
def test_noise_scaled_tolerances_are_tau_times_the_noise_level_per_timestep(dit, monkeypatch, tau):
    chain = ChainTolerances(monkeypatch)
    labels = torch.arange(3)
    out = sample_parallel(dit, DIFFUSION, labels, steps=STEPS, tau=tau, generator=seeded())
    scale = DEFAULT_TAU if tau is None else tau
    expected = np.array([scale * noise_level(t) for t in out.timesteps])
    (call,) = chain.calls
    # solve_chain's residual is the 2-norm over the whole state: the RMS tolerance times sqrt(numel).
    assert call["numel"] == 3 * 64
    np.testing.assert_allclose(np.asarray(call["tol"]), expected * math.sqrt(3 * 64), rtol=1e-12)
    np.testing.assert_allclose(out.tolerances, expected, rtol=1e-12)
    # Timesteps descend, so do the noise levels: the high-noise timesteps get the loosest tolerances.
    assert all(a > b for a, b in zip(out.tolerances, out.tolerances[1:], strict=False))
    assert all(r <= tol * (1 + 1e-6) for r, tol in zip(out.residuals, out.tolerances, strict=True))
    assert out.options["tau"] == scale and out.options["tol"] is None
    summary = out.summary()
    assert summary["tolerances"] == out.tolerances and summary["tau"] == scale


def test_a_plain_tol_is_one_rms_tolerance_for_every_timestep(dit, monkeypatch):
    chain = ChainTolerances(monkeypatch)
    out = sample_parallel(dit, DIFFUSION, torch.arange(2), steps=STEPS, tol=1e-4, generator=seeded())
    np.testing.assert_allclose(np.asarray(chain.calls[0]["tol"]), 1e-4 * math.sqrt(2 * 64), rtol=1e-12)
    assert out.tolerances == [1e-4] * STEPS
    assert out.options["tol"] == 1e-4 and out.options["tau"] is None


class ToyDenoiser(nn.Module):
    """A one-layer noise predictor with DiT's call, in any dtype (the transformers embed time in float32):
    ``eps = tanh(x W + sin(t / 300) v + e_y)`` on 1 x 4 x 4 images, 3 classes."""

    depth, in_channels, input_size, num_classes = 1, 1, 4, 3

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(16, 16, generator=gen, dtype=dtype) * 0.5)
        self.time = nn.Parameter(torch.randn(16, generator=gen, dtype=dtype))
        self.label = nn.Parameter(torch.randn(3, 16, generator=gen, dtype=dtype) * 0.3)

    def forward(self, x, t, y, **options):
        h = x.flatten(1) @ self.weight + torch.sin(t[:, None].to(x.dtype) / 300.0) * self.time + self.label[y]
        return torch.tanh(h).reshape(x.shape), ModelState(block_evals=1)


@pytest.fixture
def float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the noise the samplers draw
    yield
    torch.set_default_dtype(dtype)


def test_noise_scaled_samples_are_within_the_chains_bound_of_the_sequential_ones(float64):
    model = ToyDenoiser(torch.float64)
    labels = torch.arange(3)
    trajectory = []
    reference = sequential(model, labels, trajectory=trajectory).images
    assert reference.dtype == torch.float64
    x0 = torch.randn(reference.shape, generator=seeded())
    lip = lipschitz_bound(model, labels, [x0, *trajectory[:-1]])
    n = reference.numel()
    distances = []
    for tau in (1e-1, 1e-3, 1e-5):
        out = sample_parallel(model, DIFFUSION, labels, steps=STEPS, tau=tau, generator=seeded())
        assert out.converged and out.images.dtype == torch.float64
        # Step k's defect is at most sqrt(n) tol_k (2-norm), and grows by at most L at each later step.
        bound = math.sqrt(n) * sum(tol * lip ** (STEPS - 1 - k) for k, tol in enumerate(out.tolerances))
        distance = float((out.images - reference).norm())
        assert distance <= bound + 1e-12  # + float64 rounding
        distances.append(distance)
    # Not vacuous: a looser tau stops sooner, further from the sequential samples.
    assert distances[0] > distances[1] > distances[2] > 0


class CallSizes:
    """Records the batch of every call of the model's forward."""

    def __init__(self, model):
        self.model, self.sizes, self.forward = model, [], model.forward

    def __enter__(self):
        def forward(x, t, y, **options):
            self.sizes.append(x.shape[0])
            return self.forward(x, t, y, **options)

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


@pytest.mark.parametrize("name", ["dit", "fpdm"])
def test_max_batch_chunks_the_model_calls_and_changes_no_sample(name, request, monkeypatch):
    model = request.getfixturevalue(name)
    labels = torch.arange(3)
    kwargs = {"iterations": 2, "reuse": False} if name == "fpdm" else {}
    chain = ChainTolerances(monkeypatch)
    runs = {}
    for max_batch in (None, 5):
        with CallSizes(model) as calls:
            out = sample_parallel(
                model,
                DIFFUSION,
                labels,
                steps=STEPS,
                tau=1e-3,
                max_batch=max_batch,
                generator=seeded(),
                **kwargs,
            )
        runs[max_batch] = out, calls.sizes
    assert [call["max_batch"] for call in chain.calls] == [None, 5]  # passed through to solve_chain
    (whole, whole_sizes), (chunked, chunked_sizes) = runs[None], runs[5]
    assert len(whole_sizes) == whole.sweeps  # one call per sweep
    # Each sweep's call of `rows` timesteps becomes ceil(rows / 5) calls, in order, of at most 5 timesteps.
    expected = []
    for size in whole_sizes:
        rows = size // 3
        expected += [3 * min(5, rows - i) for i in range(0, rows, 5)]
    assert chunked_sizes == expected and len(chunked_sizes) > len(whole_sizes)
    assert chunked.sweeps == whole.sweeps and chunked.block_evals == whole.block_evals
    assert chunked.options["max_batch"] == 5
    # Rows of a batched call are computed independently: chunking may only change float32 rounding.
    assert float((chunked.images - whole.images).abs().max()) <= 1e-6


def test_auto_max_batch_is_no_limit_off_cuda(dit):
    with CallSizes(dit) as calls:
        out = sample_parallel(dit, DIFFUSION, torch.arange(2), steps=STEPS, generator=seeded())
    assert out.options["max_batch"] is None and len(calls.sizes) == out.sweeps  # and no probe call
    assert auto_max_batch(lambda: pytest.fail("no probe off CUDA"), torch.device("cpu"), 100) is None


def test_chunk_for_memory_fits_half_the_free_memory_between_one_and_all_steps():
    gib = 2**30
    assert chunk_for_memory(10 * gib, gib, 100) == 5  # half of 10 GiB at 1 GiB a timestep
    assert chunk_for_memory(10 * gib, gib // 100, 100) == 100  # everything fits: never more than the steps
    assert chunk_for_memory(gib, 4 * gib, 100) == 1  # nothing fits: one timestep per call still runs
    assert chunk_for_memory(gib, 0, 7) == 7


def test_auto_max_batch_on_cuda_uses_the_probes_peak_and_the_free_memory(monkeypatch):
    # The CUDA calls replaced by a fake device: 1 GiB allocated before the probe, whose peak adds 2 GiB;
    # 15 GiB free on the device plus 5 GiB reserved by the allocator and unused.
    gib = 2**30
    state = {"allocated": gib, "peak": gib, "probed": 0}

    def probe():
        state["probed"] += 1
        state["peak"] = 3 * gib

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=gib))
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (15 * gib, 80 * gib))
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 6 * gib)
    assert auto_max_batch(probe, torch.device("cuda"), 100) == 5  # (15 + 6 - 1) / 2 / 2
    assert state["probed"] == 1
    assert auto_max_batch(probe, torch.device("cuda"), 3) == 3


@pytest.mark.parametrize("name", ["dit", "fpdm"])
@pytest.mark.parametrize(("warmup", "coarse"), [(1, 0), (2, 3), (0, 4)])
def test_a_first_guess_counts_its_model_calls_as_rounds_and_evaluations(name, warmup, coarse, request):
    out, counted = sample_counting_rows(request, name, warmup=warmup, coarse=coarse)
    rows = parallel.guess_rows(STEPS, warmup, coarse)
    assert len(rows) == warmup + coarse and rows[:warmup] == list(range(warmup))  # coarse ones start after
    assert out.sweeps == len(rows) + out.chain.sweeps and out.chain.total_evaluations == sum(
        out.chain.evaluations_per_step
    )
    assert counted == out.block_evals * 3  # an independent tally of every block call
    per_step = 2 + 2 if name == "fpdm" else 2
    assert out.block_evals == per_step * (len(rows) + out.chain.total_evaluations)
    for row in range(STEPS):
        chained = int(out.chain.evaluations_per_step[row - warmup]) if row >= warmup else 0
        assert out.spent[row] == per_step * ((row in rows) + chained)
    assert out.converged and out.options["guess_rows"] == rows


def test_a_first_guess_changes_no_sample_and_a_full_warmup_is_the_sequential_sampler(models64, float64):
    labels = torch.arange(2)
    for model, kwargs in models64:
        reference = sequential(model, labels, reuse=False)
        for warmup, coarse in ((1, 0), (3, 2), (0, 3), (STEPS, 0)):
            out = sample_parallel(
                model,
                DIFFUSION,
                labels,
                steps=STEPS,
                tol=0.0,
                warmup=warmup,
                coarse=coarse,
                generator=seeded(),
                **kwargs,
            )
            assert out.converged
            assert float((out.images - reference.images).abs().max()) < EXACT_IN_FLOAT64
        # Every timestep evaluated in turn: the sequential sampler, its rounds and its evaluations.
        assert out.sweeps == STEPS and out.chain.sweeps == 0 and out.block_evals == out.sequential_block_evals


def test_the_ddim_guess_jumps_from_the_last_evaluated_timestep_with_its_predicted_clean_image(
    dit, monkeypatch, float64
):
    # Written from the definition: evaluate the noise at each guess row in turn; every later state up to the
    # next guess row is x_j = sqrt(abar_j) x0 + sqrt(1 - abar_j) e, with x0 the clipped clean image predicted
    # at the row and e the noise that x0 implies there.
    model = copy.deepcopy(dit).double()
    labels = torch.arange(2)
    seen = {}
    real = parallel.solve_chain

    def recording(step, x0, num_steps, **options):
        seen.update(x0=x0, init=options["init"])
        return real(step, x0, num_steps, **options)

    monkeypatch.setattr(parallel, "solve_chain", recording)
    sample_parallel(model, DIFFUSION, labels, steps=STEPS, tol=1e-8, warmup=2, coarse=2, generator=seeded())
    timesteps = [*DIFFUSION.respace(STEPS), -1]
    abar = [float(DIFFUSION.alpha_bar(t)) for t in timesteps]
    rows = parallel.guess_rows(STEPS, 2, 2)
    assert rows == [0, 1, 2, 7]
    states = [torch.randn(2, 1, 8, 8, generator=seeded())]
    for i, row in enumerate(rows):
        x = states[row]
        with torch.no_grad():
            e, _ = model(x, torch.full((2,), timesteps[row]), labels)
        x0 = ((x - math.sqrt(1 - abar[row]) * e) / math.sqrt(abar[row])).clamp(-1, 1)
        e = (x - math.sqrt(abar[row]) * x0) / math.sqrt(1 - abar[row])
        for j in range(row + 1, (rows[i + 1] if i + 1 < len(rows) else STEPS) + 1):
            states.append(math.sqrt(abar[j]) * x0 + math.sqrt(1 - abar[j]) * e)
    expected = torch.stack(states)
    torch.testing.assert_close(seen["init"], expected[2:], atol=1e-12, rtol=0)
    torch.testing.assert_close(seen["x0"], expected[2], atol=1e-12, rtol=0)


def test_paradigms_tolerances_are_its_criterion_on_each_steps_residual():
    # Written from ParaDiGMS's definition: the state after step k (timestep t = t_{k+1}) passes when its
    # RMS change is at most tolerance * sqrt(posterior variance of the step from t to the next timestep).
    timesteps = DIFFUSION.respace(STEPS)
    got = parallel.paradigms_tolerances(DIFFUSION, timesteps, 0.1)
    after = [*timesteps[1:], -1, -1]
    for k in range(STEPS):
        t, t_next = after[k], after[k + 1]
        if t == -1 or t_next == -1:
            expected = 0.0  # a step into t = -1 has no posterior variance: accepted only when exact
        else:
            a, a_next = float(DIFFUSION.alpha_bar(t)), float(DIFFUSION.alpha_bar(t_next))
            expected = 0.1 * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        assert math.isclose(float(got[k]), expected, rel_tol=1e-12, abs_tol=1e-300), k
    assert float(got[0]) > 0 and got[-2:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("tau", [1e-6, 3e-2])
def test_our_noise_scaled_tolerance_converts_to_paradigms_criterion_from_their_definitions(tau):
    # A residual d of D entries whose RMS is exactly our tolerance tau * sqrt(1 - abar_{t_k}) meets
    # ParaDiGMS's ||d||^2 / (D * posterior variance of the step from t_{k+1}) <= tolerance^2 with equality
    # at the converted tolerance: the statistic, computed from the definitions, is the tolerance squared.
    timesteps = DIFFUSION.respace(STEPS)
    converted = parallel.paradigms_equivalent(DIFFUSION, timesteps, tau)
    after = [*timesteps[1:], -1, -1]
    gen = torch.Generator().manual_seed(0)
    D = 3 * 8 * 8
    for k in range(STEPS):
        t, t_next = after[k], after[k + 1]
        if t == -1 or t_next == -1:
            assert converted[k] == math.inf  # no posterior variance: ParaDiGMS accepts only an exact state
            continue
        sigma = math.sqrt(1 - float(DIFFUSION.alpha_bar(timesteps[k])))
        d = torch.randn(D, generator=gen, dtype=torch.float64)
        d *= tau * sigma / d.pow(2).mean().sqrt()  # RMS exactly our tolerance
        a, a_next = float(DIFFUSION.alpha_bar(t)), float(DIFFUSION.alpha_bar(t_next))
        posterior = (1 - a_next) / (1 - a) * (1 - a / a_next)
        statistic = float(d.pow(2).sum()) / (D * posterior)
        assert math.isclose(statistic, float(converted[k]) ** 2, rel_tol=1e-9), k


def test_chain_solver_is_the_deprecated_spelling_of_chain_rule():
    base = ["model.pt", "--budget", "8", "--parallel"]
    with pytest.warns(FutureWarning, match="--chain-solver is deprecated: spell it --chain-rule"):
        old = sample_cli.parse_args([*base, "--chain-solver", "anderson"])
    new = sample_cli.parse_args([*base, "--chain-rule", "anderson"])
    assert old.chain_rule == new.chain_rule == "anderson" and not hasattr(old, "chain_solver")
    assert sample_cli.parse_args(base).chain_rule == "secant"
    with pytest.raises(SystemExit):
        sample_cli.parse_args([*base, "--chain-solver", "newton"])  # the same choices as --chain-rule


def test_max_evals_bounds_the_evaluations_spent_and_says_when_it_stopped_the_chain(dit):
    labels = torch.arange(2)
    free = sample_parallel(dit, DIFFUSION, labels, steps=STEPS, tol=1e-6, warmup=1, generator=seeded())
    assert free.converged and free.block_evals > 2 * free.sequential_block_evals
    for cap in (*range(free.sequential_block_evals, free.block_evals, 4), free.block_evals, 10**6):
        out = sample_parallel(
            dit, DIFFUSION, labels, steps=STEPS, tol=1e-6, warmup=1, max_evals=cap, generator=seeded()
        )
        assert out.block_evals <= cap
        if cap < free.block_evals:  # finishing would have cost what the free run spent
            assert not out.converged and out.sweeps < free.sweeps
            # It ran every sweep the cap pays for at the worst (sweep s evaluating all STEPS - 1 - s + 1
            # timesteps after the warm-up), and no more.
            left, allowed = cap - 2, 0  # DiT: 2 blocks per timestep; the warm-up evaluated one timestep
            while allowed < STEPS - 1 and 2 * (STEPS - 1 - allowed) <= left:
                left -= 2 * (STEPS - 1 - allowed)
                allowed += 1
            assert out.chain.sweeps == allowed
    assert out.converged and torch.equal(out.images, free.images)


def test_the_result_names_the_sequential_sampler_it_reproduces(fpdm):
    labels = torch.arange(2)
    cold = sample_parallel(fpdm, DIFFUSION, labels, steps=4, iterations=2, generator=seeded())
    warm = sample_parallel(fpdm, DIFFUSION, labels, steps=4, iterations=2, reuse=True, generator=seeded())
    assert "reuse=False" in cold.summary()["reproduces"]
    assert warm.summary()["reproduces"] is None  # warm starts across sweeps: no sequential sampler's samples


WORLD = 2


def _spread_worker(rank: int, store_path: str, models, results) -> None:
    import torch.distributed as dist

    with gloo_group(store_path, rank, WORLD, results):
        torch.set_default_dtype(torch.float64)
        results[rank] = [_spread_runs(model, kwargs, dist.group.WORLD) for model, kwargs in models]


def _spread_runs(model, kwargs, group) -> list:
    runs = []
    for options in ({"tol": 1e-7}, {"tol": 1e-7, "warmup": 1, "window": 5, "max_batch": 2}):
        out = sample_parallel(
            model,
            DIFFUSION,
            torch.arange(3),
            steps=STEPS,
            group=group,
            generator=seeded(),
            **kwargs,
            **options,
        )
        runs.append((out.images, out.sweeps, out.block_evals, out.spent, out.options["ranks"]))
    return runs


def test_two_processes_give_the_samples_of_one(models64, float64, tmp_path):
    results = run_workers(_spread_worker, (str(tmp_path / "store"), list(models64)), WORLD)
    alone = [_spread_runs(model, kwargs, None) for model, kwargs in models64]
    for rank in range(WORLD):
        for runs, single in zip(results[rank], alone, strict=True):
            for (images, sweeps, evals, spent, ranks), (images1, sweeps1, evals1, spent1, _) in zip(
                runs, single, strict=True
            ):
                assert ranks == WORLD and (sweeps, evals, spent) == (sweeps1, evals1, spent1)
                # The model evaluated on other batch sizes rounds differently, nothing else differs.
                assert float((images - images1).abs().max()) < EXACT_IN_FLOAT64
    # Both ranks gathered the same images and made the same decisions: the same samples to the bit.
    for runs0, runs1 in zip(results[0], results[1], strict=True):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(runs0, runs1, strict=True))


def test_error_tol_stops_sooner_within_it_of_the_sequential_samples(float64):
    model = ToyDenoiser(torch.float64)
    labels = torch.arange(3)
    reference = sequential(model, labels).images
    full = sample_parallel(model, DIFFUSION, labels, steps=STEPS, tau=1e-12, generator=seeded())
    early = sample_parallel(
        model, DIFFUSION, labels, steps=STEPS, tau=1e-12, error_tol=1e-6, generator=seeded()
    )
    assert early.sweeps < full.sweeps and early.converged
    assert float((early.images - reference).abs().max()) <= 1e-6
    assert early.options["error_tol"] == 1e-6 and early.options["error_estimate"] <= 1e-6
    assert full.options["error_tol"] is None and full.options["error_estimate"] is None
    # The timesteps the estimate made final were never evaluated at their returned states.
    assert math.isinf(early.residuals[-1]) and all(math.isfinite(r) for r in full.residuals)
    assert early.block_evals < full.block_evals


def test_sample_cli_error_tol_is_a_parallel_option_and_recorded(checkpoint, tmp_path, capsys):
    common = [str(checkpoint), *"--num 2 --budget 24 --steps 6 --guidance 1 --no-progress".split()]
    out = tmp_path / "early"
    assert sample_cli.main([*common, "--out", str(out), "--parallel", "--error-tol", "1e-3"]) == 0
    assert json.loads((out / "summary.json").read_text())["error_tol"] == 1e-3
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # a negative one is refused with the other --parallel options
        sample_cli.main([*common, "--out", str(tmp_path / "refused"), "--error-tol", "1e-3"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--error-tol" in err and "is for --parallel only" in err, err
    assert not (tmp_path / "refused").exists()
