"""MLflow tracking against real stores: SQLite in tmp_path and a real ``mlflow server`` on loopback.

What a run holds is read back by a separate Python process (``mlflow.search_runs``,
``MlflowClient.get_metric_history``), the served model goes through ``mlflow.pyfunc``,
and the server is killed and restarted mid-run to show that no metric is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import run_cli
from segan import tracking
from segan.checkpoint import make_meta, save_checkpoint
from segan.config import Config, to_dict
from segan.errors import UserError
from segan.nets import build_segmentor

REGIONS = ["whole", "core"]
CHANNELS = ["t1", "flair"]

# Runs in a fresh interpreter: prints every run of an experiment as JSON.
READER = r"""
import json, sys
import mlflow
from mlflow import MlflowClient

uri, experiment = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(uri)
client = MlflowClient(uri)

def files(run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += files(run_id, f.path) if f.is_dir else [f.path]
    return out

runs = []
for run in mlflow.search_runs(experiment_names=[experiment], output_format="list"):
    rid = run.info.run_id
    runs.append({
        "run_id": rid, "run_name": run.info.run_name, "status": run.info.status,
        "artifact_uri": run.info.artifact_uri, "tags": run.data.tags, "params": run.data.params,
        "metrics": {k: [[m.step, m.value] for m in sorted(client.get_metric_history(rid, k), key=lambda m: m.step)]
                    for k in run.data.metrics},
        "artifacts": sorted(files(rid)),
        "models": [m.model_id for m in (run.outputs.model_outputs if run.outputs else [])],
    })
print(json.dumps(runs))
"""


@pytest.fixture(scope="module")
def db_template(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store, created once: creating one runs ~5 s of schema migrations."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    tracking.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def new_store(db_template):
    """``new_store(folder)`` -> the URI of a fresh SQLite store in ``folder`` (a copy of the template)."""
    def make(folder: Path, name: str = "mlflow.db") -> str:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(db_template, folder / name)
        return f"sqlite:///{folder / name}"
    return make


def read_runs(uri: str, experiment: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-c", READER, uri, experiment], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dead_uri():
    """``http://127.0.0.1:<port>`` where nothing answers: the port stays bound (not listening) by
    this test, so no other process (a parallel test's server) can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def tiny_config() -> Config:
    cfg = Config()
    cfg.experiment = "tracking-test"
    cfg.model.channels, cfg.model.strides, cfg.model.num_res_units = [8, 16], [2], 1
    cfg.data.patch_size = [32, 32]
    return cfg


def make_checkpoint(path: Path) -> torch.nn.Module:
    """A real segan checkpoint of a tiny 2D U-Net (2 channels in, 2 regions out)."""
    cfg = tiny_config()
    torch.manual_seed(0)
    net = build_segmentor(cfg.model, 2, len(CHANNELS), len(REGIONS)).eval()
    meta = make_meta(channels=CHANNELS, region_names=REGIONS, region_labels=[[1, 2], [2]],
                     label_names={0: "background", 1: "edema", 2: "tumour"}, spatial_dims=2, patch_size=[32, 32],
                     preprocess=to_dict(cfg.preprocess), dataset="phantoms")
    save_checkpoint({"config": to_dict(cfg), "meta": meta, "segmentor": net.state_dict(),
                     "opt_seg": {"state": {}, "param_groups": []}, "epoch": 3}, path)
    return net


def slice_arrays(shift: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).normal(size=(2, 40, 40)).astype(np.float32)
    target = np.zeros((2, 40, 40), np.uint8)
    target[0, 8:30, 10:28] = 1
    target[1, 14:22, 15:22] = 1
    return image, target, np.roll(target, shift, axis=1)


def start(uri: str, name: str = "r", experiment: str = "tracking-test", **kwargs) -> tracking.RunTracker:
    return tracking.RunTracker.start(to_dict(tiny_config()), tracking_uri=uri, experiment=experiment,
                                     run_name=name, tags={"method": "segan", "spatial_dims": "2",
                                                          "dataset": "phantoms"}, **kwargs)


def n_warnings(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records if r.name.startswith("segan.tracking"))


# ----------------------------------------------------------------------------- local store
def test_tracking_uri_precedence_and_default_store(tmp_path, monkeypatch, new_store):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow_runs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from_env.db")
    assert tracking.resolve_tracking_uri(None) == "sqlite:///from_env.db"
    assert tracking.resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    with pytest.raises(UserError, match="folder store"):
        tracking.resolve_tracking_uri("./mlruns")

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    new_store(tmp_path / "mlflow_runs")
    tr = start(None, name="default-store")
    tr.log_metrics({"loss_seg": 0.5}, step=0)
    tr.finish("FINISHED")
    assert (tmp_path / "mlflow_runs" / "mlflow.db").is_file()
    run = tracking.MlflowClient(tracking.default_tracking_uri()).get_run(tr.run_id)
    assert run.info.artifact_uri.startswith((tmp_path / "mlflow_runs" / "artifacts" / "tracking-test").as_uri())
    assert not (tmp_path / "mlruns").exists()


@pytest.fixture(scope="module")
def sqlite_run(tmp_path_factory, db_template) -> dict:
    """One complete run (params, metrics, images, config artifact, registered model) in SQLite."""
    root = tmp_path_factory.mktemp("sqlite_store")
    shutil.copyfile(db_template, root / "mlflow.db")
    uri = f"sqlite:///{root}/mlflow.db"
    out = root / "outputs"
    out.mkdir()
    net = make_checkpoint(out / "best.pt")
    (out / "config.yaml").write_text("seed: 0\n")
    tr = start(uri, name="segan-full")
    tr.log_params({"data.fingerprint": "abc123"})
    history = []
    for epoch in range(3):
        record = {"loss_seg": 1.0 / (epoch + 1), "loss_adv": 0.7, "loss_critic": 0.2 * epoch,
                  "val_dice_mean": 0.5 + 0.1 * epoch, "val_dice_whole": 0.6 + 0.1 * epoch, "lr": 1e-3}
        tr.log_metrics(record, step=epoch)
        history.append({"epoch": epoch, **record})
    tr.log_metrics({"val_hd95_whole": 4.5}, step=2)
    tr.log_artifact(out / "config.yaml")
    tr.log_overlay(*slice_arrays(), REGIONS, epoch=2)
    tr.log_curves(history)
    tr.log_model(out / "best.pt", register="tiny-segmentor")
    tr.finish("FINISHED")
    return {"uri": uri, "root": root, "run_id": tr.run_id, "model_uri": tr.model_uri, "net": net}


def test_run_holds_params_metrics_artifacts_and_model(sqlite_run):
    (run,) = read_runs(sqlite_run["uri"], "tracking-test")
    assert run["run_id"] == sqlite_run["run_id"] and run["run_name"] == "segan-full"
    assert run["status"] == "FINISHED"
    assert {k: run["tags"][k] for k in ("method", "spatial_dims", "dataset")} == {
        "method": "segan", "spatial_dims": "2", "dataset": "phantoms"}
    params = run["params"]
    assert params["model.channels"] == "[8, 16]" and params["method.name"] == "segan"
    assert params["data.fingerprint"] == "abc123"
    assert params["version.torch"] == torch.__version__ and "version.mlflow" in params
    assert len(params.get("git_commit", "0" * 40)) == 40
    assert run["metrics"]["val_dice_mean"] == [[0, 0.5], [1, 0.6], [2, pytest.approx(0.7)]]
    assert [s for s, _ in run["metrics"]["loss_seg"]] == [0, 1, 2]
    assert run["metrics"]["val_hd95_whole"] == [[2, 4.5]]
    assert run["artifacts"] == ["config.yaml", "curves.png", "overlays/epoch_002.png"]
    assert run["artifact_uri"].startswith((Path(sqlite_run["root"]) / "artifacts").as_uri())
    assert run["models"] and sqlite_run["model_uri"] == f"models:/{run['models'][0]}"
    png = Path(run["artifact_uri"].removeprefix("file://")) / "overlays" / "epoch_002.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pyfunc_round_trip_returns_masks(sqlite_run, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_run["uri"])
    x = np.random.default_rng(1).normal(size=(3, len(CHANNELS), 40, 36)).astype(np.float32)
    with torch.no_grad():
        expected = (torch.sigmoid(sqlite_run["net"](torch.from_numpy(x))) > 0.5).numpy().astype(np.uint8)
    for uri in ("models:/tiny-segmentor/1", f"runs:/{sqlite_run['run_id']}/model", sqlite_run["model_uri"]):
        model = mlflow.pyfunc.load_model(uri)
        masks = model.predict(x)
        assert masks.shape == (3, len(REGIONS), 40, 36) and masks.dtype == np.uint8
        np.testing.assert_array_equal(masks, expected)
    schema = model.metadata.get_input_schema().inputs[0]
    assert schema.shape == (-1, len(CHANNELS), -1, -1) and schema.type == np.dtype(np.float32)
    with pytest.raises(Exception, match="shape"):
        model.predict(x[0])  # no batch axis


def make_checkpoint_3d(path: Path) -> None:
    """A real segan checkpoint of a tiny 3D U-Net (2 channels in, 2 regions out, 16^3 patches)."""
    cfg = tiny_config()
    cfg.data.spatial_dims, cfg.data.patch_size = 3, [16, 16, 16]
    torch.manual_seed(0)
    net = build_segmentor(cfg.model, 3, len(CHANNELS), len(REGIONS)).eval()
    meta = make_meta(channels=CHANNELS, region_names=REGIONS, region_labels=[[1, 2], [2]],
                     label_names={0: "background", 1: "edema", 2: "tumour"}, spatial_dims=3,
                     patch_size=[16, 16, 16], preprocess=to_dict(cfg.preprocess), dataset="phantoms")
    save_checkpoint({"config": to_dict(cfg), "meta": meta, "segmentor": net.state_dict()}, path)


def test_pyfunc_and_predictor_give_identical_masks_2d_and_3d(sqlite_run, new_store, tmp_path, monkeypatch):
    """The logged pyfunc and segan's Predictor (the `segan predict` path) are one implementation:
    same preprocessed input -> the same masks, in 2D and in 3D (Gaussian-blended windows)."""
    import mlflow
    from monai.inferers import sliding_window_inference

    from segan.predictor import Predictor
    from segan.tracking.model import download_checkpoint

    cpu = torch.device("cpu")
    rng = np.random.default_rng(2)
    x2 = rng.normal(size=(3, len(CHANNELS), 40, 36)).astype(np.float32)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_run["uri"])
    ckpt2 = download_checkpoint(f"runs:/{sqlite_run['run_id']}/model", sqlite_run["uri"], tmp_path / "2d")
    masks2 = mlflow.pyfunc.load_model(f"runs:/{sqlite_run['run_id']}/model").predict(x2)
    assert np.array_equal(masks2, Predictor.from_checkpoint(ckpt2, cpu).masks(x2))

    uri = new_store(tmp_path / "store3d")
    make_checkpoint_3d(tmp_path / "best3d.pt")
    tr = start(uri, name="segan-3d")
    tr.log_model(tmp_path / "best3d.pt")
    tr.finish("FINISHED")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    x3 = rng.normal(size=(2, len(CHANNELS), 28, 20, 24)).astype(np.float32)  # larger than a patch: windows overlap
    masks3 = mlflow.pyfunc.load_model(f"runs:/{tr.run_id}/model").predict(x3)
    predictor = Predictor.from_checkpoint(tmp_path / "best3d.pt", cpu)
    expected = predictor.masks(x3)
    assert masks3.shape == (2, len(REGIONS), 28, 20, 24) and masks3.dtype == np.uint8
    assert np.array_equal(masks3, expected) and 0 < expected.sum() < expected.size
    # The pyfunc's former forward (constant-weight windows) gives other masks on this input,
    # so the equality above pins the shared Gaussian path.
    with torch.no_grad():
        constant = sliding_window_inference(torch.from_numpy(x3), [16, 16, 16], 4, predictor.model, overlap=0.5)
    assert not np.array_equal((torch.sigmoid(constant) > 0.5).numpy().astype(np.uint8), expected)


def test_download_checkpoint_gives_slim_loadable_file(sqlite_run, tmp_path):
    from segan.checkpoint import load_checkpoint

    path = tracking.download_checkpoint("models:/tiny-segmentor/1", sqlite_run["uri"], tmp_path)
    ckpt = load_checkpoint(path)
    assert set(ckpt) == {"format", "config", "meta", "segmentor"}  # no optimizer state in the model
    assert ckpt["meta"]["region_names"] == REGIONS
    with pytest.raises(UserError, match="not found"):
        tracking.download_checkpoint("models:/no-such-model/1", sqlite_run["uri"], tmp_path / "x")


def test_resume_continues_the_same_run(tmp_path, caplog, new_store):
    uri = new_store(tmp_path)
    first = start(uri, name="resumable")
    first.log_metrics({"val_dice_mean": 0.4}, step=0)
    first.finish("KILLED")
    cfg = to_dict(tiny_config())
    cfg["train"]["epochs"] = 99
    again = tracking.RunTracker.start(cfg, tracking_uri=uri, experiment="tracking-test", run_name="resumable",
                                      resume_run_id=first.run_id)
    assert again.run_id == first.run_id
    assert tracking.MlflowClient(uri).get_run(first.run_id).info.status == "RUNNING"
    again.log_metrics({"val_dice_mean": 0.6}, step=1)
    again.finish("FINISHED")
    run = tracking.MlflowClient(uri).get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "40"
    history = tracking.MlflowClient(uri).get_metric_history(first.run_id, "val_dice_mean")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.4), (1, 0.6)]
    assert n_warnings(caplog, "train.epochs changed") == 1


def test_make_tracker_is_null_when_disabled_or_not_rank_zero(tmp_path, new_store):
    cfg = tiny_config()
    cfg.tracking.uri = f"sqlite:///{tmp_path}/never.db"
    assert isinstance(tracking.make_tracker(cfg, rank=1), tracking.NullTracker)
    cfg.tracking.enabled = False
    null = tracking.make_tracker(cfg, rank=0)
    assert isinstance(null, tracking.NullTracker) and null.run_id is None
    null.log_metrics({"a": 1.0}, step=0)
    null.log_overlay(*slice_arrays(), REGIONS, epoch=0)
    null.finish("FINISHED")
    assert not (tmp_path / "never.db").exists()
    cfg.tracking.enabled, cfg.tracking.uri = True, new_store(tmp_path, "used.db")
    tr = tracking.make_tracker(cfg, rank=0, experiment="named", tags={"dataset": "brats"})
    tr.finish("FINISHED")
    run = tracking.MlflowClient(cfg.tracking.uri).get_run(tr.run_id)
    assert run.data.tags["dataset"] == "brats" and run.data.tags["method"] == "segan"
    assert run.info.run_name.startswith("segan-")


# --------------------------------------------------------------------- segan evaluate --run
def test_evaluate_logs_its_means_to_an_existing_run(tmp_path, new_store):
    uri = new_store(tmp_path / "store")
    client = tracking.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("eval-test"), run_name="trained-elsewhere").info.run_id
    truth = np.zeros((8, 8, 4), np.uint8)
    truth[2:6, 2:6, 1:3] = 1  # 32 voxels
    guess = np.roll(truth, 1, axis=1)  # 32 voxels, 24 of them true: Dice 0.75, IoU 24/40
    for folder, mask in (("gt", truth), ("pred", guess)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / folder / "case1.nii.gz"))
    proc = run_cli("evaluate", "-p", tmp_path / "pred", "-g", tmp_path / "gt", "--regions", "lesion=1",
                   "--run", run_id, "--tracking-uri", uri)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    (run,) = read_runs(uri, "eval-test")
    assert run["run_id"] == run_id and run["status"] == "RUNNING"  # logging does not end someone's run
    assert run["metrics"]["eval_dice_lesion"] == [[0, 0.75]]
    assert run["metrics"]["eval_iou_lesion"] == [[0, pytest.approx(0.6)]]
    assert run["metrics"]["eval_dice_mean"] == [[0, 0.75]]


def test_log_metrics_to_run_errors_are_one_line(tmp_path, new_store, dead_uri):
    from segan.metrics import run_evaluate

    uri = new_store(tmp_path)
    client = tracking.MlflowClient(uri)
    gone = client.create_run(client.create_experiment("e")).info.run_id
    client.delete_run(gone)
    missing = "0" * 32
    cases = [(missing, uri, f"MLflow run {missing}: not found in {uri}; pass a run id"),
             (gone, uri, f"MLflow run {gone}: deleted in {uri}"),
             (missing, f"sqlite:///{tmp_path}/none.db", f"no MLflow store at {tmp_path}/none.db"),
             (missing, dead_uri, f"MLflow store {dead_uri}: not answering")]
    for run_id, store, message in cases:
        t0 = time.monotonic()
        with pytest.raises(UserError) as err:
            tracking.log_metrics_to_run(run_id, {"eval_dice_mean": 0.5}, store)
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    assert time.monotonic() - t0 < 15  # the dead server fails in seconds (no retries, short timeout)
    assert not (tmp_path / "none.db").exists()
    # `segan evaluate --run` passes the error on as it is, after the table and CSV are done.
    (tmp_path / "gt").mkdir()
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(tmp_path / "gt" / "a.nii.gz"))
    with pytest.raises(UserError, match=f"MLflow run {missing}: not found"):
        run_evaluate(tmp_path / "gt", tmp_path / "gt", regions="all=1", run_id=missing, tracking_uri=uri)


# ------------------------------------------------------------------------- a real server
class MlflowServer:
    """``mlflow server`` on 127.0.0.1 (one worker, no job runner) that a test can kill and restart."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/server.db",
             "--artifacts-destination", str(self.root / "artifacts")],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("mlflow server did not start: " + (self.root / "server.log").read_text()[-2000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group: the CLI and its uvicorn child
            self.proc.wait()
        self.proc = None

    @property
    def up(self) -> bool:
        return self.proc is not None


@pytest.fixture(scope="module")
def server(tmp_path_factory, db_template):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    shutil.copyfile(db_template, srv.root / "server.db")
    yield srv
    srv.kill()


def test_server_down_at_start_then_up_loses_nothing(server, tmp_path, caplog):
    server.kill()
    t0 = time.monotonic()
    tr = start(server.uri, name="down-at-start", experiment="server-test")
    tr.retry_interval = 0.0
    assert tr.run_id is None and time.monotonic() - t0 < 5
    tr.log_metrics({"loss_seg": 1.0, "val_dice_mean": 0.1}, step=0)
    tr.log_overlay(*slice_arrays(), REGIONS, epoch=0)
    assert n_warnings(caplog, "is not answering") == 1
    server.start()
    tr.log_metrics({"loss_seg": 0.5, "val_dice_mean": 0.2}, step=1)
    assert tr.run_id is not None and n_warnings(caplog, "answers again") == 1
    tr.finish("FINISHED")
    (run,) = read_runs(server.uri, "server-test")
    assert run["run_id"] == tr.run_id and run["status"] == "FINISHED"
    assert run["metrics"]["val_dice_mean"] == [[0, 0.1], [1, 0.2]]
    assert run["params"]["method.name"] == "segan" and run["tags"]["method"] == "segan"
    assert run["artifacts"] == ["overlays/epoch_000.png"]
    assert n_warnings(caplog, "is not answering") == 1  # once per outage, not per call


def test_server_killed_mid_run_and_restarted_loses_nothing(server, tmp_path, caplog):
    if not server.up:
        server.start()
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    tr = start(server.uri, name="killed-mid-run", experiment="server-test-2")
    tr.retry_interval = 0.0  # try the dead server on every call: each try must still be fast
    expected = {}
    for epoch in range(8):
        if epoch == 2:
            server.kill()
        if epoch == 5:
            server.start()
        t0 = time.monotonic()
        record = {"loss_seg": 1.0 / (epoch + 1), "val_dice_mean": epoch / 10}
        tr.log_metrics(record, step=epoch)
        if epoch == 3:
            tr.log_artifact(tmp_path / "config.yaml")
            tr.log_overlay(*slice_arrays(), REGIONS, epoch=epoch)
        assert time.monotonic() - t0 < 5, "a dead server must cost seconds, not minutes"
        for k, v in record.items():
            expected.setdefault(k, []).append([epoch, pytest.approx(v)])
    tr.finish("FINISHED")
    assert n_warnings(caplog, "is not answering") == 1 and n_warnings(caplog, "answers again") == 1
    (run,) = read_runs(server.uri, "server-test-2")
    assert run["status"] == "FINISHED"
    assert run["metrics"] == expected
    assert run["artifacts"] == ["config.yaml", "overlays/epoch_003.png"]


def test_store_gone_at_finish_spills_to_json_and_replays(tmp_path, caplog, new_store, dead_uri):
    out = tmp_path / "outputs"
    out.mkdir()
    tr = start(dead_uri, name="never-reached", spill_dir=out)
    tr.finish_timeout = 0.5
    for epoch in range(3):
        tr.log_metrics({"loss_seg": 1.0 - epoch / 10, "val_dice_mean": epoch / 10}, step=epoch)
    tr.log_overlay(*slice_arrays(), REGIONS, epoch=2)
    tr.finish("FAILED")
    spill = out / "mlflow_unsent_never-reached.json"
    data = json.loads(spill.read_text())
    assert data["status"] == "FAILED" and data["run_id"] is None and len(data["metrics"]) == 6
    overlay = [op for op in data["ops"] if op["kind"] == "artifact"][0]
    assert Path(overlay["path"]).is_file() and Path(overlay["path"]).is_relative_to(out)
    assert n_warnings(caplog, str(spill)) == 1

    uri = new_store(tmp_path, "later.db")
    run_id = tracking.replay_unsent(spill, tracking_uri=uri)
    assert not spill.exists()
    client = tracking.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.params["method.name"] == "segan"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_dice_mean"))
    assert history == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert [a.path for a in client.list_artifacts(run_id, "overlays")] == ["overlays/epoch_002.png"]


def test_overlay_png_draws_each_contour_where_its_mask_is(tmp_path):
    """The overlay's contours lie on the mask boundaries, in the region's colour, solid for the
    truth and dashed for the prediction; inside the masks and far from them the image shows."""
    from matplotlib import colormaps
    from skimage import io

    n = 40
    image = np.zeros((2, n, n), np.float32)  # a constant image is drawn black
    target = np.zeros((2, n, n), np.uint8)
    target[0, 4:16, 4:16] = 1  # first axis left -> right, second bottom -> top
    target[1, 7:13, 7:13] = 1
    pred = np.zeros_like(target)
    pred[0, 4:16, 20:32] = 1  # the prediction of region 0 sits above its truth
    path = tmp_path / "overlay.png"
    tracking.save_overlay_png(path, image, target, pred, REGIONS, title="epoch 1")
    rgb = io.imread(path)[..., :3].astype(float)

    black = (rgb < 10).all(-1)  # the image's extent: the rows and columns that are mostly black
    cols, rows = black.sum(0), black.sum(1)
    xs, ys = np.flatnonzero(cols > 0.5 * cols.max()), np.flatnonzero(rows > 0.5 * rows.max())
    left, right, top, bottom = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    sx, sy = (right - left) / n, (bottom - top) / n
    assert abs(sx - sy) < 0.5  # square pixels, the whole 40 x 40 slice shown

    def pixel(i: float, j: float) -> tuple[int, int]:
        """PNG (row, column) of array position (i, j), pixel centres at integers."""
        return int(round(bottom - (j + 0.5) * sy)), int(round(left + (i + 0.5) * sx))

    def colour_near(i: float, j: float, colour: np.ndarray, radius: int = 2) -> bool:
        r, c = pixel(i, j)
        window = rgb[r - radius: r + radius + 1, c - radius: c + radius + 1]
        return bool((np.abs(window - colour).max(-1) < 40).any())

    tab10 = [np.array(colormaps["tab10"](k)[:3]) * 255 for k in range(2)]
    # A contour at level 0.5 runs half a pixel outside the mask: mask [a, b) -> a - 0.5, b - 0.5.
    def edge(a: int, b: int) -> list[tuple[float, float]]:
        mid = [a + 1 + t * (b - a - 3) / 7 for t in range(8)]  # clear of the corners
        return ([(a - 0.5, m) for m in mid] + [(b - 0.5, m) for m in mid]
                + [(m, a - 0.5) for m in mid] + [(m, b - 0.5) for m in mid])

    for k, (a, b) in enumerate(((4, 16), (7, 13))):
        assert all(colour_near(i, j, tab10[k]) for i, j in edge(a, b)), f"true contour of region {k}"

    def drawn_fraction(i: float, j0: float, j1: float, colour: np.ndarray) -> float:
        """Share of the PNG rows along the vertical line i, j0..j1 that carry ``colour`` (within 1 px)."""
        (r1, c), (r0, _) = pixel(i, j1), pixel(i, j0)
        strip = rgb[r1:r0 + 1, c - 1: c + 2]
        return float((np.abs(strip - colour).max(-1) < 40).any(1).mean())

    solid, dashed = drawn_fraction(3.5, 5, 14, tab10[0]), drawn_fraction(3.5, 21, 30, tab10[0])
    assert solid > 0.95 and 0.3 < dashed < 0.85, (solid, dashed)  # the prediction's contour is dashed
    assert all(colour_near(i, j + 16, tab10[0]) for i, j in edge(4, 16)[::3])  # where its mask is
    # Nothing drawn inside the masks (between the two true contours, inside the core) or far away.
    for i, j in [(10, 10), (5.5, 10), (10, 14.5), (30, 8), (30, 20), (10, 36), (25, 12)]:
        r, c = pixel(i, j)
        assert (rgb[r - 2: r + 3, c - 2: c + 3] < 10).all(), (i, j)
