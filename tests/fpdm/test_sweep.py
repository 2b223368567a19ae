"""sweep.py --quick end to end: the outputs' structure, the budgets, the matched training compute."""

import dataclasses
import json
import math
import shutil
import time

import pytest
from fpdm import sweep_stats
from fpdm import sweeping as sweep
from fpdm.cli import UsageError
from fpdm.training import TrainConfig, load_checkpoint


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    start = time.perf_counter()
    assert (
        sweep.main(["--quick", "--out", str(out / "results"), "--work", str(out / "work"), "--threads", "1"])
        == 0
    )
    return out, time.perf_counter() - start


def test_quick_sweep_runs_in_under_a_minute_and_writes_the_three_files(quick):
    out, wall_s = quick
    assert wall_s < 60
    for name in ("sweep.json", "sweep.md", "sweep.png", "grids.png"):
        assert (out / "results" / name).stat().st_size > 0
    for name in ("sweep.png", "grids.png"):
        assert (out / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(training included)" in (out / "results" / "sweep.md").read_text()


def test_every_method_and_budget_is_scored_over_every_seed_within_its_budget(quick):
    out, _ = quick
    report = json.loads((out / "results" / "sweep.json").read_text())
    budgets, seeds = report["config"]["budgets"], report["config"]["seeds"]
    assert budgets == [5, 12] and seeds == 2 and report["config"]["dit_depths"] == [5, 6]
    methods = sweep.methods([5, 6])
    assert [m.name for m in methods[:2]] == ["DiT-5", "DiT-6"]
    rows = report["results"]
    assert [(r["name"], r["budget"]) for r in rows] == [(m.name, b) for m in methods for b in budgets]
    by = {(r["name"], r["budget"]): r for r in rows}
    # A budget below a DiT's depth buys no timestep: reported as such, not sampled.
    assert by[("DiT-6", 5)]["affordable"] is False and by[("DiT-6", 5)]["per_seed"] == []
    assert "| DiT-6 | — |" in (out / "results" / "sweep.md").read_text()
    for row in (r for r in rows if r["affordable"]):
        assert len(row["per_seed"]) == seeds
        assert all(1 <= s["spent"] <= row["budget"] for s in row["per_seed"])
        assert row["spent_max"] <= row["budget"]
        fds = [s["fd"] for s in row["per_seed"]]
        assert math.isclose(row["fd_mean"], sum(fds) / seeds) and row["fd_std"] >= 0
        for metric in sweep_stats.METRICS:
            assert all(math.isfinite(s[metric]) for s in row["per_seed"])
            assert math.isclose(row[metric + "_mean"], sum(s[metric] for s in row["per_seed"]) / seeds)
        assert all(0 <= s["agreement"] <= 1 and s["fd_pixels"] >= 0 for s in row["per_seed"])
    # DiT: budget // depth timesteps of depth blocks; FPDM plain: the first DiT's timesteps; smoothing: more.
    assert by[("DiT-5", 12)]["steps"] == 2 and by[("DiT-5", 12)]["spent_max"] == 10
    assert by[("DiT-6", 12)]["steps"] == 2 and by[("DiT-6", 12)]["spent_max"] == 12
    assert by[("FPDM plain", 12)]["steps"] == 2 and by[("FPDM plain", 12)]["spent_max"] == 12
    assert by[("FPDM smoothing", 12)]["steps"] == 3
    assert by[("FPDM 1 iteration/step+reuse", 12)]["steps"] == 4  # 12 // (pre + post + 1)
    assert by[("FPDM reuse, Anderson", 12)]["solver"] == "anderson"
    assert by[("FPDM reuse, Anderson", 12)]["steps"] == by[("FPDM reuse", 12)]["steps"] == 2
    assert by[("FPDM plain", 12)]["reuse"] is False and by[("FPDM reuse", 12)]["reuse"] is True
    assert by[("FPDM smoothing+reuse, Anderson", 5)]["solver"] == "anderson"
    assert by[("FPDM tolerance", 12)]["schedule"] == "tolerance"


def test_training_compute_is_matched_and_parameters_reported(quick):
    out, _ = quick
    report = json.loads((out / "results" / "sweep.json").read_text())
    training = report["training"]
    assert sorted(training) == ["dit5", "dit6", "fpdm"]
    fpdm = training["fpdm"]
    assert fpdm["block_passes"] == fpdm["forward_block_passes"] + 2 * fpdm["backward_block_passes"]
    markdown = (out / "results" / "sweep.md").read_text()
    assert f"{fpdm['parameters'] / 1e6:.3f} M" in markdown
    for name in ("dit5", "dit6"):
        dit = training[name]
        assert dit["block_passes"] == 3 * dit["depth"] * dit["steps"]
        # Each DiT's steps are the nearest to FPDM's compute: within half a DiT step of it.
        assert abs(dit["block_passes"] - fpdm["block_passes"]) <= 3 * dit["depth"] / 2
        assert dit["parameters"] > 0 and dit["parameters"] != fpdm["parameters"]
        assert f"{dit['parameters'] / 1e6:.3f} M" in markdown
    assert training["dit6"]["parameters"] > training["dit5"]["parameters"]
    for method in sweep.methods([5, 6]):
        assert f"| {method.name} |" in markdown


def test_training_compute_counts_the_estimators_evaluations_from_the_log(tmp_path):
    cfg = TrainConfig(steps=3, seed=5, sjfb_no_grad=(0, 6), sjfb_grad=(1, 3), max_iter=8)
    draws = [(4, 1), (0, 3), (6, 2)]  # per step: no-grad (solver) and differentiable (estimator) evaluations
    log = tmp_path / "log.jsonl"

    def write(records):
        log.write_text("".join(json.dumps(r) + "\n" for r in records))

    write(
        {"step": i + 1, "block_evals": 2 + a + b, "nfe": a, "grad_evals": b} for i, (a, b) in enumerate(draws)
    )
    compute = sweep.training_compute(log, cfg, pre_post=2)
    assert compute["forward"] == sum(2 + a + b for a, b in draws)
    assert compute["backward"] == sum(2 + b for _, b in draws)
    assert compute["passes"] == compute["forward"] + 2 * compute["backward"]
    # Counts that do not add up are refused.
    write({"step": i + 1, "block_evals": 2, "nfe": a, "grad_evals": b} for i, (a, b) in enumerate(draws))
    with pytest.raises(ValueError, match="implicit evaluations"):
        sweep.training_compute(log, cfg, pre_post=2)
    # A log written before the estimator's evaluations were recorded is refused, saying so.
    write({"step": i + 1, "block_evals": 2 + a + b} for i, (a, b) in enumerate(draws))
    with pytest.raises(ValueError, match="older train"):
        sweep.training_compute(log, cfg, pre_post=2)
    write([{"step": 2, "block_evals": 5}])
    with pytest.raises(ValueError, match="one record"):
        sweep.training_compute(log, cfg, pre_post=2)


def test_reuse_checkpoints_skips_training_only_for_the_same_configuration(quick, tmp_path, capsys):
    out, _ = quick
    work = tmp_path / "work"
    shutil.copytree(out / "work", work)
    args = sweep.parse_args(["--quick", "--work", str(work)])
    cfg = sweep._train_config(args, "fpdm", args.fpdm_steps, work)
    log = work / "fpdm" / "log.jsonl"
    before = log.read_text()
    wall_s, last, reused = sweep._train_or_reuse(cfg, reuse=True)
    assert reused and log.read_text() == before and last["step"] == cfg.steps and wall_s > 0
    changed = dataclasses.replace(cfg, lr=cfg.lr / 2)
    # Another configuration is not trained over without --overwrite; the error names the field.
    with pytest.raises(UsageError, match=r"--lr 0\.001 -> 0\.0005.*--overwrite"):
        sweep._train_or_reuse(changed, reuse=True)
    assert log.read_text() == before
    # Without --reuse-checkpoints, a run in --work is not trained over either.
    with pytest.raises(UsageError, match=r"holds a run of an earlier sweep.*--reuse-checkpoints"):
        sweep._train_or_reuse(cfg, reuse=False)
    assert log.read_text() == before
    assert sweep._train_or_reuse(changed, reuse=True, overwrite=True)[2] is False
    assert "another configuration" in capsys.readouterr().out
    assert load_checkpoint(work / "fpdm" / "checkpoint.pt")["config"]["lr"] == cfg.lr / 2


def test_paired_differences_are_taken_seed_by_seed(quick):
    out, _ = quick
    report = json.loads((out / "results" / "sweep.json").read_text())
    by = {(r["name"], r["budget"]): r for r in report["results"]}
    paired = {item["label"]: item for item in report["paired_differences"]["fd"]}
    assert set(paired) == {label for label, _, _ in sweep_stats.comparisons([5, 6])}
    item = paired["smoothing"]
    for budget in (5, 12):
        method, baseline = by[(item["method"], budget)], by[(item["baseline"], budget)]
        diffs = [a["fd"] - b["fd"] for a, b in zip(method["per_seed"], baseline["per_seed"], strict=True)]
        mean, std = item["cells"][str(budget)]
        assert math.isclose(mean, sum(diffs) / len(diffs)) and std >= 0
    # DiT-6 cannot pay for a timestep at budget 5, so its comparison has no cell there.
    assert paired["FPDM smoothing+reuse vs DiT-6"]["cells"]["5"] is None
    assert "Paired differences" in (out / "results" / "sweep.md").read_text()
