"""Training data: data set -> cached cases -> reproducible 2D/3D samples and validation volumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.io import save_nifti
from data_prep.msd import Case
from data_prep.preprocess import CaseCache
from segan.config import AugmentConfig, Config, DataConfig, PreprocessConfig
from segan.data import PatchDataset, build_data, make_loader
from segan.errors import UserError
from segan.regions import labels_to_regions

CHANNELS = ["T1", "T1ce", "T2", "FLAIR"]
LABELS = {"0": "background", "1": "oedema", "2": "core", "3": "enhancing"}
REGIONS = {"whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]}
NO_AUG = AugmentConfig(flip_prob=0.0, affine_prob=0.0, intensity_prob=0.0)
# Real-world variety: RAS and LPS, 1 mm and anisotropic voxels, offset noisy background.
GRIDS = [(np.diag([1.0, 1.0, 1.0, 1.0]), (40, 40, 40)),
         (np.diag([1.0, 1.0, 1.0, 1.0]), (38, 42, 40)),
         (np.diag([-1.0, -1.0, 1.0, 1.0]), (40, 40, 36)),
         (np.diag([1.2, 1.2, 2.0, 1.0]), (34, 34, 20))]


def _write_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for k, (affine, shape) in enumerate(GRIDS):
        mm = np.stack(np.meshgrid(*[np.arange(s) * abs(affine[i, i]) for i, s in enumerate(shape)],
                                  indexing="ij"), -1)
        centre = mm.reshape(-1, 3).mean(0)
        head = (((mm - centre) / 17.0) ** 2).sum(-1) < 1
        r = (((mm - centre - rng.uniform(-4, 4, 3)) / 6.0) ** 2).sum(-1)
        label = np.zeros(shape, np.uint8)
        label[r < 1], label[r < 0.45], label[r < 0.15] = 1, 2, 3
        image = np.stack([80 + head * (300 + 40 * c) + label * (25 * (c + 1)) + rng.normal(0, 5, shape)
                          for c in range(4)], -1)
        save_nifti(root / f"imagesTr/case_{k}.nii.gz", image, affine, dtype=np.float32)
        save_nifti(root / f"labelsTr/case_{k}.nii.gz", label, affine)
        training.append({"image": f"./imagesTr/case_{k}.nii.gz", "label": f"./labelsTr/case_{k}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "tiny", "channel_names": dict(enumerate(CHANNELS)), "labels": LABELS, "regions": REGIONS,
        "numTraining": len(training), "file_ending": ".nii.gz", "training": training, "test": []}))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "tiny"
    _write_dataset(root)
    return root


def _cfg(root: Path, dims: int = 2, patch=(32, 32), augment: AugmentConfig = NO_AUG, **data) -> Config:
    data = {"root": str(root), "spatial_dims": dims, "patch_size": list(patch), "samples_per_epoch": 64,
            "val_fraction": 0.25, "augment": augment, **data}
    return Config(seed=3, data=DataConfig(**data),
                  preprocess=PreprocessConfig(cache_dir=str(root.parent / "cache")))


def _items(ds: PatchDataset, epoch: int, n: int | None = None) -> list[dict]:
    ds.set_epoch(epoch)
    return [ds[i] for i in range(n or len(ds))]


def test_bundle_from_msd_folder(dataset):
    bundle = build_data(_cfg(dataset))
    assert bundle.channels == CHANNELS and bundle.dataset_name == "tiny"
    assert bundle.region_names == list(REGIONS) and bundle.region_labels == list(REGIONS.values())
    assert bundle.label_names == {int(k): v for k, v in LABELS.items()}
    assert len(bundle.val_cases) == 1 and len(bundle.datalist["training"]) == 3
    assert bundle.preprocess_spec["orientation"] == "RAS" and "channels" not in bundle.preprocess_spec
    assert len(bundle.train_set) == 64 and hasattr(bundle.train_set, "set_epoch")
    for case in bundle.val_cases:
        assert case.image.dtype == np.float32 and case.image.shape[0] == 4
        assert case.target.dtype == np.float32 and case.target.shape == (3, *case.image.shape[1:])
        whole, core, enh = case.target
        assert (enh <= core).all() and (core <= whole).all() and enh.sum() > 0  # nested regions


def test_datalist_file_default_regions_and_channel_subset(dataset, tmp_path):
    entries = [{"case": f"case_{k}", "image": [f"imagesTr/case_{k}.nii.gz"], "label": f"labelsTr/case_{k}.nii.gz"}
               for k in range(4)]
    datalist = {"root": str(dataset), "name": "listed", "channel_names": CHANNELS, "labels": LABELS,
                "training": entries[:3], "validation": entries[3:], "test": []}
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    bundle = build_data(_cfg(dataset, datalist=str(path), channels=["flair", "T1"]))
    assert bundle.dataset_name == "listed" and bundle.channels == ["FLAIR", "T1"]
    assert bundle.preprocess_spec["channels"] == [3, 0]
    assert bundle.region_names == ["oedema", "core", "enhancing"]  # one region per label (MSD default)
    assert bundle.region_labels == [[1], [2], [3]]
    item = bundle.train_set[0]
    assert item["image"].shape == (2, 32, 32) and item["target"].shape == (3, 32, 32)
    (val,) = bundle.val_cases
    # label 3 voxels are exactly the "enhancing" channel of the target
    assert val.target[2].sum() > 0 and ((val.target.sum(0) <= 1)).all()

    with pytest.raises(UserError, match="data.channels: 'PD' is not a channel.*FLAIR"):
        build_data(_cfg(dataset, datalist=str(path), channels=["PD"]))
    with pytest.raises(UserError, match="data.regions: region 'tumour'.*\\[7\\]"):
        build_data(_cfg(dataset, datalist=str(path), regions={"tumour": [1, 7]}))
    with pytest.raises(UserError, match="data.datalist .*missing.json: file not found"):
        build_data(_cfg(dataset, datalist=str(tmp_path / "missing.json")))


def test_missing_root_is_a_user_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as err:
        build_data(_cfg(missing))
    message = str(err.value)
    assert str(missing) in message and "folder not found" in message
    assert f"segan prepare phantoms --out {missing}" in message and "--set data.root=" in message


def test_2d_items_shapes_padding_and_targets(dataset):
    bundle = build_data(_cfg(dataset, patch=(48, 56), fg_fraction=0.5))
    ds = bundle.train_set
    for item in _items(ds, 0, 24):
        image, target = item["image"], item["target"]
        assert image.dtype == torch.float32 and image.shape == (4, 48, 56)
        assert target.dtype == torch.float32 and target.shape == (3, 48, 56)
        assert set(torch.unique(target).tolist()) <= {0.0, 1.0}
        assert (target[2] <= target[1]).all() and (target[1] <= target[0]).all()
        # slices are under 48 x 56 voxels: the padding is each channel's volume minimum
        low = image.amin(dim=(1, 2))
        assert any(np.allclose(low.numpy(), pad) for pad in ds.pad)
        assert ((image == low[:, None, None]).sum(dim=(1, 2)) >= 48 * 56 - 42 * 42).all()
    # with augmentation on, shapes and binary targets still hold
    aug = build_data(_cfg(dataset, patch=(32, 32), augment=AugmentConfig(flip_prob=0.5, affine_prob=1.0)))
    for item in _items(aug.train_set, 0, 8):
        assert item["image"].shape == (4, 32, 32)
        assert set(torch.unique(item["target"]).tolist()) <= {0.0, 1.0}


def test_3d_items_shapes_and_foreground_patches(dataset):
    bundle = build_data(_cfg(dataset, dims=3, patch=(16, 16, 16), fg_fraction=1.0, augment=AugmentConfig()))
    for item in _items(bundle.train_set, 0, 12):
        assert item["image"].shape == (4, 16, 16, 16) and item["image"].dtype == torch.float32
        assert item["target"].shape == (3, 16, 16, 16) and item["target"].dtype == torch.float32
        assert item["target"][0].sum() > 0  # centred on a labelled voxel (an affine never moves it out)
    padded = build_data(_cfg(dataset, dims=3, patch=(48, 48, 48)))
    item = padded.train_set[0]
    assert item["image"].shape == (4, 48, 48, 48) and item["target"].shape == (3, 48, 48, 48)


@pytest.mark.parametrize("fg_fraction", [0.0, 0.7, 1.0])
def test_fg_fraction_is_honoured(dataset, fg_fraction):
    # patches larger than any slice: an item holds foreground iff its slice does
    ds = build_data(_cfg(dataset, patch=(64, 64), fg_fraction=fg_fraction, samples_per_epoch=400)).train_set
    depth = [np.load(Path(f), mmap_mode="r").shape[-1] for f, _ in ds.files]
    p_slice = np.mean([len(s) / d for s, d in zip(ds.fg_slices, depth)])
    expected = fg_fraction + (1 - fg_fraction) * p_slice
    observed = np.mean([float(item["target"][0].any()) for item in _items(ds, 0)])
    assert 0.1 < p_slice < 0.6
    assert abs(observed - expected) < 0.08, (observed, expected)


def test_stream_is_deterministic_across_builds_epochs_and_workers(dataset):
    cfg = _cfg(dataset, patch=(32, 32), augment=AugmentConfig(affine_prob=0.5), samples_per_epoch=32)
    first, second = build_data(cfg).train_set, build_data(cfg).train_set
    a0, b0 = _items(first, 0), _items(second, 0)
    for x, y in zip(a0, b0):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
    a1 = _items(first, 1)
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a0, a1))

    def batches(num_workers: int) -> list[torch.Tensor]:
        ds = build_data(cfg).train_set
        loader = make_loader(ds, batch_size=8, num_workers=num_workers, seed=cfg.seed)
        out = []
        for epoch in (0, 1):  # persistent workers must see the new epoch
            ds.set_epoch(epoch)
            out += [torch.cat([b["image"].flatten(), b["target"].flatten()]) for b in loader]
        return out

    single, multi = batches(0), batches(2)
    assert len(single) == len(multi) == 8
    assert all(torch.equal(x, y) for x, y in zip(single, multi))
    assert torch.equal(single[0][: 8 * 4 * 32 * 32], torch.stack([x["image"] for x in a0[:8]]).flatten())


def test_regions_from_labels_match_cached_label(dataset):
    bundle = build_data(_cfg(dataset))
    (val,) = bundle.val_cases
    entry = bundle.datalist["validation"][0]
    cache = CaseCache(Path(str(dataset.parent / "cache")), bundle.preprocess_spec)
    cached = cache.get(Case(entry["case"], list(entry["image"]), entry["label"]))
    assert np.array_equal(val.target, labels_to_regions(np.asarray(cached.label), bundle.region_labels))
    assert np.array_equal(val.image, cached.image)


# ---------------------------------------------------------------- file checks before training
def test_training_on_broken_files_exits_2_naming_every_one(dataset, tmp_path):
    """The issue's case: unreadable scans in a folder without dataset.json. `segan train` runs
    `prepare check`'s per-file checks first (no lead about data.regions) and names every file."""
    root = tmp_path / "broken"
    shutil.copytree(dataset, root)
    (root / "dataset.json").unlink()
    broken = [root / "imagesTr/case_0.nii.gz", root / "labelsTr/case_1.nii.gz", root / "labelsTr/case_2.nii.gz",
              root / "labelsTr/case_3.nii.gz", root / "labelsTr/case_0.nii.gz"]
    broken[0].write_text("not a scan\n")
    broken[1].write_bytes(broken[1].read_bytes()[:200])  # truncated gzip
    broken[2].write_bytes(b"")
    broken[3].write_text("not a label map either\n")
    broken[4].write_text("plain text\n")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "segan", "train", "-c", "configs/smoke.yaml",
                           "--set", f"data.root={root}", "--set", f"preprocess.cache_dir={tmp_path / 'cache'}",
                           "--set", "tracking.enabled=false", "--set", "data.patch_size=[32, 32]",
                           "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=repo, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "data.regions" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: {len(broken)} problem(s) in the training data of {root}"), proc.stderr
    for path in broken:
        assert sum(line.strip().startswith(f"{path}:") for line in lines) == 1, (path, proc.stderr)
    assert "not a readable NIfTI" in proc.stderr and "truncated" in proc.stderr and "0 bytes" in proc.stderr
    assert lines[-1].startswith("fix them and train again")
    assert not (tmp_path / "run").exists()  # nothing was built or written


def test_file_checks_are_remembered_by_size_and_mtime(dataset, tmp_path):
    """A clean data set is read once: a later change that keeps a file's size and mtime is not
    seen (the check was not run again), a new mtime is."""
    root = tmp_path / "tiny"
    shutil.copytree(dataset, root)
    cfg = _cfg(root)
    build_data(cfg)
    record = json.loads((root.parent / "cache" / "checked.json").read_text())
    assert len(record["cases"]) == len(GRIDS)  # training + validation cases, all clean
    victim = root / "labelsTr/case_1.nii.gz"
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)  # broken, but same size ...
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and same mtime: taken as the checked file
    assert len(build_data(cfg).datalist["training"]) == 3
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(UserError, match=r"1 problem\(s\) in the training data") as exc:
        build_data(cfg)
    assert f"{victim}: not a readable NIfTI file" in str(exc.value)
