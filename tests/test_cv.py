"""``segan train --folds K``: fold runs under one parent run, the recorded split, cv.json as a model."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import SMOKE, run_cli


@pytest.fixture(scope="module")
def cv_run(phantoms_small: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, object]:
    tmp = tmp_path_factory.mktemp("cv")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = tmp / "cv2"
    proc = run_cli("train", "-c", SMOKE, "--folds", "2", "--out", out, "--tracking-uri", uri,
                   "--set", f"data.root={phantoms_small}", "--set", f"preprocess.cache_dir={tmp / 'cache'}",
                   "--set", "train.epochs=1", "--set", "experiment=cvtest", cwd=tmp, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, uri, proc


def test_folds_are_child_runs_of_one_parent_with_cv_mean_and_std(cv_run) -> None:
    from mlflow.tracking import MlflowClient

    out, uri, proc = cv_run
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cvtest")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("segan.role") == "cv"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2
    cv = json.loads((out / "cv.json").read_text())
    fold_best = [c["val_dice_mean"] for c in cv["per_fold"]]
    metrics = parents[0].data.metrics
    assert metrics["cv_val_dice_mean_mean"] == pytest.approx(np.mean(fold_best), abs=1e-6)
    assert metrics["cv_val_dice_mean_std"] == pytest.approx(np.std(fold_best), abs=1e-6)
    assert cv["mean"] == pytest.approx(np.mean(fold_best), abs=1e-6)
    # each fold's best equals that child's logged maximum of val_dice_mean
    by_id = {c.info.run_id: c for c in children}
    for rec in cv["per_fold"]:
        hist = MlflowClient(uri).get_metric_history(rec["run_id"], "val_dice_mean")
        assert rec["run_id"] in by_id and rec["val_dice_mean"] == pytest.approx(max(m.value for m in hist), abs=1e-6)
    assert "CV (best epoch per fold)" in proc.stdout and f"val_dice_mean: {cv['mean']:.4f} ± " in proc.stdout


def test_split_is_recorded_and_folds_validate_disjoint_cases(cv_run, phantoms_small: Path) -> None:
    out, _, _ = cv_run
    lists = [json.loads((out / f"fold_{i}" / "datalist.json").read_text()) for i in range(2)]
    val = [{c["case"] for c in d["validation"]} for d in lists]
    train = [{c["case"] for c in d["training"]} for d in lists]
    assert val[0] and val[1] and not val[0] & val[1]
    assert train[0] == val[1] and train[1] == val[0]  # K=2: each fold trains on the other
    labelled = {p.name.split(".")[0] for p in (phantoms_small / "labelsTr").iterdir()}
    assert val[0] | val[1] == labelled
    assert not ({c["case"] for c in lists[0]["test"]} & labelled)
    cv = json.loads((out / "cv.json").read_text())
    assert cv["k"] == 2 and all((out / f).is_file() for f in cv["folds"])


def test_cv_folder_predicts_as_the_mean_of_its_folds(cv_run, phantoms_small: Path, tmp_path: Path) -> None:
    out, _, _ = cv_run
    scans = phantoms_small / "imagesTs"
    assert run_cli("predict", "-m", out, "-i", scans, "-o", tmp_path / "ens", "--probabilities").returncode == 0
    probs = []
    for i in range(2):
        proc = run_cli("predict", "-m", out / f"fold_{i}", "-i", scans, "-o", tmp_path / f"f{i}", "--probabilities")
        assert proc.returncode == 0, proc.stderr
        probs.append(sorted((tmp_path / f"f{i}").glob("*_prob.nii.gz")))
    for ens_file, a, b in zip(sorted((tmp_path / "ens").glob("*_prob.nii.gz")), *probs):
        mean = (nib.load(a).get_fdata() + nib.load(b).get_fdata()) / 2
        np.testing.assert_allclose(nib.load(ens_file).get_fdata(), mean, atol=1e-5)
    info = json.loads((tmp_path / "ens" / "model.json").read_text())
    assert len(info["models"]) == 2
    cv = json.loads((out / "cv.json").read_text())
    assert info["post"]["from"] == str(out / "cv.json")
    for region in info["regions"]:  # the CV's choice, else the config's threshold 0.5
        assert info["post"][region]["threshold"] == cv["post"].get(region, {}).get("threshold", 0.5)


def test_cv_chooses_postprocessing_on_out_of_fold_cases_and_the_ensemble_applies_it(
        cv_run, phantoms_small: Path, tmp_path: Path) -> None:
    import shutil

    from mlflow.tracking import MlflowClient

    out, uri, proc = cv_run
    cv = json.loads((out / "cv.json").read_text())
    labelled = len(list((phantoms_small / "labelsTr").iterdir()))
    assert cv["oof_cases"] == labelled and isinstance(cv["post"], dict)
    assert 0.0 <= cv["oof_dice_before"] <= cv["oof_dice_after"] <= 1.0
    parent = [r for r in MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("cvtest")
                                                        .experiment_id]) if r.data.tags.get("segan.role") == "cv"][0]
    assert parent.data.metrics["oof_dice_after"] == pytest.approx(cv["oof_dice_after"])
    assert "post-processing chosen on the out-of-fold cases" in proc.stderr
    # a choice that removes everything: the ensemble's label maps are empty, its probabilities unchanged
    copy = tmp_path / "cvcopy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("mlruns", "*.db"))
    cv["post"] = {r: {"threshold": 1.0, "largest_component": True} for r in ("whole_tumour", "tumour_core", "enhancing")}
    (copy / "cv.json").write_text(json.dumps(cv))
    scans = phantoms_small / "imagesTs"
    assert run_cli("predict", "-m", copy, "-i", scans, "-o", tmp_path / "none", "--probabilities").returncode == 0
    masks = sorted(p for p in (tmp_path / "none").glob("*.nii.gz") if not p.name.endswith("_prob.nii.gz"))
    assert masks and all(not nib.load(m).get_fdata().any() for m in masks)
    probs = sorted((tmp_path / "none").glob("*_prob.nii.gz"))
    assert probs and any(nib.load(p).get_fdata().max() > 0.5 for p in probs)


def test_bad_fold_counts_exit_2_with_one_line(phantoms_small: Path, tmp_path: Path) -> None:
    base = ["train", "-c", SMOKE, "--set", f"data.root={phantoms_small}", "--set", "tracking.enabled=false"]
    too_many = run_cli(*base, "--folds", "9", "--out", tmp_path / "x", cwd=tmp_path)
    assert too_many.returncode == 2 and too_many.stderr.startswith("error: --folds 9")
    assert "Traceback" not in too_many.stderr and not (tmp_path / "x").exists()
    resume = run_cli(*base, "--folds", "2", "--resume", tmp_path, cwd=tmp_path)
    assert resume.returncode == 2 and "--folds" in resume.stderr and "Traceback" not in resume.stderr
