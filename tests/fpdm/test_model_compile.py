"""compile_blocks: compiled blocks, an eager solver loop, no recompilation from step to step.

Graphs are counted with a backend that records every graph dynamo hands it and runs it as traced
(``gm.forward``): no C++ compiler is needed, and a new graph after warm-up means a recompilation.
"""

import copy

import pytest
import torch
from fpdm.diffusion import GaussianDiffusion
from fpdm.models import DiTBlock, FinalLayer, ImplicitBlock, TimestepEmbedder, compile_blocks, create_model
from fpdm.sampling import sample

from implicitdiff import SJFB


class CountingBackend:
    """A ``torch.compile`` backend that keeps each graph it is given and runs it unchanged."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(gm)
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    options = {"hidden_size": 32, "num_heads": 2, "class_dropout_prob": 0.1, **overrides}
    if name.startswith("FPDM"):
        # Random S-JFB draws: 0 to 4 no-grad iterations, 1 to 3 differentiable ones.
        options.update(grad=SJFB(no_grad_iters=(0, 4), grad_iters=(1, 3), seed=3), max_iter=4)
    else:
        options.update(depth=2)
    model = create_model(name, **options).train()
    with torch.no_grad():  # leave adaLN-Zero, so that every block's output matters
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


def batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(8, 1, 8, 8, generator=gen) * 2 - 1, torch.randint(0, 10, (8,), generator=gen)


def train_step(model, optimizer, step: int):
    """One training step with the step's own data, noise and timesteps; the loss and the model's state."""
    torch.manual_seed(1000 + step)  # label dropout
    x, y = batch(step)
    loss, state = GaussianDiffusion().training_loss(
        model,
        x,
        y,
        generator=torch.Generator().manual_seed(step),
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), state


def test_compile_blocks_compiles_the_static_parts_in_place_and_keeps_the_state_dict():
    model = tiny("FPDM-Digits/2")
    keys = list(model.state_dict())
    assert compile_blocks(model, backend=CountingBackend()) is model
    assert list(model.state_dict()) == keys  # checkpoints are unchanged
    compiled = {type(m) for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert compiled == {DiTBlock, ImplicitBlock, FinalLayer, TimestepEmbedder}
    # The DiT block inside the implicit block is compiled with it, not on its own.
    assert model.implicit_block.block._compiled_call_impl is None
    with pytest.raises(TypeError, match="no block to compile"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["FPDM-Digits/2", "DiT-Digits/2"])
def test_no_new_graphs_after_warm_up_and_compiled_matches_eager(name):
    eager = tiny(name)
    compiled = copy.deepcopy(eager)
    backend = CountingBackend()
    compile_blocks(compiled, backend=backend)
    opt_eager = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    opt_compiled = torch.optim.AdamW(compiled.parameters(), lr=1e-3)
    draws, warm = [], None
    for step in range(7):
        if step == 3:
            warm = len(backend.graphs)
        loss_eager, state_eager = train_step(eager, opt_eager, step)
        loss_compiled, state_compiled = train_step(compiled, opt_compiled, step)
        torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-6)
        assert state_compiled.block_evals == state_eager.block_evals
        draws.append((state_compiled.stats.nfe, state_compiled.grad_evals) if state_compiled.stats else None)
    assert warm is not None and warm > 0
    assert len(backend.graphs) == warm, f"{len(backend.graphs) - warm} graphs compiled after warm-up"
    for p_eager, p_compiled in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p_compiled, p_eager, rtol=1e-4, atol=1e-5)
    if name.startswith("FPDM"):
        # The S-JFB draws after warm-up differ from step to step (and from warm-up's), yet compile nothing.
        assert len(set(draws[3:])) > 1, draws


def test_compiled_sampling_compiles_nothing_after_the_first_run():
    model = tiny("FPDM-Digits/2").eval()
    backend = CountingBackend()
    compile_blocks(model, backend=backend)
    labels = torch.arange(3)

    def run(schedule: str):
        return sample(model, GaussianDiffusion(), labels, budget=30, steps=6, schedule=schedule, tol=0.05,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip

    first = run("constant")
    warm = len(backend.graphs)
    assert warm > 0
    again = run("increasing")  # other iteration counts per timestep
    run("tolerance")
    assert len(backend.graphs) == warm
    assert first.iterations != again.iterations


def test_compiling_the_whole_model_compiles_nothing_new_across_draws():
    # What most users type: torch.compile(model). The layer's solve and S-JFB's draws run outside the
    # compiled graphs, so a new draw (a new iteration count) is not a recompilation.
    eager = tiny("FPDM-Digits/2")
    backend = CountingBackend()
    model = torch.compile(copy.deepcopy(eager), backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_eager = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    draws, warm = [], None
    for step in range(11):
        if step == 3:
            warm = len(backend.graphs)
        loss, state = train_step(model, optimizer, step)
        loss_eager, _ = train_step(eager, opt_eager, step)
        torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
        draws.append((state.stats.nfe, state.grad_evals) if state.stats else None)
    assert warm is not None and warm > 0
    assert len(backend.graphs) == warm, f"{len(backend.graphs) - warm} graphs compiled after warm-up"
    assert len(set(draws[3:])) > 2, draws
