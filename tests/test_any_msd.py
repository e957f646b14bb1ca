"""Any MSD folder trains with `--set data.root=...` only, and its scans get masks on their own grid."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _scan(rng, shape, affine):
    """One-channel int16 scan with scl_slope/inter, an offset background and a blob (label 1)."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    centre = [s / 2 + rng.uniform(-3, 3) for s in shape]
    blob = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + ((z - centre[2]) * 1.5) ** 2) < 36
    head = ((x - shape[0] / 2) ** 2 / 180 + (y - shape[1] / 2) ** 2 / 180 + (z - shape[2] / 2) ** 2 / 90) < 1
    image = 100 + 300 * head + 400 * blob + rng.normal(0, 20, shape)  # background 100, not 0
    img = nib.Nifti1Image(np.round(image / 2).astype(np.int16), affine)
    img.header.set_slope_inter(2.0, 0.0)
    return img, nib.Nifti1Image(blob.astype(np.uint8), affine)


def test_single_channel_lps_msd_folder_trains_and_predicts(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "Task99_Blob"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    affine = np.diag([-1.2, -1.2, 2.5, 1.0])  # LPS, anisotropic
    shape = (30, 28, 14)
    training = []
    for i in range(5):
        img, lab = _scan(rng, shape, affine)
        nib.save(img, root / "imagesTr" / f"blob_{i:03d}.nii.gz")
        nib.save(lab, root / "labelsTr" / f"blob_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/blob_{i:03d}.nii.gz", "label": f"./labelsTr/blob_{i:03d}.nii.gz"})
    for i in range(2):
        nib.save(_scan(rng, shape, affine)[0], root / "imagesTs" / f"blob_{i + 10:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Blob", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "blob"},
        "numTraining": 5, "training": training, "test": ["./imagesTs/blob_010.nii.gz", "./imagesTs/blob_011.nii.gz"]}))

    env = {**os.environ, "SEGAN_CACHE": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "segan", "train", "-c", str(ROOT / "configs" / "smoke.yaml"),
                            "--set", f"data.root={root}", "--out", str(run)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    cfg = (run / "config.yaml").read_text()
    assert "- CT" in cfg and "blob:" in cfg  # channels and regions derived from dataset.json

    pred = subprocess.run([sys.executable, "-m", "segan", "predict", "-m", str(run), "-i", str(root / "imagesTs"),
                           "-o", str(tmp_path / "preds")], capture_output=True, text=True, env=env, timeout=300)
    assert pred.returncode == 0, pred.stderr[-2000:]
    for i in (10, 11):
        scan = nib.load(root / "imagesTs" / f"blob_{i:03d}.nii.gz")
        mask = nib.load(tmp_path / "preds" / f"blob_{i:03d}.nii.gz")
        assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
        assert mask.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
