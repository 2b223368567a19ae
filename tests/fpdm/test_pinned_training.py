"""Issue 23, tests that catch bugs: the data order's coverage of an epoch, the EMA across checkpoint
boundaries and its defaults, each against a reference computed independently of the training loop."""

from dataclasses import replace

import pytest
import torch
from fpdm import training as train
from fpdm.cli import UsageError
from fpdm.training import (
    CHECKPOINT_NAME,
    TrainConfig,
    batch_indices,
    ema_multi_avg_fn,
    load_checkpoint,
    parse_args,
)

TINY = ["--hidden-size", "16", "--num-heads", "2", "--batch-size", "16", "--no-progress", "--lr", "3e-3"]


# ------------------------------------------------------------------------------------------------------
# The data order
# ------------------------------------------------------------------------------------------------------


def reference_epoch(num_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch, written out plainly: a permutation seeded by (seed, epoch), cut into
    full batches; the remainder is dropped."""
    order = torch.randperm(
        num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
    ).tolist()
    return [order[k * batch_size : (k + 1) * batch_size] for k in range(num_items // batch_size)]


@pytest.mark.parametrize("num_items, batch_size", [(10, 3), (16, 16), (17, 4), (5, 1), (1437, 128), (100, 7)])
@pytest.mark.parametrize("seed", [0, 1, 977])
def test_every_epoch_uses_each_item_at_most_once_and_all_but_the_remainder(num_items, batch_size, seed):
    per_epoch = num_items // batch_size
    epochs = []
    for epoch in range(3):
        batches = [
            batch_indices(num_items, batch_size, seed, epoch * per_epoch + k) for k in range(per_epoch)
        ]
        assert all(b.dtype == torch.long and b.shape == (batch_size,) for b in batches)
        flat = torch.cat(batches).tolist()
        assert len(set(flat)) == len(flat) == per_epoch * batch_size  # each item at most once
        assert all(0 <= i < num_items for i in flat)
        assert [b.tolist() for b in batches] == reference_epoch(num_items, batch_size, seed, epoch)
        epochs.append(flat)
    if num_items > 5:  # epochs are shuffled anew (a fixed order would pass the checks above)
        assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    if per_epoch * batch_size == num_items:
        assert sorted(epochs[0]) == list(range(num_items))  # no remainder: every item exactly once


def test_the_data_order_depends_on_the_seed_and_only_on_seed_and_step():
    a = [batch_indices(100, 10, 0, step) for step in range(25)]
    assert all(torch.equal(x, batch_indices(100, 10, 0, step)) for step, x in enumerate(a))
    b = [batch_indices(100, 10, 1, step) for step in range(25)]
    assert not all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # Over a few epochs the dropped remainder changes, so every item is seen.
    seen = torch.cat([batch_indices(103, 10, 0, step) for step in range(60)])
    assert set(seen.tolist()) == set(range(103))


def test_a_batch_larger_than_the_data_is_refused():
    with pytest.raises(UsageError, match="--batch-size 11 exceeds the dataset"):
        batch_indices(10, 11, 0, 0)


def test_training_fetches_exactly_the_planned_batches_across_epochs_and_a_resume(tmp_path, monkeypatch):
    from fpdm.data import TensorPairs

    fetched = []
    real_fetch = TensorPairs.fetch

    def recording_fetch(dataset, indices):
        fetched.append(torch.as_tensor(indices).clone())
        return real_fetch(dataset, indices)

    monkeypatch.setattr(TensorPairs, "fetch", recording_fetch)
    # 1797 digits in batches of 600: 2 steps an epoch, so 5 steps cross two epoch boundaries.
    cfg = parse_args(
        ["--out", str(tmp_path / "run"), *TINY, "--batch-size", "600", "--steps", "3", "--seed", "4"]
    )
    train.train(cfg)
    train.train(replace(cfg, steps=5, resume=True))
    assert len(fetched) == 5
    for step, indices in enumerate(fetched):
        epoch, k = divmod(step, 2)
        assert indices.tolist() == reference_epoch(1797, 600, 4, epoch)[k]


# ------------------------------------------------------------------------------------------------------
# The EMA: the default decay, one update by hand, and checkpoint boundaries
# ------------------------------------------------------------------------------------------------------


def test_the_default_ema_decay_is_0_999_and_one_update_matches_the_hand_computed_value():
    assert TrainConfig().ema_decay == 0.999 and parse_args([]).ema_decay == 0.999
    assert TrainConfig().ema_warmup is False and parse_args([]).ema_warmup is False
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 4.0]]))
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(TrainConfig().ema_decay))
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0, 4.0]]))
    ema.update_parameters(model)
    # 0.999 * [1, -2, 4] + 0.001 * [3, 0, 4] = [1.002, -1.998, 4]
    expected = torch.tensor([[1.002, -1.998, 4.0]])
    torch.testing.assert_close(ema.module.weight.detach(), expected, rtol=0, atol=4e-7)


def test_one_warm_up_update_matches_the_hand_computed_value():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(0.999, warmup=True))
    ema.update_parameters(model)
    with torch.no_grad():
        model.weight.fill_(12.0)
    ema.update_parameters(model)  # n = 1: decay min(0.999, 2 / 11) -> 2/11 * 1 + 9/11 * 12 = 110 / 11 = 10
    assert abs(float(ema.module.weight.detach()) - 10.0) < 4e-6


def reference_ema(weights: list[dict], decay: float, warmup: bool) -> dict:
    """The EMA folded by hand over each step's weights, in float64."""
    ema = {k: v.double() for k, v in weights[0].items()}
    for n, current in enumerate(weights[1:], start=1):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        ema = {k: d * ema[k] + (1 - d) * current[k].double() for k in ema}
    return ema


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("warmup", [False, True], ids=["fixed", "warmup"])
def test_the_ema_across_checkpoint_boundaries_is_the_hand_folded_ema_and_bit_identical(tmp_path, warmup):
    steps, decay = 6, 0.6
    base = parse_args(["--out", str(tmp_path / "straight"), *TINY, "--steps", str(steps), "--log-every", "1"])
    base = replace(base, ema_decay=decay, ema_warmup=warmup, ckpt_every=100)
    train.train(base)  # one checkpoint, at the end
    straight = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)

    # The same run stopped and resumed after every step: a checkpoint boundary between any two updates.
    split, weights = replace(base, out=str(tmp_path / "split")), []
    for step in range(1, steps + 1):
        train.train(replace(split, steps=step, resume=step > 1))
        ckpt = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)
        weights.append(
            {k: v for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
        )
    for key, value in straight["ema"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, ckpt["ema"][key]), key
        else:  # the implicit layer's extra state (its estimator's generator)
            assert _same_state(value, ckpt["ema"][key]), key
    assert int(ckpt["ema"]["n_averaged"]) == steps

    expected = reference_ema(weights, decay, warmup)
    for key, value in expected.items():
        got = ckpt["ema"][f"module.{key}"].double()
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=key)
    # The EMA is not the last weights (a missed update or a copy would show here).
    moved = [k for k in expected if not torch.allclose(expected[k], weights[-1][k].double(), atol=1e-6)]
    assert moved
