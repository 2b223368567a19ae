"""A folder of VAE latents: its format, and how ``extract_latents.py`` writes one from an image folder.

The latents folder, format ``fpdm-latents/1``
---------------------------------------------
``--data latents:DIR`` trains on a folder that holds three files:

``latents.npy``
    ``(N, C, h, w)``, float16 or float32: the VAE's latents already multiplied by its ``scaling_factor``
    (what the diffusion model sees; about unit variance).
``labels.npy``
    ``(N,)`` int64: the class of each row, in ``0 .. num_classes - 1``.
``meta.json``
    A JSON object with at least ``format`` (``"fpdm-latents/1"``), ``count`` (N), ``num_classes``,
    ``class_names`` (in label order), ``scaling_factor``, ``vae`` (the Hub id or folder of the
    ``AutoencoderKL`` that encoded the images: what a sampler decodes with; ``null`` when unknown),
    ``image_size`` (``null`` when unknown), ``latent_shape`` (``[C, h, w]``) and ``dtype`` (``"float16"``
    or ``"float32"``). ``extract_latents.py`` adds how the rows were made: ``source``, ``source_digest``,
    ``crop``, ``flip``, ``posterior``, ``seed`` and ``batch_size``.

The arrays are numpy's ``.npy`` format; training opens them with ``numpy.load(mmap_mode="r")`` and reads
only the rows of its batches (:class:`fpdm.data.LatentFolder`), so its memory does not grow with N. A
folder is complete when it has ``meta.json``, which is written last. To write one from your own tools::

    rows = np.lib.format.open_memmap("DIR/latents.npy", mode="w+", dtype=np.float16, shape=(N, 4, 32, 32))
    rows[i:j] = scaled_latents_of_images_i_to_j   # in chunks; then rows.flush()
    np.save("DIR/labels.npy", labels.astype(np.int64))
    Path("DIR/meta.json").write_text(json.dumps({"format": "fpdm-latents/1", "count": N, ...}))

Extraction
----------
``extract_latents.py --data folder:PATH --out DIR --vae NAME`` encodes every image of an image folder
(:class:`fpdm.data.ImageFolder`) with diffusers' ``AutoencoderKL`` (``pip install implicitdiff[latents]``;
Stable Diffusion's VAE, as DiT and FPDM use: 256 px images to 4x32x32 latents). Images are decoded by
``DataLoader`` workers (``--workers``). By default the latents are float16: half the disk and page cache of
float32 (ImageNet-256: 10.5 GB instead of 21 GB), with a relative rounding error of at most
``2**-11`` (about 5e-4 of a latent of unit scale), far below the noise the diffusion adds at its first
timestep (``sqrt(beta_1) = 0.01``); training reads them as float32.

* The arrays are preallocated (``numpy.lib.format.open_memmap``) and filled batch by batch, each batch's
  rows written in place at their offset: the memory of a process does not grow with N (a map of the whole
  file would count every page written in the writer's resident memory).
* A batch (``--batch-size`` rows) is the unit of work; under ``torchrun`` rank ``r`` of ``W`` encodes the
  batches ``r, r + W, r + 2W, ...``. A batch holds the same rows whatever the number of processes, and a
  posterior sample's noise is a function of ``(--seed, row)``, so the result does not depend on how many
  processes wrote it (bit for bit on the same device and thread count).
* ``progress.npy`` holds one byte per batch, set once its rows are on disk (``fsync``), at least every
  ``--commit-every`` seconds and when the run stops. Ctrl-C or SIGTERM finishes the batch under way,
  records it and exits (130, 143); after a crash or a kill, at most the last ``--commit-every`` seconds
  are lost. Running the same command again continues where it stopped and gives the same files as an
  uninterrupted run. ``job.json`` describes the unfinished job, so that a different one (another folder,
  VAE, size, seed, ...) is refused instead of mixed in.
* When every batch is done, rank 0 writes ``meta.json`` and removes ``job.json`` and ``progress.npy``.
* One extraction at a time works in a folder: rank 0 holds ``extract.lock``, a
  :class:`fpdm.run_folder.RunLock` (an exclusive ``flock``, released by the system if the process dies, so
  a killed run leaves no stale lock); a second is refused.
* Every problem with ``--out`` (a file, a folder of other files, another job, no permission, too little
  disk space) is one line and exit status 2 before any image is encoded.

``--convert OLD.pt --out DIR`` turns a latents file of the example's earlier format (a ``torch.save`` dict
of ``latents``, ``labels``, ``num_classes``, ``scaling_factor``) into a folder, in chunks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fpdm.cli import (
    EXIT_NON_FINITE,
    Interrupted,
    OneLineParser,
    StopSignals,
    UsageError,
    bounded_float,
    bounded_int,
    describe_os_error,
    run_command,
)
from fpdm.data import (
    CROPS,
    JOB_NAME,
    LABELS_NAME,
    LATENT_DTYPES,
    LATENTS_FORMAT,
    LATENTS_NAME,
    META_NAME,
    ImageFolder,
    quiet_worker,
    read_image,
)
from fpdm.distributed import Runtime, gather_objects, joined, on_main_then_all
from fpdm.files import FileKindError, load_tensors, save_json_atomically
from fpdm.run_folder import RunLock

__all__ = [
    "IDENTITY_KEYS",
    "PROGRESS_NAME",
    "RANDOM_TINY_VAE",
    "LatentsWriter",
    "NonFiniteLatentsError",
    "build_parser",
    "encode_batch",
    "load_vae",
    "main",
    "row_seed",
    "tiny_vae",
]

#: One byte per batch: 1 once the batch's rows are on disk.
PROGRESS_NAME = "progress.npy"
#: The lock file of the extraction at work in the folder (:class:`fpdm.run_folder.RunLock`).
LOCK_NAME = "extract.lock"
#: Every file an extraction writes in its folder.
OWN_FILES = (META_NAME, JOB_NAME, PROGRESS_NAME, LATENTS_NAME, LABELS_NAME, LOCK_NAME)
#: What ``meta.json`` records of how a folder was made: a rerun resumes only a job equal in all of them.
IDENTITY_KEYS = (
    *("format", "source", "source_digest", "count", "num_classes", "class_names", "image_size"),
    *("crop", "flip", "vae", "posterior", "seed", "batch_size", "dtype"),
)
#: ``meta.json``'s ``vae`` for :func:`tiny_vae`; :func:`load_vae` builds it again from this name.
RANDOM_TINY_VAE = "fpdm:random-tiny-vae"
FLIPS = ("none", "random")


class NonFiniteLatentsError(ValueError):
    """The VAE (or a converted file) gave NaN or infinite latents; nothing of that batch is written."""


# ----------------------------------------------------------------------------------------------------
# The VAE and the encoding of a batch
# ----------------------------------------------------------------------------------------------------


def tiny_vae(seed: int = 0) -> Any:
    """A small randomly initialised ``AutoencoderKL`` (2x downsampling, 4 latent channels), for tests."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def load_vae(name: str | None) -> Any:
    """``AutoencoderKL.from_pretrained(name)`` (a Hub id or a local folder), or :func:`tiny_vae` for
    :data:`RANDOM_TINY_VAE` (what ``meta.json`` records for ``--random-tiny-vae``)."""
    if name == RANDOM_TINY_VAE:
        return tiny_vae()
    if not name:
        raise ValueError("pass --vae (a Hub id or a folder) or --random-tiny-vae")
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(name)


def latent_shape(vae: Any, image_size: int) -> tuple[int, int, int]:
    """``(C, h, w)`` of an image of side ``image_size``: each encoder block but the last halves the side."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(f"--image-size {image_size} is not a multiple of the VAE's downsampling {factor}")
    side = image_size // factor
    return int(vae.config.latent_channels), side, side


def row_seed(seed: int, row: int, stream: int = 0) -> int:
    """A 64-bit seed that depends on ``(seed, row, stream)`` only (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence([seed, row, stream]).generate_state(1, np.uint64)[0])


@torch.no_grad()
def encode_batch(
    vae: Any, images: torch.Tensor, rows: Sequence[int], *, posterior: str, seed: int
) -> torch.Tensor:
    """Scaled latents ``(B, C, h, w)`` float32 of images ``(B, 3, S, S)`` in ``[-1, 1]`` (rows ``rows``).

    ``posterior="sample"`` draws ``mean + std * noise`` from the encoder's diagonal Gaussian (as DiT's
    feature extraction does) with the noise of row ``i`` drawn from a generator seeded by
    ``row_seed(seed, i)``, so a row's latent does not depend on the batch it is in; ``"mean"`` takes the
    mean. Multiplied by the VAE's ``scaling_factor``.
    """
    dist = vae.encode(images).latent_dist
    z = dist.mean
    if posterior == "sample":
        shape = z.shape[1:]
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(row_seed(seed, r))) for r in rows]
        z = z + dist.std * torch.stack(noise).to(z.device, z.dtype)
    return (z * float(vae.config.scaling_factor)).float()


class _Rows(Dataset):
    """Row ``i`` of the output: ``(i, image, label, error)``, the image decoded (in a ``DataLoader`` worker)
    and flipped if asked; a damaged file comes back as its one-line message, with a blank image."""

    def __init__(self, images: ImageFolder, flip: str, seed: int) -> None:
        self.images, self.flip, self.seed = images, flip, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor, int, str]:
        size, error = self.images.image_size, ""
        try:
            x = read_image(self.images.path(row), size, self.images.crop)
        except FileKindError as failure:
            x, error = torch.zeros(3, size, size), str(failure)
        if self.flip == "random" and row_seed(self.seed, row, stream=1) & 1:
            x = x.flip(-1)
        return row, x, int(self.images.labels[row]), error


# ----------------------------------------------------------------------------------------------------
# The folder: preallocated arrays filled batch by batch, and the record of the batches done
# ----------------------------------------------------------------------------------------------------


class LatentsWriter:
    """The arrays of a latents folder under construction, and ``progress.npy``.

    :meth:`create` preallocates ``latents.npy``, ``labels.npy`` (``numpy.lib.format.open_memmap``: sparse
    files, nothing is written but the headers) and ``progress.npy`` (zeros). :meth:`write` puts a batch's
    rows in place with ``os.pwrite`` at their offset (no map of the whole file: its written pages would
    count in this process's resident memory). :meth:`commit` flushes the arrays to disk (``fsync``), then
    sets the batches' bytes of ``progress.npy`` and flushes it: a batch marked done is on disk.
    """

    def __init__(self, out: Path, job: dict[str, Any]) -> None:
        self.out, self.count, self.batch_size = Path(out), int(job["count"]), int(job["batch_size"])
        self.shape, self.dtype = tuple(job["latent_shape"]), np.dtype(job["dtype"])
        self.num_batches = math.ceil(self.count / self.batch_size)
        self._arrays = {
            LATENTS_NAME: (self.dtype, (self.count, *self.shape)),
            LABELS_NAME: (np.dtype(np.int64), (self.count,)),
            PROGRESS_NAME: (np.dtype(np.uint8), (self.num_batches,)),
        }
        self._files: dict[str, tuple[int, int]] = {}

    def create(self) -> None:
        """Preallocate the three arrays (replacing any)."""
        for name, (dtype, shape) in self._arrays.items():
            array = np.lib.format.open_memmap(self.out / name, mode="w+", dtype=dtype, shape=shape)
            del array

    def bytes_needed(self) -> int:
        """Disk space the arrays still need: their size less what the files already hold."""
        needed = 0
        for name, (dtype, shape) in self._arrays.items():
            path = self.out / name
            held = path.stat().st_blocks * 512 if path.exists() else 0
            needed += max(0, int(np.prod(shape)) * dtype.itemsize - held)
        return needed

    def open(self) -> None:
        """Open the arrays for writing; ``FileKindError`` if one is missing or not of the job's shape."""
        for name, (dtype, shape) in self._arrays.items():
            path = self.out / name
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as error:
                raise FileKindError(
                    f"{path}: cannot be read ({error}); pass --overwrite to start again"
                ) from None
            if array.dtype != dtype or array.shape != shape or not array.flags.c_contiguous:
                raise FileKindError(
                    f"{path}: {array.dtype} {array.shape}, not the {dtype} {shape} of {self.out / JOB_NAME}; "
                    "pass --overwrite to start again"
                )
            self._files[name] = (os.open(path, os.O_RDWR), int(array.offset))
            del array

    def close(self) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()

    def pending(self) -> list[int]:
        """The batches not yet marked done."""
        return np.flatnonzero(np.load(self.out / PROGRESS_NAME) == 0).tolist()

    def rows(self, batch: int) -> range:
        return range(batch * self.batch_size, min((batch + 1) * self.batch_size, self.count))

    def write(self, batch: int, latents: np.ndarray, labels: np.ndarray) -> None:
        """Put batch ``batch``'s rows in place (not yet marked done)."""
        start, rows = self.rows(batch).start, len(self.rows(batch))
        if latents.shape != (rows, *self.shape) or labels.shape != (rows,):
            raise ValueError(f"batch {batch}: got {latents.shape} and {labels.shape} for {rows} rows")
        for name, array in ((LATENTS_NAME, latents), (LABELS_NAME, labels)):
            fd, offset = self._files[name]
            data = np.ascontiguousarray(array, dtype=self._arrays[name][0]).tobytes()
            os.pwrite(fd, data, offset + start * len(data) // rows)

    def commit(self, batches: Sequence[int]) -> None:
        """Flush the arrays to disk, then mark ``batches`` done (and flush that too)."""
        if not batches:
            return
        os.fsync(self._files[LATENTS_NAME][0])
        os.fsync(self._files[LABELS_NAME][0])
        fd, offset = self._files[PROGRESS_NAME]
        for batch in batches:
            os.pwrite(fd, b"\x01", offset + batch)
        os.fsync(fd)


# ----------------------------------------------------------------------------------------------------
# The destination: checked (and prepared) by rank 0 before any encoding
# ----------------------------------------------------------------------------------------------------


def _ours(name: str) -> bool:
    """A file an extraction writes (its temporary files included)."""
    return name in OWN_FILES or any(name.startswith(f".{own}.") for own in OWN_FILES)


def _refuse_other_files(out: Path) -> None:
    """``UsageError`` for a folder that holds anything an extraction did not write."""
    others = sorted(name for name in os.listdir(out) if not _ours(name))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UsageError(
            f"--out {out} holds files that are not latents ({shown}); use an empty or a new folder"
        )


def _stored_job(out: Path) -> tuple[str, dict[str, Any] | None]:
    """What ``out`` holds: ``("empty" | "complete" | "unfinished" | "unstarted" | "other", description)``."""
    names = sorted(os.listdir(out))
    for name, state in ((META_NAME, "complete"), (JOB_NAME, "unfinished")):
        if name in names:
            try:
                stored = json.loads((out / name).read_text())
            except (OSError, ValueError):
                stored = None
            return state, stored if isinstance(stored, dict) else {}
    names = [name for name in names if name != LOCK_NAME]
    if PROGRESS_NAME in names:
        return "unstarted", None  # the arrays were made, the job never described: nothing was encoded
    return ("other", None) if LATENTS_NAME in names or LABELS_NAME in names else ("empty", None)


def _differences(stored: dict[str, Any], job: dict[str, Any]) -> list[str]:
    return [
        f"{key} {stored.get(key)!r} -> {job[key]!r}" for key in IDENTITY_KEYS if stored.get(key) != job[key]
    ]


def check_destination(out: Path, job: dict[str, Any], overwrite: bool, lock: RunLock) -> str:
    """Decide what to do with ``--out``: ``"new"``, ``"resume"`` or ``"complete"``; ``UsageError`` (one
    line) for a file, a folder that cannot be written, a folder in use by another extraction, a folder of
    other files, another job's latents without ``overwrite``. Creates the folder and takes its ``lock``
    (which writes the lock file: the proof that the folder can be written)."""
    if out.exists() and not out.is_dir():
        raise UsageError(
            f"--out {out} is a file; the latents are written to a folder ({', '.join(OWN_FILES[:3])})"
        )
    if out.is_dir():
        _refuse_other_files(out)
    try:  # the lock is a file written in the folder: taking it proves the folder can be written
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as error:
        raise UsageError(f"--out {out} cannot be written ({describe_os_error(error)})") from None
    state, stored = _stored_job(out)
    if state in ("complete", "unfinished") and not overwrite:
        assert stored is not None
        changed = _differences(stored, job)
        if changed:
            what = "latents" if state == "complete" else "an unfinished extraction"
            raise UsageError(
                f"--out {out} holds {what} of another job ({'; '.join(changed[:3])}); pass --overwrite to "
                "replace it, or another --out"
            )
    if state == "other" and not overwrite:
        raise UsageError(
            f"--out {out} holds {LATENTS_NAME} or {LABELS_NAME} without {META_NAME} or {JOB_NAME}; pass "
            "--overwrite to replace them, or another --out"
        )
    if overwrite or state in ("empty", "other", "unstarted"):
        return "new"
    return "resume" if state == "unfinished" else "complete"


def _clear(out: Path) -> None:
    """Remove an extraction's files, ``meta.json`` first (a half-cleared folder is never complete); not
    the lock this extraction holds (a lock file deleted under its owner would let a second one in)."""
    for name in sorted(os.listdir(out), key=lambda name: name != META_NAME):
        if _ours(name) and name != LOCK_NAME:
            (out / name).unlink(missing_ok=True)


def _prepare(out: Path, job: dict[str, Any], state: str) -> str:
    """Rank 0: make the folder ready for the job (``state`` from :func:`check_destination`); returns a
    notice for the user."""
    writer = LatentsWriter(out, job)
    if state == "new":
        _clear(out)
    needed, free = writer.bytes_needed(), shutil.disk_usage(out).free
    if needed > free:
        raise UsageError(
            f"--out {out}: the latents need {needed / 1e9:.2f} GB more and the disk has "
            f"{free / 1e9:.2f} GB free"
        )
    if state == "new":
        writer.create()
        save_json_atomically(job, out / JOB_NAME)
        return f"extracting {job['count']} images into {out}"
    stored, keys = json.loads((out / JOB_NAME).read_text()), ("latent_shape", "scaling_factor")
    changed = [f"{key} {stored.get(key)!r} -> {job[key]!r}" for key in keys if stored.get(key) != job[key]]
    if changed:
        raise UsageError(
            f"--out {out}: the VAE {job['vae']} now gives another {'; '.join(changed)} than the unfinished "
            "extraction used; pass --overwrite to start again"
        )
    writer.open()
    writer.close()
    done = writer.num_batches - len(writer.pending())
    return f"resuming the unfinished extraction in {out}: {done} of {writer.num_batches} batches are done"


# ----------------------------------------------------------------------------------------------------
# The run: each rank fills its batches; rank 0 finishes the folder
# ----------------------------------------------------------------------------------------------------


def _image_batches(
    job: dict[str, Any],
    workers: int,
    images: ImageFolder,
    vae: Any,
    runtime: Runtime,
    batches: list[int],
    writer: LatentsWriter,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(batch, latents, labels)`` for each of ``batches``: images decoded by ``--workers`` DataLoader
    workers, encoded on this rank's device."""
    loader = DataLoader(
        _Rows(images, job["flip"], job["seed"]),
        batch_sampler=[list(writer.rows(batch)) for batch in batches],
        num_workers=workers,
        pin_memory=runtime.device.type == "cuda",
        worker_init_fn=quiet_worker,
        generator=torch.Generator(),  # not the global RNG's draw
    )
    vae = vae.to(runtime.device).eval()
    for batch, (rows, x, labels, errors) in zip(batches, loader, strict=True):
        bad = [error for error in errors if error]
        if bad:
            raise FileKindError(
                f"{bad[0]}; the batches before it are kept: replace the file by a readable image of the "
                "same name and run the same command again to continue"
            )
        z = encode_batch(
            vae, x.to(runtime.device), rows.tolist(), posterior=job["posterior"], seed=job["seed"]
        )
        yield batch, z.cpu().numpy(), labels.numpy()


def _converted_batches(
    payload: dict[str, Any], batches: list[int], writer: LatentsWriter
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(batch, latents, labels)`` copied from a loaded ``.pt`` latents file (memory-mapped tensors)."""
    for batch in batches:
        rows = writer.rows(batch)
        latents = payload["latents"][rows.start : rows.stop].float().numpy()
        yield batch, latents, payload["labels"][rows.start : rows.stop].long().numpy()


def _fill(
    writer: LatentsWriter,
    batches: Iterator[tuple[int, np.ndarray, np.ndarray]],
    stop: StopSignals,
    commit_every: float,
    bar: Any,
) -> int:
    """Write every batch the iterator gives until it ends or a stop is requested; committed every
    ``commit_every`` seconds and at the end, whatever ends it. Returns the rows written."""
    done: list[int] = []
    written, last_commit = 0, time.monotonic()
    try:
        for batch, latents, labels in batches:
            if not np.isfinite(latents).all():
                rows = writer.rows(batch)
                raise NonFiniteLatentsError(
                    f"non-finite latents in rows {rows.start}..{rows.stop - 1}; nothing of them is written"
                )
            stored = latents.astype(writer.dtype)
            if not np.isfinite(stored).all():
                raise NonFiniteLatentsError(
                    f"latents beyond the range of {writer.dtype} in batch {batch}; use --dtype float32"
                )
            writer.write(batch, stored, labels)
            done.append(batch)
            written += len(labels)
            if bar is not None:
                bar.update(len(labels))
            if stop.requested or time.monotonic() - last_commit >= commit_every:
                writer.commit(done)
                done, last_commit = [], time.monotonic()
            if stop.requested:
                break
    finally:
        writer.commit(done)
    return written


def _run_rank(
    args: argparse.Namespace, runtime: Runtime, job: dict[str, Any], source: Any, vae: Any
) -> dict[str, Any]:
    """This rank's share of the pending batches; returns what it did (rows, seconds, a stop or an error)."""
    from tqdm import tqdm

    writer = LatentsWriter(Path(args.out), job)
    writer.open()
    mine = [batch for batch in writer.pending() if batch % runtime.world_size == runtime.rank]
    total = sum(len(writer.rows(batch)) for batch in mine)
    bar = (
        tqdm(total=total, desc="encode", unit="img", dynamic_ncols=True)
        if runtime.is_main and args.progress
        else None
    )
    if isinstance(source, ImageFolder):
        batches = _image_batches(job, args.workers, source, vae, runtime, mine, writer)
    else:
        batches = _converted_batches(source, mine, writer)
    outcome: dict[str, Any] = {"rows": 0, "seconds": 0.0, "signum": 0, "error": None}
    start = time.perf_counter()
    with StopSignals() as stop:
        try:
            outcome["rows"] = _fill(writer, batches, stop, args.commit_every, bar)
        except (FileKindError, NonFiniteLatentsError, OSError) as error:
            outcome["error"] = error
        finally:
            writer.close()
            if bar is not None:
                bar.close()
        outcome["signum"] = stop.requested
    outcome["seconds"] = time.perf_counter() - start
    return outcome


def _finish(out: Path, job: dict[str, Any]) -> None:
    """Rank 0, once every rank is done: check that every batch is, write ``meta.json``, tidy up."""
    writer = LatentsWriter(out, job)
    left = writer.pending()
    if left:
        raise FileKindError(
            f"{out / PROGRESS_NAME}: {len(left)} batches are not done; run the same command again"
        )
    save_json_atomically({**job, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, out / META_NAME)
    (out / JOB_NAME).unlink(missing_ok=True)
    (out / PROGRESS_NAME).unlink(missing_ok=True)


def _conclude(
    args: argparse.Namespace, runtime: Runtime, job: dict[str, Any], outcomes: list[dict[str, Any]]
) -> dict[str, Any]:
    """Every rank's outcome in: the first error stops every rank; a stop by a signal stops every rank
    with it; otherwise rank 0 finishes the folder. Returns the summary."""
    out = Path(args.out)
    errors = [o["error"] for o in outcomes if o["error"] is not None]
    if errors:
        raise errors[0]
    rows = sum(o["rows"] for o in outcomes)
    signum = next((o["signum"] for o in outcomes if o["signum"]), 0)
    if signum:
        name = "SIGINT" if signum == 2 else "SIGTERM"
        raise Interrupted(
            f"stopped by {name}; {rows} images were encoded in this run and every finished batch is kept in "
            f"{out}: run the same command again to continue",
            signum,
        )
    on_main_then_all(runtime, lambda: _finish(out, job))
    seconds = max(o["seconds"] for o in outcomes)
    return {
        "out": str(out),
        "count": job["count"],
        "latent_shape": job["latent_shape"],
        "dtype": job["dtype"],
        "encoded": rows,
        "seconds": round(seconds, 3),
        "images_per_second": round(rows / seconds, 2) if seconds > 0 else None,
        "processes": runtime.world_size,
        "workers": getattr(args, "workers", 0),
    }


# ----------------------------------------------------------------------------------------------------
# The job: what is encoded, and how
# ----------------------------------------------------------------------------------------------------


def _vae_name(args: argparse.Namespace) -> str | None:
    """What ``meta.json`` records as ``vae``: a local folder by its absolute path, a Hub id as given."""
    if getattr(args, "random_tiny_vae", False):
        return RANDOM_TINY_VAE
    if args.vae and Path(args.vae).is_dir():
        return str(Path(args.vae).resolve())
    return args.vae


def _image_job(args: argparse.Namespace) -> tuple[ImageFolder, dict[str, Any]]:
    """The image folder of ``--data folder:PATH`` and the job's description (all but the VAE's shapes)."""
    kind, _, where = args.data.partition(":")
    if kind != "folder" or not where:
        raise UsageError(f"--data {args.data!r}: expected folder:PATH, an image folder PATH/<class>/<image>")
    try:
        images = ImageFolder(where, args.image_size, check=False, crop=args.crop)
    except FileKindError as error:
        raise UsageError(str(error)) from None
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--data {args.data!r}: {error}") from None
    job = {
        "format": LATENTS_FORMAT,
        "source": str(images.root.resolve()),
        "source_digest": images.digest(),
        "count": len(images),
        "num_classes": images.num_classes,
        "class_names": images.classes,
        "image_size": args.image_size,
        **{"crop": args.crop, "flip": args.flip, "vae": _vae_name(args)},
        **{"posterior": "mean" if args.mean else "sample", "seed": args.seed},
        **{"batch_size": args.batch_size, "dtype": args.dtype or "float16"},
    }
    return images, job


def _open_vae(args: argparse.Namespace, job: dict[str, Any]) -> Any:
    """The VAE, with the job's ``latent_shape`` and ``scaling_factor`` added; ``UsageError`` if it cannot
    be loaded or does not fit the image size."""
    try:
        vae = load_vae(job["vae"])
        job["latent_shape"] = list(latent_shape(vae, args.image_size))
    except ValueError as error:
        raise UsageError(str(error)) from None
    except (OSError, ImportError) as error:
        raise UsageError(f"--vae {args.vae!r}: cannot load an AutoencoderKL ({error})") from None
    job["scaling_factor"] = float(vae.config.scaling_factor)
    return vae.eval().requires_grad_(False)


OLD_KIND = "a latents file written by an earlier extract_latents.py"


def _old_latents(path: Path) -> dict[str, Any]:
    """A ``.pt`` latents file of the earlier format, its tensors memory-mapped where the file allows;
    ``FileKindError`` (one line) when it is not one."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format file, or not one at all: the plain loader says which
        payload = load_tensors(path, OLD_KIND, keys=("latents", "labels", "num_classes"))
    missing = [
        k for k in ("latents", "labels", "num_classes") if not isinstance(payload, dict) or k not in payload
    ]
    if missing:
        raise FileKindError(f"{path}: has no {missing[0]!r} (expected {OLD_KIND})")
    latents, labels = payload["latents"], payload["labels"]
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or not latents.is_floating_point():
        raise FileKindError(f"{path}: 'latents' is not a float tensor (N, C, h, w) (expected {OLD_KIND})")
    if (
        not isinstance(labels, torch.Tensor)
        or labels.shape != latents.shape[:1]
        or labels.is_floating_point()
    ):
        raise FileKindError(f"{path}: 'labels' is not an integer tensor (N,) (expected {OLD_KIND})")
    num_classes = int(payload["num_classes"])
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise FileKindError(
            f"{path}: labels range over {int(labels.min())}..{int(labels.max())}, outside the {num_classes} "
            f"classes 0..{num_classes - 1}"
        )
    return payload


def _convert_job(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The loaded ``--convert`` file and the job's description."""
    path = Path(args.convert)
    try:
        payload = _old_latents(path)
    except FileKindError as error:
        raise UsageError(str(error)) from None
    latents, stat = payload["latents"], path.stat()
    num_classes = int(payload["num_classes"])
    job = {
        "format": LATENTS_FORMAT,
        "source": str(path.resolve()),
        "source_digest": f"{stat.st_size}:{stat.st_mtime_ns}",
        "count": int(latents.shape[0]),
        "num_classes": num_classes,
        "class_names": [str(label) for label in range(num_classes)],
        "image_size": args.image_size,
        **{"crop": None, "flip": None, "vae": _vae_name(args), "posterior": None, "seed": None},
        **{"batch_size": args.batch_size, "dtype": args.dtype or "float32"},
        "latent_shape": list(latents.shape[1:]),
        "scaling_factor": float(payload.get("scaling_factor", torch.tensor(1.0))),
    }
    return payload, job


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

#: Options of an image extraction that mean nothing to ``--convert``, by their ``argparse`` name.
IMAGE_ONLY = ("random_tiny_vae", "crop", "flip", "mean", "seed", "workers")


def build_parser() -> argparse.ArgumentParser:
    """The command line; see the module docstring."""
    epilog = (
        "The folder holds latents.npy (N, C, h, w), labels.npy (N,) int64 and meta.json (the format: "
        "fpdm.latents). Run the same command again after an interruption to continue; under torchrun "
        "the processes share the batches. Exit status: 0 done, 1 non-finite latents, 2 a usage error (a "
        "destination that cannot take the job among them, before any encoding), 3 a file that could not be "
        "written, 130 Ctrl-C and 143 SIGTERM (finished batches are kept)."
    )
    description = (
        "Encode an image folder with a VAE into a latents folder for train.py --data latents:DIR, in "
        "batches, resumable, split over the processes of torchrun."
    )
    parser = OneLineParser(description=description, epilog=epilog)
    add = parser.add_argument
    add("--data", metavar="folder:PATH", help="the images: an image folder PATH/<class>/<image>")
    add("--convert", metavar="OLD.pt", help="convert a .pt latents file of the earlier format instead")
    add("--out", required=True, metavar="DIR", help="output folder (latents.npy, labels.npy, meta.json)")
    add("--overwrite", action="store_true", help="replace the latents or unfinished extraction in --out")
    add(
        "--vae",
        default=None,
        metavar="NAME",
        help="AutoencoderKL: Hub id or local folder (with --convert: recorded only)",
    )
    add("--random-tiny-vae", action="store_true", default=None, help="a small random VAE (tests)")
    add("--image-size", type=bounded_int(1), default=None, help="side of the square images (default: 256)")
    add("--crop", choices=CROPS, default=None, help="center (default) or adm (ADM's and DiT's ImageNet crop)")
    add("--flip", choices=FLIPS, default=None, help="none (default) or random (per image, from --seed)")
    add("--batch-size", type=bounded_int(1), default=32, help="images per batch (default: %(default)s)")
    add(
        "--workers", type=bounded_int(0), default=None, help="DataLoader workers decoding images (default: 4)"
    )
    add(
        "--device",
        default="auto",
        help="'auto' (default), 'cpu', 'cuda' or 'cuda:N'; under torchrun each rank its GPU",
    )
    add("--mean", action="store_true", default=None, help="encode to the posterior mean, not a sample")
    add(
        "--seed",
        type=bounded_int(0),
        default=None,
        help="seed of the posterior samples and flips (default: 0)",
    )
    add("--dtype", choices=LATENT_DTYPES, default=None, help="float16 (default; --convert: float32)")
    add("--commit-every", type=bounded_float(0.0), default=10.0,
        help="seconds between records of the finished batches (default: %(default)s)")  # fmt: skip
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    add("--json", action="store_true", help="print the summary as JSON")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """The rules between options (``UsageError``); fills in the defaults of the image options."""
    if (args.data is None) == (args.convert is None):
        raise UsageError("pass --data folder:PATH (images to encode) or --convert OLD.pt, one of them")
    if args.convert is not None:
        given = [name for name in IMAGE_ONLY if getattr(args, name) is not None]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} does nothing with --convert; drop it")
        return
    if args.random_tiny_vae and args.vae:
        raise UsageError("--vae and --random-tiny-vae exclude each other")
    if not (args.random_tiny_vae or args.vae):
        raise UsageError("pass --vae (a Hub id or a local AutoencoderKL folder) or --random-tiny-vae")
    defaults = {"image_size": 256, "crop": "center", "flip": "none", "seed": 0, "workers": 4}
    defaults.update(mean=False, random_tiny_vae=False)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def extract(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the extraction (or conversion) the parsed ``args`` ask for, as one process or a ``torchrun``
    rank; returns the summary, ``None`` when ``--out`` already holds this job's latents.

    Raises
    ------
    cli.UsageError
        A bad combination of options, a source or destination that cannot be used (before any encoding).
    files.FileKindError
        An image that cannot be read, met during the encoding (the finished batches are kept).
    NonFiniteLatentsError
        NaN or infinite latents.
    cli.Interrupted
        Ctrl-C or SIGTERM; the finished batches are kept.
    """
    _check_args(args)
    with joined(args.device) as runtime:
        return _extract(args, runtime)


def _extract(args: argparse.Namespace, runtime: Runtime) -> dict[str, Any] | None:
    out = Path(args.out)
    source, job = _image_job(args) if args.data is not None else _convert_job(args)
    existed, lock = out.exists(), RunLock(out, LOCK_NAME, "extract_latents.py")
    try:
        state = on_main_then_all(runtime, lambda: check_destination(out, job, args.overwrite, lock))
        if state == "complete":
            if runtime.is_main:
                print(f"[extract_latents] {out} already holds these latents; nothing to do", file=sys.stderr)
            return None
        try:
            vae = _open_vae(args, job) if isinstance(source, ImageFolder) else None
            notice = on_main_then_all(runtime, lambda: _prepare(out, job, state))
        except BaseException:
            if runtime.is_main and not existed and set(os.listdir(out)) <= {LOCK_NAME}:
                lock.release()
                out.rmdir()  # a folder this command made for a job it refused is no obstacle to the next
            raise
        if runtime.is_main:
            print(f"[extract_latents] {notice}", file=sys.stderr, flush=True)
        outcome = _run_rank(args, runtime, job, source, vae)
        summary = _conclude(args, runtime, job, gather_objects(runtime, outcome))
        return summary
    finally:
        lock.release()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; see the module docstring. Exit status 0 done (or nothing to do), 1 non-finite
    latents, 2 a usage error, 3 a file that could not be written, 128 + the signal's number when stopped."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def command() -> int:
        try:
            summary = extract(args)
        except FileKindError as error:
            raise UsageError(str(error)) from None
        except NonFiniteLatentsError as error:
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            return EXIT_NON_FINITE
        if summary is not None and int(os.environ.get("RANK", 0)) == 0:
            if args.json:
                print(json.dumps(summary))
            else:
                shape, rate = tuple(summary["latent_shape"]), summary["images_per_second"]
                print(
                    f"wrote {summary['count']} latents {shape} {summary['dtype']} to {summary['out']} "
                    f"({summary['encoded']} encoded in {summary['seconds']} s, {rate} images/s)"
                )
        return 0

    return run_command(parser, command)
