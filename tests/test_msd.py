"""Reading and validating data sets (MSD with/without dataset.json, BraTS), splits, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import run_cli
from data_prep.io import save_nifti
from data_prep.check import check_dataset
from data_prep.datalist import make_datalist, split_cases
from data_prep.msd import load_dataset
from data_prep.phantoms import generate
from segan.errors import UserError

EYE = np.eye(4)


@pytest.fixture(scope="module")
def base_set(tmp_path_factory) -> Path:
    """10 training cases of 32^3, no test cases: one case per defect below."""
    root = tmp_path_factory.mktemp("msd_base")
    generate(root, cases=10, size=32, seed=5, test_fraction=0.0)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# Each defect damages one file of its own case and returns that file.
def _truncated(root: Path) -> Path:
    f = root / "imagesTr/phantom_000.nii.gz"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


def _empty(root: Path) -> Path:
    f = root / "imagesTr/phantom_001.nii.gz"
    f.write_bytes(b"")
    return f


def _text(root: Path) -> Path:
    f = root / "labelsTr/phantom_002.nii.gz"
    f.write_text("this is not a scan\n")
    return f


def _nan(root: Path) -> Path:
    f = root / "imagesTr/phantom_003.nii.gz"
    img = nib.load(f)
    data = np.asarray(img.dataobj).copy()
    data[10:12, 10, 10, 1] = np.nan
    save_nifti(f, data, img.affine, dtype=np.float32)
    return f


def _shape(root: Path) -> Path:
    f = root / "labelsTr/phantom_004.nii.gz"
    img = nib.load(f)
    save_nifti(f, np.asarray(img.dataobj)[:, :, :30], img.affine)
    return f


def _affine(root: Path) -> Path:
    f = root / "labelsTr/phantom_005.nii.gz"
    img = nib.load(f)
    shifted = img.affine.copy()
    shifted[0, 3] += 2.0
    save_nifti(f, np.asarray(img.dataobj), shifted)
    return f


def _value(root: Path) -> Path:
    f = root / "labelsTr/phantom_006.nii.gz"
    img = nib.load(f)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    save_nifti(f, data, img.affine)
    return f


def _missing_label(root: Path) -> Path:
    f = root / "labelsTr/phantom_007.nii.gz"
    f.unlink()
    return f


DEFECTS = {"truncated": (_truncated, "truncated"), "empty": (_empty, "0 bytes"),
           "text": (_text, "not a readable NIfTI"), "nan": (_nan, "NaN"),
           "shape": (_shape, "shape"), "affine": (_affine, "affine"),
           "value": (_value, "[7]"), "missing_label": (_missing_label, "missing")}


def test_clean_phantoms_pass(phantoms_small):
    info = load_dataset(phantoms_small)
    assert info.layout == "msd" and info.name == "phantoms"
    assert info.channel_names == ["T1", "T1ce", "T2", "FLAIR"]
    assert info.labels == {0: "background", 1: "oedema", 2: "non-enhancing core", 3: "enhancing"}
    assert info.regions == {"whole_tumour": [1, 2, 3], "tumour_core": [2, 3], "enhancing": [3]}
    assert [c.name for c in info.training] == [f"phantom_{i:03d}" for i in range(4)]
    assert [c.name for c in info.test] == ["phantom_004", "phantom_005"]
    assert info.test[0].label == str(phantoms_small / "labelsTs/phantom_004.nii.gz")
    assert all(Path(p).is_absolute() for c in info.training for p in c.images + [c.label])
    rows, problems = check_dataset(info)
    assert problems == []
    assert rows[0] == {"case": "phantom_000", "split": "training", "channels": 4, "shape": [48, 48, 48],
                       "spacing": [1.0, 1.0, 1.0], "labels": [0, 1, 2, 3], "status": "ok"}
    assert [r["split"] for r in rows] == ["training"] * 4 + ["test"] * 2


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_alone_is_one_problem_naming_its_file(base_set, tmp_path, defect):
    root = _copy(base_set, tmp_path / "set")
    make, words = DEFECTS[defect]
    bad = make(root)
    rows, problems = check_dataset(load_dataset(root))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{bad}: ") and words in problems[0]
    assert ";" in problems[0]                           # says what to do
    assert sum(r["status"] != "ok" for r in rows) == 1


def test_all_defects_together_listed_by_the_cli(base_set, tmp_path):
    root = _copy(base_set, tmp_path / "broken")
    bad_files = [make(root) for make, _ in DEFECTS.values()]
    res = run_cli("prepare", "check", root, "--datalist", tmp_path / "list.json")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr + res.stdout
    problem_lines = [ln.strip() for ln in res.stdout.splitlines() if ln.startswith("  /")]
    assert len(problem_lines) == len(DEFECTS)
    for f in bad_files:
        assert sum(ln.startswith(f"{f}: ") for ln in problem_lines) == 1, f
    assert "8 problem(s):" in res.stdout
    assert res.stderr.strip().startswith("error: 8 problem(s)") and "data list not written" in res.stderr
    assert not (tmp_path / "list.json").exists()
    # The two clean cases are reported as such.
    assert "phantom_008  training  4   32x32x32" in res.stdout


def test_channel_count_mismatch_and_unlisted_label(base_set, tmp_path):
    root = _copy(base_set, tmp_path / "ch")
    (root / "dataset.json").unlink()                     # pair by name; expect the usual channel count
    f = root / "imagesTr/phantom_009.nii.gz"
    img = nib.load(f)
    save_nifti(f, np.asarray(img.dataobj)[..., :3], img.affine, dtype=np.float32)
    stray = root / "labelsTr/stray.nii.gz"
    save_nifti(stray, np.zeros((32, 32, 32)), EYE)
    _, problems = check_dataset(load_dataset(root))
    assert len(problems) == 2
    assert any(p.startswith(f"{f}: ") and "3 channel(s), expected 4 (channel_0" in p for p in problems)
    assert any(p.startswith(f"{stray}: ") and "label without an image" in p for p in problems)


def test_dataset_json_entry_pointing_to_a_missing_file(base_set, tmp_path):
    root = _copy(base_set, tmp_path / "js")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = "./imagesTr/nobody.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    _, problems = check_dataset(load_dataset(root))
    assert problems == [f"{root / 'imagesTr/nobody.nii.gz'}: listed in dataset.json but not found; "
                        "fix the entry or restore the file"]


def _vol(rng: np.random.Generator, shape=(16, 16, 12)) -> np.ndarray:
    return rng.normal(100, 10, shape).astype(np.float32)


def _lab(rng: np.random.Generator, values, shape=(16, 16, 12)) -> np.ndarray:
    return rng.choice(np.asarray(values), size=shape).astype(np.uint8)


def test_msd_without_json_channel_files_and_single_files(tmp_path):
    rng = np.random.default_rng(0)
    aff = np.diag([0.9, 0.9, 3.0, 1.0])                  # anisotropic
    split = tmp_path / "split"                           # case_0000.nii, case_0001.nii
    for case in ("b_case", "a_case"):
        for ch in range(2):
            save_nifti(split / f"imagesTr/{case}_{ch:04d}.nii", _vol(rng), aff, dtype=np.float32)
        save_nifti(split / f"labelsTr/{case}.nii", _lab(rng, [0, 1, 2]), aff)
    save_nifti(split / "imagesTs/new_0000.nii", _vol(rng), aff, dtype=np.float32)
    save_nifti(split / "imagesTs/new_0001.nii", _vol(rng), aff, dtype=np.float32)
    (split / "imagesTr/._a_case_0000.nii").write_bytes(b"\x00\x05macOS resource fork")   # ignored
    info = load_dataset(split)
    assert info.layout == "msd-nojson" and info.name == "split" and info.regions is None
    assert info.channel_names == ["channel_0", "channel_1"]
    assert info.labels == {0: "background", 1: "label_1", 2: "label_2"}
    assert [c.name for c in info.training] == ["a_case", "b_case"]
    assert [Path(p).name for p in info.training[0].images] == ["a_case_0000.nii", "a_case_0001.nii"]
    assert info.test[0].name == "new" and info.test[0].label is None
    rows, problems = check_dataset(info)
    assert problems == []
    assert rows[0]["spacing"] == [0.9, 0.9, 3.0] and rows[0]["channels"] == 2

    single = tmp_path / "single"                         # one 3D file per case
    for case in ("x", "y", "z"):
        save_nifti(single / f"imagesTr/{case}.nii.gz", _vol(rng), EYE, dtype=np.float32)
        save_nifti(single / f"labelsTr/{case}.nii.gz", _lab(rng, [0, 1]), EYE)
    info = load_dataset(single)
    assert info.channel_names == ["channel_0"] and len(info.training) == 3
    assert check_dataset(info)[1] == []


def _brats_case(root: Path, name: str, rng, suffixes, seg: bool = True) -> None:
    (root / name).mkdir(parents=True)
    for s in suffixes:
        # Scaled int16 with a non-zero background, as real exports can be.
        img = nib.Nifti1Image(rng.integers(50, 900, (16, 16, 12)).astype(np.int16), EYE)
        img.header.set_slope_inter(0.5, 10.0)
        nib.save(img, str(root / name / f"{name}{s}.nii.gz"))
    if seg:
        save_nifti(root / name / f"{name}_seg.nii.gz", _lab(rng, [0, 1, 2, 4]), EYE)


def test_brats_layout_loads_in_channel_order_and_passes(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "brats"
    _brats_case(root, "BraTS20_001", rng, ["_flair", "_t2", "_t1ce", "_t1"])
    _brats_case(root, "BraTS20_002", rng, ["_t1", "_t1ce", "_t2", "_flair"])
    info = load_dataset(root)
    assert info.layout == "brats"
    assert info.channel_names == ["t1", "t1ce", "t2", "flair"]
    assert [Path(p).name for p in info.training[0].images] == [
        "BraTS20_001_t1.nii.gz", "BraTS20_001_t1ce.nii.gz", "BraTS20_001_t2.nii.gz", "BraTS20_001_flair.nii.gz"]
    assert set(info.labels) == {0, 1, 2, 4} and info.labels[2] == "oedema"
    assert info.regions == {"whole_tumour": [1, 2, 4], "tumour_core": [1, 4], "enhancing": [4]}
    rows, problems = check_dataset(info)
    assert problems == [] and rows[0]["channels"] == 4 and rows[0]["labels"] == [0, 1, 2, 4]

    # BraTS 2023 names; a folder of unlabelled cases is a test set.
    val = tmp_path / "brats23"
    _brats_case(val, "BraTS-GLI-00001-000", rng, ["-t1n", "-t1c", "-t2w", "-t2f"], seg=False)
    info = load_dataset(val)
    assert info.training == [] and info.test[0].label is None
    assert info.test[0].images[0].endswith("-t1n.nii.gz") and info.test[0].images[3].endswith("-t2f.nii.gz")


def test_nnunet_v2_json_regions_and_v1_style_entries(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "Dataset001_X"
    for case in ("c1", "c2"):
        save_nifti(root / f"imagesTr/{case}_0000.nii.gz", _vol(rng), EYE, dtype=np.float32)
        save_nifti(root / f"labelsTr/{case}.nii.gz", _lab(rng, [0, 1, 2, 3]), EYE)
    meta = {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 2,
            "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}}
    (root / "dataset.json").write_text(json.dumps(meta))
    info = load_dataset(root)
    assert info.regions == {"whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]}
    assert set(info.labels) == {0, 1, 2, 3} and [c.name for c in info.training] == ["c1", "c2"]
    assert check_dataset(info)[1] == []
    # nnU-Net v1 lists ./imagesTr/c1.nii.gz while the file is c1_0000.nii.gz.
    meta["training"] = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("c1", "c2")]
    (root / "dataset.json").write_text(json.dumps(meta))
    info = load_dataset(root)
    assert [Path(p).name for p in info.training[0].images] == ["c1_0000.nii.gz"]
    assert check_dataset(info)[1] == []


def test_load_dataset_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a recognisable data set"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson/dataset.json").write_text("{not json")
    with pytest.raises(UserError, match=r"dataset\.json: not valid JSON"):
        load_dataset(tmp_path / "badjson")


def test_split_is_deterministic_by_case_and_order_free():
    names = [f"case_{i:02d}" for i in range(20)]
    tr, va = split_cases(names, seed=1, val_fraction=0.2)
    assert (tr, va) == split_cases(list(reversed(names)) + names[:3], seed=1, val_fraction=0.2)
    assert len(va) == 4 and sorted(tr + va) == names and not set(tr) & set(va)
    assert split_cases(names, seed=2, val_fraction=0.2)[1] != va
    assert split_cases(names[:2], seed=0, val_fraction=0.1)[1] != []    # at least one validation case
    assert split_cases(names, seed=0, val_fraction=0.0) == (names, [])


def test_kfold_folds_are_disjoint_and_cover_all_cases():
    names = [f"c{i}" for i in range(11)]
    vals = [split_cases(names, seed=0, val_fraction=0.2, folds=5, fold=k)[1] for k in range(5)]
    assert sorted(sum(vals, [])) == sorted(names)
    assert all(2 <= len(v) <= 3 for v in vals)
    for k in range(5):
        tr, va = split_cases(names, seed=0, val_fraction=0.2, folds=5, fold=k)
        assert not set(tr) & set(va) and len(tr) + len(va) == 11
    with pytest.raises(UserError, match="folds"):
        split_cases(names, seed=0, val_fraction=0.2, folds=12)
    with pytest.raises(UserError, match="fold 5"):
        split_cases(names, seed=0, val_fraction=0.2, folds=5, fold=5)


def test_make_datalist_content(phantoms_small):
    info = load_dataset(phantoms_small)
    dl = make_datalist(info, seed=0, val_fraction=0.25)
    assert dl["labels"] == {"0": "background", "1": "oedema", "2": "non-enhancing core", "3": "enhancing"}
    assert dl["split"] == {"seed": 0, "val_fraction": 0.25, "folds": None, "fold": 0}
    assert len(dl["training"]) == 3 and len(dl["validation"]) == 1
    assert {e["case"] for e in dl["training"] + dl["validation"]} == {c.name for c in info.training}
    assert dl["test"][0]["label"].endswith("labelsTs/phantom_004.nii.gz")
    assert dl["training"][0]["image"][0].startswith(str(phantoms_small))
    assert len(dl["fingerprint"]) == 64 and dl["fingerprint"] == make_datalist(info, seed=9)["fingerprint"]
    json.dumps(dl)


def test_cli_check_clean_json_datalist_and_errors(phantoms_small, tmp_path):
    out = tmp_path / "dl" / "list.json"
    res = run_cli("prepare", "check", phantoms_small, "--datalist", out, "--folds", 2)
    assert res.returncode == 0, res.stderr
    assert "no problems found" in res.stdout and "layout msd, 4 training + 2 test cases" in res.stdout
    dl = json.loads(out.read_text())
    assert len(dl["validation"]) == 2 and dl["split"]["folds"] == 2

    res = run_cli("prepare", "check", phantoms_small, "--json")
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["ok"] is True and len(report["cases"]) == 6

    # --fold F writes fold F: its validation cases are that fold's, and every fold's differ.
    vals = []
    for fold in (0, 1):
        path = tmp_path / f"fold{fold}.json"
        res = run_cli("prepare", "check", phantoms_small, "--datalist", path, "--folds", 2, "--fold", fold)
        assert res.returncode == 0, res.stderr
        listed = json.loads(path.read_text())
        assert listed["split"] == {"seed": 0, "val_fraction": 0.2, "folds": 2, "fold": fold}
        names = sorted(c.name for c in load_dataset(phantoms_small).training)
        assert sorted(e["case"] for e in listed["validation"]) == sorted(
            split_cases(names, seed=0, val_fraction=0.2, folds=2, fold=fold)[1])
        vals.append({e["case"] for e in listed["validation"]})
    assert not vals[0] & vals[1] and len(vals[0] | vals[1]) == 4
    assert {e["case"] for e in dl["validation"]} == vals[0]  # no --fold: fold 0

    for args, words in ((["prepare", "check", tmp_path / "nowhere"], "folder not found"),
                        (["prepare", "check", phantoms_small, "--datalist", out, "--folds", 9], "--folds 9"),
                        (["prepare", "check", phantoms_small, "--datalist", out, "--folds", 2, "--fold", 2],
                         "fold 2: must be in 0..1"),
                        (["prepare", "check", phantoms_small, "--fold", 1], "--fold 1 needs --folds")):
        res = run_cli(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
