"""ChainSecant: its proposal against a reference written from its definition, and its arguments."""

from __future__ import annotations

import pytest
import torch

from implicitdiff import ChainSecant
from implicitdiff._chainrules import Sweep


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"m": 0}, "m must be"),
        ({"m": 2.5}, "m must be"),
        ({"lam": -1.0}, "lam must be"),
        ({"safeguard": 1.0}, "safeguard must be"),
        ({"safeguard": float("nan")}, "safeguard must be"),
        ({"base": "identity"}, "base must be one of"),
    ],
)
def test_chain_secant_checks_its_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ChainSecant(**kwargs)


def _sweep(inputs, images, estimates, final, change, cumulative):
    return Sweep(
        inputs=inputs,
        images=images,
        estimates=estimates,
        residual=torch.linalg.vector_norm(images - estimates, dim=1),
        final=final,
        change=change,
        origin=torch.zeros(1, inputs.shape[1], dtype=inputs.dtype),
        cumulative=cumulative,
        stop_mode="abs",
        samples=inputs.shape[1],  # a state of one entry per sample: any blocks dividing it keep samples whole
    )


def _picard_first(rule, rand, rows, n, cumulative):
    """The first sweep of ``rule`` (no pairs yet) proposes Picard on the form: each row its image plus
    ``B`` times the change (``B = I`` cumulative, ``0`` step). Returns the sweep and the rule's state."""
    base = 1.0 if cumulative else 0.0
    first = _sweep(rand(rows, n), rand(rows, n), rand(rows, n), 1, rand(n), cumulative)
    state = rule.start(first)
    proposal, state = rule.propose(state, first)
    d, expected = first.change, first.images.clone()
    for j in range(1, rows):
        expected[j] = first.images[j] + base * d
        d = expected[j] - first.estimates[j]
    torch.testing.assert_close(proposal[1:], expected[1:], rtol=0, atol=1e-15)
    return first, state


@pytest.mark.parametrize("cumulative", [False, True])
def test_a_proposal_carries_the_change_down_the_window_through_each_blocks_own_secant(cumulative):
    # Two sweeps of three steps, a state of two blocks of two entries, one pair per step and block:
    # the model of block b is J d = B d + (s_b - B x_b) (x_b . d) / (x_b . x_b) with (x_b, s_b) the
    # unit-scaled pair of that block alone (B = I cumulative, 0 step).
    gen = torch.Generator().manual_seed(0)
    rows, n, base = 3, 4, 1.0 if cumulative else 0.0
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    rule = ChainSecant(m=1, lam=0.0, safeguard=float("inf"), blocks=2)
    first, state = _picard_first(rule, rand, rows, n, cumulative)

    second = _sweep(rand(rows, n), rand(rows, n), rand(rows, n), 1, rand(n), cumulative)
    proposal, state = rule.propose(state, second)
    dz, ds = second.inputs - first.inputs, second.images - first.images  # the pairs, one per row
    d, expected = second.change, second.images.clone()
    for j in range(1, rows):
        correction = torch.empty(n, dtype=torch.float64)
        for block in (slice(0, 2), slice(2, 4)):
            scale = torch.linalg.vector_norm(dz[j, block])
            x, s = dz[j, block] / scale, ds[j, block] / scale
            correction[block] = (s - base * x) * (x @ d[block]) / (x @ x)
        expected[j] = second.images[j] + base * d + correction
        d = expected[j] - second.estimates[j]
    torch.testing.assert_close(proposal[1:], expected[1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cumulative", [False, True])
def test_a_fitted_base_is_each_blocks_least_squares_multiple_of_the_identity(cumulative):
    # base="fitted", one pair per step and block: block b's model is J d = beta_b d + (s_b - beta_b x_b)
    # (x_b . d) / (x_b . x_b), beta_b = (x_b . s_b) / (x_b . x_b), so J x_b = s_b and J d = beta_b d for d
    # orthogonal to x_b. Before the first pair, beta is the form's (1 cumulative, 0 step): Picard.
    gen = torch.Generator().manual_seed(1)
    rows, n = 3, 4
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    rule = ChainSecant(m=1, lam=0.0, safeguard=float("inf"), blocks=2, base="fitted")
    first, state = _picard_first(rule, rand, rows, n, cumulative)

    second = _sweep(rand(rows, n), rand(rows, n), rand(rows, n), 1, rand(n), cumulative)
    proposal, state = rule.propose(state, second)
    dz, ds = second.inputs - first.inputs, second.images - first.images
    d, expected = second.change, second.images.clone()
    for j in range(1, rows):
        change = torch.empty(n, dtype=torch.float64)
        for block in (slice(0, 2), slice(2, 4)):
            x, s = dz[j, block], ds[j, block]
            beta = (x @ s) / (x @ x)
            change[block] = beta * d[block] + (s - beta * x) * (x @ d[block]) / (x @ x)
        expected[j] = second.images[j] + change
        d = expected[j] - second.estimates[j]
    torch.testing.assert_close(proposal[1:], expected[1:], rtol=1e-12, atol=1e-12)


def test_chain_secant_safeguard_forgets_only_the_steps_its_secant_part_made_worse():
    # From the definition: a step's proposal z was its base model's proposal z - secant plus the secant
    # part; evaluated, the residual is fz - z, and the base model's would have been fz - (z - secant). A
    # step whose residual exceeds safeguard times the base's forgets its older pairs; the others keep them.
    rule = ChainSecant(m=2, safeguard=4.0)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    v = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    state = rule.start(_sweep(z, z, z, 1, z[0], False))
    state.known.fill_(True)
    state.X.normal_(generator=generator)
    state.S.normal_(generator=generator)
    state.k = 1  # slot 1 takes this sweep's pair, slot 0 holds an older one
    # Row 0: the secant part undid what the base had right (base residual tiny): forget. Row 1: the secant
    # part halved the residual (base residual 2v): keep. Row 2: not known yet: nothing to forget.
    state.secant[0] = -v[0] + 1e-3 * v[0]
    state.secant[1] = v[1]
    state.secant[2] = -v[2]
    state.known[2] = False
    older = state.X[:, 0].clone(), state.S[:, 0].clone()
    fz = z + v
    for row in range(3):
        residual = torch.linalg.vector_norm(fz[row] - z[row])
        base_residual = torch.linalg.vector_norm(fz[row] - (z[row] - state.secant[row]))
        assert bool(residual > 4.0 * base_residual) == (row in (0, 2))  # the cases are what they say
    rule.record(state, z, fz, z)
    assert torch.all(state.X[0, 0] == 0) and torch.all(state.S[0, 0] == 0)
    assert torch.equal(state.X[1, 0], older[0][1]) and torch.equal(state.S[1, 0], older[1][1])
    assert torch.equal(state.X[2, 0], older[0][2]) and torch.equal(state.S[2, 0], older[1][2])
