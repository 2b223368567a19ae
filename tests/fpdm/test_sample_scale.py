"""sample.py at scale: a sample is a function of (seed, index); processes, shards, resume, the merged npz,
the VAE decoding of latent models, and the output folder's owner."""

import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fpdm import generation as sample_cli
from fpdm.files import NpzMember, npz_member_rows, write_npz_streamed
from fpdm.latents import tiny_vae
from fpdm.shards import SHARDS_NAME, ShardPlan
from fpdm.training import TrainConfig, build_model
from test_command_lines import exit_status, run_dir  # noqa: F401 (a fixture: a tiny digits checkpoint)
from test_nothing_lost import EXIT_INTERRUPTED, EXIT_USAGE, EXIT_WRITE, one_line, subprocess_env
from test_run_folder import holding_lock

REPO = Path(__file__).resolve().parents[2]
SAMPLE_PY = REPO / "examples" / "fpdm" / "sample.py"
#: Half the digits of float32: differences of rounding (another batching of the same arithmetic), amplified
#: by the sampler's conditioning up to 1 / sqrt(eps), stay below it; a sample drawn from another generator
#: differs by O(1).
ROUNDING = float(np.sqrt(np.finfo(np.float32).eps))


@pytest.fixture(scope="module")
def checkpoint(run_dir):  # noqa: F811
    return run_dir / "checkpoint.pt"


def sample_argv(checkpoint, out, *extra):
    return [str(checkpoint), "--out", str(out), "--budget", "12", "--no-progress", "--threads", "1", *extra]


def load(path):
    with np.load(path) as arrays:
        return {name: arrays[name] for name in arrays.files}


# ------------------------------------------------------------------------------------------------------
# Samples are functions of (seed, index)
# ------------------------------------------------------------------------------------------------------


def test_a_sample_does_not_depend_on_the_batch_it_is_drawn_in(checkpoint, tmp_path):
    runs = {}
    for batch_size in ("5", "2", "1"):
        argv = sample_argv(checkpoint, tmp_path / batch_size, "--num-samples", "5", "--method", "ddpm")
        assert sample_cli.main([*argv, "--batch-size", batch_size]) == 0  # DDPM: noise at every step too
        runs[batch_size] = load(tmp_path / batch_size / "samples.npz")
    for batch_size in ("2", "1"):
        assert np.array_equal(runs[batch_size]["labels"], runs["5"]["labels"])
        assert np.abs(runs[batch_size]["images"] - runs["5"]["images"]).max() <= ROUNDING
    # The tolerance tells samples apart: sample i against sample i + 1 of the same label cycle differs.
    assert (
        np.abs(runs["5"]["images"][1:] - runs["5"]["images"][:-1]).max(axis=(1, 2, 3)).min() > 100 * ROUNDING
    )
    assert runs["5"]["labels"].tolist() == [0, 1, 2, 3, 4]


def test_the_npz_holds_uint8_images_for_adms_evaluator_beside_our_arrays(checkpoint, tmp_path):
    argv = sample_argv(checkpoint, tmp_path / "s", "--num-samples", "5", "--batch-size", "2", "--labels", "7")
    assert sample_cli.main(argv) == 0
    arrays = load(tmp_path / "s" / "samples.npz")
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (5, 8, 8, 3)
    expected = np.round((np.clip(arrays["images"], -1, 1) + 1) * 127.5).astype(np.uint8)  # (5, 1, 8, 8)
    assert np.array_equal(arrays["arr_0"], np.repeat(expected.transpose(0, 2, 3, 1), 3, axis=3))
    assert arrays["labels"].tolist() == arrays["arr_1"].tolist() == [7] * 5
    assert arrays["spent"].shape == (3, len(arrays["timesteps"][0]))  # one row per batch
    assert not (tmp_path / "s" / SHARDS_NAME).exists()  # merged, then removed


def test_num_is_refused_under_torchrun_and_both_counts_at_once(checkpoint, tmp_path, capsys, monkeypatch):
    argv = sample_argv(checkpoint, tmp_path / "s", "--num", "4", "--num-samples", "4")
    status, err = exit_status(sample_cli.main, argv, capsys)
    assert status == EXIT_USAGE and "give one" in err
    monkeypatch.setenv("RANK", "0")
    status, err = exit_status(sample_cli.main, sample_argv(checkpoint, tmp_path / "s", "--num", "4"), capsys)
    assert status == EXIT_USAGE and one_line(err) and "pass --num-samples" in err and "--numa-binding" in err


# ------------------------------------------------------------------------------------------------------
# Interrupted runs keep their shards and resume (Ctrl-C, SIGTERM, a count too large to finish)
# ------------------------------------------------------------------------------------------------------


def stop_after(monkeypatch, shards, stop):
    """Make the run stop (``stop()``) once ``shards`` shards are written."""
    real, written = ShardPlan.write, []

    def write(self, batch, arrays):
        path = real(self, batch, arrays)
        written.append(batch)
        if len(written) == shards:
            stop()
        return path

    monkeypatch.setattr(ShardPlan, "write", write)
    return written


def ctrl_c():
    raise KeyboardInterrupt


def test_ctrl_c_keeps_the_finished_batches_and_a_rerun_resumes_to_the_same_samples(
    checkpoint, tmp_path, capsys, monkeypatch
):
    common = ["--num-samples", "5", "--batch-size", "2", "--method", "ddpm", "--progress"]
    assert sample_cli.main(sample_argv(checkpoint, tmp_path / "whole", *common)) == 0
    capsys.readouterr()
    written = stop_after(monkeypatch, 2, ctrl_c)
    argv = sample_argv(checkpoint, tmp_path / "cut", *common)
    status, err = exit_status(sample_cli.main, argv, capsys)
    shards = tmp_path / "cut" / SHARDS_NAME
    assert status == EXIT_INTERRUPTED + signal.SIGINT and "Traceback" not in err
    # The message is a line of its own, not glued to the progress bar's last line.
    (line,) = [line for line in err.split("\n") if "stopped by SIGINT" in line]
    prog, _, message = line.partition(": ")  # the line starts with the program's name, then the message
    assert " " not in prog and "\r" not in prog
    assert message.startswith("stopped by SIGINT: 2 of 3 batches (4 of 5 samples) are kept in ")
    assert str(shards) in line and "run the same command again" in line
    assert sorted(p.name for p in shards.glob("batch-*.npz")) == ["batch-000000.npz", "batch-000001.npz"]
    assert not (tmp_path / "cut" / "samples.npz").exists() and not (tmp_path / "cut" / "sample.lock").exists()
    monkeypatch.undo()
    assert sample_cli.main(argv) == 0
    assert "resuming: 2 of 3 batches" in capsys.readouterr().out
    whole, resumed = load(tmp_path / "whole" / "samples.npz"), load(tmp_path / "cut" / "samples.npz")
    assert whole.keys() == resumed.keys()
    for name in whole:  # the same arithmetic on the same batches: equal, not close
        assert np.array_equal(whole[name], resumed[name], equal_nan=True), name
    assert written == [0, 1]
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["resumed_batches"] == 2 and summary["num_images"] == 5 and summary["batches"] == 3


def test_a_rerun_with_other_settings_is_refused_until_overwrite(checkpoint, tmp_path, capsys, monkeypatch):
    stop_after(monkeypatch, 1, ctrl_c)
    argv = sample_argv(checkpoint, tmp_path / "s", "--num-samples", "4", "--batch-size", "2")
    assert exit_status(sample_cli.main, argv, capsys)[0] == EXIT_INTERRUPTED + signal.SIGINT
    monkeypatch.undo()
    status, err = exit_status(sample_cli.main, [*argv, "--seed", "3"], capsys)
    assert status == EXIT_USAGE and one_line(err) and "--seed 0 -> 3" in err and "--overwrite" in err
    assert len(list((tmp_path / "s" / SHARDS_NAME).glob("batch-*"))) == 1  # kept
    assert sample_cli.main([*argv, "--seed", "3", "--overwrite"]) == 0
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["resumed_batches"] == 0


def test_sigterm_keeps_the_shards_and_says_so(checkpoint, tmp_path, capsys, monkeypatch):
    stop_after(monkeypatch, 1, lambda: signal.raise_signal(signal.SIGTERM))
    argv = sample_argv(checkpoint, tmp_path / "s", "--num-samples", "4", "--batch-size", "2")
    status, err = exit_status(sample_cli.main, argv, capsys)
    assert status == EXIT_INTERRUPTED + signal.SIGTERM and one_line(err)
    assert "stopped by SIGTERM: 1 of 2 batches (2 of 4 samples) are kept" in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_while_the_shards_are_merged_keeps_them_says_so_and_a_rerun_merges(
    checkpoint, tmp_path, capsys, monkeypatch, signum
):
    # The merge of a large run takes minutes: a stop there keeps every shard, and says so.
    def unhandled(signum, frame):  # the sampler's own handler must be the one in place
        raise AssertionError(f"{signal.Signals(signum).name} reached no handler of the sampler")

    previous = signal.signal(signal.SIGTERM, unhandled)
    # SIGINT ignored, as a job started in the background by a shell without job control inherits it (Python
    # then installs no KeyboardInterrupt): the sampler must install its own handler for it too.
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    real_merge = sample_cli.merge_shards

    def merge(plan, path, **kwargs):
        path.write_bytes(b"PK partial")
        # raise_signal, not os.kill(os.getpid()): the signal reaches this thread before the call returns,
        # so the handler runs at once (os.kill may hand it to another of torch's threads first).
        signal.raise_signal(signum)
        raise AssertionError("the merge went on after the signal")

    try:
        monkeypatch.setattr(sample_cli, "merge_shards", merge)
        argv = sample_argv(checkpoint, tmp_path / "s", "--num-samples", "5", "--batch-size", "2")
        status, err = exit_status(sample_cli.main, argv, capsys)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    name = signal.Signals(signum).name
    assert status == EXIT_INTERRUPTED + signum and one_line(err)
    assert f"stopped by {name}: 3 of 3 batches (5 of 5 samples) are kept in " in err
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [SHARDS_NAME]  # no partial file, no lock
    assert len(list((tmp_path / "s" / SHARDS_NAME).glob("batch-*.npz"))) == 3
    monkeypatch.setattr(sample_cli, "merge_shards", real_merge)
    assert sample_cli.main(argv) == 0
    assert "resuming: 3 of 3 batches" in capsys.readouterr().out
    assert load(tmp_path / "s" / "samples.npz")["labels"].shape == (5,)
    assert not (tmp_path / "s" / SHARDS_NAME).exists()


@pytest.mark.parametrize("when", ["loading", "cleaning up"])
def test_sigterm_before_sampling_or_again_during_the_clean_up_says_sigterm(
    checkpoint, tmp_path, capsys, monkeypatch, when
):
    # SIGTERM is 143 and a line that names it wherever it arrives, however many arrive.
    def unhandled(signum, frame):  # the sampler's own handler must be the one in place
        raise AssertionError("SIGTERM reached no handler of the sampler")

    real_load = sample_cli._load

    def load_then_signal(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)
        return loaded

    def signal_again(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(sample_cli, "_load", load_then_signal)
    if when == "cleaning up":
        stop_after(monkeypatch, 1, lambda: signal.raise_signal(signal.SIGTERM))
        monkeypatch.setattr(sample_cli, "_load", real_load)
        monkeypatch.setattr(sample_cli, "_leave_nothing_empty", signal_again)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        argv = sample_argv(checkpoint, tmp_path / "s", "--num-samples", "4", "--batch-size", "2")
        status, err = exit_status(sample_cli.main, argv, capsys)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert status == EXIT_INTERRUPTED + signal.SIGTERM and one_line(err) and "SIGTERM" in err, err
    if when == "loading":
        assert not (tmp_path / "s").exists()  # nothing written, nothing in the way of the rerun


def test_ctrl_c_before_any_batch_says_nothing_was_kept_and_leaves_nothing(
    checkpoint, tmp_path, capsys, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_cli, "_sample_batch", interrupted)
    status, err = exit_status(
        sample_cli.main, sample_argv(checkpoint, tmp_path / "s", "--num-samples", "4"), capsys
    )
    assert status == EXIT_INTERRUPTED + signal.SIGINT and one_line(err) and "nothing was kept" in err
    assert not (tmp_path / "s").exists()


def test_a_count_too_large_to_hold_is_streamed_not_allocated(checkpoint, tmp_path, capsys, monkeypatch):
    # 10**14 labels would be 800 TB: the run starts at once, batch by batch, and stops on Ctrl-C.
    stop_after(monkeypatch, 1, ctrl_c)
    argv = sample_argv(checkpoint, tmp_path / "s", "--num-samples", str(10**14), "--batch-size", "2")
    status, err = exit_status(sample_cli.main, argv, capsys)
    assert status == EXIT_INTERRUPTED + signal.SIGINT and one_line(err)
    assert f"1 of {10**14 // 2} batches (2 of {10**14} samples) are kept" in err


# ------------------------------------------------------------------------------------------------------
# The output folder: one owner, writable before the work, no stale files after --overwrite
# ------------------------------------------------------------------------------------------------------


def test_a_second_sampler_into_the_same_out_is_refused_and_changes_nothing(checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    argv = sample_argv(checkpoint, out, "--num-samples", "2")
    assert sample_cli.main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a sampler that runs now (a live pid on this host) owns the folder
        owner = {"pid": sleeper.pid, "host": socket.gethostname(), "started": time.time()}
        (out / sample_cli.LOCK_NAME).write_text(json.dumps(owner))
        for extra in ([], ["--overwrite", "--seed", "2"]):
            status, err = exit_status(sample_cli.main, [*argv, *extra], capsys)
            assert status == EXIT_USAGE and one_line(err) and f"in use by sample.py pid {sleeper.pid}" in err
    finally:
        sleeper.kill()
        sleeper.wait()
    (out / sample_cli.LOCK_NAME).unlink()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_sampler_at_work_in_the_same_out_is_refused_and_changes_nothing(checkpoint, tmp_path, capsys):
    # The second of two samplers started at once: the first holds sample.lock's kernel lock.
    out = tmp_path / "s"
    argv = sample_argv(checkpoint, out, "--num-samples", "2")
    assert sample_cli.main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with holding_lock(out, sample_cli.LOCK_NAME, "sample.py") as pid:
        for extra in ([], ["--overwrite", "--seed", "2"]):
            status, err = exit_status(sample_cli.main, [*argv, *extra], capsys)
            assert status == EXIT_USAGE and one_line(err)
            assert f"in use by sample.py pid {pid} on this host" in err
            assert f"`kill {pid}`" in err and str(out / sample_cli.LOCK_NAME) in err
    (out / sample_cli.LOCK_NAME).unlink()  # the record the killed holder left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_stage_of_a_merge_killed_by_sigkill_is_removed_by_the_rerun(checkpoint, tmp_path, capsys):
    # kill -9 (or the out-of-memory killer) during the final move leaves a stage as large as samples.npz.
    out = tmp_path / "s"
    argv = sample_argv(checkpoint, out, "--num-samples", "2")
    stale = out / ".partial-x1y2z3"
    stale.mkdir(parents=True)
    (stale / "samples.npz").write_bytes(b"PK partial")
    assert sample_cli.main(argv) == 0
    assert f"removed {stale}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "samples.npz", "summary.json"]


def test_an_out_on_a_read_only_file_system_is_refused_before_sampling(
    checkpoint, tmp_path, capsys, monkeypatch
):
    real_mkdir, sampled = os.mkdir, []

    def read_only(path, *args, **kwargs):  # a read-only mount (chmod does not stop root)
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    monkeypatch.setattr(sample_cli, "sample", lambda *a, **k: sampled.append(1))
    status, err = exit_status(sample_cli.main, sample_argv(checkpoint, tmp_path / "ro" / "s"), capsys)
    assert status == EXIT_WRITE and one_line(err) and "Read-only file system" in err and not sampled


def latent_checkpoint(path: Path, data: str, **config) -> Path:
    """A tiny FPDM on 4x8x8 latents with random weights, saved as train.py saves a checkpoint."""
    torch.manual_seed(0)
    cfg = TrainConfig(model="FPDM-Digits/2", hidden_size=16, num_heads=2, data=data)
    model = build_model(cfg, in_channels=4, input_size=8, num_classes=3)
    with torch.no_grad():
        for parameter in model.parameters():  # adaLN-Zero starts at zero: give it an output
            parameter.normal_(0, 0.05)
    torch.save(
        {"step": 1, "model": model.state_dict(), "config": {**dataclasses.asdict(cfg), **config}}, path
    )
    return path


def test_overwrite_leaves_no_grid_of_an_older_run(checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    assert sample_cli.main(sample_argv(checkpoint, out, "--num-samples", "2")) == 0
    assert (out / "grid.png").exists()
    latents_only = latent_checkpoint(tmp_path / "latent.pt", "latents:" + str(tmp_path / "gone"))
    assert sample_cli.main(sample_argv(latents_only, out, "--num-samples", "2", "--overwrite")) == 0
    assert "writing latents only" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["samples.npz", "summary.json"]
    arrays = load(out / "samples.npz")
    assert arrays["latents"].shape == (2, 4, 8, 8) and "arr_0" not in arrays and "images" not in arrays


# ------------------------------------------------------------------------------------------------------
# Latent models: decoded by the VAE their latents name; two processes write what one does
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    """A latent checkpoint whose latents folder's meta.json names a tiny random VAE saved to a folder."""
    root = tmp_path_factory.mktemp("latent")
    tiny_vae().save_pretrained(root / "vae")
    (root / "latents").mkdir()
    meta = {"vae": str(root / "vae"), "scaling_factor": 0.5, "num_classes": 3, "latent_shape": [4, 8, 8]}
    (root / "latents" / "meta.json").write_text(json.dumps(meta))
    return latent_checkpoint(root / "checkpoint.pt", f"latents:{root / 'latents'}"), root / "vae"


def run_sampler(argv, processes):
    launcher = [sys.executable, str(SAMPLE_PY)]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--standalone", str(SAMPLE_PY)]  # fmt: skip
    proc = subprocess.run([*launcher, *argv], capture_output=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc


def test_two_processes_write_what_one_process_writes_decoded_by_the_vae(latent_model, tmp_path):
    checkpoint, vae_folder = latent_model
    common = ["--budget", "8", "--num-samples", "5", "--batch-size", "2", "--no-progress", "--threads", "1"]
    for processes in (1, 2):
        run_sampler([str(checkpoint), "--out", str(tmp_path / str(processes)), *common], processes)
    one, two = load(tmp_path / "1" / "samples.npz"), load(tmp_path / "2" / "samples.npz")
    assert one.keys() == two.keys() >= {"arr_0", "arr_1", "latents", "labels"}
    for name in one:  # the same batches, the same arithmetic, on whichever rank: equal
        assert np.array_equal(one[name], two[name], equal_nan=True), name
    summary = json.loads((tmp_path / "2" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["decoded_with"] == str(vae_folder)
    # arr_0 is the VAE's decoding of the latents (scaled back by meta.json's factor), as uint8 NHWC.
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(one["latents"]) / 0.5).sample.clamp(-1, 1)
    assert one["arr_0"].shape == (5, 16, 16, 3) and one["arr_0"].dtype == np.uint8
    assert np.abs(one["arr_0"].astype(int) - sample_cli.pixels(decoded).astype(int)).max() <= 1  # rounding
    assert (tmp_path / "1" / "grid.png").exists()


def test_a_vae_that_cannot_be_loaded_or_does_not_fit_is_one_line_before_sampling(
    latent_model, checkpoint, tmp_path, capsys
):
    latent, _ = latent_model
    argv = ["--out", str(tmp_path / "s"), "--num-samples", "1", "--budget", "8", "--no-progress"]
    status, err = exit_status(
        sample_cli.main, [str(latent), *argv, "--vae", str(tmp_path / "nowhere")], capsys
    )
    assert status == EXIT_USAGE and one_line(err) and f"--vae {tmp_path / 'nowhere'}: could not load" in err
    status, err = exit_status(sample_cli.main, [str(checkpoint), *argv, "--vae", "any"], capsys)
    assert status == EXIT_USAGE and one_line(err) and "samples images, not latents; drop --vae" in err
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------------
# The streamed npz
# ------------------------------------------------------------------------------------------------------


def test_a_streamed_npz_reads_back_as_np_savez_writes_it(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    steps = rng.standard_normal((3, 5))
    members = {
        "arr_0": NpzMember(images.shape, images.dtype, lambda: (images[i : i + 3] for i in range(0, 7, 3))),
        "steps": NpzMember(steps.shape, steps.dtype, lambda: iter([steps[:1], steps[1:]])),
    }
    write_npz_streamed(tmp_path / "a.npz", members)
    arrays = load(tmp_path / "a.npz")
    assert np.array_equal(arrays["arr_0"], images) and np.array_equal(arrays["steps"], steps)
    shape, dtype, rows = npz_member_rows(tmp_path / "a.npz", "arr_0", 2)
    assert shape == images.shape and dtype == np.uint8
    assert np.array_equal(np.concatenate(list(rows)), images)
    with pytest.raises(ValueError, match="hold 6 rows, expected 7"):
        write_npz_streamed(
            tmp_path / "b.npz", {"x": NpzMember((7, 2), np.float64, lambda: [np.zeros((6, 2))])}
        )
