"""FPDM and DiT: parameter counts of the paper's presets, fitting, and the implicit block's solve."""

import pytest
import torch
from fpdm.diffusion import GaussianDiffusion
from fpdm.models import FPDM, count_parameters, create_model, sincos_pos_embed_2d

from implicitdiff import JFB, Anderson, Broyden, Picard
from implicitdiff.gradients import IFT, SJFB


def tiny_fpdm(grad=None, **overrides) -> FPDM:
    torch.manual_seed(0)
    options = {
        "hidden_size": 32,
        "num_heads": 2,
        "class_dropout_prob": 0.0,
        "grad": grad or JFB(),
        **overrides,
    }
    return create_model("FPDM-Digits/2", **options)


def digits_batch(n: int = 16):
    from fpdm.data import load_digits

    data = load_digits()
    return data.images[:n], data.labels[:n]


def test_xl_presets_have_the_papers_parameter_counts_on_the_meta_device():
    with torch.device("meta"):
        dit = create_model("DiT-XL/2")
        fpdm = create_model("FPDM-XL/2")
    assert next(dit.parameters()).device.type == "meta"
    assert count_parameters(dit) == pytest.approx(675e6, rel=0.005)
    assert count_parameters(fpdm) == pytest.approx(86.5e6, rel=0.02)
    # 1 pre + 1 implicit + 1 post block at hidden 1152, 16 heads, patch 2 on 32x32x4 latents.
    assert (fpdm.pre_depth, fpdm.post_depth, fpdm.hidden_size, fpdm.num_heads) == (1, 1, 1152, 16)
    assert fpdm.pos_embed.shape == (1, 256, 1152)


def test_models_predict_zero_noise_at_init_and_have_the_input_shape():
    x, y = digits_batch(4)
    t = torch.tensor([0, 10, 500, 999])
    for name in ("DiT-Digits/2", "FPDM-Digits/2"):
        model = create_model(name, hidden_size=32, num_heads=2)
        eps, _ = model(x, t, y)
        assert eps.shape == x.shape
        assert torch.count_nonzero(eps) == 0  # adaLN-Zero: the final layer starts at zero


def test_sincos_position_embedding_is_distinct_per_position():
    pos = sincos_pos_embed_2d(32, 4)
    assert pos.shape == (16, 32)
    assert torch.cdist(pos, pos).add(torch.eye(16)).min() > 0.1


def overfit(model, steps: int, lr: float = 1e-2) -> tuple[float, float]:
    """Train on one fixed batch with fixed timesteps and noise; return the first and last loss."""
    x0, y = digits_batch(16)
    diffusion = GaussianDiffusion()
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (16,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = diffusion.q_sample(x0, t, noise)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = (model(x_t, t, y)[0] - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], min(losses[-5:])


@pytest.mark.parametrize(
    "make_grad",
    [
        lambda: SJFB(no_grad_iters=(0, 6), grad_iters=(1, 3), seed=0),
        lambda: JFB(),
        lambda: IFT(solver=Anderson(), max_iter=8, tol=1e-3, stop_mode="rel", on_failure="ignore"),
    ],
    ids=["sjfb", "jfb", "ift"],
)
def test_small_fpdm_overfits_a_fixed_batch_of_digits(make_grad):
    model = tiny_fpdm(grad=make_grad(), max_iter=6, tol=1e-4)
    first, last = overfit(model, steps=40)
    assert first > 0.5  # the network starts by predicting zero noise: loss ~ E[noise^2] = 1
    assert last < first / 5, (first, last)


@pytest.fixture(scope="module")
def trained_fpdm() -> FPDM:
    model = tiny_fpdm(grad=SJFB(no_grad_iters=(0, 6), grad_iters=(1, 3), seed=0))
    overfit(model, steps=20)
    return model.eval()


@pytest.mark.parametrize("solver", [Picard(), Anderson(m=5), Broyden(memory=10)], ids=repr)
@pytest.mark.parametrize("when", ["init", "trained"])
def test_fpdm_fixed_point_converges_under_the_librarys_solvers(solver, when, trained_fpdm):
    model = tiny_fpdm() if when == "init" else trained_fpdm
    x, y = digits_batch(8)
    t = torch.linspace(0, 999, 8).long()
    with torch.no_grad():
        eps, state = model(x, t, y, solver=solver, max_iter=60, tol=1e-4)
        assert state.stats.all_converged, state.stats.summary()
        assert state.stats.nfe < 60
        # The returned z is a fixed point of the implicit block.
        h, c = model.embed(x, t, y)
        for block in model.blocks_pre:
            h = block(h, c)
        f_z = model.implicit_block(state.z, model.injection(h), c)
        rel = (f_z - state.z).flatten(1).norm(dim=1) / f_z.flatten(1).norm(dim=1)
    assert float(rel.max()) <= 1e-4 * 1.01
    assert torch.isfinite(eps).all()


def test_warm_start_from_the_previous_solution_converges_at_once(trained_fpdm):
    x, y = digits_batch(8)
    t = torch.full((8,), 300)
    with torch.no_grad():
        _, cold = trained_fpdm(x, t, y, max_iter=60, tol=1e-5)
        _, warm = trained_fpdm(x, t, y, max_iter=60, tol=1e-5, z0=cold.z)
    assert cold.stats.nfe > 3
    assert warm.stats.nfe == 1 and warm.stats.all_converged


def test_block_evals_count_pre_post_and_every_implicit_evaluation(trained_fpdm):
    x, y = digits_batch(4)
    t = torch.full((4,), 500)
    # Counts travel with the result: a forward pass sets no attribute on any module (torch.compile would
    # guard on it and recompile).
    snapshot = {id(m): {k: id(v) for k, v in vars(m).items()} for m in trained_fpdm.modules()}
    with torch.no_grad():
        _, state = trained_fpdm(x, t, y, max_iter=5, tol=1e-12)
    assert state.stats.nfe == 5 and state.block_evals == 1 + 1 + 5 and state.grad_evals == 0
    # A fixed budget (tol=None) spends exactly max_iter evaluations too, with no host reads.
    with torch.no_grad():
        _, fixed = trained_fpdm(x, t, y, max_iter=5, tol=None)
    assert fixed.stats.nfe == 5 and fixed.block_evals == 7
    # Without a gradient the state is f(stats.z): five iterations are five applications of the block.
    torch.testing.assert_close(fixed.z, fixed.stats.fz)
    # With a gradient, JFB adds one differentiable evaluation (eval mode: S-JFB acts as JFB).
    _, state = trained_fpdm(x, t, y, max_iter=5, tol=1e-12)
    assert state.block_evals == 1 + 1 + 5 + 1 and state.grad_evals == 1
    assert snapshot == {id(m): {k: id(v) for k, v in vars(m).items()} for m in trained_fpdm.modules()}


def test_dit_gradient_checkpointing_gives_the_same_gradients():
    x, y = digits_batch(4)
    t = torch.tensor([1, 200, 600, 999])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_model("DiT-Digits/2", hidden_size=32, num_heads=2, depth=3,
                             gradient_checkpointing=checkpointing)  # fmt: skip
        with torch.no_grad():  # leave adaLN-Zero so that every block contributes a gradient
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model(x, t, y)[0].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1])
