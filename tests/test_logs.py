"""Logs that fit batch jobs: with stderr redirected to a file (SLURM, CI, ``> log``), training
writes one line per epoch and prediction one line per case, with no ``\\r`` redraws; MLflow's
INFO lines show only with ``-v``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from segan.progress import Progress, format_seconds

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "train.threads=1", "--set", "train.steps_per_epoch=2", "--set", "train.val_max_cases=1",
        "--set", "train.progress=true"]


def run_logged(args: list[str], cwd: Path, log: Path) -> tuple[int, str]:
    """``python -m segan ARGS`` with stderr written to the file ``log`` (not a terminal)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    env.pop("MLFLOW_LOGGING_LEVEL", None)
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "segan", *args], stdout=subprocess.DEVNULL, stderr=fh,
                              cwd=cwd, env=env, timeout=300)
    return proc.returncode, log.read_text()


@pytest.fixture(scope="module")
def trained(phantoms_small, tmp_path_factory):
    """A 2-epoch smoke run in a fresh folder (a fresh SQLite store), stderr to a file."""
    work = tmp_path_factory.mktemp("logs")
    rc, text = run_logged(["train", "-c", REPO / "configs/smoke.yaml", "--set", f"data.root={phantoms_small}",
                           "--out", work / "run", *TINY], work, work / "train.log")
    assert rc == 0, text[-3000:]
    return work, text


def test_training_log_has_one_line_per_epoch(trained):
    _, text = trained
    assert "\r" not in text and "it/s" not in text  # no bar redraws
    epochs = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"], text
    assert "seg " in epochs[0] and "val_dice_mean " in epochs[0] and "ETA" in epochs[0]
    assert "ETA" not in epochs[-1] and epochs[-1].endswith(" s")
    assert "INFO" not in text and "alembic" not in text and "Creating initial MLflow" not in text, text


def test_verbose_shows_mlflow_info(phantoms_small, tmp_path):
    rc, text = run_logged(["-v", "train", "-c", REPO / "configs/smoke.yaml", "--set", f"data.root={phantoms_small}",
                           "--out", tmp_path / "run", "--set", "train.epochs=1", *TINY], tmp_path, tmp_path / "v.log")
    assert rc == 0, text[-3000:]
    assert "INFO mlflow" in text and "Creating initial MLflow database tables" in text, text
    assert "\r" not in text and sum(line.startswith("epoch ") for line in text.splitlines()) == 1


def test_predict_log_has_one_line_per_case(trained, phantoms_small):
    work, _ = trained
    images = sorted((phantoms_small / "imagesTs").glob("*.nii.gz"))
    assert images
    rc, text = run_logged(["predict", "-m", work / "run", "-i", phantoms_small / "imagesTs", "-o", work / "pred",
                           "--device", "cpu"], work, work / "predict.log")
    assert rc == 0, text[-3000:]
    assert "\r" not in text and "INFO" not in text, text
    cases = [line for line in text.splitlines() if line.startswith("predict ")]
    assert len(cases) == len(images), text
    assert cases[0].startswith(f"predict 1/{len(images)}: ") and " ok, " in cases[0], text


def test_progress_lines_in_a_file(tmp_path):
    """The helper itself: a file gets lines (where asked for), never a bar."""
    log = tmp_path / "p.log"
    with open(log, "w") as fh:
        with Progress(3, "case", stream=fh) as p:
            for i in range(3):
                p.done(f"c{i} ok", seconds=1.5)
        with Progress(5, "step", stream=fh, lines=False) as p:  # a terminal bar only: silent here
            p.update(5, {"loss": 1})
        Progress(2, "off", stream=fh, enabled=False).done("x")
    lines = log.read_text().splitlines()
    assert lines[0].startswith("case 1/3: c0 ok, 1.5 s, ETA ") and lines[2] == "case 3/3: c2 ok, 1.5 s", lines
    assert len(lines) == 3
    assert format_seconds(185) == "3 min 05 s" and format_seconds(7600) == "2 h 06 min"
