"""sample.py --parallel under torchrun: the processes spread the samples or each sweep's timesteps, give the
samples of one process, resume the shards of an interrupted run, and refuse what cannot be spread."""

import json
import signal

import numpy as np
import pytest
from fpdm import generation as sample_cli
from fpdm.shards import SHARDS_NAME, ShardPlan
from test_command_lines import exit_status
from test_nothing_lost import EXIT_INTERRUPTED, EXIT_USAGE, one_line
from test_sample_scale import ctrl_c, latent_checkpoint, load, run_sampler, stop_after

#: How far two processes' samples may be from one process's, relative to the largest entry (the latents are
#: not clipped: a model with random weights takes them to hundreds). The samples spread: the same batches,
#: the same arithmetic, so equal. The timesteps spread: each rank runs the model on its share of a sweep, a
#: batch of another size, which may round differently (a few float32 ulps, eps = 1.2e-7 relative, per
#: step); four steps carry that to the samples well inside 1e-5. A wrong noise, label or timestep on a rank
#: moves a sample by O(1) of the scale (checked below against the next sample).
SAME_SAMPLES = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny FPDM on 4x8x8 latents with random weights, no VAE: the samples are the latents themselves."""
    root = tmp_path_factory.mktemp("spread")
    return latent_checkpoint(root / "checkpoint.pt", f"latents:{root / 'no-latents'}")


def parallel_argv(checkpoint, out, spread, *extra):
    return [
        str(checkpoint),
        *("--out", str(out), "--parallel", "--spread", spread, "--budget", "16", "--steps", "4"),
        *("--num-samples", "5", "--batch-size", "2", "--no-progress", "--threads", "1", *extra),
    ]


@pytest.mark.parametrize("spread", ["samples", "timesteps"])
def test_two_processes_resume_one_process_run_to_its_samples(
    checkpoint, tmp_path, capsys, monkeypatch, spread
):
    whole = tmp_path / "whole"
    assert sample_cli.main(parallel_argv(checkpoint, whole, spread)) == 0
    # One process stops after the first of 3 batches; two processes (torchrun, gloo) finish the run.
    cut = tmp_path / "cut"
    stop_after(monkeypatch, 1, ctrl_c)
    status, err = exit_status(sample_cli.main, parallel_argv(checkpoint, cut, spread), capsys)
    assert status == EXIT_INTERRUPTED + signal.SIGINT and "1 of 3 batches" in err
    monkeypatch.undo()
    # Mark the kept batch: the resumed run must merge it as it is, not sample it again.
    shard = ShardPlan(cut / SHARDS_NAME, 5, 2).path(0)
    kept = load(shard)
    kept["latents"] = kept["latents"] / 2
    np.savez(shard, **kept)
    proc = run_sampler(parallel_argv(checkpoint, cut, spread), processes=2)
    assert "resuming: 1 of 3 batches" in proc.stdout.decode()
    one, two = load(whole / "samples.npz"), load(cut / "samples.npz")
    assert one.keys() == two.keys() >= {"latents", "labels"}
    assert np.array_equal(one["labels"], two["labels"]) and one["labels"].tolist() == [0, 1, 2, 0, 1]
    assert np.array_equal(two["latents"][:2], kept["latents"])
    scale = np.abs(one["latents"]).max()
    assert np.abs(one["latents"][2:] - two["latents"][2:]).max() <= SAME_SAMPLES * scale
    apart = np.abs(one["latents"][1:] - one["latents"][:-1]).max(axis=(1, 2, 3))
    assert apart.min() > 1000 * SAME_SAMPLES * scale  # the tolerance tells samples apart
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["spread"] == spread and summary["world_size"] == 2 and summary["resumed_batches"] == 1
    # The processes that evaluated one batch's sweeps: 2 when they shared them, else each batch had one.
    assert summary["ranks"] == (2 if spread == "timesteps" else 1)
    assert summary["num_images"] == 5 and summary["converged"] and not (cut / SHARDS_NAME).exists()
    assert json.loads((whole / "summary.json").read_text())["ranks"] == 1


def test_the_spread_is_part_of_the_settings_a_rerun_must_match(checkpoint, tmp_path, capsys, monkeypatch):
    stop_after(monkeypatch, 1, ctrl_c)
    argv = parallel_argv(checkpoint, tmp_path / "s", "samples")
    assert exit_status(sample_cli.main, argv, capsys)[0] == EXIT_INTERRUPTED + signal.SIGINT
    monkeypatch.undo()
    status, err = exit_status(sample_cli.main, parallel_argv(checkpoint, tmp_path / "s", "timesteps"), capsys)
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
def test_what_cannot_be_spread_is_refused_naming_the_options(checkpoint, tmp_path, capsys, extra, message):
    argv = [str(checkpoint), "--out", str(tmp_path / "s"), "--budget", "16", "--no-progress", *extra]
    status, err = exit_status(sample_cli.main, argv, capsys)
    assert status == EXIT_USAGE and one_line(err) and message in err, err
    assert not (tmp_path / "s").exists()


def test_help_says_when_each_spread_pays(capsys):
    with pytest.raises(SystemExit):
        sample_cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--spread {samples,timesteps}" in out and "pays with many samples" in out
    assert "pays with few samples" in out
