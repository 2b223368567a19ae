"""sample.py and demo.py end to end on a tiny model trained for a few steps."""

import json

import numpy as np
import pytest
import torch
from fpdm import demo
from fpdm import generation as sample_cli
from fpdm.training import CHECKPOINT_NAME, TrainConfig, train
from PIL import Image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    cfg = TrainConfig(out=str(out), hidden_size=16, num_heads=2, batch_size=32, steps=3, ckpt_every=3,
                      device="cpu", progress=False, log_every=1)  # fmt: skip
    train(cfg)
    return out / CHECKPOINT_NAME


def test_load_model_rebuilds_the_architecture_from_the_checkpoint(checkpoint):
    model = sample_cli.load_model(checkpoint)
    assert (model.hidden_size, model.in_channels, model.input_size, model.num_classes) == (16, 1, 8, 10)
    assert not model.training
    raw = sample_cli.load_model(checkpoint, ema=False)
    ckpt = torch.load(checkpoint, weights_only=True)
    assert torch.equal(raw.final_layer.linear.weight, ckpt["model"]["final_layer.linear.weight"])
    assert torch.equal(model.final_layer.linear.weight, ckpt["ema"]["module.final_layer.linear.weight"])


def test_sample_cli_writes_grid_arrays_and_summary(checkpoint, tmp_path, capsys):
    argv = [str(checkpoint), "--out", str(tmp_path / "s"), "--num", "5", "--batch-size", "2",
            "--budget", "16", "--schedule", "tolerance", "--tol", "0.5", "--solver", "anderson",
            "--labels", "3", "7", "--nrow", "3", "--pixels", "16", "--no-progress"]  # fmt: skip
    assert sample_cli.main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("grid.png", "samples.npz", "summary.json"):
        assert str(tmp_path / "s" / name) in printed
    arrays = np.load(tmp_path / "s" / "samples.npz")
    assert arrays["images"].shape == (5, 1, 8, 8)
    assert arrays["labels"].tolist() == [3, 7, 3, 7, 3]
    assert arrays["spent"].shape == (3, 4) and (arrays["spent"].sum(axis=1) <= 16).all()
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["num_images"] == 5 and summary["batches"] == 3 and summary["spent_per_sample_max"] <= 16
    assert summary["solver"].startswith("Anderson") and summary["schedule"] == "tolerance"
    with Image.open(tmp_path / "s" / "grid.png") as grid:
        assert grid.size == (3 * 18 + 2, 2 * 18 + 2)  # 3 columns, 2 rows of 16 px tiles and 2 px gaps


def test_sample_cli_is_reproducible_with_a_seed(checkpoint, tmp_path):
    common = [str(checkpoint), "--num", "4", "--budget", "12", "--method", "ddpm", "--no-progress"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        sample_cli.main([*common, "--out", str(tmp_path / name), "--seed", seed])
    images = {name: np.load(tmp_path / name / "samples.npz")["images"] for name in "abc"}
    assert np.array_equal(images["a"], images["b"])
    assert not np.allclose(images["a"], images["c"])


def test_demo_trains_samples_and_reports_where_the_files_are(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "demo"), "--train-steps", "2", "--hidden-size", "16", "--num-heads", "2",
            "--num", "10", "--budget", "12", "--threads", "1", "--no-progress"]  # fmt: skip
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["sampling"]["spent_total"] <= 12 and summary["sampling"]["reuse"] is True
    assert summary["sampling"]["steps"] == 3  # smoothing: 12 // (1 pre + 1 post + 2 iterations)
    for path in (summary["files"]["grid"], summary["files"]["npz"], str(tmp_path / "demo" / "summary.json")):
        assert path in printed
    assert (tmp_path / "demo" / "train" / CHECKPOINT_NAME).exists()
    # Run again, the demo continues its finished run (no training) and replaces its samples ...
    checkpoint = (tmp_path / "demo" / "train" / CHECKPOINT_NAME).read_bytes()
    assert demo.main(argv) == 0
    assert (tmp_path / "demo" / "train" / CHECKPOINT_NAME).read_bytes() == checkpoint
    # ... and refuses, in one line, to continue it with another model.
    with pytest.raises(SystemExit) as stop:
        demo.main([*argv, "--hidden-size", "32"])
    assert stop.value.code == 2 and "--hidden-size 16 -> 32" in capsys.readouterr().err
