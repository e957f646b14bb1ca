"""``segan compare`` on a real SQLite store: best metric per run, mean ± std per group, formats, plot.

The store holds two methods x two seeds, a FAILED run with the highest Dice, a run that
never logged a metric, a sweep parent, and a second experiment. A second store holds real
trainings that stopped for every reason (epochs, time budget, diverged, killed).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, tiny_sweep_workspace
from segan import tracking
from segan.config import Config, to_dict
from segan.errors import UserError

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
SEGAN_2D = Path(__file__).resolve().parents[1] / "configs" / "segan_2d.yaml"

# (method, seed, status, val_dice_mean per epoch)
RUNS = [
    ("segan", 0, "FINISHED", [0.5, 0.7, 0.6]),
    ("segan", 1, "FINISHED", [0.6, 0.8, 0.75]),
    ("bce", 0, "FINISHED", [0.4, 0.6]),
    ("bce", 1, "FINISHED", [0.3, 0.5, 0.45]),
    ("lsgan", 0, "FAILED", [0.9]),
    ("supervised", 0, "FINISHED", []),
]


def _log_run(uri: str, experiment: str, method: str, seed: int, status: str, dice: list[float],
             parent: str | None = None) -> str:
    cfg = Config()
    cfg.seed, cfg.method.name, cfg.train.epochs = seed, method, 3
    tr = tracking.RunTracker.start(to_dict(cfg), tracking_uri=uri, experiment=experiment,
                                   run_name=f"{method}-seed{seed}", tags={"method": method}, parent_run_id=parent)
    for epoch, value in enumerate(dice):
        tr.log_metrics({"val_dice_mean": value, "val_dice_whole": value + 0.05, "loss_seg": 1 - value,
                        "val_hd95_whole": 10 * (1 - value), "lr": 1e-3 / (epoch + 1)}, step=epoch)
    tr.finish(status)
    return tr.run_id


@pytest.fixture(scope="module")
def db_template(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store, created once: creating one runs ~5 s of schema migrations."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    tracking.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, db_template) -> dict:
    root = tmp_path_factory.mktemp("compare_store")
    shutil.copyfile(db_template, root / "mlflow.db")
    uri = f"sqlite:///{root}/mlflow.db"
    for method, seed, status, dice in RUNS:
        _log_run(uri, "cmp", method, seed, status, dice)
    sweep = tracking.RunTracker.start({}, tracking_uri=uri, experiment="cmp", run_name="sweep-x",
                                      tags={tracking.SWEEP_ROLE_TAG: "sweep"})
    child = _log_run(uri, "cmp", "segan", 7, "FINISHED", [0.55], parent=sweep.run_id)
    sweep.finish("FINISHED")
    _log_run(uri, "other", "segan", 0, "FINISHED", [0.2])
    return {"uri": uri, "root": root, "sweep": sweep.run_id, "child": child}


def test_json_lists_every_run_with_best_metrics(store):
    proc = run_cli("compare", "-e", "cmp", "--format", "json", "--tracking-uri", store["uri"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    runs = json.loads(proc.stdout)
    assert len(runs) == len(RUNS) + 1  # the sweep child, not the sweep parent
    for r in runs:
        assert {"run_id", "run_name", "method", "status", "metrics"} <= set(r)
    assert [r["run_name"] for r in runs] == ["lsgan-seed0", "segan-seed1", "segan-seed0", "bce-seed0",
                                             "segan-seed7", "bce-seed1", "supervised-seed0"]
    by_name = {r["run_name"]: r for r in runs}
    best = by_name["segan-seed1"]["metrics"]
    assert best["val_dice_mean"] == pytest.approx(0.8)  # max over epochs, not the last value
    assert best["val_dice_whole"] == pytest.approx(0.85)
    assert best["loss_seg"] == pytest.approx(0.2) and best["val_hd95_whole"] == pytest.approx(2.0)  # minima
    assert best["lr"] == pytest.approx(1e-3 / 3)  # neither: the last value
    assert by_name["lsgan-seed0"]["status"] == "FAILED"
    assert by_name["supervised-seed0"]["metrics"] == {} and by_name["supervised-seed0"]["method"] == "supervised"
    assert by_name["segan-seed0"]["params"]["seed"] == "0"


def test_table_has_runs_then_mean_and_std_per_method(store):
    text = tracking.run_compare(["cmp"], metric="val_dice_mean", group_by="method", fmt="table",
                                plot=None, tracking_uri=store["uri"])
    lines = text.splitlines()
    assert lines[2].split()[:3] == ["run_id", "run_name", "method"]
    assert lines[4].split()[1] == "lsgan-seed0" and lines[4].split()[-1] == "FAILED"
    groups = text[text.index("Mean ± std per method"):].split("\n\n")[1]  # header, rule, one row per group
    rows = {line.split()[0]: line for line in groups.splitlines()[2:]}
    # segan: best 0.7, 0.8, 0.55 -> mean 0.6833, sample std 0.1258; bce: 0.6, 0.5 -> 0.55 ± 0.0707
    assert "0.6833 ± 0.1258" in rows["segan"] and rows["segan"].split()[1] == "3"
    assert "0.5500 ± 0.0707" in rows["bce"]
    assert "lsgan" not in rows  # FAILED runs are listed, not averaged
    assert rows["supervised"].split()[2] == "-"
    assert list(rows)[:2] == ["segan", "bce"]
    assert "not FINISHED are listed above but not averaged" in text


def test_markdown_csv_and_plot(store, tmp_path):
    md = tracking.run_compare(["cmp"], "val_dice_mean", "method", "markdown", None, store["uri"])
    assert "| run_id | run_name | method |" in md and "|---|" in md
    text = tracking.run_compare(["cmp"], "loss_seg", "method", "csv", None, store["uri"])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(RUNS) + 1 and rows[0]["run_name"] == "lsgan-seed0"  # lowest loss first
    assert float(rows[0]["loss_seg"]) == pytest.approx(0.1) and rows[-1]["loss_seg"] == ""
    plot = tmp_path / "cmp.png"
    out = tracking.run_compare(["cmp"], "val_dice_mean", "method", "table", plot, store["uri"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert f"plot written to {plot}" in out


def test_all_experiments_and_one_sweep(store):
    runs = json.loads(tracking.run_compare([], "val_dice_mean", "method", "json", None, store["uri"]))
    assert {r["experiment"] for r in runs} == {"cmp", "other"}  # the empty Default is left out
    only = json.loads(tracking.run_compare(["cmp"], "val_dice_mean", "method", "json", None, store["uri"],
                                           parent_run_id=store["sweep"]))
    assert [r["run_id"] for r in only] == [store["child"]]
    by_status = tracking.run_compare(["cmp"], "val_dice_mean", "status", "table", None, store["uri"])
    assert "Mean ± std per method and status" in by_status


def test_user_errors_are_one_line(store, tmp_path):
    proc = run_cli("compare", "-e", "nope", "-e", "cmp", "--tracking-uri", store["uri"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: experiment 'nope' not found in {store['uri']}; existing experiments: Default, cmp, other"]
    with pytest.raises(UserError, match="metric 'val_dice' is not logged by any run.*val_dice_mean"):
        tracking.run_compare(["cmp"], "val_dice", "method", "table", None, store["uri"])
    with pytest.raises(UserError, match="no MLflow store at"):
        tracking.run_compare([], "val_dice_mean", "method", "table", None, f"sqlite:///{tmp_path}/none.db")
    assert not (tmp_path / "none.db").exists()


def test_filter_keeps_matching_runs_and_says_how_many_it_left_out(store):
    text = tracking.run_compare(["cmp"], "val_dice_mean", "method", "table", None, store["uri"],
                                filter_string="params.seed = '1'")
    table = text.split("\n\n")[1].splitlines()[2:]
    assert sorted(line.split()[1] for line in table) == ["bce-seed1", "segan-seed1"]
    assert text.endswith("5 other run(s) in cmp do not match --filter \"params.seed = '1'\" and are not shown; "
                         "`segan compare -e cmp` lists every run")
    # what `make demo` does: only the runs started since the demo began
    later = tracking.run_compare(["cmp"], "val_dice_mean", "method", "table", None, store["uri"],
                                 filter_string="attributes.start_time >= 99999999999999")
    assert later.startswith("no runs in cmp match --filter") and "7 other run(s) in cmp" in later
    with pytest.raises(UserError, match="--filter 'seed is one': not an MLflow search filter"):
        tracking.run_compare(["cmp"], "val_dice_mean", "method", "table", None, store["uri"],
                             filter_string="seed is one")


# ------------------------------------------------------------------------------- sweeps
def test_sweep_input_errors():
    from segan.sweep import child_overrides, parse_seeds, run_sweep

    with pytest.raises(UserError, match="unknown method segn \\(did you mean 'segan'\\?\\); allowed: .*bce"):
        run_sweep(str(SMOKE), methods="segn,bce", seeds="0", overrides=[], tracking_uri=None)
    with pytest.raises(UserError, match="unknown method xyz, qq; allowed: .*segan"):
        run_sweep(str(SMOKE), methods="segan,xyz,qq", seeds="0", overrides=[], tracking_uri=None)
    with pytest.raises(UserError, match="'x' is not an integer"):
        parse_seeds("0,x")
    # A baseline swept from a SegAN config gets the baseline's family: its critic, no clamp;
    # the user's --set still wins.
    from segan.config_layers import resolve_config

    sets = child_overrides(1, "/d.json", "bce-seed1", ["method.w_adv=0.2"])
    assert sets[-1] == "method.w_adv=0.2"
    child = resolve_config(SEGAN_2D, sets, method="bce").config
    assert (child.method.name, child.model.critic, child.method.clamp, child.method.w_adv) == ("bce", "patchgan",
                                                                                               None, 0.2)
    same = resolve_config(SEGAN_2D, child_overrides(0, "/d.json", "n", []), method="segan").config
    assert (same.model.critic, same.method.clamp, same.seed) == ("segan", 0.05, 0)


def test_sweep_trains_children_under_one_parent_then_compares(tmp_path, db_template, monkeypatch, capsys):
    from data_prep.phantoms import generate
    from segan.sweep import run_sweep

    # In-process (the CLI wiring is click's; `segan compare` is run as a real process above).
    # Four real trainings: 32^3 phantoms and a 2-level U-Net keep each to a few seconds.
    generate(tmp_path / "phantoms", cases=4, size=32, seed=0, test_fraction=0.25)
    uri, sets = tiny_sweep_workspace(tmp_path, db_template, monkeypatch, "sweep-test")
    assert run_sweep(str(SMOKE), methods="segan,supervised", seeds="0,1", overrides=sets, tracking_uri=None) == 0
    out = capsys.readouterr().out
    groups = out[out.index("Mean ± std per method"):].split("\n\n")[1].splitlines()[2:]
    assert sorted(line.split()[:2] for line in groups) == [["segan", "2"], ["supervised", "2"]]

    client = tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(tracking.SWEEP_ROLE_TAG) == "sweep"]
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert {(r.data.tags["method"], r.data.params["seed"]) for r in children} == {
        ("segan", "0"), ("segan", "1"), ("supervised", "0"), ("supervised", "1")}
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "val_dice_mean" in r.data.metrics
    # The same split, epochs and segmentor for every child.
    for key in ("data.datalist", "train.epochs", "model.channels", "model.segmentor"):
        assert len({r.data.params[key] for r in children}) == 1, key
    split = children[0].data.params["data.datalist"]
    assert split.startswith(str(tmp_path / "outputs" / "sweep-test")) and split.endswith("datalist.json")
    assert (tmp_path / "outputs" / "sweep-test" / parent.info.run_name / "compare.png").is_file()


# ------------------------------------------------------------------ what was actually trained
TINY = ["train.steps_per_epoch=2", "train.batch_size=2", "train.val_max_cases=1", "train.progress=false",
        "data.patch_size=[32, 32]", "model.channels=[4, 8]", "model.strides=[2]", "model.critic_channels=[4, 8]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, db_template, phantoms_small) -> dict:
    """Real trainings into one SQLite store: two SegAN runs (one finishes its 2 epochs, one stops
    on the clock after 1 of 50), a supervised run that finishes, a BCE run that diverges, a
    supervised run killed by SIGTERM (a real `segan train` process), and one older-style run
    that recorded nothing about its training."""
    from segan.config import load_config
    from segan.train_run import run_training

    root = tmp_path_factory.mktemp("trained")
    shutil.copyfile(db_template, root / "mlflow.db")
    uri = f"sqlite:///{root}/mlflow.db"
    common = [f"data.root={phantoms_small}", f"preprocess.cache_dir={root / 'cache'}", "experiment=trained",
              f"tracking.uri={uri}", *TINY]
    plans = {"segan-done": ["method.name=segan", "train.epochs=2"],
             "segan-clock": ["method.name=segan", "seed=1", "train.epochs=50", "train.max_minutes=0.0001"],
             "supervised-done": ["method.name=supervised", "train.epochs=2"],
             "bce-diverged": ["method.name=bce", "train.epochs=2", "optim.lr=1e30", "optim.critic_lr=1e30",
                              "method.adv_warmup_epochs=0", "method.adv_ramp_epochs=0"]}
    results = {}
    for name, sets in plans.items():
        cfg = load_config(SMOKE, [*common, *sets, f"run_name={name}"])
        results[name] = run_training(cfg, out_dir=root / name)
    assert [results[n].exit_code for n in plans] == [0, 0, 0, 3]

    killed = subprocess.Popen([sys.executable, "-m", "segan", "train", "-c", str(SMOKE), "--out", str(root / "k"),
                               *(a for s in [*common, "method.name=supervised", "train.epochs=50",
                                             "run_name=supervised-killed"] for a in ("--set", s))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(SMOKE.parents[1])})
    deadline = time.monotonic() + 240
    while not (root / "k" / "last.pt").exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGTERM)
    out, err = killed.communicate(timeout=120)
    assert killed.returncode == 130, err
    _log_run(uri, "trained", "lsgan", 0, "FINISHED", [0.3])  # no stop reason, no epochs done
    return {"uri": uri, "results": results}


@pytest.mark.slow
def test_json_and_csv_show_what_each_run_trained(trained):
    runs = {r["run_name"]: r for r in json.loads(
        tracking.run_compare(["trained"], "val_dice_mean", "method", "json", None, trained["uri"]))}
    assert set(runs) == {"segan-done", "segan-clock", "supervised-done", "bce-diverged", "supervised-killed",
                         "lsgan-seed0"}
    got = {name: (r["status"], r["stop_reason"], r["epochs_done"], r["steps_done"]) for name, r in runs.items()}
    assert got["segan-done"] == ("FINISHED", "epochs", 2, 4)
    assert got["supervised-done"] == ("FINISHED", "epochs", 2, 4)
    assert got["segan-clock"] == ("FINISHED", "time budget", 1, 2)  # 1 of 50 configured epochs
    assert got["bce-diverged"][:3] == ("FAILED", "diverged", 0)  # the NaN shows at the first loss fetch
    assert got["supervised-killed"][:2] == ("KILLED", "killed") and got["supervised-killed"][2] >= 1
    assert got["supervised-killed"][3] >= 2 * got["supervised-killed"][2]
    assert got["lsgan-seed0"] == ("FINISHED", None, None, None) and runs["lsgan-seed0"]["train_seconds"] is None
    for name in ("segan-done", "segan-clock", "supervised-done", "bce-diverged", "supervised-killed"):
        seconds = runs[name]["train_seconds"]
        assert 0 < seconds < runs[name]["duration_s"], name  # fit() only, within the run's wall time
        assert "epochs_done" not in runs[name]["metrics"] and "train_seconds" not in runs[name]["metrics"]
    assert runs["segan-clock"]["params"]["train.epochs"] == "50"

    rows = {r["run_name"]: r for r in csv.DictReader(io.StringIO(
        tracking.run_compare(["trained"], "val_dice_mean", "method", "csv", None, trained["uri"])))}
    assert (rows["segan-clock"]["stop_reason"], rows["segan-clock"]["epochs_done"],
            rows["segan-clock"]["steps_done"]) == ("time budget", "1", "2")
    assert float(rows["segan-clock"]["train_seconds"]) == pytest.approx(runs["segan-clock"]["train_seconds"], abs=0.1)
    assert rows["lsgan-seed0"]["stop_reason"] == rows["lsgan-seed0"]["train_seconds"] == ""


def _table(text: str, title: str) -> dict[str, dict[str, str]]:
    """The markdown table after ``title``: first column -> {header: cell}."""
    block = text[text.index(title):].split("\n\n")[1].splitlines()
    header = [c.strip() for c in block[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in block[2:])}


@pytest.mark.slow
def test_table_marks_runs_that_stopped_for_different_reasons(trained):
    md = tracking.run_compare(["trained"], "val_dice_mean", "method", "markdown", None, trained["uri"])
    runs = {r["run_name"]: r for r in _table(md, "Runs in trained").values()}
    assert (runs["segan-clock"]["epochs"], runs["segan-clock"]["steps"], runs["segan-clock"]["stopped"]) == (
        "1/50", "2", "time budget")
    assert (runs["segan-done"]["epochs"], runs["segan-done"]["stopped"]) == ("2/2", "epochs")
    assert runs["bce-diverged"]["stopped"] == "diverged" and runs["supervised-killed"]["stopped"] == "killed"
    assert (runs["lsgan-seed0"]["epochs"], runs["lsgan-seed0"]["steps"], runs["lsgan-seed0"]["stopped"],
            runs["lsgan-seed0"]["train time"]) == ("-/3", "-", "-", "-")  # recorded nothing: still listed
    assert runs["segan-clock"]["train time"].endswith("s") and runs["segan-clock"]["train time"] != "-"

    groups = _table(md, "Mean ± std per method")
    assert groups["segan"]["runs"] == "2" and groups["segan"]["stopped"] == "mixed (epochs: 1, time budget: 1)"
    assert groups["supervised"]["stopped"] == "epochs"  # the killed run is listed, not averaged
    assert groups["lsgan"]["stopped"] == "-"
    (note,) = [line for line in md.splitlines() if line.startswith("note:")]
    assert note.startswith("note: runs stopped for different reasons (diverged: bce-diverged; epochs: ")
    assert "time budget: segan-clock" in note and "killed: supervised-killed" in note
    assert "they were not trained alike" in note

    table = tracking.run_compare(["trained"], "val_dice_mean", "method", "table", None, trained["uri"])
    assert note in table.splitlines()


@pytest.mark.slow
def test_runs_that_stopped_alike_carry_no_note(trained):
    proc = run_cli("compare", "-e", "trained", "--group-by", "status", "--tracking-uri", trained["uri"])
    assert proc.returncode == 0, proc.stderr
    assert "note: runs stopped for different reasons" in proc.stdout  # the whole table still differs
    from segan.tracking.compare import stop_reason_note, stopped_summary

    rows = tracking.collect_runs(["trained"], "val_dice_mean", tracking_uri=trained["uri"])
    alike = [r for r in rows if r.run_name in ("segan-done", "supervised-done")]
    assert stop_reason_note(alike) == "" and stopped_summary(alike) == "epochs"
    assert stopped_summary([r for r in rows if r.run_name == "lsgan-seed0"]) == "-"
