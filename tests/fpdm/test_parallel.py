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
from test_sampling import contractive_model
from torch import nn

from implicitdiff import Anderson, Picard

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


@pytest.mark.parametrize("form", ["cumulative", "step"])
@pytest.mark.parametrize("solver", [default_rule, Picard, Anderson])
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
    assert default.options["solver"].startswith("ChainSecant(") and "blocks=3" in default.options["solver"]
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


@pytest.mark.parametrize("name", ["dit", "fpdm"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_block_evaluations_counted_match_the_calls(name, guidance, request):
    model = request.getfixturevalue(name)
    labels = torch.arange(3)
    kwargs = {"iterations": 2} if name == "fpdm" else {}
    counter = RowCounter(model)
    try:
        out = sample_parallel(
            model,
            DIFFUSION,
            labels,
            steps=STEPS,
            tol=1e-5,
            window=5,
            guidance=guidance,
            solver=Anderson(),
            generator=seeded(),
            **kwargs,
        )
    finally:
        counter.remove()
    assert counter.rows == out.guided_evals * 3  # block rows = per-sample evaluations x batch (x 2 guided)
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
        *"--parallel --chain-solver anderson --chain-tol 0".split(),
    ]
    assert sample_cli.main(argv) == 0
    assert str(tmp_path / "par" / "samples.npz") in capsys.readouterr().out
    seq, par = (np.load(tmp_path / name / "samples.npz") for name in ("seq", "par"))
    assert np.abs(seq["images"] - par["images"]).max() < 1e-5  # same noise, same model, exact chain
    summary = json.loads((tmp_path / "par" / "summary.json").read_text())
    assert (
        summary["parallel"] is True and summary["batches"] == 2 and summary["solver"].startswith("Anderson")
    )
    assert summary["reuse"] is False  # cold starts by default in the parallel mode
    assert summary["iterations_per_call"] == 2 and 1 <= summary["sweeps"] <= 6  # 24 // 6 - (1 pre + 1 post)


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
