"""Checkpoints that are not what they claim: one line (exit status 2) naming the checkpoint and what does
not match, for sample.py, train.py --resume and the loader sweep.py uses; and what a resumed run
remembers of the checkpoint it restored."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fpdm import generation as sample_cli
from fpdm import training as train
from fpdm.cli import OneLineParser, run_command
from fpdm.files import FileKindError
from fpdm.training import CHECKPOINT_NAME, load_checkpoint
from test_command_lines import TINY, exit_status  # the same tiny model and exit-status reader

EXIT_USAGE, EXIT_WRITE = 2, 3


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished two-step FPDM run (hidden size 16), checkpointed at steps 1 and 2."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    argv = ["--out", str(out), *TINY, "--steps", "2", "--ckpt-every", "1", "--grad", "jfb"]
    assert train.main(argv) == 0
    return out


def with_config(run_dir: Path, folder: Path, **changes) -> Path:
    """A copy of the run whose checkpoint's config says something else about the same weights."""
    shutil.copytree(run_dir, folder)
    path = folder / CHECKPOINT_NAME
    ckpt = load_checkpoint(path)
    ckpt["config"] = {**ckpt["config"], **changes}
    torch.save(ckpt, path)
    return path


# A config that is not the weights', FPDM weights under a DiT's name, a preset this version does not know.
MISFITS = {
    "another-size": (
        {"hidden_size": 32},
        "its weights do not fit its config (FPDM-Digits/2 --hidden-size 32 --num-heads 2): ",
    ),
    "fpdm-as-dit": (
        {"model": "DiT-Digits/2", "grad": "sjfb", "pre_depth": None, "post_depth": None},
        "its config names DiT-Digits/2 but its weights are an FPDM's",
    ),
    "unknown-preset": ({"model": "FPDM-B/4"}, "model must be one of"),
}


@pytest.mark.parametrize("case", MISFITS)
def test_sample_refuses_a_checkpoint_whose_config_does_not_fit_its_weights(run_dir, tmp_path, case, capsys):
    changes, message = MISFITS[case]
    path = with_config(run_dir, tmp_path / "run", **changes)
    argv = [str(path), "--budget", "8", "--num", "2", "--out", str(tmp_path / "s"), "--no-progress"]
    status, err = exit_status(sample_cli.main, argv, capsys)
    assert status == EXIT_USAGE and one_line(err) and f"{path}: " in err and message in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("case", MISFITS)
def test_resume_refuses_a_checkpoint_whose_config_does_not_fit_its_weights(run_dir, tmp_path, case, capsys):
    changes, message = MISFITS[case]
    path = with_config(run_dir, tmp_path / "run", **changes)
    before = path.read_bytes()
    # The request is the checkpoint's own config, so that only the misfit stands in the way.
    request = {
        "another-size": ["--grad", "jfb", "--hidden-size", "32"],
        "fpdm-as-dit": ["--model", "DiT-Digits/2"],
    }
    argv = [
        "--out",
        str(path.parent),
        *TINY,
        "--steps",
        "3",
        "--resume",
        *request.get(case, ["--grad", "jfb"]),
    ]
    status, err = exit_status(train.main, argv, capsys)
    last = err.strip().splitlines()[-1]  # after the notice of the settings a resume changes (--steps)
    assert status == EXIT_USAGE and "Traceback" not in err and ": error: " in last
    assert f"{path}: " in last and message in last
    assert path.read_bytes() == before and not (path.parent / "train.lock").exists()


def test_the_loader_of_sweep_names_the_checkpoint_and_its_misfit_in_one_line(run_dir, tmp_path):
    path = with_config(run_dir, tmp_path / "run", hidden_size=32)
    with pytest.raises(FileKindError, match="its weights do not fit its config") as error:
        sample_cli.load_model(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)

    def command() -> int:
        sample_cli.load_model(path)
        return 0

    with pytest.raises(SystemExit) as stop:  # every command line turns it into exit status 2
        run_command(OneLineParser(prog="sweep.py"), command)
    assert stop.value.code == EXIT_USAGE


def test_a_json_file_given_as_a_checkpoint_is_called_a_text_file_not_pickled_objects(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_text(json.dumps({"step": 1, "model": {}, "config": {}}))
    argv = [str(path), "--budget", "8", "--out", str(tmp_path / "s")]
    status, err = exit_status(sample_cli.main, argv, capsys)
    assert status == EXIT_USAGE and one_line(err)
    assert f"{path}: is a text file, not a torch.save file" in err and "pickled" not in err
    argv = ["--out", str(tmp_path), *TINY, "--steps", "2", "--resume"]  # the same in a run folder
    status, err = exit_status(train.main, argv, capsys)
    assert status == EXIT_USAGE and one_line(err) and "is a text file, not a torch.save file" in err


def test_a_resumed_run_remembers_the_step_of_the_checkpoint_it_restored(
    run_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)  # its checkpoint is at step 2

    def full_disk(obj, handle, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    argv = ["--out", str(out), *TINY, "--steps", "4", "--ckpt-every", "2", "--grad", "jfb", "--resume"]
    status, err = exit_status(train.main, argv, capsys)
    last = err.strip().splitlines()[-1]  # after the notice of the settings a resume changes (--steps)
    assert status == EXIT_WRITE and "Traceback" not in err
    assert last.endswith(
        f"could not write the checkpoint of step 4 (No space left on device); {out / CHECKPOINT_NAME} "
        "(step 2) is kept"
    )
