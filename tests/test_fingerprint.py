"""Data-set fingerprint on real phantom variants and hand-made volumes: geometry, modality,
label volumes, the cache, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from data_prep.fingerprint import load_fingerprint
from data_prep.io import save_nifti
from data_prep.phantom_spec import resolve_spec
from data_prep.phantoms import generate


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp")
    out = {}
    for name in ("default", "t1_2mm", "aniso_1x1x4", "ct_lps_int16"):
        out[name] = root / name
        generate(out[name], cases=4, size=40, seed=1, spec=resolve_spec(name))
    return out


def _fp(source: Path, tmp_path: Path, name: str = "fp.json"):
    return load_fingerprint(source, cache_file=tmp_path / name)


def test_ct_is_detected_by_name_and_by_hounsfield_intensities(sets, tmp_path):
    fp, _, _ = _fp(sets["ct_lps_int16"], tmp_path)
    assert fp["modality"] == "CT" and fp["channels"][0]["modality_source"] == "dataset.json"
    assert -1024 <= fp["channels"][0]["min"] < -950
    assert 10 < fp["channels"][0]["foreground"]["p50"] < 40          # lesion HU, not air
    # The same scans under a neutral channel name: the intensities give CT away.
    anonymous = tmp_path / "anon"
    shutil.copytree(sets["ct_lps_int16"], anonymous)
    meta = json.loads((anonymous / "dataset.json").read_text())
    meta["channel_names"] = meta["modality"] = {"0": "scan"}
    (anonymous / "dataset.json").write_text(json.dumps(meta))
    fp, _, _ = _fp(anonymous, tmp_path, "anon.json")
    assert (fp["modality"], fp["channels"][0]["modality_source"]) == ("CT", "HU-like intensities")
    mr, _, _ = _fp(sets["default"], tmp_path, "mr.json")
    assert mr["modality"] == "MR" and [c["name"] for c in mr["channels"]] == ["T1", "T1ce", "T2", "FLAIR"]
    # MR intensities under names that say nothing: not taken for CT.
    unnamed = tmp_path / "unnamed"
    shutil.copytree(sets["default"], unnamed)
    meta = json.loads((unnamed / "dataset.json").read_text())
    meta["channel_names"] = meta["modality"] = {str(i): f"seq{i}" for i in range(4)}
    (unnamed / "dataset.json").write_text(json.dumps(meta))
    fp, _, _ = _fp(unnamed, tmp_path, "unnamed.json")
    assert fp["modality"] == "other" and {c["modality_source"] for c in fp["channels"]} == {"default"}


def test_geometry_of_the_2mm_and_1x1x4_sets(sets, tmp_path):
    fp, _, _ = _fp(sets["t1_2mm"], tmp_path)
    assert fp["n_cases"] == 3 and len(fp["channels"]) == 1
    assert fp["summary"]["median_spacing"] == [2.0, 2.0, 2.0] and fp["summary"]["median_shape"] == [20, 20, 20]
    aniso, _, _ = _fp(sets["aniso_1x1x4"], tmp_path, "aniso.json")
    assert aniso["summary"]["anisotropy"] == 4.0
    assert aniso["summary"]["spacing_p10"] == [1.0, 1.0, 4.0]
    assert aniso["summary"]["median_shape"] == [40, 40, 10] and aniso["summary"]["median_size_mm"] == [40, 40, 40]
    ct, _, _ = _fp(sets["ct_lps_int16"], tmp_path, "ct.json")
    assert ct["summary"]["orientations"] == {"LPS": 3} and ct["cases"][0]["orientation"] == "LPS"
    fg = ct["cases"][0]["channels"][0]["foreground"]
    assert list(fg) == ["p0.5", "p5", "p50", "p95", "p99.5", "mean", "std"]
    assert fg["p0.5"] <= fg["p5"] <= fg["p50"] <= fg["p95"] <= fg["p99.5"]
    assert 0 < ct["cases"][0]["body_fraction"] < 0.6                  # the head, not the air around it


def test_label_volumes_in_ml_and_components_of_known_spheres(tmp_path):
    root = tmp_path / "balls"
    spacing = (1.5, 1.5, 3.0)
    affine = np.diag([*spacing, 1.0])
    ijk = np.indices((40, 40, 20)).astype(float)
    world = ijk * np.array(spacing)[:, None, None, None]

    def ball(centre, radius):
        return ((world - np.array(centre)[:, None, None, None]) ** 2).sum(axis=0) <= radius ** 2

    training = []
    rng = np.random.default_rng(0)
    for case, (r1, r2) in enumerate([(9.0, 6.0), (9.0, 6.0)]):
        label = np.zeros((40, 40, 20), np.uint8)
        label[ball((20, 20, 30), r1)] = 1
        label[ball((45, 45, 30), r2)] = 1
        image = 100 + 20 * label + rng.normal(0, 2, label.shape)
        save_nifti(root / "imagesTr" / f"b{case}.nii.gz", image, affine, dtype=np.float32)
        save_nifti(root / "labelsTr" / f"b{case}.nii.gz", label, affine)
        training.append({"image": f"./imagesTr/b{case}.nii.gz", "label": f"./labelsTr/b{case}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "ball"},
                                                   "modality": {"0": "MR"}, "training": training}))
    fp, _, _ = _fp(root, tmp_path)
    voxels = int(label.sum())
    case = fp["cases"][1]["labels"]["1"]
    assert case["volume_ml"] == pytest.approx(voxels * 1.5 * 1.5 * 3.0 / 1000)
    assert case["volume_ml"] == pytest.approx(4 / 3 * np.pi * (9 ** 3 + 6 ** 3) / 1000, rel=0.1)
    assert case["components"] == 2 and fp["labels"]["1"]["components"]["max"] == 2
    assert fp["labels"]["1"]["name"] == "ball" and fp["labels"]["1"]["cases_present"] == 2
    assert fp["channels"][0]["foreground"]["mean"] == pytest.approx(120, abs=0.5)
    assert (fp["modality"], fp["channels"][0]["modality_source"]) == ("MR", "dataset.json")


def test_cache_is_hit_the_second_time_and_dropped_when_a_file_changes(sets, tmp_path):
    source = tmp_path / "set"
    shutil.copytree(sets["t1_2mm"], source)
    first, cache, hit = _fp(source, tmp_path)
    assert not hit and cache.is_file()
    again, cache2, hit = _fp(source, tmp_path)
    assert hit and cache2 == cache and again == first
    stored = json.loads(cache.read_text())
    stored["fingerprint"]["marker"] = "from the cache"
    cache.write_text(json.dumps(stored))
    assert _fp(source, tmp_path)[0]["marker"] == "from the cache"
    label = source / "labelsTr" / "phantom_000.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10 ** 9))
    fresh, _, hit = _fp(source, tmp_path)
    assert not hit and "marker" not in fresh and fresh["summary"] == first["summary"]


def test_datalist_source_caches_beside_the_list(sets, tmp_path):
    listing = tmp_path / "lists" / "aniso.json"
    res = run_cli("prepare", "check", sets["aniso_1x1x4"], "--datalist", listing)
    assert res.returncode == 0, res.stderr
    fp, cache, hit = load_fingerprint(listing)
    assert cache == tmp_path / "lists" / "aniso.fingerprint.json" and cache.is_file() and not hit
    assert fp["n_cases"] == 3 and fp["summary"]["anisotropy"] == 4.0   # training + validation cases


def test_cli_prints_json_and_bad_input_exits_2(sets, tmp_path):
    env = {"SEGAN_CACHE": str(tmp_path / "cache")}
    res = run_cli("prepare", "fingerprint", sets["t1_2mm"], "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["summary"]["median_spacing"] == [2.0, 2.0, 2.0]
    res = run_cli("prepare", "fingerprint", sets["t1_2mm"], env=env)
    assert "median spacing 2 x 2 x 2 mm" in res.stdout and "read from" in res.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(sets["t1_2mm"] / "imagesTr", unlabelled / "imagesTr")     # no labelsTr/, no dataset.json
    mixed = tmp_path / "mixed"
    for case, shape in (("a", (24, 24, 24, 2)), ("b", (24, 24, 24))):
        image = np.random.default_rng(0).normal(100, 10, shape)
        label = np.zeros(shape[:3], np.uint8)
        label[8:16, 8:16, 8:16] = 1
        save_nifti(mixed / "imagesTr" / f"{case}.nii.gz", image, np.eye(4), dtype=np.float32)
        save_nifti(mixed / "labelsTr" / f"{case}.nii.gz", label, np.eye(4))
    for folder, words in ((empty, "not a recognisable data set"), (unlabelled, "no labelled training cases"),
                          (mixed, "has 1 channel(s) but a has 2")):
        res = run_cli("prepare", "fingerprint", folder, env=env)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        assert words in lines[0] and "Traceback" not in res.stderr
