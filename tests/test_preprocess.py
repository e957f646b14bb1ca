"""Preprocessing: orientation/spacing/crop/normalisation, exact inversion, foreground mask, cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.cache import CheckRecord, enforce_limit, scan
from data_prep.io import ScanError, save_nifti
from data_prep.msd import Case
from data_prep.preprocess import (
    CaseCache,
    Preprocessor,
    default_cache_dir,
    foreground_mask,
    spec_from_config,
    spec_hash,
)
from segan.config import PreprocessConfig
from segan.errors import UserError

LPS_ANISO = np.array([[-1.2, 0, 0, 40.0], [0, -0.9, 0, 30.0], [0, 0, 3.0, -35.0], [0, 0, 0, 1]])


def _spec(**kw) -> dict:
    return {**spec_from_config(PreprocessConfig()), **kw}


def _world(shape, affine) -> np.ndarray:
    """(X, Y, Z, 3) world coordinates (mm) of every voxel centre."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _scan(shape=(56, 72, 22), affine=LPS_ANISO, offset=100.0, noise=0.0, seed=0):
    """Two-channel 'head' (ellipsoid, dark ventricle) with a nested blob label; background = ``offset``."""
    rng = np.random.default_rng(seed)
    w = _world(shape, affine)
    centre = w.reshape(-1, 3).mean(0)
    r = (w - centre) / np.array([26.0, 24.0, 24.0])
    head = (r ** 2).sum(-1) < 1
    ventricle = (((w - centre) / np.array([5.0, 7.0, 6.0])) ** 2).sum(-1) < 1
    blob = (((w - centre - [8, 6, 0]) / np.array([10.0, 9.0, 12.0])) ** 2).sum(-1) < 1
    core = (((w - centre - [8, 6, 0]) / np.array([6.0, 5.0, 8.0])) ** 2).sum(-1) < 1
    t1 = offset + head * (500.0 - 300.0 * ventricle) + blob * 150.0
    t2 = offset + head * 250.0 + blob * 300.0
    image = np.stack([t1, t2]).astype(np.float32)
    if noise:
        image += np.abs(rng.normal(0, noise, image.shape)).astype(np.float32)  # Rician-like, positive
    label = (blob.astype(np.int16) + core).astype(np.int16)
    return image, label, head


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_spec_is_json_and_validated():
    spec = spec_from_config(PreprocessConfig())
    assert json.loads(json.dumps(spec)) == spec
    assert set(spec) == {"version", "orientation", "spacing", "normalize", "percentiles", "crop_foreground", "margin"}
    assert spec_hash(spec) == spec_hash(dict(reversed(list(spec.items()))))
    with pytest.raises(UserError, match="preprocess.normalize"):
        Preprocessor(_spec(normalize="minmax"))
    with pytest.raises(UserError, match="preprocess.orientation"):
        Preprocessor(_spec(orientation="RAR"))
    with pytest.raises(UserError, match="preprocess.spacing"):
        Preprocessor(_spec(spacing=[1, 0, 1]))
    with pytest.raises(UserError, match="newer"):
        Preprocessor(_spec(version=99))


def test_lps_anisotropic_to_ras_and_back():
    image, label, _ = _scan(offset=100.0, noise=5.0)
    pre = Preprocessor(_spec(spacing=[1.0, 1.0, 1.0], margin=3))
    out = pre(image, LPS_ANISO, label)
    # RAS, 1 mm: a diagonal positive affine
    np.testing.assert_allclose(out.affine[:3, :3], np.eye(3), atol=1e-6)
    assert out.image.dtype == np.float32 and out.label.dtype == np.uint8
    assert out.image.shape[1:] == out.label.shape
    # the crop removed background: smaller than the resampled grid
    assert np.prod(out.image.shape[1:]) < np.prod(out.resampled_shape)
    # tumour volume (mm^3) and world position survive resampling
    vol_before = (label > 0).sum() * abs(np.linalg.det(LPS_ANISO[:3, :3]))
    assert abs((out.label > 0).sum() - vol_before) / vol_before < 0.05
    com_before = _world(label.shape, LPS_ANISO)[label > 0].mean(0)
    com_after = _world(out.label.shape, out.affine)[out.label > 0].mean(0)
    np.testing.assert_allclose(com_after, com_before, atol=0.6)

    onehot = np.stack([out.label == k for k in range(3)]).astype(np.float32)
    back = pre.invert(onehot, out)  # bilinear, then argmax
    assert back.shape == (3, *label.shape) and back.dtype == np.float32
    restored = back.argmax(0)
    for k in (1, 2):
        assert _dice(restored >= k, label >= k) > 0.95
    nearest = pre.invert(out.label[None].astype(np.float32), out, mode="nearest")[0]
    assert _dice(nearest > 0, label > 0) > 0.95
    with pytest.raises(ValueError, match="preprocessed grid"):
        pre.invert(onehot[:, :-1], out)


@pytest.mark.parametrize("affine", [np.diag([1.0, 1.0, 1.0, 1.0]),
                                    np.array([[1.2, 0, 0, -3], [0, 0.9, 0, 4], [0, 0, 3.0, 5], [0, 0, 0, 1]])])
def test_identity_spec_inverts_exactly(affine):
    image, label, _ = _scan(shape=(30, 34, 12), affine=affine)
    native = list(np.abs(np.diag(affine)[:3]))
    for spacing in (None, native):
        pre = Preprocessor(_spec(spacing=spacing, crop_foreground=False, normalize="none"))
        out = pre(image, affine, label)
        assert np.array_equal(out.image, image) and np.array_equal(out.label, label)
        np.testing.assert_allclose(out.affine, affine)
        assert np.array_equal(pre.invert(out.image, out), image)


def test_reorientation_and_crop_at_native_spacing_invert_exactly():
    """LPS at native spacing: flips and a crop, undone voxel for voxel (no interpolation)."""
    image, label, _ = _scan(shape=(30, 34, 12))
    pre = Preprocessor(_spec(spacing=None, crop_foreground=False, normalize="none"))
    out = pre(image, LPS_ANISO, label)
    assert np.array_equal(out.image, image[:, ::-1, ::-1, :])
    assert np.array_equal(pre.invert(out.image, out), image)

    cropped = Preprocessor(_spec(spacing=None, margin=1, normalize="none"))
    out = cropped(image, LPS_ANISO, label)
    assert out.image.shape[1] < image.shape[1]
    back = cropped.invert(out.image, out)
    inside = back != 0
    assert np.array_equal(back[inside], image[inside]) and inside.mean() > 0.3
    assert np.array_equal(cropped.invert(out.label[None], out, "nearest")[0], label)


@pytest.mark.parametrize("offset,noise", [(100.0, 0.0), (50.0, 25.0)])
def test_foreground_mask_without_zero_background(offset, noise):
    image, _, head = _scan(affine=np.diag([1.0, 1.0, 1.0, 1.0]), shape=(64, 64, 60), offset=offset, noise=noise)
    mask = foreground_mask(image)
    assert not mask.all()  # "non-zero voxels" would be everything here
    iou = np.logical_and(mask, head).sum() / np.logical_or(mask, head).sum()
    assert iou > 0.9
    # z-score statistics are over the mask: the head has mean 0, std 1
    pre = Preprocessor(_spec(spacing=None, margin=2))
    out = pre(image, np.eye(4))
    inner = foreground_mask(image)[tuple(slice(s, e) for s, e in zip(out.crop_start, out.crop_end))]
    for channel in out.image:
        assert abs(channel[inner].mean()) < 1e-3 and abs(channel[inner].std() - 1) < 1e-3
    assert out.image.shape[1] < 64 and out.image.shape[3] < 60  # cropped to the head + margin


def test_foreground_mask_degenerate_falls_back_to_everything():
    assert foreground_mask(np.full((2, 10, 10, 10), 7.0, np.float32)).all()
    tiny = np.zeros((1, 40, 40, 40), np.float32)
    tiny[0, 3, 3, 3] = 1000.0  # a single hot voxel is not a head
    assert foreground_mask(tiny).all()


def test_percentile_normalisation_and_channel_selection():
    image, label, _ = _scan(affine=np.eye(4), shape=(40, 40, 36), noise=3.0)
    out = Preprocessor(_spec(spacing=None, normalize="percentile", percentiles=[1.0, 99.0]))(image, np.eye(4), label)
    assert out.image.min() >= 0.0 and out.image.max() <= 1.0 and out.image.max() == 1.0
    one = Preprocessor(_spec(spacing=None, channels=[1]))(image, np.eye(4))
    assert one.image.shape[0] == 1 and one.label is None
    with pytest.raises(UserError, match="channel"):
        Preprocessor(_spec(channels=[3]))(image, np.eye(4))


def _write_case(folder, name, image, label, affine) -> Case:
    folder.mkdir(parents=True, exist_ok=True)
    img_path, lab_path = folder / f"{name}_img.nii.gz", folder / f"{name}_lab.nii.gz"
    save_nifti(img_path, np.moveaxis(image, 0, -1), affine, dtype=np.float32)
    save_nifti(lab_path, label, affine, dtype=np.uint8)
    return Case(name=name, images=[str(img_path)], label=str(lab_path))


def test_cache_reuses_entries_and_keys_on_spec_and_files(tmp_path, monkeypatch):
    image, label, _ = _scan(shape=(30, 34, 12))
    case = _write_case(tmp_path / "raw", "case_a", image, label, LPS_ANISO)
    spec = _spec(spacing=[1.5, 1.5, 1.5])
    cache = CaseCache(tmp_path / "cache", spec)
    first = cache.get(case)
    entry = first.path
    assert entry.parent.name == f"spec-{spec_hash(cache.spec)}"
    assert sorted(p.name for p in entry.iterdir()) == ["image.npy", "label.npy", "meta.json"]
    expected = Preprocessor(spec)(image, LPS_ANISO, label)
    np.testing.assert_allclose(first.image, expected.image, atol=1e-5)
    assert np.array_equal(first.label, expected.label)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["stats"]["channel_min"] == pytest.approx(expected.image.min(axis=(1, 2, 3)).tolist())
    assert set(meta["stats"]["label_slices"]) == {"1", "2"}

    # Second call: no NIfTI decoding. Prove it by making the source unreadable while keeping
    # its size and mtime (the cache key): the cached entry still comes back, as memory maps.
    stamp = (entry / "image.npy").stat().st_mtime_ns
    src = case.images[0]
    st = os.stat(src)
    with open(src, "r+b") as fh:
        fh.write(b"\0" * st.st_size)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = cache.get(case)
    assert isinstance(again.image, np.memmap) and isinstance(again.label, np.memmap)
    assert (entry / "image.npy").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.image, first.image)
    pre = Preprocessor(spec)
    assert np.array_equal(pre.invert(again.label[None], again, "nearest"),
                          pre.invert(expected.label[None], expected, "nearest"))

    # a different spec -> a different folder (and here a real decode of the now-broken file)
    other = CaseCache(tmp_path / "cache", _spec(spacing=[1.5, 1.5, 1.5], margin=9))
    assert other.root != cache.root
    with pytest.raises(ScanError, match="case_a_img"):
        other.get(case)
    # an edited source (new mtime) -> a new entry
    case = _write_case(tmp_path / "raw", "case_a", image, label, LPS_ANISO)
    assert cache.entry_dir(case) != entry
    assert cache.get(case).path != entry

    monkeypatch.setenv("SEGAN_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("SEGAN_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "segan")


def test_cache_rejects_label_on_another_grid(tmp_path):
    image, label, _ = _scan(shape=(30, 34, 12))
    case = _write_case(tmp_path / "raw", "bad", image, label[:-1], LPS_ANISO)
    with pytest.raises(ScanError, match="bad_lab.*label shape"):
        CaseCache(tmp_path / "cache", _spec()).get(case)
    assert not list((tmp_path / "cache").rglob("meta.json"))


def test_cache_stays_under_its_limit_and_cache_clear_empties_it(tmp_path):
    """Real entries above a tiny limit: stale ones go first, then the least recently used; the
    running job's entries and recently used ones stay. `segan cache info|clear` as subprocesses."""
    image, label, _ = _scan(shape=(24, 26, 10))
    cache_dir = tmp_path / "cache"
    cache = CaseCache(cache_dir, _spec(spacing=None))
    cases = [_write_case(tmp_path / "raw", f"c{i}", image, label, LPS_ANISO) for i in range(6)]
    entries = [cache.get(c).path for c in cases]
    size = max(e.size for e in scan(cache_dir))
    hour_ago = time.time() - 3600
    for k, entry in enumerate(entries):  # last used an hour ago, c0 first ... c5 last
        os.utime(entry / "meta.json", (hour_ago + k, hour_ago + k))
    os.unlink(cases[5].images[0])  # c5's source is gone: stale, although the most recently used
    cache.get(cases[3])  # c3 used again now: newest, and inside the grace window
    limit = int(2.5 * size)
    removed = enforce_limit(cache_dir, keep=[entries[0]], limit=limit)  # the running job uses c0, the oldest
    assert [e.path.name for e in removed] == [entries[i].name for i in (5, 1, 2, 4)]
    left = scan(cache_dir)
    assert sorted(e.path for e in left) == sorted([entries[0], entries[3]])
    assert sum(e.size for e in left) <= limit
    assert not any(e.stale for e in left)

    record = CheckRecord(cache_dir)  # a remembered file check, which `cache clear` removes too
    record.put(cases[0], [0, 1, 2], {"case": "c0"})
    record.save()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "SEGAN_CACHE": str(cache_dir), "SEGAN_CACHE_MAX_GB": "0.5"}

    def segan(*args, **extra_env):
        return subprocess.run([sys.executable, "-m", "segan", *args], capture_output=True, text=True,
                              env={**env, **extra_env}, timeout=120)

    info = segan("cache", "info")
    assert info.returncode == 0, info.stderr
    assert f"{cache_dir}: 2 preprocessed case(s), {sum(e.size for e in left) / 1e6:.1f} MB" in info.stdout
    assert "limit: 500.0 MB ($SEGAN_CACHE_MAX_GB)" in info.stdout and "file checks remembered: 1" in info.stdout
    cleared = segan("cache", "clear")
    assert cleared.returncode == 0 and "removed 2 preprocessed case(s)" in cleared.stdout, cleared.stderr
    assert scan(cache_dir) == [] and not (cache_dir / "checked.json").exists()
    assert "0 preprocessed case(s), 0.0 MB" in segan("cache", "info").stdout
    bad = segan("cache", "info", SEGAN_CACHE_MAX_GB="lots")
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "error: $SEGAN_CACHE_MAX_GB='lots': expected a positive number of GB, e.g. SEGAN_CACHE_MAX_GB=5"
