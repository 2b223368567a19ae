"""Latents folders: extraction (chunked, resumable, split over processes, its destination checked first),
the format, conversion of the older .pt files, and training reading them through memory maps."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from fpdm import latents
from fpdm import training as train
from fpdm.data import LatentFolder, TensorPairs, load_dataset, read_image, read_latents_meta
from fpdm.distributed import Runtime
from fpdm.files import FileKindError
from fpdm.latents import RANDOM_TINY_VAE, encode_batch, row_seed, tiny_vae
from fpdm.run_folder import RunLock
from fpdm.training import StepBatches, TrainConfig, batch_indices, training_batches
from test_command_lines import TINY, exit_status

# Extraction in this process runs on one thread, as the subprocesses below do (OMP_NUM_THREADS=1): the
# same arithmetic, the same bytes.
from test_parallel import one_thread  # noqa: F401  (a module-wide autouse fixture)
from test_run_folder import holding_lock

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "fpdm"
REPO = EXAMPLE_DIR.parents[1]
EXIT_USAGE, EXIT_INTERRUPTED = 2, 128
PER_CLASS = {"cat": 5, "dog": 4}  # 9 images; batches of 2: four full batches and one of a single row
BATCH = 2
#: The documented keys of meta.json (the README's format), written out rather than taken from the code.
META_KEYS = {"format", "count", "num_classes", "class_names", "scaling_factor", "vae", "image_size"}
META_KEYS |= {"latent_shape", "dtype"}


def write_images(root: Path, per_class: dict = PER_CLASS, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(20, 28, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def argv(images: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", f"folder:{images}", "--out", str(out), "--random-tiny-vae", "--image-size", "16",
            "--batch-size", str(BATCH), "--workers", "0", "--no-progress", *extra]  # fmt: skip


def one_line(err: str) -> bool:
    """One error line (after any notices), no traceback."""
    errors = [line for line in err.splitlines() if "error:" in line]
    return len(errors) == 1 and err.endswith(errors[0] + "\n") and "Traceback" not in err


def folder_bytes(folder: Path) -> dict:
    """The arrays' bytes and meta.json without its time of writing."""
    meta = json.loads((folder / "meta.json").read_text())
    meta.pop("created")
    arrays = {name: (folder / name).read_bytes() for name in ("latents.npy", "labels.npy")}
    return {**arrays, "meta": {k: v for k, v in meta.items() if k != "source"}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An image folder and its extraction in one uninterrupted process, one thread."""
    root = tmp_path_factory.mktemp("reference")
    images = write_images(root / "images")
    assert latents.main(argv(images, root / "latents")) == 0
    return images, root / "latents"


def subprocess_env() -> dict:
    paths = [str(EXAMPLE_DIR), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------------------
# The folder an extraction writes
# ------------------------------------------------------------------------------------------------------


def test_extraction_writes_the_documented_folder_row_by_row(reference):
    images, out = reference
    assert sorted(p.name for p in out.iterdir()) == ["labels.npy", "latents.npy", "meta.json"]
    meta = json.loads((out / "meta.json").read_text())
    assert META_KEYS <= meta.keys() and meta["format"] == "fpdm-latents/1"
    assert meta["count"] == 9 and meta["num_classes"] == 2 and meta["class_names"] == ["cat", "dog"]
    assert meta["latent_shape"] == [4, 8, 8] and meta["dtype"] == "float16" and meta["image_size"] == 16
    assert meta["vae"] == RANDOM_TINY_VAE and meta["source"] == str(images.resolve())
    rows = np.load(out / "latents.npy")
    assert rows.shape == (9, 4, 8, 8) and rows.dtype == np.float16
    assert np.load(out / "labels.npy").tolist() == [0] * 5 + [1] * 4
    # Each row from its definition: the image alone through the encoder, the posterior mean plus its std
    # times the noise of the row's own generator, times the scaling factor.
    vae = tiny_vae().eval()
    assert meta["scaling_factor"] == pytest.approx(float(vae.config.scaling_factor))
    files = [images / "cat" / f"{i}.png" for i in range(5)] + [images / "dog" / f"{i}.png" for i in range(4)]
    for row, path in enumerate(files):
        with torch.no_grad():
            dist = vae.encode(read_image(path, 16)[None]).latent_dist
        gen = torch.Generator().manual_seed(row_seed(0, row))
        expected = (dist.mean + dist.std * torch.randn(4, 8, 8, generator=gen)) * vae.config.scaling_factor
        # float16 storage: a relative rounding error of at most 2**-11; the batch's float32 sums differ
        # from the single image's by a few float32 epsilons.
        bound = 2.0**-11 * expected.abs() + 1e-5
        assert (torch.from_numpy(rows[row].astype(np.float32)) - expected[0]).abs().le(bound).all(), row


def test_a_row_does_not_depend_on_the_batch_it_is_encoded_in():
    vae = tiny_vae().eval()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    together = encode_batch(vae, x, [10, 11, 12, 13, 14], posterior="sample", seed=3)
    apart = torch.cat(
        [encode_batch(vae, x[i : i + 1], [10 + i], posterior="sample", seed=3) for i in range(5)]
    )
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-6)
    other_seed = encode_batch(vae, x, [10, 11, 12, 13, 14], posterior="sample", seed=4)
    assert not torch.allclose(together, other_seed)
    mean = encode_batch(vae, x, [0, 1, 2, 3, 4], posterior="mean", seed=0)
    torch.testing.assert_close(mean, vae.encode(x).latent_dist.mean * vae.config.scaling_factor)


def test_row_seeds_are_numpys_seed_sequence_of_seed_row_and_stream():
    # The documented definition, so that another tool can draw the same noise.
    for seed, row, stream in [(0, 0, 0), (0, 1, 0), (1, 0, 0), (0, 0, 1), (7, 1_281_166, 1)]:
        expected = np.random.SeedSequence([seed, row, stream]).generate_state(1, np.uint64)[0]
        assert row_seed(seed, row, stream) == int(expected)
    seeds = {row_seed(seed, row, stream) for seed in range(3) for row in range(50) for stream in range(2)}
    assert len(seeds) == 300


def test_dataloader_workers_outlive_a_signal_sent_to_the_whole_process_group():
    # A terminal's Ctrl-C or a scheduler's SIGTERM reaches the workers too: they must keep serving the
    # main process, which finishes its step and stops them itself.
    from fpdm.data import quiet_worker

    loader = torch.utils.data.DataLoader(range(40), batch_size=4, num_workers=1, worker_init_fn=quiet_worker)
    batches = iter(loader)
    got = [next(batches)]
    for signum in (signal.SIGINT, signal.SIGTERM):
        os.kill(batches._workers[0].pid, signum)
    got += list(batches)
    assert torch.equal(torch.cat(got), torch.arange(40))


def test_random_flips_are_a_function_of_seed_and_row_and_flip_the_image(tmp_path):
    images = write_images(tmp_path / "images")
    for flip in ("none", "random"):
        out = tmp_path / flip
        assert latents.main(argv(images, out, "--mean", "--flip", flip, "--dtype", "float32")) == 0
    plain, flipped = np.load(tmp_path / "none" / "latents.npy"), np.load(tmp_path / "random" / "latents.npy")
    chosen = [row for row in range(9) if row_seed(0, row, stream=1) & 1]
    assert 0 < len(chosen) < 9
    vae = tiny_vae().eval()
    files = [images / "cat" / f"{i}.png" for i in range(5)] + [images / "dog" / f"{i}.png" for i in range(4)]
    for row in range(9):
        x = read_image(files[row], 16)
        x = x.flip(-1) if row in chosen else x
        expected = encode_batch(vae, x[None], [row], posterior="mean", seed=0)[0]
        torch.testing.assert_close(torch.from_numpy(flipped[row]), expected, rtol=1e-5, atol=1e-6)
        assert np.array_equal(plain[row], flipped[row]) == (row not in chosen)


# ------------------------------------------------------------------------------------------------------
# Split over processes, interrupted, resumed: always the same bytes
# ------------------------------------------------------------------------------------------------------


def test_two_processes_under_torchrun_write_what_one_process_writes(reference, tmp_path):
    images, single = reference
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(EXAMPLE_DIR / "extract_latents.py"), *argv(images, out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, timeout=300, cwd=REPO, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert folder_bytes(out) == folder_bytes(single)


DRIVER = """
import os, signal, sys
from fpdm import latents
real, calls = latents.encode_batch, []

def encode(*args, **kwargs):
    calls.append(1)
    if len(calls) == {at}:
        os.kill(os.getpid(), signal.{signal})
    return real(*args, **kwargs)

latents.encode_batch = encode
sys.exit(latents.main({argv!r}))
"""


def progress(out: Path) -> list[int]:
    return np.load(out / "progress.npy").tolist()


def test_a_killed_extraction_resumes_to_the_uninterrupted_result(reference, tmp_path, capsys):
    images, single = reference
    out = tmp_path / "killed"
    script = DRIVER.format(at=4, signal="SIGKILL", argv=argv(images, out, "--commit-every", "0"))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=subprocess_env(), timeout=300)
    assert proc.returncode == -signal.SIGKILL
    # Killed while encoding the fourth batch: the three before it were recorded, nothing after.
    assert progress(out) == [1, 1, 1, 0, 0] and not (out / "meta.json").exists()
    with pytest.raises(FileKindError, match="an extraction that has not finished"):
        LatentFolder(out)
    assert latents.main(argv(images, out)) == 0
    assert "resuming the unfinished extraction" in capsys.readouterr().err
    assert folder_bytes(out) == folder_bytes(single)


def test_sigterm_finishes_the_batch_records_it_and_a_rerun_completes(reference, tmp_path, capsys,
                                                                     monkeypatch):  # fmt: skip
    images, single = reference
    real, calls = latents.encode_batch, []

    def encode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(latents, "encode_batch", encode)
    out = tmp_path / "stopped"
    # A long --commit-every: the stop itself records what is done.
    status, err = exit_status(latents.main, argv(images, out, "--commit-every", "3600"), capsys)
    assert status == EXIT_INTERRUPTED + signal.SIGTERM
    assert "stopped by SIGTERM" in err and "run the same command again" in err
    assert progress(out) == [1, 1, 0, 0, 0]
    # Another job is refused in the unfinished folder, naming what differs.
    status, err = exit_status(latents.main, argv(images, out, "--seed", "1"), capsys)
    assert status == EXIT_USAGE and one_line(err) and "unfinished extraction of another job" in err
    assert "seed 0 -> 1" in err and progress(out) == [1, 1, 0, 0, 0]
    assert latents.main(argv(images, out)) == 0
    assert len(calls) == 2 + 3  # the rerun encoded only the three batches left
    assert folder_bytes(out) == folder_bytes(single)


def test_a_damaged_image_stops_with_one_line_and_keeps_the_batches_before_it(tmp_path, capsys):
    images = write_images(tmp_path / "images")
    (images / "dog" / "1.png").write_bytes(b"not a png")  # row 6, batch 3
    out = tmp_path / "out"
    status, err = exit_status(latents.main, argv(images, out, "--commit-every", "3600"), capsys)
    assert status == EXIT_USAGE and one_line(err) and "dog/1.png" in err and "run the same command" in err
    assert progress(out) == [1, 1, 1, 0, 0]


# ------------------------------------------------------------------------------------------------------
# The destination: every problem before any encoding
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_encoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("encoded before the destination was checked")

    monkeypatch.setattr(latents, "encode_batch", refuse)


def test_a_folder_in_use_by_another_extraction_is_refused_and_free_once_it_ends(
    tmp_path, capsys, no_encoding
):
    import fcntl

    images = write_images(tmp_path / "images")
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / "extract.lock", "w") as held:  # what a running extraction holds
        fcntl.flock(held, fcntl.LOCK_EX)
        for extra in ([], ["--overwrite"]):
            status, err = exit_status(latents.main, argv(images, out, *extra), capsys)
            assert status == EXIT_USAGE and one_line(err) and "in use by another extract_latents.py" in err
    assert os.listdir(out) == ["extract.lock"]
    # A killed run's lock file is no obstacle (the system released its flock): see the resume after
    # SIGKILL above; a complete folder has no lock file (the first test).


def test_an_extraction_at_work_is_named_and_a_killed_ones_lock_is_taken_over(tmp_path, capsys, monkeypatch):
    # extract.lock is the RunLock of train.lock and sample.lock: the live owner is named with the command
    # that stops it; the record a killed extraction left (its kernel lock free) is no obstacle.
    images = write_images(tmp_path / "images")
    out = tmp_path / "busy"
    with holding_lock(out, latents.LOCK_NAME, "extract_latents.py") as pid:
        status, err = exit_status(latents.main, argv(images, out, "--overwrite"), capsys)
        assert status == EXIT_USAGE and one_line(err) and f"in use by extract_latents.py pid {pid}" in err
        assert f"`kill {pid}`" in err
    assert (out / latents.LOCK_NAME).exists()  # the killed holder left its record
    records = []

    def encode(*args, **kwargs):  # the check passed, the encoding begins: the lock is this run's
        records.append(json.loads((out / latents.LOCK_NAME).read_text()))
        with pytest.raises(ValueError, match=f"in use by extract_latents.py pid {os.getpid()}"):
            RunLock(out, latents.LOCK_NAME, "extract_latents.py").acquire()  # a second one is kept out
        raise KeyboardInterrupt

    monkeypatch.setattr(latents, "encode_batch", encode)
    status, err = exit_status(latents.main, argv(images, out), capsys)
    assert status == EXIT_INTERRUPTED + signal.SIGINT and "which is no longer running" in err
    assert records[0]["program"] == "extract_latents.py" and records[0]["pid"] == os.getpid()


def test_an_existing_folder_that_cannot_be_written_is_refused_before_encoding(
    tmp_path, capsys, no_encoding, monkeypatch
):
    images = write_images(tmp_path / "images")
    out = tmp_path / "ro"
    out.mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):  # a read-only mount (chmod does not stop root)
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    status, err = exit_status(latents.main, argv(images, out), capsys)
    assert status == EXIT_USAGE and one_line(err) and f"--out {out} cannot be written" in err
    assert "Read-only file system" in err and os.listdir(out) == []


def test_a_file_as_out_is_refused_before_any_encoding_even_with_overwrite(tmp_path, capsys, no_encoding):
    images = write_images(tmp_path / "images")
    out = tmp_path / "latents.pt"
    out.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        status, err = exit_status(latents.main, argv(images, out, *extra), capsys)
        assert status == EXIT_USAGE and one_line(err) and "is a file" in err
    assert out.read_text() == "keep me"


def test_a_folder_of_other_files_is_refused_and_left_alone(tmp_path, capsys, no_encoding):
    images = write_images(tmp_path / "images")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        status, err = exit_status(latents.main, argv(images, out, *extra), capsys)
        assert status == EXIT_USAGE and one_line(err) and "notes.txt" in err
    assert os.listdir(out) == ["notes.txt"]


def test_an_unwritable_destination_and_a_full_disk_are_refused_before_encoding(tmp_path, capsys, no_encoding,
                                                                               monkeypatch):  # fmt: skip
    images = write_images(tmp_path / "images")
    (tmp_path / "file").write_text("")
    status, err = exit_status(latents.main, argv(images, tmp_path / "file" / "out"), capsys)
    assert status == EXIT_USAGE and one_line(err) and "cannot be written" in err
    monkeypatch.setattr(latents.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    status, err = exit_status(latents.main, argv(images, tmp_path / "full"), capsys)
    assert status == EXIT_USAGE and one_line(err) and "GB free" in err
    assert not (tmp_path / "full").exists()  # the folder it made for the refused job is gone


def test_complete_latents_are_kept_for_the_same_job_refused_for_another_replaced_with_overwrite(
    reference, tmp_path, capsys
):
    images, single = reference
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("latents.npy", "labels.npy", "meta.json"):
        (out / name).write_bytes((single / name).read_bytes())
    assert latents.main(argv(images, out)) == 0
    assert "nothing to do" in capsys.readouterr().err
    status, err = exit_status(latents.main, argv(images, out, "--dtype", "float32"), capsys)
    assert status == EXIT_USAGE and one_line(err) and "dtype 'float16' -> 'float32'" in err
    assert latents.main(argv(images, out, "--dtype", "float32", "--overwrite")) == 0
    assert np.load(out / "latents.npy").dtype == np.float32 and read_latents_meta(out)["dtype"] == "float32"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vae", "x"], "--vae and --random-tiny-vae exclude each other"),
        (["--convert", "x.pt"], "pass --data folder:PATH (images to encode) or --convert OLD.pt"),
        (["--batch-size", "0"], "--batch-size"),
        (["--image-size", "15"], "not a multiple of the VAE's downsampling 2"),
    ],
)
def test_bad_option_combinations_are_one_line(tmp_path, extra, message, capsys, no_encoding):
    images = write_images(tmp_path / "images")
    status, err = exit_status(latents.main, [*argv(images, tmp_path / "out"), *extra], capsys)
    assert status == EXIT_USAGE and one_line(err) and message in err


# ------------------------------------------------------------------------------------------------------
# The format: read through memory maps, checked against meta.json
# ------------------------------------------------------------------------------------------------------


def write_folder(out: Path, rows: np.ndarray, labels: np.ndarray, num_classes: int, **meta) -> Path:
    """A latents folder written as the README tells a user to, with numpy and json only."""
    out.mkdir(parents=True)
    array = np.lib.format.open_memmap(out / "latents.npy", mode="w+", dtype=rows.dtype, shape=rows.shape)
    array[:] = rows
    array.flush()
    del array
    np.save(out / "labels.npy", labels.astype(np.int64))
    names = [f"c{i}" for i in range(num_classes)]
    fields = {"format": "fpdm-latents/1", "count": len(rows), "num_classes": num_classes,
              "class_names": names, "scaling_factor": 0.5, "vae": None, "image_size": None,
              "latent_shape": list(rows.shape[1:]), "dtype": str(rows.dtype), **meta}  # fmt: skip
    (out / "meta.json").write_text(json.dumps(fields))
    return out


@pytest.fixture
def user_folder(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((600, 4, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=600)
    return write_folder(tmp_path / "user", rows, labels, 3), rows, labels


def test_the_dataset_holds_memory_maps_never_the_arrays(user_folder):
    folder, rows, labels = user_folder
    data = load_dataset(f"latents:{folder}")
    assert isinstance(data, LatentFolder) and len(data) == 600 and data.num_classes == 3
    x, y = data.fetch([5, 0, 599, 5])
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(rows[[5, 0, 599, 5]]))
    assert y.tolist() == labels[[5, 0, 599, 5]].tolist()
    # Structurally: after reading, the arrays are still maps of the files, and nothing the dataset holds
    # is an in-memory array of the rows.
    assert isinstance(data.latents, np.memmap) and isinstance(data.labels, np.memmap)
    for value in vars(data).values():
        held = value if isinstance(value, tuple) else (value,)
        for item in held:
            assert isinstance(item, np.memmap) or not isinstance(item, np.ndarray | torch.Tensor), type(item)
    # A worker started by spawn gets the dataset pickled: the maps are not in it, the worker opens its own.
    pickled = pickle.dumps(data)
    assert len(pickled) < rows.nbytes / 20
    again = pickle.loads(pickled)
    assert torch.equal(again.fetch([7])[0], torch.from_numpy(rows[[7]]))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "meta.json").unlink(), "has no meta.json"),
        (lambda f: None, "is a file of a latents folder; name the folder: latents:"),
        (lambda f: (f / "meta.json").write_text("{"), "not a JSON file"),
        (lambda f: edit_meta(f, format="fpdm-latents/9"), "this version reads 'fpdm-latents/1'"),
        (lambda f: edit_meta(f, count=599), "but meta.json says float32 (599, 4, 4, 4)"),
        (lambda f: edit_meta(f, num_classes=2, class_names=["a", "b"]), "labels range over 0..2, outside"),
        (lambda f: edit_meta(f, class_names=["a"]), "1 class_names for num_classes 3"),
        (lambda f: edit_meta(f, dtype="float64"), "dtype 'float64'"),
        (lambda f: edit_meta(f, scaling_factor="0.18"), "'scaling_factor' is '0.18', of the wrong type"),
        (lambda f: np.save(f / "labels.npy", np.zeros(600, np.int32)), "expected int64 (600,)"),
    ],
    ids=[
        "no-meta",
        "the-array",
        "bad-json",
        "format",
        "count",
        "labels",
        "class-names",
        "dtype",
        "type",
        "int32",
    ],
)
def test_a_folder_that_does_not_match_its_meta_is_one_line(user_folder, damage, message, tmp_path, capsys):
    folder, _, _ = user_folder
    damage(folder)
    if "is a file" in message:
        folder = folder / "latents.npy"
    with pytest.raises(FileKindError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LatentFolder(folder)
    status, err = exit_status(
        train.main, ["--out", str(tmp_path / "run"), *TINY, "--data", f"latents:{folder}"], capsys
    )
    assert status == EXIT_USAGE and one_line(err) and str(folder) in err


def edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **changes}))


# ------------------------------------------------------------------------------------------------------
# The older .pt files: refused with the command that converts them, which does
# ------------------------------------------------------------------------------------------------------


def test_an_old_pt_file_is_refused_with_the_command_that_converts_it(tmp_path, capsys):
    old = tmp_path / "imagenet256.pt"
    rows, labels = torch.randn(7, 4, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    torch.save({"latents": rows, "labels": labels, "num_classes": torch.tensor(3),
                "scaling_factor": torch.tensor(0.18215)}, old)  # fmt: skip
    status, err = exit_status(
        train.main, ["--out", str(tmp_path / "run"), *TINY, "--data", f"latents:{old}"], capsys
    )
    command = f"python examples/fpdm/extract_latents.py --convert {old} --out {tmp_path / 'imagenet256'}"
    assert status == EXIT_USAGE and one_line(err) and command in err
    assert latents.main([*command.split()[2:], "--batch-size", "3", "--no-progress"]) == 0
    data = LatentFolder(tmp_path / "imagenet256")
    assert torch.equal(data.fetch(range(7))[0], rows) and torch.equal(data.fetch(range(7))[1], labels)
    assert data.meta["dtype"] == "float32" and data.meta["scaling_factor"] == pytest.approx(0.18215)
    assert data.meta["vae"] is None and data.class_names == ["0", "1", "2"]
    status, err = exit_status(
        latents.main, ["--convert", str(old), "--out", str(tmp_path / "x"), "--flip", "random"], capsys
    )
    assert status == EXIT_USAGE and one_line(err) and "--flip does nothing with --convert" in err


# ------------------------------------------------------------------------------------------------------
# Training reads each step's rows, and each rank only its share
# ------------------------------------------------------------------------------------------------------


def recording(monkeypatch, cls) -> list:
    seen, real = [], cls.fetch

    def fetch(self, indices):
        seen.append(list(indices))
        return real(self, indices)

    monkeypatch.setattr(cls, "fetch", fetch)
    return seen


def test_each_rank_reads_only_its_share_of_each_step_in_the_seed_step_order(user_folder, monkeypatch):
    folder, rows, labels = user_folder
    data = LatentFolder(folder)
    seen = recording(monkeypatch, LatentFolder)
    cfg = TrainConfig(batch_size=256, seed=3, steps=5)  # 2 steps an epoch: steps 2 .. 4 cross two epochs
    got = {}
    for rank in (0, 1):
        runtime = Runtime(rank=rank, world_size=2, device=torch.device("cpu"))
        seen.clear()
        got[rank] = list(training_batches(data, cfg, runtime, start=2))
        planned = [
            batch_indices(600, 256, 3, step)[rank * 128 : (rank + 1) * 128].tolist() for step in (2, 3, 4)
        ]
        assert seen == planned  # the rows it read: exactly its share, step by step
    for k, step in enumerate((2, 3, 4)):
        whole = batch_indices(600, 256, 3, step)
        x = torch.cat([got[0][k][0], got[1][k][0]])
        y = torch.cat([got[0][k][1], got[1][k][1]])
        assert torch.equal(x, torch.from_numpy(rows[whole.numpy()])) and torch.equal(
            y, torch.from_numpy(labels[whole.numpy()])
        )


def test_a_folder_gives_the_batches_the_same_data_in_memory_gives(user_folder, monkeypatch):
    folder, rows, labels = user_folder
    cfg = TrainConfig(batch_size=100, seed=1, steps=9)
    one = Runtime(rank=0, world_size=1, device=torch.device("cpu"))
    from_disk = list(training_batches(LatentFolder(folder), cfg, one, start=0))
    in_memory = list(
        training_batches(TensorPairs(torch.from_numpy(rows), torch.from_numpy(labels), 3), cfg, one, start=0)
    )
    assert len(from_disk) == 9
    for (a, b), (c, d) in zip(from_disk, in_memory, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_image_folders_are_decoded_in_workers_in_the_same_order(tmp_path):
    from fpdm.data import ImageFolder

    data = ImageFolder(write_images(tmp_path / "images"), 8)
    cfg = TrainConfig(batch_size=4, seed=2, steps=5)
    runtime = Runtime(rank=0, world_size=1, device=torch.device("cpu"))
    here = list(training_batches(data, cfg, runtime, start=1))
    workers = list(
        training_batches(data, TrainConfig(batch_size=4, seed=2, steps=5, workers=2), runtime, start=1)
    )
    expected = [data.fetch(batch_indices(9, 4, 2, step)) for step in range(1, 5)]
    for (a, b), (c, d), (e, f) in zip(here, workers, expected, strict=True):
        assert torch.equal(a, c) and torch.equal(a, e) and torch.equal(b, d) and torch.equal(b, f)


def test_the_step_sampler_refuses_a_batch_that_does_not_split_over_the_ranks():
    with pytest.raises(ValueError, match="batch_size 10 is not divisible by world_size 3"):
        StepBatches(100, 10, 0, 0, 5, rank=0, world_size=3)


def test_training_runs_on_extracted_latents(reference, tmp_path):
    _, folder = reference
    cfg = train.parse_args(["--out", str(tmp_path / "run"), *TINY, "--batch-size", "4", "--steps", "2",
                            "--data", f"latents:{folder}"])  # fmt: skip
    summary = train.train(cfg)
    assert summary["step"] == 2 and np.isfinite(summary["loss"])
