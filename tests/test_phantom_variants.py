"""Phantom variants: each really has the voxel size, orientation, data type, header, channels,
intensities and labels it claims, shows the same physical object, and loads through the pipeline."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import run_cli
from data_prep.phantom_render import downsample, make_grid
from data_prep.phantom_spec import VARIANTS, resolve_spec
from data_prep.phantoms import generate

SIZE = 40  # mm field of view per side (40^3 voxels at 1 mm)


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    """The four benchmark variants and the default, 4 cases each (3 training, 1 test), seed 0."""
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name in ("default", "t1_2mm", "aniso_1x1x4", "ct_lps_int16", "small_lesions"):
        out[name] = root / name
        generate(out[name], cases=4, size=SIZE, seed=0, spec=resolve_spec(name))
    return out


def _raw_header(path: Path) -> nib.Nifti1Header:
    """The header as stored (nibabel moves scl_slope/scl_inter off a loaded image's header)."""
    with gzip.open(path) as f:
        return nib.Nifti1Header.from_fileobj(f)


def _load(root: Path, case: int = 0, split: str = "Tr") -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray]:
    img = nib.load(root / f"images{split}" / f"phantom_{case:03d}.nii.gz")
    label = np.asarray(nib.load(root / f"labels{split}" / f"phantom_{case:03d}.nii.gz").dataobj)
    return img, img.get_fdata(dtype=np.float32), label


def _world_centroid(label: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(label > 0).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _meta(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def test_t1_2mm_is_one_channel_at_2mm_with_mixed_int16_and_float32(variants):
    root = variants["t1_2mm"]
    meta = _meta(root)
    assert meta["channel_names"] == meta["modality"] == {"0": "T1"}
    assert meta["labels"] == {"0": "background", "1": "lesion"} and meta["regions"] == {"lesion": [1]}
    even, even_data, label = _load(root, 0)
    odd, odd_data, _ = _load(root, 1)
    for img in (even, odd):
        assert img.shape == (SIZE // 2,) * 3                       # same 40 mm, half the voxels per axis
        assert img.header.get_zooms() == (2.0, 2.0, 2.0)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert even.get_data_dtype() == np.float32 and odd.get_data_dtype() == np.int16
    raw = _raw_header(root / "imagesTr" / "phantom_001.nii.gz")
    assert raw["scl_slope"] > 0 and raw["scl_inter"] == 0
    stored = np.asarray(odd.dataobj.get_unscaled())
    assert 25_000 <= stored.max() <= 30_000                        # the maximum maps to 30000
    np.testing.assert_allclose(odd_data, stored * raw["scl_slope"], rtol=1e-6)
    assert set(np.unique(label)) == {0, 1}
    # The same physical object as the 1 mm default (same seed): the 2 mm lesion is the
    # 1 mm one averaged onto 2 mm voxels, in the same place.
    default_img, _, default_label = _load(variants["default"], 0)
    np.testing.assert_allclose(_world_centroid(label, even.affine),
                               _world_centroid(default_label, default_img.affine), atol=0.5)
    assert abs(label.sum() * 8 - (default_label > 0).sum()) < 0.1 * (default_label > 0).sum()


def test_aniso_1x1x4_has_four_times_fewer_axial_slices_of_the_same_object(variants):
    img, data, label = _load(variants["aniso_1x1x4"], 0)
    default_img, default_data, default_label = _load(variants["default"], 0)
    assert img.shape == (SIZE, SIZE, SIZE // 4, 4) and img.get_data_dtype() == np.float32
    assert img.header.get_zooms()[:3] == (1.0, 1.0, 4.0)
    assert np.linalg.norm(img.affine[:3, :3], axis=0).tolist() == [1.0, 1.0, 4.0]
    assert set(np.unique(label)) == {0, 1, 2, 3}                   # nested tumour labels kept
    np.testing.assert_allclose(_world_centroid(label, img.affine),
                               _world_centroid(default_label, default_img.affine), atol=0.75)
    # Thick slices: the brain seen at 1x1x4 is the 1 mm brain averaged over 4 slices.
    brain, default_brain = np.any(data > 0, axis=-1), np.any(default_data > 0, axis=-1)
    assert abs(brain.sum() * 4 - default_brain.sum()) < 0.05 * default_brain.sum()
    assert _meta(variants["aniso_1x1x4"])["regions"] == {"whole_tumour": [1, 2, 3], "tumour_core": [2, 3],
                                                         "enhancing": [3]}


def test_ct_lps_int16_stores_hounsfield_units_as_hu_plus_1024(variants):
    root = variants["ct_lps_int16"]
    meta = _meta(root)
    assert meta["channel_names"] == {"0": "CT"} and meta["tensorImageSize"] == "3D"
    img, hu, label = _load(root, 0)
    assert img.shape == (SIZE,) * 3 and img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    raw = _raw_header(root / "imagesTr" / "phantom_000.nii.gz")
    assert (float(raw["scl_slope"]), float(raw["scl_inter"])) == (1.0, -1024.0)
    assert np.asarray(img.dataobj.get_unscaled()).min() >= 0       # HU >= -1024 stored from 0 up
    assert abs(np.median(hu[:3, :3, :]) + 1000) < 15               # air outside the head
    assert (hu < -500).mean() > 0.3
    assert np.percentile(hu, 99.5) > 400                           # skull
    assert ((hu > -150) & (hu < -60)).sum() > 100                  # subcutaneous fat
    soft = hu[(hu > -50) & (hu < 150)]
    assert 20 < np.median(soft) < 45                               # brain / soft tissue
    around = ndimage.binary_dilation(label > 0, iterations=3) & (label == 0) & (hu > -50) & (hu < 150)
    assert 3 < np.median(hu[around]) - np.median(hu[label > 0]) < 25   # lesion a little darker
    assert set(np.unique(label)) == {0, 1}


def test_small_lesions_uint8_las_sform_only(variants):
    root = variants["small_lesions"]
    img, data, label = _load(root, 0)
    assert img.shape == (SIZE, SIZE, SIZE, 4) and img.get_data_dtype() == np.uint8
    raw = _raw_header(root / "imagesTr" / "phantom_000.nii.gz")
    assert (int(raw["qform_code"]), int(raw["sform_code"])) == (0, 1)
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    assert (data.min(), data.max()) == (0.0, 255.0)                # rescaled, no header scaling
    assert np.isnan(raw["scl_slope"]) or float(raw["scl_slope"]) in (0.0, 1.0)
    components, count = ndimage.label(label > 0)
    assert count >= 4 and np.bincount(components.ravel())[1:].max() < 0.01 * label.size
    assert _meta(root)["labels"] == {"0": "background", "1": "lesion"}


def test_orientation_really_flips_the_voxel_axes(tmp_path, variants):
    generate(tmp_path / "lps", cases=2, size=SIZE, seed=0, test_fraction=0.0, spec=resolve_spec(orientation="LPS"))
    ras_img, ras, ras_label = _load(variants["default"], 0)
    lps_img, lps, lps_label = _load(tmp_path / "lps", 0)
    np.testing.assert_array_equal(lps, ras[::-1, ::-1])
    np.testing.assert_array_equal(lps_label, ras_label[::-1, ::-1])
    corner = np.array([1, 2, 3, 1.0])                              # a voxel lands on the same world point
    flipped = np.array([SIZE - 2, SIZE - 3, 3, 1.0])
    np.testing.assert_allclose(ras_img.affine @ corner, lps_img.affine @ flipped)


def test_downsampling_is_area_weighted():
    grid = make_grid(48, (1.5, 2.0, 4.0))
    assert grid.shape == (32, 24, 12)
    rng = np.random.default_rng(0)
    volume = rng.random((48, 48, 48)).astype(np.float32)
    np.testing.assert_allclose(downsample(volume, grid).sum() * 1.5 * 2 * 4, volume.sum(), rtol=1e-5)
    np.testing.assert_allclose(downsample(np.full((48,) * 3, 7.0, np.float32), grid), 7.0, rtol=1e-6)
    half = np.zeros((48, 48, 48), np.float32)
    half[:, :, :2] = 1.0                                           # half of the first 4 mm slice
    assert np.allclose(downsample(half, grid)[:, :, 0], 0.5) and not downsample(half, grid)[:, :, 1:].any()


def test_variants_are_deterministic_per_seed(tmp_path):
    digests = []
    for name in ("a", "b", "c"):
        generate(tmp_path / name, cases=2, size=32, seed=0 if name != "c" else 1, spec=resolve_spec("ct_lps_int16"))
        digests.append({p.name + p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted((tmp_path / name).rglob("*.nii.gz"))})
    assert digests[0] == digests[1] and digests[0] != digests[2]


@pytest.mark.parametrize("name", ["t1_2mm", "aniso_1x1x4", "ct_lps_int16", "small_lesions"])
def test_every_variant_passes_prepare_check(variants, name):
    res = run_cli("prepare", "check", variants[name])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no problems found" in res.stdout


def test_cli_options_override_a_variant_and_bad_combinations_exit_2(tmp_path):
    out = tmp_path / "ct2"
    res = run_cli("prepare", "phantoms", "--out", out, "--cases", 2, "--size", 32, "--variant", "ct_lps_int16",
                  "--spacing", "2,2,4", "--sform-only")
    assert res.returncode == 0, res.stderr
    assert "16x16x8 voxels at 2x2x4 mm (LPS, int16, sform only, variant custom)" in res.stdout
    img = nib.load(out / "imagesTr" / "phantom_000.nii.gz")
    assert img.header.get_zooms() == (2.0, 2.0, 4.0) and int(_raw_header(img.file_map["image"].filename)
                                                            ["qform_code"]) == 0
    for bad, key in ((["--modality", "ct", "--channels", "4"], "--channels 4"), (["--spacing", "0"], "--spacing"),
                     (["--orientation", "RAR"], "--orientation"), (["--spacing", "6"], "--size 32")):
        res = run_cli("prepare", "phantoms", "--out", tmp_path / "bad", "--cases", 2, "--size", 32, *bad)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], bad
    assert set(VARIANTS) >= {"default", "t1_2mm", "aniso_1x1x4", "ct_lps_int16", "small_lesions"}


@pytest.mark.slow
def test_smoke_training_runs_on_the_ct_variant(variants, tmp_path):
    res = run_cli("train", "-c", Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml",
                  "--set", f"data.root={variants['ct_lps_int16']}", "--set", f"preprocess.cache_dir={tmp_path / 'c'}",
                  "--set", "tracking.enabled=false", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2",
                  "--set", "train.batch_size=2", "--set", "train.val_max_cases=1", "--out", tmp_path / "run",
                  env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "val_dice_lesion" in res.stdout + res.stderr
    assert (tmp_path / "run" / "best.pt").is_file()
