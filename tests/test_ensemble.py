"""Ensembles and uncertainty (`segan predict -m A -m B`, cv folders, `--uncertainty`).

Two tiny supervised 2D models (seeds 0 and 1, a few steps each) are trained once for the
module on the session's small phantom set; predictions run in-process through
``run_predict`` (the CLI's code) except where the exit status is the point.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segan.checkpoint import save_checkpoint
from segan.errors import UserError
from segan.inference import PredictOptions, run_predict
from segan.postprocess import postprocess
from segan.regions import regions_to_labels

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
REGIONS = ["whole_tumour", "tumour_core", "enhancing"]
REGION_LABELS = [[1, 2, 3], [2, 3], [3]]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ensemble")


@pytest.fixture(scope="module")
def models(phantoms_small, work) -> dict[str, Path]:
    """Two trained checkpoints (different seeds) and a copy of the first with renamed regions."""
    from segan.config import load_config
    from segan.runtime import DistContext
    from segan.training import Trainer

    out = {}
    for seed in (0, 1):
        cfg = load_config(SMOKE, [f"data.root={phantoms_small}", f"preprocess.cache_dir={work / 'cache'}",
                                  "tracking.enabled=false", "method.name=supervised", f"seed={seed}",
                                  "train.epochs=2", "train.steps_per_epoch=4", "train.val_max_cases=1"])
        Trainer(cfg, work / f"run{seed}", DistContext()).fit(None)
        out[f"m{seed}"] = work / f"run{seed}" / "best.pt"
    ckpt = torch.load(out["m0"], map_location="cpu", weights_only=True)
    ckpt["meta"]["region_names"] = ["whole", "core", "enh"]
    save_checkpoint(ckpt, work / "renamed.pt")
    out["renamed"] = work / "renamed.pt"
    return out


@pytest.fixture(scope="module")
def singles(models, work, phantoms_small) -> dict[str, Path]:
    """Each trained model alone over imagesTs, with probability maps."""
    images = phantoms_small / "imagesTs"
    return {key: predict(work, f"single_{key}", [models[key]], [images], probabilities=True) for key in ("m0", "m1")}


def post_of(ckpt: Path):
    from segan.config import from_dict

    return from_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["config"]).post


def predict(work: Path, name: str, models: list[Path | str], inputs: list[Path], **opts) -> Path:
    out = work / name
    assert run_predict([str(m) for m in models], [str(i) for i in inputs], out, PredictOptions(**opts)) == 0
    return out


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def rows(out: Path) -> dict[str, dict]:
    with open(out / "predictions.csv", newline="") as fh:
        return {r["case"]: r for r in csv.DictReader(fh)}


def cases(folder: Path) -> list[str]:
    return sorted(p.name[:-len(".nii.gz")] for p in folder.glob("*.nii.gz"))


# ---------------------------------------------------------------- averaging
def test_same_checkpoint_twice_gives_the_single_model_masks(models, singles, work, phantoms_small):
    images = phantoms_small / "imagesTs"
    single = singles["m0"]
    twice = predict(work, "twice", [models["m0"], models["m0"]], [images], probabilities=True)
    for case in cases(images):
        mask1, aff1 = load(single / f"{case}.nii.gz")
        mask2, aff2 = load(twice / f"{case}.nii.gz")
        assert mask1.any(), case  # a trained model marks something: the comparison means something
        np.testing.assert_array_equal(mask1, mask2)
        np.testing.assert_array_equal(aff1, aff2)
        np.testing.assert_array_equal(load(single / f"{case}_prob.nii.gz")[0], load(twice / f"{case}_prob.nii.gz")[0])
    info = json.loads((twice / "model.json").read_text())
    assert [m["checkpoint"] for m in info["models"]] == [str(models["m0"])] * 2
    assert info["regions"] == dict(zip(REGIONS, REGION_LABELS))


def test_two_models_average_each_models_probabilities(models, singles, work, phantoms_small):
    images = phantoms_small / "imagesTs"
    a, b = singles["m0"], singles["m1"]
    ab = predict(work, "ab", [models["m0"], models["m1"]], [images], probabilities=True)
    post = post_of(models["m0"])  # the first member's post-processing
    for case in cases(images):
        pa, pb, pab = (load(d / f"{case}_prob.nii.gz")[0] for d in (a, b, ab))
        assert np.abs(pa - pb).max() > 1e-2  # two different models
        np.testing.assert_allclose(pab, (pa + pb) / 2, atol=1e-5)
        # thresholded and post-processed once, after averaging
        expected = regions_to_labels(postprocess(np.moveaxis(pab, -1, 0), post), REGION_LABELS)
        np.testing.assert_array_equal(load(ab / f"{case}.nii.gz")[0], expected)


def test_models_with_different_regions_exit_2_naming_both(models, work, phantoms_small):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = work / "mismatch"
    proc = subprocess.run([sys.executable, "-m", "segan", "predict", "-m", str(models["m0"]), "-m",
                           str(models["renamed"]), "-i", str(phantoms_small / "imagesTs"), "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr
    assert str(models["m0"]) in lines[0] and str(models["renamed"]) in lines[0]
    assert "whole_tumour" in lines[0] and "whole=" in lines[0]
    assert not out.exists()


def test_cv_folder_expands_to_its_folds(models, work, phantoms_small):
    cv = work / "cv"
    for k, key in enumerate(("m0", "m1")):
        (cv / f"fold_{k}").mkdir(parents=True)
        shutil.copy(models[key], cv / f"fold_{k}" / "best.pt")
    (cv / "cv.json").write_text(json.dumps({"folds": ["fold_0/best.pt", "fold_1/best.pt"]}))
    images = phantoms_small / "imagesTs"
    via_cv = predict(work, "via_cv", [cv], [images], probabilities=True)
    via_m = predict(work, "via_m", [models["m0"], models["m1"]], [images], probabilities=True)
    for case in cases(images):
        np.testing.assert_array_equal(load(via_cv / f"{case}_prob.nii.gz")[0], load(via_m / f"{case}_prob.nii.gz")[0])
    info = json.loads((via_cv / "model.json").read_text())
    assert [Path(m["checkpoint"]) for m in info["models"]] == [cv / "fold_0" / "best.pt", cv / "fold_1" / "best.pt"]

    (cv / "cv.json").write_text(json.dumps({"folds": []}))
    with pytest.raises(UserError, match="'folds'"):
        run_predict([str(cv)], [str(images)], work / "bad_cv", PredictOptions())
    (cv / "cv.json").write_text(json.dumps({"folds": ["fold_9/best.pt"]}))
    with pytest.raises(UserError, match="fold_9"):
        run_predict([str(cv)], [str(images)], work / "bad_cv", PredictOptions())
    assert not (work / "bad_cv").exists()


# ---------------------------------------------------------------- uncertainty
def test_uncertainty_maps_on_the_scans_grid_and_csv_summaries(models, singles, work, phantoms_small):
    from segan.ensemble import boundary

    images = phantoms_small / "imagesTs"
    a, b = singles["m0"], singles["m1"]
    ens = predict(work, "unc_ens", [models["m0"], models["m1"]], [images], uncertainty=True, probabilities=True)
    post = post_of(models["m0"])
    one = predict(work, "unc_one", [models["m0"]], [images], uncertainty=True)
    assert json.loads((ens / "model.json").read_text())["uncertainty"] == "variance"
    assert json.loads((one / "model.json").read_text())["uncertainty"] == "entropy"
    table_ens, table_one = rows(ens), rows(one)
    for case in cases(images):
        scan = nib.load(str(images / f"{case}.nii.gz"))
        unc_img = nib.load(str(ens / f"{case}_unc.nii.gz"))
        assert unc_img.shape == (*scan.shape[:3], len(REGIONS)) and unc_img.get_data_dtype() == np.float32
        np.testing.assert_allclose(unc_img.affine, scan.affine, atol=1e-6)
        pa, pb = load(a / f"{case}_prob.nii.gz")[0], load(b / f"{case}_prob.nii.gz")[0]
        unc = np.asarray(unc_img.dataobj)
        np.testing.assert_allclose(unc, ((pa - pb) / 2) ** 2, atol=1e-5)  # variance of two members
        assert unc.max() > 1e-4

        h = np.asarray(nib.load(str(one / f"{case}_unc.nii.gz")).dataobj)
        p = np.clip(pa.astype(np.float64), 1e-12, 1 - 1e-12)
        np.testing.assert_allclose(h, -(p * np.log2(p) + (1 - p) * np.log2(1 - p)), atol=1e-4)

        masks = postprocess(np.moveaxis(load(ens / f"{case}_prob.nii.gz")[0], -1, 0), post)
        row = table_ens[case]
        means = []
        for k, name in enumerate(REGIONS):
            inside = masks[k]
            if not inside.any():
                assert row[f"unc_mean_{name}"] == ""
                continue
            edge = boundary(inside)
            assert edge.sum() < inside.sum() or inside.sum() < 30  # the rim, not the whole mask
            assert row[f"unc_mean_{name}"] == f"{unc[..., k][inside].mean():.4f}"
            assert row[f"unc_boundary_{name}"] == f"{unc[..., k][edge].mean():.4f}"
            means.append(unc[..., k][inside].mean())
        assert abs(float(row["uncertainty"]) - np.mean(means)) < 1e-4
        assert float(table_one[case]["uncertainty"]) > float(row["uncertainty"])  # bits vs variance


def test_tta_members_count_towards_the_variance(models, work, phantoms_small):
    images = phantoms_small / "imagesTs"
    out = predict(work, "unc_tta", [models["m0"]], [images], uncertainty=True, tta=True, probabilities=True)
    tta = predict(work, "tta", [models["m0"]], [images], tta=True, probabilities=True)
    assert json.loads((out / "model.json").read_text())["uncertainty"] == "variance"
    for case in cases(images):
        # the per-flip members average to the usual TTA probabilities
        np.testing.assert_allclose(load(out / f"{case}_prob.nii.gz")[0], load(tta / f"{case}_prob.nii.gz")[0],
                                   atol=1e-5)
        unc = load(out / f"{case}_unc.nii.gz")[0]
        assert 0 <= unc.min() and unc.max() <= 0.25 and unc.max() > 0


def test_uncertainty_error_benchmark_prints_a_spearman_rho(models, singles, work, phantoms_small):
    gt = work / "labels_all"
    gt.mkdir()
    for sub in ("labelsTr", "labelsTs"):
        for f in (phantoms_small / sub).glob("*.nii.gz"):
            shutil.copy(f, gt / f.name)
    out = predict(work, "bench", [models["m0"], models["m1"]],
                  [phantoms_small / "imagesTr", phantoms_small / "imagesTs"], uncertainty=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "uncertainty_error.py"), "-p", str(out),
                           "-g", str(gt)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["cases"] == 6 and result["left_out"] == [] and result["kind"] == "variance"
    assert result["spearman"] is None or -1.0 <= result["spearman"] <= 1.0
    assert {p["case"] for p in result["pairs"]} == set(cases(gt))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "uncertainty_error.py"), "-p",
                           str(singles["m0"]), "-g", str(gt)], capture_output=True, text=True, env=env, timeout=300)
    # predicted without --uncertainty: one error line, exit 2
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "--uncertainty" in proc.stderr


def test_per_flip_members_of_3d_sliding_window_average_to_tta():
    from segan.config import Config
    from segan.nets import build_segmentor
    from segan.sliding import predict_batch

    cfg = Config()
    cfg.model.channels, cfg.model.strides = [8, 16, 32], [2, 2]
    torch.manual_seed(0)
    net = build_segmentor(cfg.model, 3, 1, 2).eval()
    x = torch.randn(1, 1, 20, 24, 18)
    each = predict_batch(net, x, 3, [16, 16, 16], tta=True, per_flip=True)
    assert each.shape == (1, 8, 2, 20, 24, 18)
    torch.testing.assert_close(each.mean(1), predict_batch(net, x, 3, [16, 16, 16], tta=True), atol=1e-5, rtol=0)
    assert each.var(1).max() > 1e-4  # the flips disagree: a variance to report
    plain = predict_batch(net, x, 3, [16, 16, 16], per_flip=True)
    torch.testing.assert_close(plain[:, 0], predict_batch(net, x, 3, [16, 16, 16]), atol=0, rtol=0)
