"""sample.py --parallel under torchrun: the processes spread the samples or each sweep's timesteps, give the
samples of one process, resume the shards of an interrupted run, and refuse what cannot be spread."""

import dataclasses
import json
import signal

import numpy as np
import pytest
import torch
from fpdm import generation as sample_cli
from fpdm.shards import SHARDS_NAME
from fpdm.training import TrainConfig, build_model
from test_command_lines import exit_status
from test_nothing_lost import EXIT_INTERRUPTED, EXIT_USAGE, one_line
from test_sample_scale import ctrl_c, load, run_sampler, stop_after

#: How far two processes' samples may be from one process's. The samples spread: the same batches, the same
#: arithmetic, so equal. The timesteps spread: each rank runs the model on its share of a sweep, a batch of
#: another size, which may round differently (a few float32 ulps, about 1e-7, per step); the four steps
#: carry that to the images, clipped to [-1, 1], well inside 1e-5. A wrong noise, label or timestep on a
#: rank moves a sample by O(1) (checked below against the next sample).
SAME_SAMPLES = 1e-5


@pytest.fixture(scope="module")
def pixel_checkpoint(tmp_path_factory):
    """A tiny FPDM on 1x8x8 images with random weights, saved as train.py saves a checkpoint."""
    torch.manual_seed(0)
    cfg = TrainConfig(model="FPDM-Digits/2", hidden_size=16, num_heads=2, data="digits")
    model = build_model(cfg, in_channels=1, input_size=8, num_classes=3)
    with torch.no_grad():
        for parameter in model.parameters():  # adaLN-Zero starts at zero: give it an output
            parameter.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("spread") / "checkpoint.pt"
    torch.save({"step": 1, "model": model.state_dict(), "config": dataclasses.asdict(cfg)}, path)
    return path


def parallel_argv(checkpoint, out, spread, *extra):
    return [
        str(checkpoint),
        *("--out", str(out), "--parallel", "--spread", spread, "--budget", "16", "--steps", "4"),
        *("--num-samples", "5", "--batch-size", "2", "--no-progress", "--threads", "1", *extra),
    ]


@pytest.mark.parametrize("spread", ["samples", "timesteps"])
def test_two_processes_resume_one_process_run_to_its_samples(
    pixel_checkpoint, tmp_path, capsys, monkeypatch, spread
):
    whole = tmp_path / "whole"
    assert sample_cli.main(parallel_argv(pixel_checkpoint, whole, spread)) == 0
    # One process stops after the first of 3 batches; two processes (torchrun, gloo) finish the run.
    cut = tmp_path / "cut"
    stop_after(monkeypatch, 1, ctrl_c)
    status, err = exit_status(sample_cli.main, parallel_argv(pixel_checkpoint, cut, spread), capsys)
    assert status == EXIT_INTERRUPTED + signal.SIGINT and "1 of 3 batches" in err
    monkeypatch.undo()
    proc = run_sampler(parallel_argv(pixel_checkpoint, cut, spread), processes=2)
    assert "resuming: 1 of 3 batches" in proc.stdout.decode()
    one, two = load(whole / "samples.npz"), load(cut / "samples.npz")
    assert one.keys() == two.keys() >= {"arr_0", "images", "labels"}
    assert np.array_equal(one["labels"], two["labels"]) and one["labels"].tolist() == [0, 1, 2, 0, 1]
    assert np.abs(one["images"] - two["images"]).max() <= SAME_SAMPLES
    apart = np.abs(one["images"][1:] - one["images"][:-1]).max(axis=(1, 2, 3))
    assert apart.min() > 1000 * SAME_SAMPLES  # the tolerance tells samples apart
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["spread"] == spread and summary["world_size"] == 2 and summary["resumed_batches"] == 1
    # The processes that evaluated one batch's sweeps: 2 when they shared them, else each batch had one.
    assert summary["ranks"] == (2 if spread == "timesteps" else 1)
    assert summary["num_images"] == 5 and summary["converged"] and not (cut / SHARDS_NAME).exists()
    assert json.loads((whole / "summary.json").read_text())["ranks"] == 1


def test_the_spread_is_part_of_the_settings_a_rerun_must_match(
    pixel_checkpoint, tmp_path, capsys, monkeypatch
):
    stop_after(monkeypatch, 1, ctrl_c)
    argv = parallel_argv(pixel_checkpoint, tmp_path / "s", "samples")
    assert exit_status(sample_cli.main, argv, capsys)[0] == EXIT_INTERRUPTED + signal.SIGINT
    monkeypatch.undo()
    status, err = exit_status(
        sample_cli.main, parallel_argv(pixel_checkpoint, tmp_path / "s", "timesteps"), capsys
    )
    assert status == EXIT_USAGE and one_line(err) and "--spread 'samples' -> 'timesteps'" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--spread", "timesteps"], "--spread timesteps does nothing here: it is for --parallel only"),
        (["--parallel", "--spread", "timesteps", "--reuse"], "drop --reuse"),
        (["--parallel", "--spread", "steps"], "--spread: invalid choice: 'steps'"),
    ],
    ids=["without --parallel", "with --reuse", "unknown"],
)
def test_what_cannot_be_spread_is_refused_naming_the_options(
    pixel_checkpoint, tmp_path, capsys, extra, message
):
    argv = [str(pixel_checkpoint), "--out", str(tmp_path / "s"), "--budget", "16", "--no-progress", *extra]
    status, err = exit_status(sample_cli.main, argv, capsys)
    assert status == EXIT_USAGE and one_line(err) and message in err, err
    assert not (tmp_path / "s").exists()


def test_help_says_when_each_spread_pays(capsys):
    with pytest.raises(SystemExit):
        sample_cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--spread {samples,timesteps}" in out and "pays with many samples" in out
    assert "pays with few samples" in out
