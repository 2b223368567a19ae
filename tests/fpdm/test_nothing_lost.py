"""Issue 23, the command lines: nothing a user made is lost, nothing silent, one line instead of a traceback.

A run folder has one owner (``train.lock``); Ctrl-C and SIGTERM write a checkpoint and stop so that
``--resume`` loses no step; a full disk or a read-only folder is one line and exit status 3; images of more
than 8 bits are read by their real range; ``evaluate.py`` refuses images and labels outside its contract;
``sweep.py`` does not replace results without ``--overwrite``.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fpdm import evaluation as evaluate
from fpdm import generation as sample_cli
from fpdm import sweeping as sweep
from fpdm import training as train
from fpdm.data import ImageFolder, read_image
from fpdm.diffusion import GaussianDiffusion
from fpdm.files import FileKindError
from fpdm.training import CHECKPOINT_NAME, LOG_NAME, load_checkpoint
from test_command_lines import TINY, exit_status  # the same tiny model and exit-status reader

# The documented exit statuses (README, command-line rules) and the lock's name, written out: the tests
# pin them rather than follow the code.
EXIT_USAGE, EXIT_WRITE, EXIT_INTERRUPTED = 2, 3, 128
LOCK_NAME = "train.lock"

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "fpdm"


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


def subprocess_env() -> dict:
    paths = [str(EXAMPLE_DIR), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(proc.stdout)


# ------------------------------------------------------------------------------------------------------
# The run folder's owner
# ------------------------------------------------------------------------------------------------------


def write_lock(out: Path, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    owner = {"pid": pid, "host": host or socket.gethostname(), "started": time.time()}
    (out / LOCK_NAME).write_text(json.dumps(owner))


def test_a_lock_of_another_host_is_refused_naming_the_host_and_the_file(tmp_path, capsys):
    out = tmp_path / "run"
    write_lock(out, 1, host="some-other-node")
    status, err = exit_status(train.main, ["--out", str(out), *TINY, "--steps", "1"], capsys)
    assert status == EXIT_USAGE and one_line(err)
    assert "pid 1 on host some-other-node" in err and f"delete {out / LOCK_NAME}" in err


def test_the_lock_of_a_crashed_run_is_taken_over_and_released_at_the_end(tmp_path, capsys):
    out = tmp_path / "run"
    pid = dead_pid()
    write_lock(out, pid)
    assert train.main(["--out", str(out), *TINY, "--steps", "1"]) == 0
    assert f"taking over the lock of pid {pid}, which is no longer running" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists() and load_checkpoint(out / CHECKPOINT_NAME)["step"] == 1


def test_the_lock_is_created_atomically_and_only_once(tmp_path):
    from fpdm.run_folder import RunLock

    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    owner = json.loads((tmp_path / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(ValueError, match="is in use"):
        second.acquire()
    second.release()  # not its lock: nothing happens
    assert (tmp_path / LOCK_NAME).exists()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists() and not list(tmp_path.glob(".*.tmp"))


def test_the_lock_is_released_after_a_refused_resume_and_a_failed_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--out", str(out), *TINY, "--steps", "1"]) == 0
    status, _ = exit_status(
        train.main, ["--out", str(out), *TINY, "--steps", "2", "--resume", "--seed", "3"], capsys
    )
    assert status == EXIT_USAGE and not (out / LOCK_NAME).exists()
    assert train.main(["--out", str(out), *TINY, "--steps", "2", "--resume"]) == 0


# ------------------------------------------------------------------------------------------------------
# Signals: a checkpoint, one line, an exact resume
# ------------------------------------------------------------------------------------------------------

LONG = ["--steps", "400", "--ckpt-every", "1000", "--grad", "sjfb", "--ema-warmup", "--seed", "5"]


def wait_for_log_lines(log: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        time.sleep(0.05)
    raise AssertionError("the run did not start")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_writes_a_checkpoint_and_resume_continues_bit_for_bit(tmp_path, signum, capsys):
    out = tmp_path / "stopped"
    argv = ["--out", str(out), *TINY, *LONG]
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE_DIR / "train.py"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
    )
    try:
        wait_for_log_lines(out / LOG_NAME, 3, proc)
        # Meanwhile a second run into the same folder is refused and changes nothing.
        status, err = exit_status(train.main, [*argv, "--resume"], capsys)
        assert status == EXIT_USAGE and f"in use by train.py pid {proc.pid}" in err
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stderr = stderr.decode()
    assert proc.returncode == EXIT_INTERRUPTED + signum, stderr[-2000:]
    stopped = load_checkpoint(out / CHECKPOINT_NAME)["step"]
    assert 3 <= stopped < 400
    assert stderr.strip().splitlines()[-1] == (
        f"train.py: stopped by {signal.Signals(signum).name} after step {stopped} of 400; "
        f"{out / CHECKPOINT_NAME} (step {stopped}) holds it: continue with --resume"
    )
    assert "Traceback" not in stderr and not (out / LOCK_NAME).exists()
    logged = [json.loads(line)["step"] for line in (out / LOG_NAME).read_text().splitlines()]
    assert logged == list(range(1, stopped + 1))

    # --resume loses no step: the same state as a run that was never stopped.
    end = stopped + 2
    assert train.main([*argv, "--steps", str(end), "--resume"]) == 0
    straight = tmp_path / "straight"
    assert train.main(["--out", str(straight), *TINY, *LONG, "--steps", str(end)]) == 0
    a, b = load_checkpoint(out / CHECKPOINT_NAME), load_checkpoint(straight / CHECKPOINT_NAME)
    assert a["step"] == b["step"] == end
    for part in ("model", "ema", "optimizer", "rng", "estimator"):
        assert_same(a[part], b[part], part)
    losses = [
        [json.loads(x)["loss"] for x in (d / LOG_NAME).read_text().splitlines()] for d in (out, straight)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == end


def assert_same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.mark.parametrize(
    "first, second",
    [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)],
    ids=["SIGTERM-SIGTERM", "SIGINT-SIGINT", "SIGINT-SIGTERM"],
)
def test_a_second_signal_during_the_checkpoint_stops_at_once_with_its_own_status(
    tmp_path, first, second, capsys, monkeypatch
):
    # The first signal (during step 2) asks for a checkpoint and a stop; the second arrives while that
    # checkpoint is being written: the write stops there, the previous checkpoint stays whole.
    real_loss, real_save, losses, saves, reached = GaussianDiffusion.training_loss, torch.save, [], [], []

    def loss(self, *args, **kwargs):
        losses.append(1)
        if len(losses) == 2:
            # raise_signal, not os.kill(os.getpid()): the signal reaches this thread before the call returns,
            # so the handler runs at once (os.kill may hand it to another of torch's threads first).
            signal.raise_signal(first)
        return real_loss(self, *args, **kwargs)

    def save(obj, handle, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the checkpoint of step 2
            handle.write(b"PK partial")
            signal.raise_signal(second)
            reached.append("the write went on after the second signal")
        real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "training_loss", loss)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    status, err = exit_status(
        train.main, ["--out", str(out), *TINY, "--steps", "5", "--ckpt-every", "1"], capsys
    )
    name = signal.Signals(second).name
    assert status == EXIT_INTERRUPTED + second and not reached, err
    assert one_line(err) and err.endswith(
        f": stopped at once by a second {name}; {out / CHECKPOINT_NAME} (step 1) is the last "
        "checkpoint: continue with --resume\n"
    )
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 1
    assert not list(out.glob(".*.tmp")) and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_every_command_stopped_by_a_second_signal_exits_with_that_signals_status(signum, capsys):
    # extract_latents.py (and train.py before its loop) ends through StopSignals and run_command alone.
    from fpdm import latents
    from fpdm.cli import OneLineParser, StopSignals, run_command

    assert latents.StopSignals is StopSignals

    def command() -> int:
        with StopSignals() as stop:
            signal.raise_signal(signum)
            assert stop.requested == signum  # the first one only asks
            signal.raise_signal(signum)
            pytest.fail("a second signal did not stop the command at once")
        return 0

    status, err = exit_status(lambda argv: run_command(OneLineParser(prog="x.py"), command), [], capsys)
    assert status == EXIT_INTERRUPTED + signum
    assert err == f"x.py: interrupted ({'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'})\n"


def test_ctrl_c_in_the_other_command_lines_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_cli, "run", interrupted)
    try:
        status, err = exit_status(sample_cli.main, ["x.pt", "--budget", "8", "--out", str(tmp_path)], capsys)
    except KeyboardInterrupt:  # not caught: it would end the whole test session
        pytest.fail("Ctrl-C escaped as a traceback")
    assert status == 130 and one_line(err) and "interrupted" in err


# ------------------------------------------------------------------------------------------------------
# Files that cannot be written
# ------------------------------------------------------------------------------------------------------


def test_a_full_disk_while_checkpointing_keeps_the_old_checkpoint_and_exits_3(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save, saves = torch.save, []

    def full_disk(obj, handle, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    argv = ["--out", str(out), *TINY, "--steps", "4", "--ckpt-every", "2"]
    status, err = exit_status(train.main, argv, capsys)
    assert status == EXIT_WRITE and one_line(err)
    assert "could not write the checkpoint of step 4 (No space left on device)" in err
    assert f"{out / CHECKPOINT_NAME} (step 2) is kept" in err
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 2
    assert not list(out.glob(".*.tmp")) and not (out / LOCK_NAME).exists()


def test_a_read_only_out_is_one_line_and_exit_3(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro" / "run"
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):  # a read-only mount (chmod does not stop root)
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    status, err = exit_status(train.main, ["--out", str(out), *TINY, "--steps", "1"], capsys)
    assert (
        status == EXIT_WRITE
        and one_line(err)
        and "Read-only file system" in err
        and str(tmp_path / "ro") in err
    )


def test_a_file_where_a_folder_is_expected_is_one_line_everywhere(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    status, err = exit_status(train.main, ["--out", str(blocker / "run"), *TINY, "--steps", "1"], capsys)
    assert status == EXIT_WRITE and one_line(err) and str(blocker) in err
    status, err = exit_status(train.main, ["--out", str(blocker), *TINY, "--steps", "1"], capsys)
    assert status == EXIT_USAGE and one_line(err) and "is a file, not a folder" in err
    argv = ["--out", str(tmp_path / "run"), *TINY, "--steps", "1", "--data", f"folder:{blocker}"]
    status, err = exit_status(train.main, argv, capsys)
    assert status == EXIT_USAGE and one_line(err) and "is a file; expected a folder of images" in err
    assert not (tmp_path / "run").exists()
    status, err = exit_status(evaluate.main, ["--samples", str(tmp_path)], capsys)
    assert status == EXIT_USAGE and one_line(err) and "is a folder" in err


# ------------------------------------------------------------------------------------------------------
# Image folders: the real range of wide images, damaged files before training
# ------------------------------------------------------------------------------------------------------


def image_folder(root: Path, arrays: dict[str, np.ndarray], suffix: str = ".png") -> Path:
    from PIL import Image

    for name, array in arrays.items():
        (root / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / "c" / f"{name}{suffix}")
    return root


def test_16_bit_pngs_are_read_by_their_range_not_clipped_to_white(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    flat = np.full((8, 8), 30000, dtype=np.uint16)
    folder = ImageFolder(image_folder(tmp_path, {"a": flat, "b": ramp}), 8)
    x, _ = folder[0]
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x, torch.full((3, 8, 8), 30000 / 65535 * 2 - 1), rtol=0, atol=1e-6)
    x, _ = folder[1]  # same size: no resampling, the exact values
    expected = torch.from_numpy(ramp.astype(np.float64) / 65535 * 2 - 1).float()
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-6)
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])


def test_a_32_bit_integer_image_is_refused_not_scaled_as_if_it_had_16_bits(tmp_path):
    wide = np.arange(64, dtype=np.int32).reshape(8, 8) * 100_000  # values up to 6.3 million
    path = image_folder(tmp_path / "wide", {"a": wide}, ".tif") / "c" / "a.tif"
    with pytest.raises(FileKindError, match=f"{path}: PIL mode 'I' is not supported"):
        read_image(path, 8)
    # The same pixels as 16 bits are read by their range.
    path = image_folder(tmp_path / "narrow", {"a": (wide // 100).astype(np.uint16)}, ".tif") / "c" / "a.tif"
    expected = torch.from_numpy((wide // 100).astype(np.float64) / 65535 * 2 - 1).float()
    torch.testing.assert_close(read_image(path, 8)[0], expected, rtol=0, atol=1e-6)


def test_float_tiffs_in_0_1_are_read_and_others_refused_in_one_line(tmp_path, capsys):
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    x, _ = ImageFolder(image_folder(tmp_path / "ok", {"a": unit}, ".tif"), 8)[0]
    torch.testing.assert_close(x[0], torch.from_numpy(unit * 2 - 1), rtol=0, atol=1e-6)
    wide = image_folder(tmp_path / "wide", {"a": unit * 255}, ".tif")
    argv = [
        "--out",
        str(tmp_path / "run"),
        *TINY,
        "--steps",
        "1",
        "--data",
        f"folder:{wide}",
        "--image-size",
        "8",
    ]
    status, err = exit_status(train.main, argv, capsys)
    assert status == EXIT_USAGE and one_line(err)
    assert "a float image with values in [0, 255]; float images must hold values in [0, 1]" in err
    assert not (tmp_path / "run").exists()


def test_a_damaged_image_stops_training_before_it_starts_naming_it(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = {f"{i}": (rng.random((8, 8, 3)) * 255).astype(np.uint8) for i in range(20)}
    root = image_folder(tmp_path / "data", images)
    damaged = root / "c" / "7.png"
    damaged.write_bytes(damaged.read_bytes()[:60])  # cut short
    argv = [
        "--out",
        str(tmp_path / "run"),
        *TINY,
        "--steps",
        "1",
        "--data",
        f"folder:{root}",
        "--image-size",
        "8",
    ]
    status, err = exit_status(train.main, argv, capsys)
    assert status == EXIT_USAGE and one_line(err)
    assert f"1 of 20 images cannot be used, the first: {damaged}: not a readable image" in err
    assert not (tmp_path / "run").exists()  # nothing to stand in the way of the corrected command
    damaged.unlink()
    assert train.main(argv) == 0


# ------------------------------------------------------------------------------------------------------
# evaluate.py's contract: floats in [-1, 1], labels of the classifier's classes
# ------------------------------------------------------------------------------------------------------


def digits_like(n: int = 20) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32)


@pytest.mark.parametrize(
    "images, message",
    [
        (((digits_like() + 1) * 127.5).astype(np.uint8), "are uint8 (values"),
        ((digits_like() + 1) * 127.5, "range over [0"),
        (digits_like().astype(np.int64), "are int64"),
    ],
    ids=["uint8", "float-0-255", "int64"],
)
def test_evaluate_refuses_images_outside_the_contract(tmp_path, images, message, capsys):
    path = tmp_path / "s.npz"
    np.savez(path, images=images, labels=np.arange(len(images)) % 10)
    status, err = exit_status(evaluate.main, ["--samples", str(path)], capsys)
    assert status == EXIT_USAGE and one_line(err) and message in err and "expected floats in [-1, 1]" in err
    with pytest.raises(ValueError, match="expected floats in"):
        evaluate.evaluate_images(images)


@pytest.mark.parametrize("labels", [np.arange(20) % 11, np.arange(20) - 1, np.arange(20) % 10 + 0.5])
def test_evaluate_refuses_labels_outside_the_classifiers_classes(tmp_path, labels, capsys, monkeypatch):
    path = tmp_path / "s.npz"
    np.savez(path, images=digits_like(), labels=labels)
    status, err = exit_status(evaluate.main, ["--samples", str(path), "--kid-subset-size", "10"], capsys)
    assert status == EXIT_USAGE and one_line(err)
    assert "the classifier has the classes 0..9" in err or "expected integer classes" in err


def test_a_npy_where_an_npz_is_expected_is_one_line(tmp_path, capsys):
    np.save(tmp_path / "s.npy", digits_like())
    status, err = exit_status(evaluate.main, ["--samples", str(tmp_path / "s.npy")], capsys)
    assert status == EXIT_USAGE and one_line(err) and "a single .npy array, not an .npz" in err
    np.savez(tmp_path / "s.npz", images=digits_like())
    argv = ["--samples", str(tmp_path / "s.npz"), "--real", str(tmp_path / "s.npy")]
    status, err = exit_status(evaluate.main, argv, capsys)
    assert status == EXIT_USAGE and one_line(err) and "a single .npy array, not an .npz" in err


# ------------------------------------------------------------------------------------------------------
# sweep.py and the committed results
# ------------------------------------------------------------------------------------------------------


def test_sweep_quick_without_out_does_not_replace_the_committed_results(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    shutil.copytree(sweep.RESULTS_DIR, results)
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    monkeypatch.setattr(sweep, "RESULTS_DIR", results)
    reached = []

    class Reached(Exception):
        pass

    def no_sweep(args):  # nothing is trained or written in this test
        reached.append(args.out)
        raise Reached

    def run(argv):
        try:
            return exit_status(sweep.main, ["--quick", "--work", str(tmp_path / "work"), *argv], capsys)
        except Reached:
            return "ran", ""

    monkeypatch.setattr(sweep, "run_sweep", no_sweep)
    status, err = run([])
    assert status == EXIT_USAGE and one_line(err) and not reached
    assert f"--out {results} already holds results (sweep.json, sweep.md, sweep.png, grids.png)" in err
    assert before == {p.name: p.read_bytes() for p in results.iterdir()}
    # --overwrite is the way to replace them; a fresh --out needs nothing.
    assert run(["--overwrite"])[0] == "ran"
    assert run(["--out", str(tmp_path / "new")])[0] == "ran"
    assert reached == [str(results), str(tmp_path / "new")]


# ------------------------------------------------------------------------------------------------------
# sample.py: the device, and a large budget under the tolerance schedule
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fpdm_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("fpdm") / "run"
    assert train.main(["--out", str(out), *TINY, "--steps", "1", "--grad", "jfb"]) == 0
    return out / CHECKPOINT_NAME


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_sample_device_cuda_without_cuda_is_one_line(fpdm_checkpoint, tmp_path, capsys):
    argv = [
        str(fpdm_checkpoint),
        "--budget",
        "8",
        "--num",
        "2",
        "--out",
        str(tmp_path / "s"),
        "--device",
        "cuda",
    ]
    status, err = exit_status(sample_cli.main, argv, capsys)
    assert status == EXIT_USAGE and one_line(err) and "--device 'cuda': CUDA is not available here" in err
    assert not (tmp_path / "s").exists()


TOLERANCE_MEMORY = """
import resource, sys, torch
from fpdm.diffusion import GaussianDiffusion
from fpdm.generation import load_model
from fpdm.sampling import sample
model = load_model(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = sample(model, GaussianDiffusion(), torch.arange(4), budget=int(sys.argv[2]), steps=5,
                schedule="tolerance", tol=1e-2, generator=torch.Generator().manual_seed(0))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grown, sum(result.iterations))
"""


def test_a_huge_budget_under_the_tolerance_schedule_does_not_allocate_for_it(fpdm_checkpoint, tmp_path):
    # 10**9 evaluations over 5 timesteps: a cap of 2e8 iterations each. Memory must follow the iterations
    # done (a few dozen), not the cap (a preallocated float32 trace of the cap would be 800 MB).
    script = tmp_path / "tolerance_memory.py"
    script.write_text(TOLERANCE_MEMORY)
    grown = {}
    for budget in (100, 10**9):
        proc = subprocess.run(
            [sys.executable, str(script), str(fpdm_checkpoint), str(budget)],
            capture_output=True,
            timeout=300,
            env=subprocess_env(),
        )
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        kib, iterations = map(int, proc.stdout.split())
        grown[budget] = kib
        assert iterations < 500
    assert grown[10**9] < grown[100] + 50 * 1024, grown  # within 50 MB of a small budget's


def test_a_full_disk_while_writing_samples_keeps_the_earlier_samples_whole(
    fpdm_checkpoint, tmp_path, capsys, monkeypatch
):
    from fpdm import shards

    out = tmp_path / "samples"
    argv = [str(fpdm_checkpoint), "--budget", "8", "--num", "2", "--no-progress", "--out", str(out)]
    assert sample_cli.main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(path, *args, **kwargs):
        Path(path).write_bytes(b"PK partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def full_disk_in_shard(handle, **arrays):
        handle.write(b"PK partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # The disk fills up while the batch's shard is written, then while the shards are merged.
    real_savez = np.savez
    monkeypatch.setattr(np, "savez", full_disk_in_shard)
    status, err = exit_status(sample_cli.main, [*argv, "--overwrite", "--seed", "1"], capsys)
    assert status == EXIT_WRITE and one_line(err) and "No space left on device" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no partial file, no stray folder
    monkeypatch.setattr(np, "savez", real_savez)
    monkeypatch.setattr(shards, "write_npz_streamed", full_disk)
    status, err = exit_status(sample_cli.main, [*argv, "--overwrite", "--seed", "1"], capsys)
    assert status == EXIT_WRITE and one_line(err) and "No space left on device" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "shards"} == before
    assert [p.name for p in (out / "shards").glob("batch-*")] == ["batch-000000.npz"]  # kept for the rerun
    monkeypatch.undo()
    assert sample_cli.main([*argv, "--overwrite", "--seed", "1"]) == 0
    assert "resuming: 1 of 1 batches" in capsys.readouterr().out
    assert not (out / "shards").exists() and (out / "samples.npz").read_bytes() != before["samples.npz"]
