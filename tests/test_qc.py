"""Out-of-distribution score and sanity flags of predicted cases (segan.qc), on real files.

One model is trained once (a real ``segan train`` subprocess, 2 smoke epochs) on 1-channel
MR phantoms; a CT phantom variant must be flagged, its own cases must not.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_cli


def _rows(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from data_prep.phantom_spec import resolve_spec
    from data_prep.phantoms import generate

    work = tmp_path_factory.mktemp("qc")
    generate(work / "mr", cases=8, size=32, seed=0, test_fraction=0.25, spec=resolve_spec("default", channels=1))
    generate(work / "ct", cases=3, size=32, seed=5, test_fraction=0.0, spec=resolve_spec("default", modality="ct"))
    env = {"SEGAN_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    proc = run_cli("train", "-c", REPO / "configs/smoke.yaml", "--set", f"data.root={work / 'mr'}",
                   "--set", "data.patch_size=[32,32]", "--out", work / "run",
                   "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return work, env


def _predict(work: Path, env: dict, model: Path, inputs: list[Path], out: str):
    proc = run_cli("predict", "-m", model, *[a for i in inputs for a in ("-i", i)], "-o", work / out, env=env)
    return proc, _rows(work / out)


def test_checkpoint_holds_the_fingerprint_and_a_threshold_above_its_own_cases(trained):
    work, _ = trained
    tf = torch.load(work / "run" / "best.pt", weights_only=True)["meta"]["train_fingerprint"]
    own = tf["ood"]["own_scores"]
    assert len(own) == 6 and tf["n_cases"] == 6       # 6 training + validation cases (2 are test cases)
    assert max(own.values()) < tf["ood"]["threshold"]
    assert tf["channels"][0]["foreground"]["p50"] > 0 and tf["regions"]["lesion"]["volume_ml"]["max"] > 0


def test_ct_variant_is_out_of_distribution_and_own_cases_are_not(trained):
    work, env = trained
    model = work / "run"
    proc, ct = _predict(work, env, model, [work / "ct" / "imagesTr"], "pred_ct")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(ct) == 3
    for row in ct:
        assert row["status"] == "ok" and Path(row["output"]).is_file()
        assert "out_of_distribution" in row["flags"].split(";")
        assert float(row["ood_score"]) > float(row["ood_threshold"])
        assert f"warning: {row['inputs']}: out_of_distribution: ood score" in proc.stderr
    own_scores = torch.load(model / "best.pt", weights_only=True)["meta"]["train_fingerprint"]["ood"]["own_scores"]
    # training + validation cases and the held-out test cases
    proc, rows = _predict(work, env, model, [work / "mr" / "imagesTr", work / "mr" / "imagesTs"], "pred_mr")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(rows) == 8 and "out_of_distribution" not in proc.stderr
    for row in rows:
        assert "out_of_distribution" not in row["flags"], row
        assert float(row["ood_score"]) <= float(row["ood_threshold"])
        if row["case"] in own_scores:   # the same statistics as at training time
            assert float(row["ood_score"]) == pytest.approx(own_scores[row["case"]], abs=0.01)
        assert float(row["volume_ml_lesion"]) >= 0


def _scan(work: Path, name: str, data: np.ndarray, zoom: float = 1.0) -> Path:
    (work / "scans").mkdir(exist_ok=True)
    path = work / "scans" / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([zoom, zoom, zoom, 1.0])), str(path))
    return path


def test_nan_constant_and_resampled_scans_are_flagged_and_still_predicted(trained):
    from segan.inference import PredictOptions, run_predict

    work, _ = trained
    source = nib.load(str(work / "mr" / "imagesTr" / "phantom_000.nii.gz")).get_fdata(dtype=np.float32)
    with_nan = source.copy()
    with_nan[:4, :4, :4] = np.nan
    _scan(work, "nan", with_nan)
    _scan(work, "zeros", np.zeros_like(source))
    _scan(work, "coarse", source[::4, ::4, ::4], zoom=4.0)
    assert run_predict(str(work / "run"), [str(work / "scans")], work / "pred_odd", PredictOptions()) == 0
    rows = {r["case"]: r for r in _rows(work / "pred_odd")}
    assert all(r["status"] == "ok" for r in rows.values())
    assert "nan_replaced" in rows["nan"]["flags"].split(";") and "NaN" in rows["nan"]["message"]
    assert "heavily_resampled" in rows["coarse"]["flags"].split(";")
    assert "heavily_resampled" not in rows["nan"]["flags"]
    empty = not nib.load(rows["zeros"]["output"]).get_fdata().any()
    assert ("empty_mask" in rows["zeros"]["flags"].split(";")) == empty
    assert (float(rows["zeros"]["volume_ml_lesion"]) == 0) == empty


def test_mask_size_flags_against_the_training_volumes(trained):
    from data_prep.io import load_image
    from segan.qc import case_qc

    work, _ = trained
    meta = torch.load(work / "run" / "best.pt", weights_only=True)["meta"]
    image, affine = load_image([work / "mr" / "imagesTs" / "phantom_006.nii.gz"])
    labels = np.zeros(image.shape[1:], dtype=np.uint8)
    cols, warnings = case_qc(meta, "phantom_006", image, affine, labels)
    assert cols["flags"] == "empty_mask" and cols["volume_ml_lesion"] == "0.000"
    assert warnings == ["empty_mask: the predicted mask is empty (no region voxel)"]
    labels[10, 10, 10] = 1                                      # 1 voxel = 0.001 mL
    cols, warnings = case_qc(meta, "phantom_006", image, affine, labels)
    assert cols["flags"] == "tiny_mask" and "lesion 0.001 mL" in warnings[0]
    labels[:] = 1                                               # the whole field of view
    cols, _ = case_qc(meta, "phantom_006", image, affine, labels)
    assert cols["flags"] == "huge_mask" and float(cols["volume_ml_lesion"]) == pytest.approx(32.768)


def test_checkpoint_without_fingerprint_still_predicts_without_ood_columns(trained):
    from segan.inference import PredictOptions, run_predict

    work, _ = trained
    ckpt = torch.load(work / "run" / "best.pt", weights_only=True)
    del ckpt["meta"]["train_fingerprint"]
    old = work / "old.pt"
    torch.save(ckpt, old)
    code = run_predict(str(old), [str(work / "ct" / "imagesTr")], work / "pred_old", PredictOptions())
    assert code == 0
    rows = _rows(work / "pred_old")
    assert len(rows) == 3 and all(r["status"] == "ok" and Path(r["output"]).is_file() for r in rows)
    assert "ood_score" not in rows[0] and "flags" in rows[0] and "volume_ml_lesion" in rows[0]
    assert all("out_of_distribution" not in r["flags"] for r in rows)
