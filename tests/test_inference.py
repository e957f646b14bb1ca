"""`segan predict`: geometry faithful to each input, per-file isolation, CSV, reruns, torchrun sharding.

Checkpoints are built here from random-init segmentors (no training needed for geometry);
the alignment test uses a hand-made network whose output is its input thresholded.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from data_prep.preprocess import spec_from_config
from segan.checkpoint import make_meta, save_checkpoint
from segan.config import Config, PreprocessConfig, PostprocessConfig, to_dict
from segan.errors import UserError
from segan.inference import CSV_COLUMNS, PredictOptions, Predictor, find_cases, run_predict
from segan.nets import build_segmentor

SHAPE = (24, 28, 20)
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers
def make_checkpoint(path: Path, channels: list[str], dims: int, spacing, normalize: str = "zscore") -> Path:
    cfg = Config()
    cfg.model.channels, cfg.model.strides = [8, 16, 32], [2, 2]
    cfg.data.spatial_dims = dims
    cfg.data.patch_size = [16] * dims
    cfg.preprocess.spacing, cfg.preprocess.normalize = spacing, normalize
    torch.manual_seed(0)
    net = build_segmentor(cfg.model, dims, len(channels), 2)
    meta = make_meta(channels=channels, region_names=["whole", "core"], region_labels=[[1, 2], [2]],
                     label_names={0: "background", 1: "edge", 2: "core"}, spatial_dims=dims,
                     patch_size=cfg.data.patch_size, preprocess=spec_from_config(cfg.preprocess), dataset="test")
    save_checkpoint({"config": to_dict(cfg), "meta": meta, "segmentor": net.state_dict()}, path)
    return path


def volume(seed: int, shape=SHAPE, channels: int = 0) -> np.ndarray:
    """A head-like bright ellipsoid on a non-zero noisy background; (X,Y,Z) or (X,Y,Z,C)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = ((grid / np.array([0.7, 0.6, 0.65])[:, None, None, None]) ** 2).sum(0) < 1
    base = 50 + 300 * inside + 10 * rng.standard_normal(shape)
    if channels:
        return np.stack([base * (c + 1) for c in range(channels)], axis=-1).astype(np.float32)
    return base.astype(np.float32)


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def save_scaled_int16(path: Path, raw: np.ndarray, affine: np.ndarray, slope: float, inter: float) -> Path:
    """int16 voxels with scl_slope/scl_inter in the header (nibabel would rescale on its own save)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(raw.shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(affine, 1)
    hdr.set_sform(affine, 1)
    hdr.set_slope_inter(slope, inter)
    hdr["vox_offset"] = 352
    buf = io.BytesIO()
    hdr.write_to(buf)
    buf.write(b"\0" * (352 - buf.tell()))
    buf.write(raw.astype("<i2").tobytes(order="F"))
    path.write_bytes(gzip.compress(buf.getvalue()) if path.name.endswith(".gz") else buf.getvalue())
    return path


def ras_lps_pair(spacing=(1.0, 1.4, 2.5), origin=(-12.0, -20.0, 5.0)):
    """Affines of one physical grid stored RAS and LPS (x and y flipped)."""
    ras = np.diag([*spacing, 1.0])
    ras[:3, 3] = origin
    lps = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    lps[:3, 3] = [origin[0] + (SHAPE[0] - 1) * spacing[0], origin[1] + (SHAPE[1] - 1) * spacing[1], origin[2]]
    return ras, lps


def oblique(spacing=(0.9, 1.2, 2.0), degrees: float = 20.0) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = [3.0, -7.0, 11.0]
    return aff


def run_cli(*args: str, env_extra: dict | None = None, module: tuple[str, ...] = ("-m", "segan")):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *module, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def read_rows(out: Path) -> dict[str, dict]:
    with open(out / "predictions.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames[:len(CSV_COLUMNS)]) == CSV_COLUMNS  # quality columns follow
        return {r["case"]: r for r in reader}


def failure_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("failed:")]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inference")


@pytest.fixture(scope="module")
def ckpt_1ch(work) -> Path:
    """3D model, one channel, resampling to 1.5 mm: sliding window on every input."""
    return make_checkpoint(work / "one.pt", ["MR"], dims=3, spacing=[1.5, 1.5, 1.5])


@pytest.fixture(scope="module")
def ckpt_2ch(work) -> Path:
    """2D model, two channels, 1.2 mm, percentile normalisation: slice-by-slice path."""
    return make_checkpoint(work / "two.pt", ["T1", "T2"], dims=2, spacing=[1.2, 1.2, 1.2], normalize="percentile")


@pytest.fixture(scope="module")
def geometry_run(work, ckpt_1ch):
    """One `segan predict --probabilities` over every geometry variant of a single-channel scan."""
    src = work / "scans"
    src.mkdir()
    ras, lps = ras_lps_pair()
    data = volume(1)
    expected = {
        "ras": save(src / "ras.nii.gz", data, ras),
        "lps": save(src / "lps.nii.gz", data[::-1, ::-1].copy(), lps),  # the same physical scan, stored LPS
        "oblique": save(src / "oblique.nii", volume(2), oblique()),  # uncompressed, rotated, anisotropic
        "scaled": save_scaled_int16(src / "scaled.nii.gz", np.rint(volume(3) / 2.5).astype(np.int16),
                                    np.diag([0.8, 0.8, 3.0, 1.0]), slope=2.5, inter=-100.0),
        "xyz1": save(src / "xyz1.nii.gz", volume(4)[..., None], lps),  # (X, Y, Z, 1)
        "msd": save(src / "msd_0000.nii.gz", volume(5), ras),  # nnU-Net single-channel naming
    }
    before = sorted(p.name for p in src.iterdir())
    out = work / "pred"
    proc = run_cli("predict", "-m", str(ckpt_1ch), "-i", str(src), "-o", str(out), "--probabilities")
    return proc, expected, src, before, out


# ---------------------------------------------------------------- geometry
def test_masks_keep_each_inputs_shape_and_affine(geometry_run):
    proc, expected, src, before, out = geometry_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "6 predicted, 0 skipped, 0 failed" in proc.stdout
    for case, path in expected.items():
        scan = nib.load(str(path))
        mask = nib.load(str(out / f"{case}.nii.gz"))
        assert mask.shape == scan.shape[:3], case
        assert np.allclose(mask.affine, scan.affine, atol=1e-5), case
        assert mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
        prob = nib.load(str(out / f"{case}_prob.nii.gz"))
        assert prob.shape == scan.shape[:3] + (2,)
        assert prob.get_data_dtype() == np.float32
        assert np.allclose(prob.affine, scan.affine, atol=1e-5)
    # inputs untouched, nothing written beside them
    assert sorted(p.name for p in src.iterdir()) == before
    rows = read_rows(out)
    assert set(rows) == set(expected)
    for case, row in rows.items():
        assert row["status"] == "ok" and row["message"] == ""
        assert row["output"] == str(out / f"{case}.nii.gz")
        assert float(row["seconds"]) > 0
    assert rows["msd"]["inputs"] == str(expected["msd"])


def test_lps_scan_gets_the_same_prediction_as_its_ras_twin(geometry_run):
    """The LPS file is the RAS file's voxels flipped in x and y: one physical scan, so the maps agree."""
    _, _, _, _, out = geometry_run
    ras = nib.load(str(out / "ras_prob.nii.gz")).get_fdata()
    lps = nib.load(str(out / "lps_prob.nii.gz")).get_fdata()
    assert np.allclose(lps[::-1, ::-1], ras, atol=1e-4)


class ThresholdNet(nn.Module):
    """Logits = 40 * (channel 0 - 0.5) for every region: the prediction is the input blob."""

    def __init__(self, regions: int) -> None:
        super().__init__()
        self.regions = regions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 40 * (x[:, :1] - 0.5).repeat(1, self.regions, *([1] * (x.ndim - 2)))


def _blob() -> np.ndarray:
    blob = np.zeros(SHAPE, dtype=np.float32)
    blob[4:11, 6:19, 3:8] = 1  # off-centre box: any flip or shift would show
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    blob[((grid - np.array([16, 9, 13])[:, None, None, None]) ** 2).sum(0) < 16] = 1
    blob[8:17, 8:11, 5:14] = 1  # one connected object, like a head (the foreground crop keeps one)
    return blob


@pytest.mark.parametrize("dims", [2, 3])
def test_identity_network_output_lines_up_voxel_for_voxel_on_lps_anisotropic_scan(dims):
    _, lps = ras_lps_pair(spacing=(0.8, 1.1, 2.0))
    blob = _blob()

    def predictor(spacing) -> Predictor:
        spec = spec_from_config(PreprocessConfig(spacing=spacing, normalize="none"))
        meta = make_meta(channels=["MR"], region_names=["blob"], region_labels=[[1]], label_names={1: "blob"},
                         spatial_dims=dims, patch_size=[16] * dims, preprocess=spec, dataset="test")
        return Predictor(ThresholdNet(1), meta, PostprocessConfig(), torch.device("cpu"))

    # native spacing: reorientation and crop are exact, so the mask is the blob itself
    labels, prob = predictor(None).predict(blob[None], lps)
    assert labels.shape == SHAPE and prob.shape == (1, *SHAPE)
    assert np.array_equal(labels, blob.astype(np.uint8))
    # resampled to 1 mm and back: boundary voxels may move, the object may not
    labels, _ = predictor([1.0, 1.0, 1.0]).predict(blob[None], lps)
    dice = 2 * (labels * blob).sum() / (labels.sum() + blob.sum())
    assert dice > 0.9
    centroid = lambda m: np.array(np.nonzero(m)).mean(1)  # noqa: E731
    assert np.abs(centroid(labels) - centroid(blob)).max() < 0.5


# ---------------------------------------------------------------- bad files
def test_mixed_folder_every_valid_file_gets_a_mask_and_each_bad_file_one_line(work, ckpt_2ch):
    src = work / "mixed"
    src.mkdir()
    aff = np.diag([1.1, 0.9, 1.8, 1.0])
    valid = {
        "good": save(src / "good.nii.gz", volume(6, channels=2), aff),
        "pair": save(src / "pair_0000.nii.gz", volume(7), aff),
    }
    save(src / "pair_0001.nii.gz", volume(8), aff)
    with_nan = volume(9, channels=2)
    with_nan[3:5, 4:6, 2, 1] = np.nan
    valid["nan"] = save(src / "nan.nii.gz", with_nan, aff)
    blob = gzip.compress(nib.Nifti1Image(volume(10, channels=2), aff).to_bytes())
    bad = {
        "truncated": src / "truncated.nii.gz",
        "empty": src / "empty.nii.gz",
        "text": src / "text.nii.gz",
        "onechannel": save(src / "onechannel.nii.gz", volume(11), aff),
        "flat": save(src / "flat.nii.gz", np.ones((24, 28), np.float32), np.eye(4)),
    }
    bad["truncated"].write_bytes(blob[: len(blob) // 2])
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("this is not an image\n")
    (src / "notes.txt").write_text("ignored: not a NIfTI name")
    out = work / "mixed_pred"

    proc = run_cli("predict", "-m", str(ckpt_2ch), "-i", str(src), "-o", str(out))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = failure_lines(proc.stderr)
    assert len(lines) == len(bad), proc.stderr
    for name, path in bad.items():
        assert sum(str(path) in line for line in lines) == 1, (name, lines)
    assert "truncated or corrupt" in proc.stderr and "empty (0 bytes)" in proc.stderr
    assert "not a readable NIfTI" in proc.stderr and "has 2 dimensions" in proc.stderr
    assert "has 1 channel(s); the model expects 2 (T1, T2)" in proc.stderr
    assert any(line.startswith("warning:") and "nan.nii.gz" in line for line in proc.stderr.splitlines())

    for name, path in valid.items():
        scan = nib.load(str(path))
        mask = nib.load(str(out / f"{name}.nii.gz"))
        assert mask.shape == scan.shape[:3] and np.allclose(mask.affine, scan.affine)
    rows = read_rows(out)
    assert {k: r["status"] for k, r in rows.items()} == {**{k: "ok" for k in valid}, **{k: "failed" for k in bad}}
    assert rows["pair"]["inputs"] == f"{src / 'pair_0000.nii.gz'};{src / 'pair_0001.nii.gz'}"
    assert "4 NaN/inf voxels replaced" in rows["nan"]["message"]
    assert all(rows[k]["output"] == "" for k in bad)
    assert not any(out.glob(".*")), "no temp or partial files left behind"


# ---------------------------------------------------------------- reruns and usage errors
def test_existing_outputs_fail_without_overwrite_then_continue_and_overwrite(geometry_run, ckpt_1ch):
    _, expected, src, _, out = geometry_run
    mask = out / "ras.nii.gz"
    stamp = mask.stat().st_mtime_ns
    proc = run_cli("predict", "-m", str(ckpt_1ch), "-i", str(src / "ras.nii.gz"), "-o", str(out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = failure_lines(proc.stderr)
    assert str(src / "ras.nii.gz") in line and "--overwrite" in line and "--continue" in line
    assert mask.stat().st_mtime_ns == stamp

    inputs = [str(src / "ras.nii.gz"), str(src / "lps.nii.gz")]
    assert run_predict(str(ckpt_1ch), inputs, out, PredictOptions(resume=True, probabilities=True)) == 0
    assert {r["status"] for r in read_rows(out).values()} == {"skipped"}
    assert mask.stat().st_mtime_ns == stamp
    assert run_predict(str(ckpt_1ch), inputs, out, PredictOptions(overwrite=True)) == 0
    assert {r["status"] for r in read_rows(out).values()} == {"ok"}
    assert mask.stat().st_mtime_ns != stamp


def test_output_folder_equal_to_input_folder_is_a_usage_error(geometry_run, ckpt_1ch):
    _, _, src, before, _ = geometry_run
    proc = run_cli("predict", "-m", str(ckpt_1ch), "-i", str(src), "-o", str(src))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in src.iterdir()) == before


def test_usage_errors_name_the_problem(work, geometry_run, ckpt_1ch):
    _, _, src, _, _ = geometry_run
    with pytest.raises(UserError, match="checkpoint not found"):
        run_predict(str(work / "missing.pt"), [str(src)], work / "x", PredictOptions())
    with pytest.raises(UserError, match="no .nii/.nii.gz files match"):
        run_predict(str(ckpt_1ch), [str(src / "*.mha")], work / "x", PredictOptions())
    with pytest.raises(UserError, match="no such file or folder"):
        run_predict(str(ckpt_1ch), [str(work / "nowhere")], work / "x", PredictOptions())
    with pytest.raises(UserError, match="exclude each other"):
        run_predict(str(ckpt_1ch), [str(src)], work / "x", PredictOptions(overwrite=True, resume=True))
    assert not (work / "x").exists()


def test_find_cases_groups_channel_files_and_flags_name_clashes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for name in ("c_0000.nii.gz", "c_0001.nii", "lone_0002.nii.gz", "x.nii.gz"):
        (a / name).write_bytes(b"")
    (b / "x.nii.gz").write_bytes(b"")
    cases = {(c.name, c.inputs): c for c in find_cases([str(a), str(b / "*.nii.gz")])}
    names = sorted(n for n, _ in cases)
    assert names == ["c", "lone_0002", "x", "x"]
    c = next(v for (n, _), v in cases.items() if n == "c")
    assert [p.name for p in c.paths] == ["c_0000.nii.gz", "c_0001.nii"]
    clashes = [v for (n, _), v in cases.items() if n == "x" and v.problem]
    assert len(clashes) == 1 and "different output folders" in clashes[0].problem


# ---------------------------------------------------------------- torchrun
def test_torchrun_two_cpu_ranks_shard_the_files_and_rank0_merges(work, ckpt_1ch):
    src = work / "shard"
    src.mkdir()
    ras, lps = ras_lps_pair()
    files = [save(src / f"s{i}.nii.gz", volume(20 + i), ras if i % 2 else lps) for i in range(3)]
    out = work / "shard_pred"
    proc = run_cli("--standalone", "--nproc_per_node", "2", "-m", "segan", "predict", "-m", str(ckpt_1ch),
                   "-i", str(src), "-o", str(out), "--device", "cpu",
                   module=("-m", "torch.distributed.run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    rows = read_rows(out)
    assert list(rows) == ["s0", "s1", "s2"]
    assert {r["status"] for r in rows.values()} == {"ok"}
    for f in files:
        mask = nib.load(str(out / f"{f.name}"))
        assert mask.shape == SHAPE and np.allclose(mask.affine, nib.load(str(f)).affine)
    assert not list(out.glob(".predictions.rank*.csv"))
    assert proc.stdout.count("3 predicted, 0 skipped, 0 failed") == 1  # rank 0 reports once


# ---------------------------------------------------------------- MLflow model URIs
def test_runs_uri_downloads_the_checkpoint_from_mlflow(work, geometry_run, ckpt_1ch):
    from segan import tracking

    _, expected, _, _, _ = geometry_run
    store = work / "mlflow"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = tracking.MlflowClient(uri)
    exp = client.create_experiment("inference-test", artifact_location=(store / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.log_artifact(run_id, str(ckpt_1ch), "model")
    client.set_terminated(run_id)
    out = work / "from_mlflow"
    assert run_predict(f"runs:/{run_id}/model", [str(expected["lps"])], out, PredictOptions(), tracking_uri=uri) == 0
    mask = nib.load(str(out / "lps.nii.gz"))
    assert mask.shape == SHAPE and np.allclose(mask.affine, nib.load(str(expected["lps"])).affine)
    assert f"runs:/{run_id}/model" in (out / "model.json").read_text()
    with pytest.raises(UserError, match="models:/no-such-model/1"):
        run_predict("models:/no-such-model/1", [str(expected["lps"])], work / "y", PredictOptions(), tracking_uri=uri)


# ---------------------------------------------------------------- post-processing
def test_postprocessing_small_objects_largest_component_and_holes():
    from segan.postprocess import clean_mask, postprocess

    mask = np.zeros((12, 12, 12), bool)
    mask[1:4, 1:4, 1:4] = True  # 27 voxels
    mask[6:8, 6:8, 6:8] = True  # 8 voxels
    mask[10, 10, 10] = mask[11, 11, 11] = True  # 2 voxels touching by a corner: one object
    assert clean_mask(mask, min_size=2).sum() == 27 + 8 + 2
    assert clean_mask(mask, min_size=3).sum() == 27 + 8
    assert clean_mask(mask, min_size=9).sum() == 27
    assert np.array_equal(clean_mask(mask, largest_component=True), np.pad(np.ones((3, 3, 3), bool), [(1, 8)] * 3))
    hollow = np.zeros((7, 7, 7), bool)
    hollow[1:6, 1:6, 1:6] = True
    hollow[3, 3, 3] = False
    assert clean_mask(hollow, fill_holes=True).sum() == 125 and clean_mask(hollow).sum() == 124
    assert not clean_mask(np.zeros((3, 3, 3), bool), True, 5, True).any()
    prob = np.stack([mask * 0.9, mask * 0.4]).astype(np.float32)
    out = postprocess(prob, PostprocessConfig(threshold=0.5, min_size=9))
    assert out.shape == prob.shape and out[0].sum() == 27 and not out[1].any()
