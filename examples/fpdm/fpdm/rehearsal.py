"""The paper's path at small size on the CPU, end to end, with what each stage wrote checked.

``rehearsal.py`` (``make rehearsal``) runs the commands of the README's *At scale* section, in their order
and as a user runs them, on a folder of images it makes, in a few minutes on a CPU:

1. **prepare**: a synthetic image folder (PNG and JPEG files of several sizes in a few classes, with a hidden
   folder and a hidden file that every reader must skip), a small random ``AutoencoderKL`` saved to a local
   folder (:func:`fpdm.latents.tiny_vae`), and the FID Inception-v3 with random weights saved to a file;
2. **extract**: ``extract_latents.py --data folder:PATH --vae FOLDER`` under ``torchrun`` with 2 processes
   (gloo); checked against the latents folder's format and against one process's files, byte for byte;
3. **train**: ``train.py --data latents:DIR`` under ``torchrun`` with 2 processes, a tiny FPDM, a few steps;
4. **sample**: ``sample.py CK --num-samples N`` under ``torchrun`` with 2 processes, the latents decoded by
   the VAE that ``meta.json`` names; ``samples.npz``'s ``arr_0`` checked against that VAE's decoding;
5. **evaluate**: ``evaluate.py --extractor inception --inception-weights FILE`` against the image folder:
   FID, sFID, Inception Score, precision, recall and KID, each finite, in one JSON.

Nothing is downloaded (``HF_HUB_OFFLINE=1``). A stage that fails stops the rehearsal with its command and the
end of its output; a check that fails names the stage, the file and what it found. Each stage's wall time is
printed as it ends and in a table at the end. The work happens in a temporary folder, removed at the end,
unless ``--keep DIR`` names a folder to keep (with each stage's output in ``DIR/logs``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from subprocess import PIPE
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = [
    "RehearsalFailure",
    "Sizes",
    "check_latents",
    "check_samples",
    "check_scores",
    "check_training",
    "main",
    "rehearse",
    "write_image_folder",
]

T = TypeVar("T")
EXAMPLE_DIR = Path(__file__).resolve().parents[1]
#: The class folders of the synthetic image folder, and the hidden entries every reader must skip.
CLASSES = ("disc", "ring", "stripes")
HIDDEN_FOLDER, HIDDEN_FILE = ".thumbnails", ".preview.png"
#: ``meta.json``'s keys, as the README's *The latents folder* lists them (format, then extraction's own).
META_KEYS = (
    *("format", "count", "num_classes", "class_names", "scaling_factor", "vae", "image_size"),
    *("latent_shape", "dtype", "source", "source_digest", "crop", "flip", "posterior", "seed", "batch_size"),
)
#: Files each stage leaves in its folder once it has finished (locks, progress records and shards removed).
LATENTS_FILES = {"latents.npy", "labels.npy", "meta.json"}
RUN_FILES = {"checkpoint.pt", "log.jsonl"}
SAMPLE_FILES = {"grid.png", "samples.npz", "summary.json"}
#: Seconds a stage may take before it is stopped (a few minutes is usual on a small shared CPU).
STAGE_TIMEOUT = 900
#: The scores ``evaluate.py --extractor inception`` reports, each a finite number.
SCORES = ("fid", "sfid", "inception_score", "precision", "recall", "kid_mean", "kid_std")


class RehearsalFailure(AssertionError):
    """A stage failed, or wrote something other than what its documentation promises."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big the rehearsal is: small enough for a few minutes on two CPU cores, big enough that every
    split is uneven (the last batch of extraction and of sampling is partial; each rank gets a share)."""

    processes: int = 2
    images_per_class: int = 7  # 21 images: extraction batches 4, 4, 4, 4, 4, 1
    image_size: int = 16  # the tiny VAE halves it: latents 4x8x8
    extract_batch: int = 4
    train_steps: int = 6
    train_batch: int = 8
    hidden_size: int = 32
    num_heads: int = 2
    num_samples: int = 10  # sampling batches 4, 4, 2 over two ranks
    sample_batch: int = 4
    budget: int = 8  # block evaluations per sample: 2 timesteps of 1 + 1 blocks and 2 iterations
    kid_subset_size: int = 5


def expect(condition: bool, message: str) -> None:
    """Raise :class:`RehearsalFailure` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise RehearsalFailure(message)


# ----------------------------------------------------------------------------------------------------------
# Inputs: an image folder, a VAE folder, an Inception weights file
# ----------------------------------------------------------------------------------------------------------


def _picture(label: int, index: int, height: int, width: int) -> np.ndarray:
    """An RGB ``uint8`` image of class ``label``: a disc, a ring or stripes, with its own colour and noise."""
    rng = np.random.default_rng([label, index])
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    radius = np.hypot(y - 0.5, x - 0.5)
    shape = [radius < 0.3, np.abs(radius - 0.3) < 0.08, np.sin(25 * x) > 0][label % len(CLASSES)]
    colour = rng.integers(64, 256, 3)
    image = np.where(shape[..., None], colour, 255 - colour) + rng.normal(0, 12, (height, width, 3))
    return image.clip(0, 255).astype(np.uint8)


def write_image_folder(root: Path, images_per_class: int) -> list[tuple[Path, int]]:
    """Write ``root/<class>/<image>`` (PNG and JPEG, landscape and portrait) with a hidden folder and a hidden
    file among them; return the visible images with their labels, in the order the format promises (by
    class, then by file name)."""
    from PIL import Image

    visible = []
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for index in range(images_per_class):
            height, width = (20, 26) if index % 2 else (27, 19)
            path = root / name / f"{index:03d}.{'jpg' if index % 3 == 0 else 'png'}"
            Image.fromarray(_picture(label, index, height, width)).save(path)
            visible.append((path, label))
        Image.fromarray(_picture(label, 99, 20, 20)).save(root / name / HIDDEN_FILE)
    (root / HIDDEN_FOLDER).mkdir()
    for index in range(3):
        Image.fromarray(_picture(0, 100 + index, 20, 20)).save(root / HIDDEN_FOLDER / f"{index}.png")
    return visible


def write_vae(folder: Path) -> Path:
    """:func:`fpdm.latents.tiny_vae` saved as a diffusers ``AutoencoderKL`` folder."""
    from fpdm.latents import tiny_vae

    tiny_vae(seed=0).save_pretrained(folder)
    return folder


def write_random_inception(path: Path) -> Path:
    """The FID Inception-v3 (:class:`fpdm.inception.FIDInceptionV3`) with random weights that keep the
    activations' scale (He initialisation of the convolutions), saved as ``--inception-weights`` takes it."""
    from fpdm.inception import FIDInceptionV3

    torch.manual_seed(0)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(network.state_dict(), path)
    return path


# ----------------------------------------------------------------------------------------------------------
# What each stage wrote
# ----------------------------------------------------------------------------------------------------------


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def check_latents(
    folder: Path, visible: Sequence[tuple[Path, int]], vae_folder: Path, image_size: int
) -> dict[str, Any]:
    """The latents folder of ``extract_latents.py`` is what *The latents folder* promises: its three files,
    ``meta.json``'s keys, ``(N, C, h, w)`` float16 latents and ``(N,)`` int64 labels of the visible images
    only, in order, each row the VAE's posterior sample of its image times the scaling factor (up to
    float16's rounding). Returns ``meta.json``."""
    from diffusers import AutoencoderKL

    from fpdm.data import read_image
    from fpdm.latents import encode_batch

    expect(_files(folder) == LATENTS_FILES, f"{folder}: holds {sorted(_files(folder))}, not {LATENTS_FILES}")
    meta = json.loads((folder / "meta.json").read_text())
    missing = [key for key in META_KEYS if key not in meta]
    expect(not missing, f"{folder}/meta.json: has no {missing}")
    count, names = len(visible), list(CLASSES)
    expect(meta["count"] == count, f"meta.json: count {meta['count']}, expected the {count} visible images")
    expect(meta["class_names"] == names, f"meta.json: classes {meta['class_names']}, expected {names}")
    expect(meta["num_classes"] == len(names) and meta["image_size"] == image_size, f"meta.json: {meta}")
    expect(meta["vae"] == str(vae_folder), f"meta.json: vae {meta['vae']!r}, expected {str(vae_folder)!r}")
    latents = np.load(folder / "latents.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy")
    shape = (count, *meta["latent_shape"])
    expect(
        latents.shape == shape and latents.dtype == np.float16,
        f"latents.npy: {latents.dtype} {latents.shape}",
    )
    expect(labels.dtype == np.int64, f"labels.npy: {labels.dtype}, expected int64")
    expected_labels = [label for _, label in visible]
    expect(labels.tolist() == expected_labels, f"labels.npy: {labels.tolist()}, expected {expected_labels}")
    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    expect(meta["scaling_factor"] == vae.config.scaling_factor, f"meta.json: {meta['scaling_factor']}")
    images = torch.stack([read_image(path, image_size, meta["crop"]) for path, _ in visible])
    z = encode_batch(vae, images, range(count), posterior=meta["posterior"], seed=meta["seed"]).numpy()
    # Stored as float16: |stored - z| <= 2**-11 |z| (round to nearest), plus float16's smallest normal
    # number for the values below it; float32's differences between batchings are far smaller.
    error = np.abs(latents.astype(np.float32) - z) - (2.0**-11 * np.abs(z) + 2.0**-14)
    row = int(np.unravel_index(error.argmax(), error.shape)[0])
    expect(error.max() <= 0, f"latents.npy: row {row} ({visible[row][0]}) is not its image's scaled latent")
    return meta


def same_folder(folder: Path, reference: Path, ignore: Sequence[str] = ("created",)) -> None:
    """``folder`` holds the bytes of ``reference``: the same arrays, and ``meta.json`` equal but for
    ``ignore``."""
    for name in ("latents.npy", "labels.npy"):
        same = (folder / name).read_bytes() == (reference / name).read_bytes()
        expect(same, f"{folder / name} differs from one process's {reference / name}")
    meta, other = (json.loads((f / "meta.json").read_text()) for f in (folder, reference))
    for key in ignore:
        meta.pop(key, None), other.pop(key, None)
    expect(meta == other, f"{folder}/meta.json differs from one process's: {meta} != {other}")


def check_training(run: Path, stdout: str, steps: int, latents: Path, processes: int) -> None:
    """``train.py`` left its checkpoint at ``steps`` of a model of the latents' shape, a log of finite
    losses, and reported every rank's parameters equal."""
    from fpdm.generation import load_model

    expect(_files(run) == RUN_FILES, f"{run}: holds {sorted(_files(run))}, not {RUN_FILES}")
    checkpoint = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    expect(checkpoint["step"] == steps, f"checkpoint.pt: step {checkpoint['step']}, expected {steps}")
    data = checkpoint["config"]["data"]
    expect(data == f"latents:{latents}", f"checkpoint.pt: data {data!r}, expected 'latents:{latents}'")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    expect(
        losses and losses[-1][0] == steps, f"log.jsonl: the last loss is of step {losses[-1:]}, not {steps}"
    )
    expect(all(math.isfinite(loss) for _, loss in losses), f"log.jsonl: a loss is not finite: {losses}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    last = json.loads(lines[-1]) if lines else {}
    expect(last.get("world_size") == processes, f"train.py printed {last}, expected world_size {processes}")
    expect(last.get("rank_param_max_abs_diff") == 0.0, f"the ranks' parameters differ: {last}")
    shape = tuple(json.loads((latents / "meta.json").read_text())["latent_shape"])
    model = load_model(run / "checkpoint.pt")
    x = torch.randn(2, *shape)
    with torch.no_grad():
        eps = model(x, torch.tensor([10, 900]), torch.tensor([0, 1]))[0]
    expect(eps.shape == x.shape, f"the trained model maps latents {tuple(x.shape)} to {tuple(eps.shape)}")


def check_samples(out: Path, count: int, meta: dict[str, Any], vae_folder: Path, processes: int) -> None:
    """``sample.py`` wrote ``samples.npz`` with ``arr_0`` ``uint8`` ``(N, H, W, 3)``: the VAE's decoding of
    its ``latents`` (up to rounding to integers), the labels cycling through the classes, from
    ``processes`` ranks."""
    from diffusers import AutoencoderKL

    from fpdm.generation import pixels

    expect(_files(out) == SAMPLE_FILES, f"{out}: holds {sorted(_files(out))}, not {SAMPLE_FILES}")
    with np.load(out / "samples.npz") as arrays:
        samples = {name: arrays[name] for name in arrays.files}
    size, classes = meta["image_size"], meta["num_classes"]
    arr_0 = samples.get("arr_0", np.empty(0))
    expect(
        arr_0.shape == (count, size, size, 3), f"arr_0: {arr_0.shape}, expected ({count}, {size}, {size}, 3)"
    )
    expect(arr_0.dtype == np.uint8, f"arr_0: {arr_0.dtype}, expected uint8")
    cycle = np.arange(count) % classes
    for name in ("labels", "arr_1"):
        expect(np.array_equal(samples.get(name), cycle), f"{name}: {samples.get(name)}, expected {cycle}")
    latents = samples.get("latents", np.empty(0))
    shape = (count, *meta["latent_shape"])
    expect(
        latents.shape == shape and np.isfinite(latents).all(), f"latents: {latents.shape}, expected {shape}"
    )
    summary = json.loads((out / "summary.json").read_text())
    expect(summary["world_size"] == processes, f"summary.json: world_size {summary['world_size']}")
    expect(
        summary["decoded_with"] == str(vae_folder), f"summary.json: decoded with {summary['decoded_with']}"
    )
    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(latents) / meta["scaling_factor"]).sample.clamp(-1, 1)
    # Rounding to integers: a value that float32 puts either side of a half differs by one level.
    off = np.abs(arr_0.astype(int) - pixels(decoded).astype(int)).max()
    expect(off <= 1, f"arr_0 is not the VAE's decoding of the latents ({off} levels off)")


def check_scores(path: Path, num_images: int, num_real: int) -> dict[str, Any]:
    """``evaluate.py``'s JSON holds every score of :data:`SCORES`, finite and in its range, of
    ``num_images`` samples against ``num_real`` real images in the FID Inception's 2048 features."""
    scores = json.loads(path.read_text())
    missing = [name for name in SCORES if not isinstance(scores.get(name), int | float)]
    expect(not missing, f"{path}: has no {missing}: {scores}")
    bad = [name for name in SCORES if not math.isfinite(scores[name])]
    expect(not bad, f"{path}: {bad} not finite: {scores}")
    expect(scores["fid"] >= 0 and scores["sfid"] >= 0, f"{path}: a negative distance: {scores}")
    expect(0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1, f"{path}: precision/recall {scores}")
    expect(1 <= scores["inception_score"] <= 1008, f"{path}: Inception Score {scores['inception_score']}")
    counts = (scores.get("num_images"), scores.get("num_real"), scores.get("feature_dim"))
    expect(counts == (num_images, num_real, 2048), f"{path}: images, real, features {counts}")
    expect(scores.get("extractor") == "fid-inception-v3", f"{path}: extractor {scores.get('extractor')}")
    return scores


# ----------------------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------------------


def flags(*positional: Any, **options: Any) -> list[str]:
    """A command line's arguments: ``flags("CK", num_samples=4, no_progress=True)`` is
    ``["CK", "--num-samples", "4", "--no-progress"]``."""
    args = [str(value) for value in positional]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return args


def launch(script: str, args: Sequence[str], processes: int, logs: Path, stage: str) -> str:
    """Run ``examples/fpdm/<script>`` with ``args``, under ``torchrun`` (``--standalone``) when ``processes``
    is above 1; return its standard output. Its output goes to ``logs/<stage>.out`` and ``.err``."""
    command = [sys.executable, str(EXAMPLE_DIR / script), *args]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    shown = shlex.join(["python" if c == sys.executable else c for c in command])
    print(f"[rehearsal] {stage}: {shown}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # nothing is downloaded
    # In a session of its own, so that a timeout or Ctrl-C ends torchrun's workers with it.
    with subprocess.Popen(
        command, stdout=PIPE, stderr=PIPE, text=True, env=env, start_new_session=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=STAGE_TIMEOUT)
        except BaseException as stopped:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(stopped, subprocess.TimeoutExpired):
                raise RehearsalFailure(f"{stage}: no result after {STAGE_TIMEOUT} s of\n  {shown}") from None
            raise
    (logs / f"{stage}.out").write_text(stdout)
    (logs / f"{stage}.err").write_text(stderr)
    if proc.returncode != 0:
        tail = stderr[-3000:]
        raise RehearsalFailure(
            f"{stage}: exit status {proc.returncode} of\n  {shown}\n--- its output ends:\n{tail}"
        )
    return stdout


class Clock:
    """Wall time of each stage, printed as it ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, stage: str, work: Callable[[], T]) -> T:
        """``work()``, timed as ``stage``."""
        start = time.perf_counter()
        result = work()
        self.seconds[stage] = time.perf_counter() - start
        print(f"[rehearsal] {stage}: done in {self.seconds[stage]:.1f} s", flush=True)
        return result

    def table(self) -> str:
        """One line per stage and the total."""
        rows = [f"  {stage:<9} {seconds:7.1f} s" for stage, seconds in self.seconds.items()]
        return "\n".join([*rows, f"  {'total':<9} {sum(self.seconds.values()):7.1f} s"])


def _prepare(work: Path, sizes: Sizes) -> dict[str, Any]:
    visible = write_image_folder(work / "images", sizes.images_per_class)
    inception = write_random_inception(work / "inception-random.pth")
    return {
        "images": work / "images",
        "visible": visible,
        "vae": write_vae(work / "vae"),
        "inception": inception,
    }


def _extract(work: Path, inputs: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """Two processes extract and are checked against the format; one process (here, on one thread as each
    rank has) extracts again, and the two folders are compared byte for byte."""
    from fpdm.latents import main as extract_main

    common = flags(data=f"folder:{inputs['images']}", vae=inputs["vae"], device="cpu", no_progress=True)
    common += flags(image_size=sizes.image_size, batch_size=sizes.extract_batch)
    two = [*common, *flags(out=work / "latents", workers=1)]
    launch("extract_latents.py", two, sizes.processes, work / "logs", "extract")
    meta = check_latents(work / "latents", inputs["visible"], inputs["vae"], sizes.image_size)
    status = extract_main([*common, *flags(out=work / "latents-1", workers=0)])
    expect(status == 0, f"one process's extraction (extract_latents.py {shlex.join(common)}) exited {status}")
    same_folder(work / "latents", work / "latents-1")
    return meta


def _train(work: Path, sizes: Sizes) -> None:
    run, latents = work / "run", work / "latents"
    args = flags(data=f"latents:{latents}", model="FPDM-Digits/2", hidden_size=sizes.hidden_size)
    args += flags(num_heads=sizes.num_heads, steps=sizes.train_steps, batch_size=sizes.train_batch)
    args += flags(ckpt_every=3, log_every=2, workers=1, device="cpu", no_progress=True, out=run)
    stdout = launch("train.py", args, sizes.processes, work / "logs", "train")
    check_training(run, stdout, sizes.train_steps, latents, sizes.processes)


def _sample(work: Path, inputs: dict[str, Any], meta: dict[str, Any], sizes: Sizes) -> None:
    args = flags(work / "run" / "checkpoint.pt", num_samples=sizes.num_samples, budget=sizes.budget)
    args += flags(batch_size=sizes.sample_batch, device="cpu", no_progress=True, out=work / "samples")
    launch("sample.py", args, sizes.processes, work / "logs", "sample")
    check_samples(work / "samples", sizes.num_samples, meta, inputs["vae"], sizes.processes)


def _evaluate(work: Path, inputs: dict[str, Any], sizes: Sizes) -> None:
    args = flags(samples=work / "samples" / "samples.npz", real=f"folder:{inputs['images']}")
    args += flags(extractor="inception", inception_weights=inputs["inception"], out=work / "scores.json")
    args += flags(kid_subsets=10, kid_subset_size=sizes.kid_subset_size)
    print(launch("evaluate.py", args, 1, work / "logs", "evaluate").rstrip(), flush=True)
    check_scores(work / "scores.json", sizes.num_samples, len(inputs["visible"]))


def rehearse(work: Path, sizes: Sizes = Sizes()) -> Clock:
    """Run the five stages in ``work`` (an empty folder) and check each; return their wall times.

    Raises
    ------
    RehearsalFailure
        The first stage that failed or wrote something else than promised.
    """
    clock = Clock()
    (work / "logs").mkdir(parents=True)
    torch.set_num_threads(
        1
    )  # as each torchrun rank has, so that one process's extraction is bit for bit theirs
    inputs = clock.run("prepare", lambda: _prepare(work, sizes))
    meta = clock.run("extract", lambda: _extract(work, inputs, sizes))
    clock.run("train", lambda: _train(work, sizes))
    clock.run("sample", lambda: _sample(work, inputs, meta, sizes))
    clock.run("evaluate", lambda: _evaluate(work, inputs, sizes))
    return clock


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        description="Run the at-scale path (extract, train, sample, evaluate) at small size on the CPU, "
        "with 2 processes per stage, and check what each stage wrote.",
        epilog="Exit status: 0 every stage ran and wrote what it promises, 1 a stage failed or a check did "
        "(the message names which), 2 a usage error.",
    )
    parser.add_argument("--keep", metavar="DIR", default=None, help="work in DIR (new or empty) and keep it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rehearsal; print each stage's wall time and the load of the machine."""
    parser = build_parser()
    args = parser.parse_args(argv)
    keep = Path(args.keep) if args.keep else None
    if keep and keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
        parser.error(f"--keep {keep}: exists and is not an empty folder")
    load = os.getloadavg()[0]
    print(
        f"[rehearsal] torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.1f}", flush=True
    )
    with tempfile.TemporaryDirectory(prefix="fpdm-rehearsal-") as scratch:
        work = (keep or Path(scratch)).resolve()
        try:
            clock = rehearse(work)
        except RehearsalFailure as failure:
            print(f"[rehearsal] FAILED: {failure}", file=sys.stderr)
            return 1
    now = os.getloadavg()[0]
    print(
        f"[rehearsal] every stage wrote what it promises; wall times (load average {load:.1f} -> {now:.1f}):"
    )
    print(clock.table())
    if keep:
        print(f"[rehearsal] outputs kept in {work} (each stage's output in {work / 'logs'})")
    return 0
