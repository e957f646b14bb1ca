"""The plain baseline script (benchmarks/plain_unet.py) runs end to end on a phantom variant."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.phantom_spec import resolve_spec
from data_prep.phantoms import generate

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plain_unet.py"


def _script():
    spec = importlib.util.spec_from_file_location("plain_unet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regions_paint_back_to_label_ids_and_slices_are_axial():
    plain = _script()
    whole, core, enh = np.zeros((3, 4, 4), bool)
    whole[:3], core[:2], enh[:1] = True, True, True
    labels = plain.paint(np.stack([whole, core, enh]), [[1, 2, 3], [2, 3], [3]])
    assert labels[:, 0].tolist() == [3, 2, 1, 0]
    lesion = plain.paint(np.stack([whole]), [[1]])
    assert lesion.max() == 1 and lesion.sum() == 12
    pir = np.array([[0, 0, -1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]], float)  # P, I, L axes
    assert plain.axial_axis(np.diag([-1.0, -1, 4, 1])) == 2 and plain.axial_axis(pir) == 1


@pytest.mark.slow
def test_plain_unet_trains_predicts_on_the_scan_grid_and_scores(tmp_path):
    data = tmp_path / "ct"
    generate(data, cases=4, size=32, seed=0, spec=resolve_spec("ct_lps_int16"))
    out = tmp_path / "plain"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(data), "--out", str(out), "--minutes", "0.05",
                           "--seed", "1", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result == json.loads((out / "result.json").read_text())
    assert result["steps"] > 0 and result["test_cases"] == 1 and result["failed"] == []
    assert set(result["test_dice"]) == {"lesion"} and 0.0 <= result["test_dice_mean"] <= 1.0
    assert result["test_dice_mean"] == result["test_dice"]["lesion"]
    assert 0.0 <= result["best_val_dice"] <= 1.0 and result["validation"]
    scan = nib.load(data / "imagesTs" / "phantom_003.nii.gz")
    mask = nib.load(out / "predictions" / "phantom_003.nii.gz")
    assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
    assert nib.aff2axcodes(mask.affine) == ("L", "P", "S") and mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert (out / "metrics.csv").read_text().splitlines()[-1].startswith("mean,")
