"""The rehearsal's checks (``make rehearsal``, :mod:`fpdm.rehearsal`) pass on what the stages write and catch
each way a stage could write something else. The rehearsal itself runs as its own CI step, not here."""

import json
import shutil

import numpy as np
import pytest
import torch
from fpdm import latents
from fpdm import rehearsal as rh
from fpdm.data import ImageFolder
from fpdm.generation import pixels
from fpdm.rehearsal import RehearsalFailure
from fpdm.training import TrainConfig, train

PER_CLASS = 2  # 6 images; extraction batches of 4: one full, one partial
SIZE = 16


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The rehearsal's inputs and one process's latents folder (in this process, on one thread)."""
    root = tmp_path_factory.mktemp("rehearsal")
    visible = rh.write_image_folder(root / "images", PER_CLASS)
    vae = rh.write_vae(root / "vae")
    argv = rh.flags(data=f"folder:{root / 'images'}", vae=vae, image_size=SIZE, batch_size=4, workers=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert latents.main([*argv, *rh.flags(out=root / "latents", device="cpu", no_progress=True)]) == 0
    finally:
        torch.set_num_threads(threads)
    meta = json.loads((root / "latents" / "meta.json").read_text())
    return {"root": root, "visible": visible, "vae": vae, "meta": meta}


def copy(made, tmp_path, name="latents"):
    return shutil.copytree(made["root"] / name, tmp_path / name)


def test_the_image_folder_hides_entries_that_every_reader_skips(made):
    root = made["root"] / "images"
    assert (root / rh.HIDDEN_FOLDER).is_dir() and (root / rh.CLASSES[0] / rh.HIDDEN_FILE).is_file()
    folder = ImageFolder(root, SIZE)
    assert folder.classes == list(rh.CLASSES)
    assert [folder.path(i) for i in range(len(folder))] == [path for path, _ in made["visible"]]
    assert folder.labels.tolist() == [label for _, label in made["visible"]]
    assert {path.suffix for path, _ in made["visible"]} == {".png", ".jpg"}


def test_the_latents_check_passes_on_an_extraction_and_catches_each_defect(made, tmp_path):
    meta = rh.check_latents(made["root"] / "latents", made["visible"], made["vae"], SIZE)
    assert meta == made["meta"]
    folder = copy(made, tmp_path)
    rows = np.load(folder / "latents.npy")
    np.save(folder / "latents.npy", rows[[1, 0, *range(2, len(rows))]])  # two images' latents swapped
    with pytest.raises(RehearsalFailure, match=r"row 0 \(.*000\.jpg\) is not its image's scaled latent"):
        rh.check_latents(folder, made["visible"], made["vae"], SIZE)
    np.save(folder / "latents.npy", rows * 1.001)  # a wrong scaling factor: above float16's rounding
    with pytest.raises(RehearsalFailure, match="is not its image's scaled latent"):
        rh.check_latents(folder, made["visible"], made["vae"], SIZE)
    np.save(folder / "latents.npy", rows.astype(np.float32))
    with pytest.raises(RehearsalFailure, match=r"latents.npy: float32"):
        rh.check_latents(folder, made["visible"], made["vae"], SIZE)
    np.save(folder / "latents.npy", rows)
    rh.check_latents(folder, made["visible"], made["vae"], SIZE)  # restored: passes again
    hidden = made["root"] / "images" / rh.HIDDEN_FOLDER / "0.png"
    with pytest.raises(RehearsalFailure, match="count 6, expected the 7 visible images"):
        rh.check_latents(folder, [*made["visible"], (hidden, 0)], made["vae"], SIZE)  # hidden ones counted


def test_the_latents_check_catches_wrong_labels_meta_and_leftovers(made, tmp_path):
    folder = copy(made, tmp_path)
    labels = np.load(folder / "labels.npy")
    np.save(folder / "labels.npy", labels[::-1].copy())
    with pytest.raises(RehearsalFailure, match=r"labels\.npy: .* expected"):
        rh.check_latents(folder, made["visible"], made["vae"], SIZE)
    np.save(folder / "labels.npy", labels.astype(np.int32))
    with pytest.raises(RehearsalFailure, match=r"labels\.npy: int32, expected int64"):
        rh.check_latents(folder, made["visible"], made["vae"], SIZE)
    np.save(folder / "labels.npy", labels)
    meta = {key: value for key, value in made["meta"].items() if key != "scaling_factor"}
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RehearsalFailure, match=r"meta.json: has no \['scaling_factor'\]"):
        rh.check_latents(folder, made["visible"], made["vae"], SIZE)
    (folder / "meta.json").write_text(json.dumps(made["meta"]))
    np.save(folder / "progress.npy", np.ones(2, np.uint8))  # an extraction that did not clean up
    with pytest.raises(RehearsalFailure, match=r"progress\.npy"):
        rh.check_latents(folder, made["visible"], made["vae"], SIZE)


def test_two_folders_are_the_same_when_only_their_creation_time_differs(made, tmp_path):
    folder = copy(made, tmp_path)
    meta = {**made["meta"], "created": "another time"}
    (folder / "meta.json").write_text(json.dumps(meta))
    rh.same_folder(folder, made["root"] / "latents")
    (folder / "meta.json").write_text(json.dumps({**meta, "seed": 1}))
    with pytest.raises(RehearsalFailure, match=r"meta\.json differs from one process's"):
        rh.same_folder(folder, made["root"] / "latents")
    data = bytearray((folder / "latents.npy").read_bytes())
    data[-1] ^= 1  # one bit of the last latent
    (folder / "latents.npy").write_bytes(bytes(data))
    with pytest.raises(RehearsalFailure, match=r"latents\.npy differs from one process's"):
        rh.same_folder(folder, made["root"] / "latents")


@pytest.fixture(scope="module")
def trained(made):
    run, data = made["root"] / "run", made["root"] / "latents"
    config = TrainConfig(out=str(run), data=f"latents:{data}", steps=2, batch_size=4, hidden_size=16,
                         num_heads=2, log_every=1, device="cpu", progress=False)  # fmt: skip
    train(config)
    return run, data


def test_the_training_check_passes_on_a_run_and_catches_each_defect(trained, tmp_path):
    run, data = trained
    said = json.dumps({"step": 2, "world_size": 2, "rank_param_max_abs_diff": 0.0})
    rh.check_training(run, f"notice\n{said}\n", 2, data, processes=2)
    with pytest.raises(RehearsalFailure, match="the ranks' parameters differ"):
        rh.check_training(run, said.replace("0.0", "1e-07"), 2, data, processes=2)
    with pytest.raises(RehearsalFailure, match="expected world_size 2"):
        rh.check_training(run, said.replace('"world_size": 2', '"world_size": 1'), 2, data, processes=2)
    with pytest.raises(RehearsalFailure, match=r"checkpoint\.pt: step 2, expected 3"):
        rh.check_training(run, said, 3, data, processes=2)
    with pytest.raises(RehearsalFailure, match="data 'latents:"):
        rh.check_training(run, said, 2, tmp_path, processes=2)
    broken = shutil.copytree(run, tmp_path / "run")
    log = (broken / "log.jsonl").read_text().replace('"loss": ', '"loss": NaN, "was": ', 1)
    (broken / "log.jsonl").write_text(log)
    with pytest.raises(RehearsalFailure, match="a loss is not finite"):
        rh.check_training(broken, said, 2, data, processes=2)


def write_samples(out, made, count, **changes):
    """What sample.py writes for ``count`` samples decoded by the VAE, with ``changes`` to its arrays."""
    from diffusers import AutoencoderKL

    out.mkdir()
    meta = made["meta"]
    z = torch.randn(count, *meta["latent_shape"], generator=torch.Generator().manual_seed(0))
    vae = AutoencoderKL.from_pretrained(made["vae"]).eval()
    with torch.no_grad():
        images = vae.decode(z / meta["scaling_factor"]).sample.clamp(-1, 1)
    labels = np.arange(count) % meta["num_classes"]
    arrays = {"arr_0": pixels(images), "arr_1": labels, "labels": labels, "latents": z.numpy()}
    np.savez(out / "samples.npz", **{**arrays, **changes})
    summary = {"world_size": 2, "decoded_with": str(made["vae"])}
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "grid.png").write_bytes(b"")
    return arrays


def test_the_samples_check_passes_on_decoded_samples_and_catches_each_defect(made, tmp_path):
    arrays = write_samples(tmp_path / "good", made, 5)
    rh.check_samples(tmp_path / "good", 5, made["meta"], made["vae"], processes=2)
    with pytest.raises(RehearsalFailure, match=r"arr_0: \(5, 16, 16, 3\), expected \(4, 16, 16, 3\)"):
        rh.check_samples(tmp_path / "good", 4, made["meta"], made["vae"], processes=2)
    with pytest.raises(RehearsalFailure, match=r"summary\.json: world_size 2"):
        rh.check_samples(tmp_path / "good", 5, made["meta"], made["vae"], processes=1)
    nchw = arrays["arr_0"].transpose(0, 3, 1, 2)
    darker = arrays["arr_0"] // 2
    floats = arrays["arr_0"].astype(np.float32)
    cases = {
        "nchw": ({"arr_0": nchw}, r"arr_0: \(5, 3, 16, 16\)"),
        "floats": ({"arr_0": floats}, "arr_0: float32, expected uint8"),
        "other": ({"arr_0": darker}, "arr_0 is not the VAE's decoding of the latents"),
        "labels": ({"labels": np.zeros(5, np.int64)}, "labels: .* expected"),
        "adm": ({"arr_1": arrays["arr_1"][::-1]}, "arr_1: .* expected"),
    }
    for name, (changes, message) in cases.items():
        write_samples(tmp_path / name, made, 5, **changes)
        with pytest.raises(RehearsalFailure, match=message):
            rh.check_samples(tmp_path / name, 5, made["meta"], made["vae"], processes=2)
    (tmp_path / "good" / "sample.lock").touch()  # a sampler that did not clean up
    with pytest.raises(RehearsalFailure, match=r"sample\.lock"):
        rh.check_samples(tmp_path / "good", 5, made["meta"], made["vae"], processes=2)


def test_the_scores_check_wants_every_score_finite_and_the_counts_right(tmp_path):
    scores = {"fid": 3.0, "sfid": 4.0, "inception_score": 1.5, "precision": 0.5, "recall": 0.25}
    scores |= {"kid_mean": 0.1, "kid_std": 0.01, "num_images": 10, "num_real": 21, "feature_dim": 2048}
    scores |= {"extractor": "fid-inception-v3"}
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(scores))
    assert rh.check_scores(path, 10, 21) == scores
    with pytest.raises(RehearsalFailure, match=r"images, real, features \(10, 21, 2048\)"):
        rh.check_scores(path, 10, 24)  # the hidden images counted as real ones
    for change, message in [
        ({"fid": float("nan")}, r"\['fid'\] not finite"),
        ({"sfid": None}, r"has no \['sfid'\]"),
        ({"recall": 1.5}, "precision/recall"),
        ({"inception_score": 0.5}, "Inception Score 0.5"),
        ({"extractor": "digits-classifier"}, "extractor digits-classifier"),
    ]:
        path.write_text(json.dumps({**scores, **change}))
        with pytest.raises(RehearsalFailure, match=message):
            rh.check_scores(path, 10, 21)


def test_flags_spell_a_command_line():
    assert rh.flags("CK", num_samples=4, no_progress=True) == ["CK", "--num-samples", "4", "--no-progress"]


def test_keep_refuses_a_folder_that_holds_files(tmp_path, capsys):
    (tmp_path / "x").touch()
    with pytest.raises(SystemExit) as stopped:
        rh.main(["--keep", str(tmp_path)])
    assert stopped.value.code == 2 and "exists and is not an empty folder" in capsys.readouterr().err


SLEEPER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(120)
"""


def gone(pid: int, seconds: float = 10.0) -> bool:
    """Whether process ``pid`` has ended (a zombie awaiting its reaper counts as ended) within ``seconds``."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def test_a_stage_past_its_time_is_stopped_with_every_process_it_started(tmp_path, monkeypatch):
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    (tmp_path / "logs").mkdir()
    monkeypatch.setattr(rh, "EXAMPLE_DIR", tmp_path)
    monkeypatch.setattr(rh, "STAGE_TIMEOUT", 5)
    with pytest.raises(RehearsalFailure, match=r"sleepy: no result after 5 s of\n  python .*sleeper\.py"):
        rh.launch("sleeper.py", [str(tmp_path / "pid")], 1, tmp_path / "logs", "sleepy")
    assert gone(int((tmp_path / "pid").read_text()))  # the grandchild too, not only the script


def test_a_stage_that_fails_shows_its_command_and_the_end_of_its_output(tmp_path, monkeypatch):
    (tmp_path / "failing.py").write_text("import sys\nprint('the reason', file=sys.stderr)\nsys.exit(3)\n")
    (tmp_path / "logs").mkdir()
    monkeypatch.setattr(rh, "EXAMPLE_DIR", tmp_path)
    with pytest.raises(RehearsalFailure, match=r"broken: exit status 3 of\n.*failing\.py\n.*\nthe reason"):
        rh.launch("failing.py", [], 1, tmp_path / "logs", "broken")
    assert (tmp_path / "logs" / "broken.err").read_text() == "the reason\n"
