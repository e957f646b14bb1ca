"""Synthetic phantoms: determinism, file format, labels, dataset.json, baseline, figure, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import run_cli
from data_prep.phantoms import CHANNELS, generate, otsu_baseline, phantom_affine, render_figure
from segan.errors import UserError


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    generate(tmp_path / "a", cases=4, size=40, seed=3)
    generate(tmp_path / "b", cases=4, size=40, seed=3)
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert len(a) == 1 + 4 * 2            # dataset.json + image and label per case
    assert a == b
    generate(tmp_path / "c", cases=4, size=40, seed=4)
    c = _digests(tmp_path / "c")
    assert c["imagesTr/phantom_000.nii.gz"] != a["imagesTr/phantom_000.nii.gz"]


def test_dataset_json_follows_msd_and_lists_every_file(phantoms_small):
    meta = json.loads((phantoms_small / "dataset.json").read_text())
    assert meta["modality"] == meta["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert meta["labels"] == {"0": "background", "1": "oedema", "2": "non-enhancing core", "3": "enhancing"}
    assert meta["regions"] == {"whole_tumour": [1, 2, 3], "tumour_core": [2, 3], "enhancing": [3]}
    assert (meta["numTraining"], meta["numTest"]) == (4, 2)
    assert meta["training"][0] == {"image": "./imagesTr/phantom_000.nii.gz", "label": "./labelsTr/phantom_000.nii.gz"}
    assert meta["test"] == ["./imagesTs/phantom_004.nii.gz", "./imagesTs/phantom_005.nii.gz"]
    for entry in meta["training"]:
        assert (phantoms_small / entry["image"]).is_file() and (phantoms_small / entry["label"]).is_file()
    # Test labels exist for evaluation, apart from the images and not listed.
    assert sorted(p.name for p in (phantoms_small / "labelsTs").iterdir()) == ["phantom_004.nii.gz",
                                                                               "phantom_005.nii.gz"]
    assert "labelsTs" not in json.dumps(meta)


@pytest.mark.parametrize("case", ["imagesTr/phantom_000", "imagesTs/phantom_005"])
def test_images_and_labels_have_the_documented_format(phantoms_small, case):
    img = nib.load(phantoms_small / f"{case}.nii.gz")
    lab = nib.load(phantoms_small / f"{case.replace('images', 'labels')}.nii.gz")
    assert img.shape == (48, 48, 48, 4) and img.get_data_dtype() == np.float32
    assert lab.shape == (48, 48, 48) and lab.get_data_dtype() == np.uint8
    expected = np.diag([1.0, 1.0, 1.0, 1.0])
    expected[:3, 3] = -24
    for aff in (img.affine, lab.affine):
        np.testing.assert_allclose(aff, expected)
    np.testing.assert_allclose(phantom_affine(48), expected)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 1

    data = np.asarray(img.dataobj)
    label = np.asarray(lab.dataobj)
    assert np.isfinite(data).all()
    brain = np.any(data != 0, axis=-1)
    assert 0.1 < brain.mean() < 0.5                     # a brain, not the whole box
    assert (label[~brain] == 0).all()                   # tumour only inside the brain
    counts = np.bincount(label.ravel(), minlength=4)
    assert len(counts) == 4 and (counts > 0).all()      # values exactly {0, 1, 2, 3}
    whole, core, enh = (label >= 1).sum(), (label >= 2).sum(), (label == 3).sum()
    assert whole > core > enh > 0                       # nested regions, strictly smaller
    # Each channel has its own intensity scale (not [0, 1]) and contrast: not copies.
    flat = data[brain]
    assert flat.max() > 50
    assert np.corrcoef(flat.T).min() < 0.9


def test_single_channels_do_not_solve_the_task(phantoms_small):
    result = otsu_baseline(phantoms_small)
    assert result["cases"] == 2
    assert set(result["per_modality"]) == set(CHANNELS)
    assert result["best_dice"] == max(result["per_modality"].values())
    assert 0.0 <= result["best_dice"] < 0.75


def test_tumour_contrast_needs_several_channels(phantoms_small):
    """Oedema is brighter than grey/white matter in T2 and FLAIR, but CSF is brighter
    still in T2 and darkest in FLAIR; the enhancing rim stands out in T1ce only."""
    img = np.asarray(nib.load(phantoms_small / "imagesTr/phantom_001.nii.gz").dataobj)
    label = np.asarray(nib.load(phantoms_small / "labelsTr/phantom_001.nii.gz").dataobj)
    brain = np.any(img != 0, axis=-1)
    t1, t1ce, t2, flair = (img[..., c] for c in range(4))
    normal = brain & (label == 0)
    oedema = label == 1
    csf = normal & (t2 > np.percentile(t2[normal], 97))            # brightest normal T2 voxels
    assert np.median(flair[csf]) < np.median(flair[oedema])
    assert np.median(flair[oedema]) > np.median(flair[normal])
    enh = label == 3
    ratio = lambda ch: np.median(ch[enh]) / np.median(ch[normal])  # noqa: E731
    assert ratio(t1ce) > 1.2 * ratio(t1)


def test_render_figure_writes_a_png(phantoms_small, tmp_path):
    out = render_figure(phantoms_small, tmp_path / "fig" / "phantoms.png", n_cases=2)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(out.parent.glob(".*"))              # no temp file left behind


def test_generate_refuses_a_foreign_folder_and_regenerates_its_own(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        generate(foreign, cases=2, size=32)
    assert (foreign / "notes.txt").read_text() == "keep me"

    out = tmp_path / "ph"
    generate(out, cases=4, size=32, test_fraction=0.25)
    generate(out, cases=2, size=32, test_fraction=0.0)   # fewer cases: no stale files left
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert not list((out / "imagesTs").iterdir())
    assert json.loads((out / "dataset.json").read_text())["numTest"] == 0
    (out / "dataset.json").unlink()                     # as if a run was interrupted
    generate(out, cases=2, size=32, test_fraction=0.0)
    assert (out / "dataset.json").is_file()


def test_cli_prepare_phantoms(tmp_path):
    out = tmp_path / "cli_ph"
    res = run_cli("prepare", "phantoms", "--out", out, "--cases", 3, "--size", 32, "--seed", 1)
    assert res.returncode == 0, res.stderr
    assert "Wrote 3 phantom cases (2 training, 1 test)" in res.stdout
    assert "segan prepare check" in res.stdout
    assert len(list((out / "imagesTr").glob("*.nii.gz"))) == 2

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "scan.nii.gz").write_bytes(b"x")
    res = run_cli("prepare", "phantoms", "--out", tmp_path / "busy", "--cases", 2, "--size", 32)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "busy" in lines[0]
