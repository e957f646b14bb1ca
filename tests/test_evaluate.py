"""`segan evaluate`: hand-computed Dice/IoU/HD95/precision/sensitivity, failures counted, region sources."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segan.errors import UserError
from segan.metrics import case_metrics, parse_regions, run_evaluate

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (10, 12, 8)
AFFINE = np.diag([1.5, 1.0, 2.0, 1.0])
WORST = float(np.linalg.norm([15.0, 12.0, 16.0]))  # the GT volume's diagonal in mm


def save(path: Path, labels: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), str(path))
    return path


def truth() -> np.ndarray:
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:4, 2:4, 2:4] = 1  # 8 voxels of label 1
    gt[4:6, 2:4, 2:4] = 2  # 8 voxels of label 2
    return gt


def partial() -> np.ndarray:
    """whole {1,2}: 20 predicted vs 16 true, 16 shared; core {2}: 12 predicted vs 8 true, 8 shared."""
    pred = np.zeros(SHAPE, np.uint8)
    pred[2:4, 2:4, 2:4] = 1
    pred[4:7, 2:4, 2:4] = 2
    return pred


def read_csv(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {r["case"]: r for r in csv.DictReader(fh)}


# ---------------------------------------------------------------- one case
def test_case_metrics_match_hand_computed_values():
    gt = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(gt)
    gt[1:4, 1:3, 1:3] = 1  # 12 voxels
    pred[1:3, 1:3, 1:3] = 1  # 8 voxels, all inside the truth
    pred[7, 7, 7] = 2  # a false positive of a label absent from the truth
    m = case_metrics(pred, gt, {"r": [1], "fp": [2], "absent": [5]}, spacing=[2.0, 1.0, 1.0])
    r = m["r"]
    assert r["dice"] == pytest.approx(2 * 8 / 20)
    assert r["iou"] == pytest.approx(8 / 12)
    assert r["precision"] == pytest.approx(1.0)
    assert r["sensitivity"] == pytest.approx(8 / 12)
    assert r["hd95"] == pytest.approx(2.0)  # the missed slab is one voxel = 2 mm away along x
    worst = float(np.linalg.norm([20.0, 10.0, 10.0]))
    assert m["fp"] == pytest.approx({"dice": 0.0, "iou": 0.0, "hd95": worst, "precision": 0.0, "sensitivity": 0.0})
    assert m["absent"] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "precision": 1.0, "sensitivity": 1.0}


def test_nested_regions_hand_computed():
    m = case_metrics(partial(), truth(), {"whole": [1, 2], "core": [2]})
    assert m["whole"]["dice"] == pytest.approx(32 / 36)
    assert m["whole"]["iou"] == pytest.approx(16 / 20)
    assert m["whole"]["precision"] == pytest.approx(16 / 20)
    assert m["whole"]["sensitivity"] == pytest.approx(1.0)
    assert m["core"]["dice"] == pytest.approx(16 / 20)
    assert m["core"]["iou"] == pytest.approx(8 / 12)
    assert m["core"]["precision"] == pytest.approx(8 / 12)
    assert m["core"]["hd95"] == pytest.approx(1.0)


def test_parse_regions_and_its_errors():
    assert parse_regions("whole=1,2,3; core=2,3;enh=3") == {"whole": [1, 2, 3], "core": [2, 3], "enh": [3]}
    for bad in ("whole", "whole=", "=1,2", "whole=a,b", "whole=0", ";"):
        with pytest.raises(UserError, match="--regions"):
            parse_regions(bad)


# ---------------------------------------------------------------- folders, CLI
@pytest.fixture()
def dataset(tmp_path) -> tuple[Path, Path]:
    """root/labelsTs: a, b, c; pred: a perfect, b partial, c missing, plus an unmatched file and a prob map."""
    gt, pred = tmp_path / "root" / "labelsTs", tmp_path / "pred"
    gt.mkdir(parents=True)
    pred.mkdir()
    for name in ("a", "b", "c"):
        save(gt / f"{name}.nii.gz", truth())
    save(pred / "a.nii.gz", truth())
    save(pred / "b.nii", partial())  # .nii matches by stem too
    save(pred / "extra.nii.gz", truth())
    nib.save(nib.Nifti1Image(np.zeros(SHAPE + (2,), np.float32), AFFINE), str(pred / "a_prob.nii.gz"))
    return gt, pred


def test_cli_counts_a_missing_prediction_as_failure(dataset, tmp_path):
    gt, pred = dataset
    (gt.parent / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x", "2": "y"},
                                                        "regions": {"whole": [1, 2], "core": [2]}}))
    out = tmp_path / "metrics.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "segan", "evaluate", "-p", str(pred), "-g", str(gt),
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    failures = [line for line in proc.stderr.splitlines() if line.startswith("failed:")]
    assert len(failures) == 1 and "c:" in failures[0] and "prediction missing" in failures[0]
    rows = read_csv(out)
    assert list(rows) == ["a", "b", "c", "extra", "mean"]
    assert {k: rows[k]["status"] for k in ("a", "b", "c", "extra")} == \
        {"a": "ok", "b": "ok", "c": "failed", "extra": "skipped"}
    assert float(rows["a"]["dice_whole"]) == 1.0 and float(rows["a"]["hd95_core"]) == 0.0
    assert float(rows["b"]["dice_whole"]) == pytest.approx(32 / 36, abs=1e-5)
    assert float(rows["b"]["sensitivity_core"]) == pytest.approx(1.0)
    assert float(rows["c"]["dice_whole"]) == 0.0 and float(rows["c"]["iou_core"]) == 0.0
    assert float(rows["c"]["hd95_whole"]) == pytest.approx(WORST, abs=1e-4)
    assert float(rows["mean"]["dice_whole"]) == pytest.approx((1 + 32 / 36 + 0) / 3, abs=1e-5)
    assert float(rows["mean"]["dice_core"]) == pytest.approx((1 + 0.8 + 0) / 3, abs=1e-5)
    assert float(rows["mean"]["precision_core"]) == pytest.approx((1 + 8 / 12 + 0) / 3, abs=1e-5)
    assert rows["extra"]["dice_whole"] == ""
    # the table: per-case Dice and a mean line per region
    assert "mean over 3 case(s), 1 failed" in proc.stdout
    whole = next(line for line in proc.stdout.splitlines() if line.startswith("whole "))
    assert f"{(1 + 32 / 36) / 3:.4f}" in whole


def test_regions_fall_back_to_model_json_then_label_values(dataset, tmp_path, capsys):
    gt, pred = dataset
    out = tmp_path / "m.csv"
    # no dataset.json, no model.json: one region per label value found in the ground truth
    assert run_evaluate(pred, gt, out=out) == 1
    row = read_csv(out)["b"]
    assert float(row["dice_label_1"]) == pytest.approx(1.0)  # label 1 predicted exactly
    assert float(row["dice_label_2"]) == pytest.approx(0.8)
    # the predicting model's regions (segan predict writes PRED/model.json)
    (pred / "model.json").write_text(json.dumps({"regions": {"tumour": [1, 2]}}))
    assert run_evaluate(pred, gt, out=out) == 1
    assert "dice_tumour" in read_csv(out)["b"]
    # --regions wins over both
    assert run_evaluate(pred, gt, regions="core=2", out=out) == 1
    assert set(k for k in read_csv(out)["b"] if k.startswith("dice_")) == {"dice_core"}
    assert "core" in capsys.readouterr().out


def test_unreadable_or_misaligned_predictions_fail(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    for name in ("text", "shape", "affine", "ok"):
        save(gt / f"{name}.nii.gz", truth())
    (pred / "text.nii.gz").write_text("not an image")
    save(pred / "shape.nii.gz", np.zeros((10, 12, 9), np.uint8))
    save(pred / "affine.nii.gz", truth(), np.diag([1.0, 1.0, 1.0, 1.0]))
    save(pred / "ok.nii.gz", truth())
    out = tmp_path / "m.csv"
    assert run_evaluate(pred, gt, regions="whole=1,2", out=out) == 1
    rows = read_csv(out)
    assert {k: r["status"] for k, r in rows.items() if k != "mean"} == \
        {"text": "failed", "shape": "failed", "affine": "failed", "ok": "ok"}
    assert all(float(rows[k]["dice_whole"]) == 0.0 for k in ("text", "shape", "affine"))
    assert float(rows["mean"]["dice_whole"]) == pytest.approx(0.25)
    err = capsys.readouterr().err
    assert "not a readable NIfTI" in err and "differs from the ground truth" in err and "affine differs" in err


def test_usage_errors(tmp_path):
    with pytest.raises(UserError, match="ground-truth folder not found"):
        run_evaluate(tmp_path / "p", tmp_path / "missing")
    (tmp_path / "gt").mkdir()
    with pytest.raises(UserError, match="prediction folder not found"):
        run_evaluate(tmp_path / "p", tmp_path / "gt")
    (tmp_path / "p").mkdir()
    with pytest.raises(UserError, match="holds no .nii"):
        run_evaluate(tmp_path / "p", tmp_path / "gt")


def test_swapped_folders_exit_2_with_the_right_command(tmp_path, capsys):
    """`-p GT -g PRED`: the -g folder holds model.json, predictions.csv and a probability map,
    as `segan predict` writes them, and masks with only the model's label ids."""
    gt, pred = tmp_path / "root" / "labelsTs", tmp_path / "pred"
    gt.mkdir(parents=True)
    pred.mkdir()
    for name in ("a", "b"):
        save(gt / f"{name}.nii.gz", truth())
        save(pred / f"{name}.nii.gz", partial())
    nib.save(nib.Nifti1Image(np.zeros(SHAPE + (2,), np.float32), AFFINE), str(pred / "a_prob.nii.gz"))
    (pred / "model.json").write_text(json.dumps({"regions": {"whole": [1, 2], "core": [2]}}))
    (pred / "predictions.csv").write_text("case,inputs,status,message,seconds,output\n")
    out = tmp_path / "metrics.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "segan", "evaluate", "--out", str(out)]
    swapped = subprocess.run(cmd + ["-p", str(gt), "-g", str(pred)], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=300)
    assert swapped.returncode == 2, swapped.stderr
    lines = swapped.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: -p and -g look swapped"), swapped.stderr
    assert "model.json" in lines[0] and "predictions.csv" in lines[0] and "probability map" in lines[0]
    assert "label ids (1, 2)" in lines[0]
    assert lines[0].endswith(f"segan evaluate -p {pred} -g {gt} --out {out}")
    assert not out.exists()
    assert run_evaluate(pred, gt, out=out) == 0  # the right way round
    assert float(read_csv(out)["mean"]["dice_whole"]) == pytest.approx(32 / 36, abs=1e-5)
    assert f"per-case metrics written to {out}" in capsys.readouterr().out


def test_not_swapped_two_prediction_folders_or_foreign_labels(tmp_path, capsys):
    """Two models' predictions (both folders hold model.json) and a -g folder whose masks hold a
    label its model.json cannot write are evaluated, not refused."""
    a, b = tmp_path / "model_a", tmp_path / "model_b"
    for folder in (a, b):
        folder.mkdir()
        save(folder / "x.nii.gz", truth())
        (folder / "model.json").write_text(json.dumps({"regions": {"whole": [1, 2]}}))
    assert run_evaluate(a, b) == 0
    plain = tmp_path / "plain"
    plain.mkdir()
    save(plain / "x.nii.gz", truth())
    foreign = truth()
    foreign[0, 0, 0] = 5  # not an id of model_b's regions
    save(b / "x.nii.gz", foreign)
    assert run_evaluate(plain, b, regions="whole=1,2") == 0
    assert "swapped" not in capsys.readouterr().err
