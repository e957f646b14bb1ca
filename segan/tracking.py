"""MLflow: where runs go, a run logger that survives a dead server, the served model, ``segan compare``.

The only module that imports mlflow. Sections:

- **Store**: URI = ``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:////<cwd>/mlflow_runs/mlflow.db``.
  Experiments in a SQLite store keep their artifacts beside the database
  (``<db folder>/artifacts/<experiment>``), never in ``./mlruns``.
- **RunTracker**: params, tags, metrics, artifacts, images and the model of one run. Every
  call is buffered and sent in order; when the store is unreachable (server down at start
  or gone mid-run) training goes on: one warning, the buffer is kept and re-sent when the
  store answers again, and :meth:`RunTracker.finish` writes whatever could not be sent to
  a JSON file (:func:`replay_unsent` sends it later). Nothing is dropped silently.
- **SegmentorModel**: the segmentor as an MLflow pyfunc model ("model from code": no
  pickles; the checkpoint is loaded with ``weights_only=True``).
- **Images**: validation overlays (true vs predicted contours) and training curves.
- **Comparison**: :func:`run_compare` (best metric per run, mean ± std per group).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from segan.errors import UserError

log = logging.getLogger(__name__)

STORE_DIR = "mlflow_runs"
MODEL_NAME = "model"  # name of the logged segmentor inside a run
MODEL_CHECKPOINT = "segmentor.pt"  # the checkpoint file inside the model's artifacts
SWEEP_ROLE_TAG = "segan.role"  # "sweep" on a sweep's parent run (no metrics; compare skips it)
PACKAGES = ("torch", "monai", "mlflow", "numpy", "segan")
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_BATCH_PARAMS = 100  # MLflow's limits per log_batch call
_BATCH_METRICS = 1000


# ------------------------------------------------------------------------------------- store
def default_tracking_uri() -> str:
    """``sqlite:////abs/cwd/mlflow_runs/mlflow.db`` (four slashes: an absolute path)."""
    return "sqlite:///" + (Path.cwd() / STORE_DIR / "mlflow.db").as_posix()


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > :func:`default_tracking_uri`.

    The plain file store (a folder path or ``file:`` URI) is refused: MLflow 3 no longer
    supports it for tracking.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if "://" not in uri or uri.startswith("file:"):
        raise UserError(f"tracking URI {uri!r}: MLflow's folder store is not supported; use a database, "
                        "e.g. sqlite:///mlflow_runs/mlflow.db, or a server, e.g. http://127.0.0.1:5000")
    return uri


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths are relative to the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _configure_http(uri: str) -> None:
    """Make a dead server cost seconds, not minutes: the tracker is the retry layer.

    MLflow's defaults (7 retries with exponential backoff, 120 s timeout) would stall a
    training step for minutes. Values the user exported are kept.
    """
    if _is_http(uri):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database; else the server decides."""
    db = _sqlite_path(uri)
    if db is None:
        return None
    return (db.absolute().parent / "artifacts" / _slug(experiment)).as_uri()


def get_or_create_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """Experiment id for ``name``; created (artifacts beside a SQLite store) or restored if needed."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri, name))
        except MlflowException as exc:  # another process (a sweep, a DDP job) created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise exc
    if exp.lifecycle_stage == "deleted":
        log.warning("MLflow experiment %r was deleted; restoring it to log this run", name)
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _is_transient(exc: BaseException) -> bool:
    """A failure worth retrying later: no answer, a timeout, a 5xx, a rate limit, an I/O error.

    MLflow wraps connection failures in an ``MlflowException`` with status 500; ``requests``
    errors are ``OSError``s. Anything else (a 4xx, a bug) is not retried.
    """
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status in (408, 429)
    return isinstance(exc, OSError)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


# ------------------------------------------------------------------------- run metadata
def package_versions() -> dict[str, str]:
    """``{'version.torch': '2.13.0+cpu', ...}`` for the packages that shape a result."""
    out = {}
    for name in PACKAGES:
        try:
            out[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The commit of the segan source tree, or None (no git, not a checkout, any failure)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."


def metric_key(name: str) -> str:
    """A name MLflow accepts (letters, digits, ``_ - . : /`` and spaces); e.g. region names."""
    return re.sub(r"[^\w.\- :/]", "_", str(name))


def config_hash(cfg_dict: dict) -> str:
    return hashlib.sha1(json.dumps(cfg_dict, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_run_name(cfg_dict: dict) -> str:
    """``<method>-<short hash of the resolved config>``."""
    method = (cfg_dict.get("method") or {}).get("name", "run")
    return f"{method}-{config_hash(cfg_dict)}"


@contextlib.contextmanager
def _mlflow_globals(uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI (and experiment) at ours, then restore them.

    ``Model.log`` reads both from globals (a LoggedModel lands in the experiment given by
    ``MLFLOW_EXPERIMENT_ID``, else in "Default"); ``models:/`` URIs use the registry, whose
    URI follows the global tracking URI.
    """
    from mlflow.tracking._tracking_service import utils as tracking_utils

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    saved_env = {k: os.environ.get(k) for k in keys}
    saved_uri = tracking_utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    if experiment_id is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no progress bars in training logs
    try:
        with warnings.catch_warnings():
            # Logged without an input example on purpose: validating one would run the
            # model inside the training process. The tensor signature documents the input.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            yield
    finally:
        tracking_utils._tracking_uri = saved_uri
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------- the tracker
class RunTracker:
    """One MLflow run, logged from rank 0 of a training job.

    Every call queues its payload and tries to send the queue in order (run creation,
    params, tags, artifacts, the model, then metrics). While the store does not answer,
    a warning is logged once, the queue is kept, and a new attempt is made at most every
    ``retry_interval`` seconds. ``run_id`` is None until the run exists in the store.
    """

    retry_interval: float = 10.0  # seconds between attempts while the store is away
    finish_timeout: float = 30.0  # how long finish() keeps retrying before writing the spill file

    def __init__(self, uri: str, experiment: str, run_name: str, *, tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None, resume_run_id: str | None = None,
                 spill_dir: Path | None = None, start_time_ms: int | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = resume_run_id
        self.model_uri: str | None = None  # models:/<id> of the last logged segmentor
        self.spill_dir = Path(spill_dir) if spill_dir else None
        self.parent_run_id = parent_run_id
        self._client = MlflowClient(uri)
        self._tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            self._tags["mlflow.parentRunId"] = parent_run_id
        self._resume_run_id = resume_run_id
        self._start_ms = start_time_ms or int(time.time() * 1000)
        self._experiment_id: str | None = None
        self._run_ready = False
        self._logged_params: dict[str, str] = {}
        self._ops: list[tuple[str, dict[str, Any]]] = []
        self._metrics: list[Metric] = []
        self._rejected: list[dict[str, Any]] = []  # refused by the store (bad value): kept for the spill file
        self._online = True
        self._last_try = -math.inf
        self._staging = Path(tempfile.mkdtemp(prefix="segan-mlflow-"))
        self._last_checkpoint_dir: Path | None = None
        self._system_monitor: Any = None
        self._finished = False

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    def start(cls, cfg_dict: dict, *, tracking_uri: str | None, experiment: str, run_name: str,
              resume_run_id: str | None = None, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, spill_dir: Path | None = None) -> RunTracker:
        """Open (or, with ``resume_run_id``, reopen) a run; never fails because the store is down.

        Params: the flattened config, package versions and the git commit when there is one.
        ``spill_dir``: where :meth:`finish` writes what could not be sent (default: the folder
        of the last checkpoint given to :meth:`log_artifact`/:meth:`log_model`, else of the
        first artifact, else the cwd).
        """
        from segan.config import flatten

        uri = resolve_tracking_uri(tracking_uri)
        _configure_http(uri)
        db = _sqlite_path(uri)
        if db is not None:
            db.absolute().parent.mkdir(parents=True, exist_ok=True)
        tags = dict(tags or {})
        params = {k: _param_value(v) for k, v in flatten(cfg_dict).items()}
        params.update(package_versions())
        commit = git_commit()
        if commit:
            params["git_commit"] = commit
            tags.setdefault("mlflow.source.git.commit", commit)
        tracker = cls(uri, experiment, run_name, tags=tags, parent_run_id=parent_run_id,
                      resume_run_id=resume_run_id, spill_dir=spill_dir)
        if resume_run_id:
            tracker._ops.append(("tags", {"tags": tracker._tags}))
        tracker._ops.append(("params", {"params": params}))
        tracker._flush(force=True)
        tracker._start_system_metrics()
        return tracker

    def finish(self, status: str) -> None:
        """Send everything, then mark the run ``FINISHED`` | ``FAILED`` | ``KILLED``.

        Retries for up to ``finish_timeout`` seconds; what still cannot be sent is written to
        ``mlflow_unsent_<run>.json`` (see :func:`replay_unsent`) with a warning naming it.
        """
        if self._finished:
            return
        self._finished = True
        self._stop_system_metrics()
        self._ops.append(("terminate", {"status": status, "end_time": int(time.time() * 1000)}))
        deadline = time.monotonic() + self.finish_timeout
        interrupted = False
        try:
            while not self._flush(force=True) and time.monotonic() < deadline:
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, keep the data
            interrupted = True
        if self._ops or self._metrics or self._rejected:
            self._spill(status)
        else:
            shutil.rmtree(self._staging, ignore_errors=True)
        if interrupted:
            raise KeyboardInterrupt

    # ---------------------------------------------------------------- logging
    def log_params(self, params: dict) -> None:
        """Extra params (e.g. the data list fingerprint); a key keeps its first value."""
        self._queue("params", {"params": {str(k): _param_value(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._queue("tags", {"tags": {str(k): str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Per-epoch (``step``) metrics; None values are skipped, NaN is kept (MLflow stores it)."""
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            self._metrics.append(Metric(metric_key(key), float(value), now, int(step)))
        self._flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file (sent when the store answers; a queued file is read at send time)."""
        path = Path(path)
        if not path.is_file():
            log.warning("MLflow: artifact %s does not exist; not logged", path)
            return
        if path.suffix == ".pt" or self._last_checkpoint_dir is None:  # where a spill file would go
            self._last_checkpoint_dir = path.absolute().parent
        op = ("artifact", {"path": str(path.absolute()), "artifact_path": artifact_path})
        if op not in self._ops:  # e.g. best.pt logged again while the server is away
            self._queue(*op)

    def log_overlay(self, image: np.ndarray, target: np.ndarray, pred: np.ndarray,
                    region_names: list[str], epoch: int, channel: int = 0) -> None:
        """Artifact ``overlays/epoch_XXX.png``: one slice, true (solid) and predicted (dashed) contours.

        ``image`` ``(C, H, W)``; ``target``/``pred`` ``(K, H, W)`` binary, one channel per region.
        """
        png = self._staging / f"epoch_{int(epoch):03d}.png"
        try:
            save_overlay_png(png, image, target, pred, region_names, title=f"epoch {epoch}", channel=channel)
        except Exception as exc:  # an image is not worth a training run
            log.warning("MLflow: overlay of epoch %s not drawn (%s: %s)", epoch, type(exc).__name__, _short(exc))
            return
        self._queue("artifact", {"path": str(png), "artifact_path": "overlays"})

    def log_curves(self, history: list[dict]) -> None:
        """Artifact ``curves.png``: losses and validation Dice per epoch (one dict per epoch)."""
        png = self._staging / "curves.png"
        try:
            save_curves_png(png, history)
        except Exception as exc:  # an image is not worth a training run
            log.warning("MLflow: curves not drawn (%s: %s)", type(exc).__name__, _short(exc))
            return
        op = ("artifact", {"path": str(png), "artifact_path": None})
        if op not in self._ops:  # the queued file already holds the newest curves
            self._queue(*op)

    def log_model(self, checkpoint_path: Path, register: str | None = None) -> None:
        """Log the segmentor as pyfunc model ``model`` (see :class:`SegmentorModel`); ``register``: a name.

        The model's artifact is a slim copy of the checkpoint (config, meta, segmentor weights).
        """
        from segan.checkpoint import load_checkpoint, save_checkpoint

        checkpoint_path = Path(checkpoint_path)
        self._last_checkpoint_dir = checkpoint_path.absolute().parent
        ckpt = load_checkpoint(checkpoint_path)
        slim = self._staging / f"model-{len(os.listdir(self._staging))}" / MODEL_CHECKPOINT
        save_checkpoint({k: ckpt[k] for k in ("config", "meta", "segmentor") if k in ckpt}, slim)
        self._queue("model", {"checkpoint": str(slim), "register": register})

    # ---------------------------------------------------------------- sending
    def _queue(self, kind: str, payload: dict[str, Any]) -> None:
        self._ops.append((kind, payload))
        self._flush()

    def _flush(self, force: bool = False) -> bool:
        """Send the queue in order; True when nothing is left. Never raises for store failures."""
        if self._run_ready and not self._ops and not self._metrics:
            return True
        if not force and not self._online and time.monotonic() - self._last_try < self.retry_interval:
            return False
        self._last_try = time.monotonic()
        try:
            self._ensure_run()
            while self._ops:
                kind, payload = self._ops[0]
                try:
                    getattr(self, f"_send_{kind}")(**payload)
                except Exception as exc:
                    if _is_transient(exc):
                        raise
                    log.warning("MLflow could not log %s of run %s (%s: %s); kept for the unsent file", kind,
                                self.run_id, type(exc).__name__, _short(exc))
                    self._rejected.append({"kind": kind, **payload})
                self._ops.pop(0)
            while self._metrics:
                chunk = self._metrics[:_BATCH_METRICS]
                try:
                    self._client.log_batch(self.run_id, metrics=chunk)
                except Exception as exc:
                    if _is_transient(exc):
                        raise
                    log.warning("MLflow refused %d metrics of run %s (%s); kept for the unsent file",
                                len(chunk), self.run_id, _short(exc))
                    self._rejected.extend({"kind": "metric", **_metric_dict(m)} for m in chunk)
                del self._metrics[: len(chunk)]
        except Exception as exc:
            if self._online:
                log.warning("MLflow tracking store %s is not answering (%s); training goes on, metrics and "
                            "artifacts are kept and sent once it answers", self.uri, _short(exc))
            self._online = False
            return False
        if not self._online:
            log.warning("MLflow tracking store %s answers again; buffered metrics and artifacts were sent", self.uri)
        self._online = True
        return True

    def _ensure_run(self) -> None:
        if self._run_ready:
            return
        if self._resume_run_id:
            try:
                run = self._client.get_run(self._resume_run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow run %s is not in %s; starting a new run", self._resume_run_id, self.uri)
                self._resume_run_id = None
            else:
                self.run_id = run.info.run_id
                self._experiment_id = run.info.experiment_id
                self._logged_params = dict(run.data.params)
                if run.info.status != "RUNNING":
                    self._client.update_run(self.run_id, status="RUNNING")
                self._run_ready = True
                return
        if self._experiment_id is None:
            self._experiment_id = get_or_create_experiment(self._client, self.uri, self.experiment)
        run = self._client.create_run(self._experiment_id, start_time=self._start_ms, tags=self._tags,
                                      run_name=self.run_name)
        self.run_id = run.info.run_id
        self._run_ready = True

    def _send_params(self, params: dict[str, str]) -> None:
        changed = sorted(k for k, v in params.items() if k in self._logged_params and self._logged_params[k] != v)
        if changed:
            log.warning("MLflow run %s: params %s changed since the run started; the first values are kept",
                        self.run_id, ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else ""))
        new = [Param(k, v) for k, v in params.items() if k not in self._logged_params]
        for i in range(0, len(new), _BATCH_PARAMS):
            self._client.log_batch(self.run_id, params=new[i: i + _BATCH_PARAMS])
            self._logged_params.update({p.key: p.value for p in new[i: i + _BATCH_PARAMS]})

    def _send_tags(self, tags: dict[str, str]) -> None:
        self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _send_artifact(self, path: str, artifact_path: str | None) -> None:
        self._client.log_artifact(self.run_id, path, artifact_path)
        if Path(path).parent == self._staging:  # a rendered image: done with it
            Path(path).unlink(missing_ok=True)

    def _send_model(self, checkpoint: str, register: str | None) -> None:
        info = log_segmentor_model(Path(checkpoint), uri=self.uri, run_id=self.run_id,
                                   experiment_id=self._experiment_id, register=register)
        self.model_uri = info.model_uri

    def _send_terminate(self, status: str, end_time: int) -> None:
        self._client.set_terminated(self.run_id, status=status, end_time=end_time)

    # ---------------------------------------------------------------- leftovers
    def _spill(self, status: str) -> Path:
        """Write what could not be sent (and the files it needs) beside the checkpoint."""
        folder = self.spill_dir or self._last_checkpoint_dir or Path.cwd()
        stem = f"mlflow_unsent_{self.run_id or _slug(self.run_name)}"
        files = folder / f"{stem}_files"
        ops = list(self._ops)
        if any(Path(p["path"] if k == "artifact" else p.get("checkpoint", "")).is_relative_to(self._staging)
               for k, p in ops if k in ("artifact", "model")):
            shutil.rmtree(files, ignore_errors=True)
            files.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self._staging), files)
            ops = [(k, {key: (str(files / Path(v).relative_to(self._staging))
                              if key in ("path", "checkpoint") and Path(v).is_relative_to(self._staging) else v)
                        for key, v in p.items()}) for k, p in ops]
        else:
            shutil.rmtree(self._staging, ignore_errors=True)
        data = {
            "format": "segan-mlflow-unsent/1",
            "tracking_uri": self.uri, "experiment": self.experiment, "run_name": self.run_name,
            "run_id": self.run_id if self._run_ready else self._resume_run_id,
            "start_time": self._start_ms, "status": status, "tags": self._tags,
            "ops": [{"kind": k, **p} for k, p in ops if k != "terminate"],
            "metrics": [_metric_dict(m) for m in self._metrics],
            "rejected": self._rejected,
        }
        from segan.io_utils import atomic_write_text

        path = folder / f"{stem}.json"
        atomic_write_text(path, json.dumps(data, indent=1))
        log.warning("MLflow tracking store %s could not take %d metrics and %d other items of run %s; they are "
                    "saved in %s (send them later with segan.tracking.replay_unsent)", self.uri,
                    len(self._metrics), len(data["ops"]), self.run_id or self.run_name, path)
        return path

    def _start_system_metrics(self) -> None:
        """CPU/memory/GPU system metrics when psutil is installed and the run exists."""
        import importlib.util

        if not self._run_ready or importlib.util.find_spec("psutil") is None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system_monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.uri)
            self._system_monitor.start()
        except Exception as exc:  # optional: never a reason to stop training
            log.info("MLflow system metrics unavailable: %s", _short(exc))
            self._system_monitor = None

    def _stop_system_metrics(self) -> None:
        if self._system_monitor is not None:
            with contextlib.suppress(Exception):
                self._system_monitor.finish()
            self._system_monitor = None


def _metric_dict(m: Metric) -> dict[str, Any]:
    return {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}


def replay_unsent(path: str | Path, tracking_uri: str | None = None) -> str | None:
    """Send a ``mlflow_unsent_*.json`` file written by :meth:`RunTracker.finish`; returns the run id.

    The run is reopened if the store has it, else created; then it is marked with the status
    it ended with. ``tracking_uri`` defaults to the store named in the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        assert data.get("format") == "segan-mlflow-unsent/1"
    except (OSError, ValueError, AssertionError):
        raise UserError(f"{path}: not an unsent-MLflow file written by segan training") from None
    uri = resolve_tracking_uri(tracking_uri or data["tracking_uri"])
    _configure_http(uri)
    tracker = RunTracker(uri, data["experiment"], data["run_name"], tags=data["tags"],
                         resume_run_id=data["run_id"], spill_dir=path.parent, start_time_ms=data["start_time"])
    tracker._ops = [(op.pop("kind"), op) for op in data["ops"]]
    tracker._metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in data["metrics"]]
    if data.get("rejected"):
        log.warning("%s: %d items were refused by the store and are not re-sent", path, len(data["rejected"]))
    tracker.finish(data["status"])
    if tracker._ops or tracker._metrics:
        raise UserError(f"{path}: the MLflow store {uri} still does not answer; the file is kept")
    path.unlink()
    shutil.rmtree(path.with_name(path.stem + "_files"), ignore_errors=True)
    return tracker.run_id


class NullTracker:
    """The tracker when tracking is off or on ranks other than 0: every call does nothing."""

    run_id: str | None = None
    model_uri: str | None = None

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> NullTracker:
        return cls()

    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_overlay(self, image: np.ndarray, target: np.ndarray, pred: np.ndarray,
                    region_names: list[str], epoch: int, channel: int = 0) -> None: ...
    def log_curves(self, history: list[dict]) -> None: ...
    def log_model(self, checkpoint_path: Path, register: str | None = None) -> None: ...
    def finish(self, status: str) -> None: ...


def make_tracker(cfg: Any, rank: int, **kwargs: Any) -> RunTracker | NullTracker:
    """The tracker of a training job: :class:`NullTracker` unless tracking is on and ``rank == 0``.

    ``kwargs`` go to :meth:`RunTracker.start` (``tracking_uri`` overrides ``cfg.tracking.uri``;
    ``tags`` are merged over method / spatial_dims / dataset; ``run_name`` defaults to
    ``cfg.run_name`` or ``<method>-<config hash>``).
    """
    from segan.config import to_dict

    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    cfg_dict = to_dict(cfg)
    tags = {"method": cfg.method.name, "spatial_dims": str(cfg.data.spatial_dims),
            "dataset": Path(cfg.data.root).name, **(kwargs.pop("tags", None) or {})}
    return RunTracker.start(cfg_dict, tracking_uri=kwargs.pop("tracking_uri", None) or cfg.tracking.uri,
                            experiment=kwargs.pop("experiment", None) or cfg.experiment,
                            run_name=kwargs.pop("run_name", None) or cfg.run_name or default_run_name(cfg_dict),
                            tags=tags, **kwargs)


# ----------------------------------------------------------------------- the served model
_MODEL_CODE = '''"""MLflow "model from code" entry point of a segan segmentor: see segan.tracking.SegmentorModel."""
import mlflow
from segan.tracking import SegmentorModel

mlflow.models.set_model(SegmentorModel())
'''


class SegmentorModel(mlflow.pyfunc.PythonModel):
    """pyfunc: float32 ``(N, C, *spatial)`` in preprocessed space -> uint8 masks ``(N, K, *spatial)``.

    ``spatial`` has ``spatial_dims`` axes (2: slices ``(H, W)``, 3: volumes ``(X, Y, Z)``), the
    channels are the checkpoint's ``meta.channels`` in order, already normalised the way the
    config's ``preprocess`` says. Each output channel is one region (``meta.region_names``):
    sigmoid > ``post.threshold`` (0.5). Inputs of any size: 2D slices go through whole (the
    segmentor pads to its stride), 3D volumes in sliding windows of the training patch size.
    Needs segan installed where the model is loaded (GPU used when there is one).
    """

    def load_context(self, context: Any) -> None:
        import dataclasses

        import torch

        from segan.checkpoint import load_checkpoint
        from segan.config import ModelConfig
        from segan.nets import build_segmentor

        ckpt = load_checkpoint(context.artifacts["checkpoint"])
        meta, cfg = ckpt["meta"], ckpt["config"]
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        model_cfg = ModelConfig(**{k: v for k, v in cfg["model"].items() if k in names})
        self.spatial_dims = int(meta["spatial_dims"])
        self.patch_size = [int(p) for p in meta["patch_size"]]
        post = cfg.get("post") or {}
        self.threshold = float(post.get("threshold", 0.5))
        self.overlap = float(post.get("overlap", 0.5))
        self.sw_batch_size = int(post.get("sw_batch_size", 4))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.out_channels = len(meta["region_names"])
        net = build_segmentor(model_cfg, self.spatial_dims, len(meta["channels"]), len(meta["region_names"]))
        net.load_state_dict(ckpt["segmentor"])
        self.net = net.to(self.device).eval()

    # np.ndarray is a hint MLflow accepts without deriving a signature from it, so the tensor
    # signature logged with the model stays the one that is enforced.
    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        import torch
        from monai.inferers import sliding_window_inference

        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a float32 array (N, C, {'H, W' if self.spatial_dims == 2 else 'X, Y, Z'}), "
                             f"got shape {x.shape}")
        batch = torch.from_numpy(x)
        with torch.inference_mode():
            if self.spatial_dims == 2:  # whole slices (the segmentor pads to its stride), a few at a time
                logits = torch.cat([self.net(b.to(self.device)).cpu()
                                    for b in batch.split(max(1, self.sw_batch_size * 4))]) if len(batch) else \
                    torch.zeros((0, self.out_channels, *x.shape[2:]))
            else:  # volumes: sliding windows of the training patch size
                logits = sliding_window_inference(batch.to(self.device), roi_size=self.patch_size,
                                                  sw_batch_size=self.sw_batch_size, predictor=self.net,
                                                  overlap=self.overlap).cpu()
            return (torch.sigmoid(logits) > self.threshold).to(torch.uint8).numpy()


def model_signature(meta: dict) -> Any:
    """Tensor signature: float32 ``(-1, C, -1, ...)`` in, uint8 ``(-1, K, -1, ...)`` out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    free = (-1,) * int(meta["spatial_dims"])
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(meta["channels"]), *free))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, len(meta["region_names"]), *free))]))


def log_segmentor_model(checkpoint: Path, *, uri: str, run_id: str | None, experiment_id: str,
                        register: str | None = None) -> Any:
    """Log a (slim) checkpoint as the pyfunc model ``model`` of ``run_id``; returns MLflow's ModelInfo."""
    from mlflow.models import Model

    from segan.checkpoint import load_checkpoint

    meta = load_checkpoint(checkpoint)["meta"]
    versions = package_versions()
    reqs = [f"{name}=={versions[f'version.{name}'].split('+')[0]}" for name in ("torch", "monai", "numpy", "mlflow")
            if f"version.{name}" in versions]
    with tempfile.TemporaryDirectory() as tmp, _mlflow_globals(uri, experiment_id):
        code = Path(tmp) / "segan_model.py"
        code.write_text(_MODEL_CODE)
        return Model.log(artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                         python_model=str(code), artifacts={"checkpoint": str(checkpoint)},
                         signature=model_signature(meta), pip_requirements=reqs,
                         registered_model_name=register, flavor_name="pyfunc.ModelFromCode",
                         metadata={"segan_regions": list(meta["region_names"]),
                                   "segan_channels": list(meta["channels"])})


def download_checkpoint(model_uri: str, tracking_uri: str | None = None, dst: Path | None = None) -> Path:
    """Download the checkpoint behind ``runs:/<id>/model``, ``models:/<name>/<version>`` or any
    artifact URI of a ``.pt`` file; returns the local ``.pt`` path (for ``segan predict``)."""
    _, uri = _open_store(tracking_uri)
    dst = Path(dst or tempfile.mkdtemp(prefix="segan-model-"))
    try:
        with _mlflow_globals(uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise UserError(f"model {model_uri}: not found in MLflow store {uri} ({_short(exc)}); pass runs:/<run id>/"
                        f"{MODEL_NAME} or models:/<name>/<version>") from None
    if local.is_file():
        return local
    found = sorted(local.rglob(MODEL_CHECKPOINT)) or sorted(local.rglob("*.pt"))
    if not found:
        raise UserError(f"model {model_uri}: holds no segan checkpoint (.pt); pass a model logged by segan train")
    return found[0]


# ------------------------------------------------------------------------------- images
def _normalise(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    return np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img, dtype=float)


def _region_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def save_overlay_png(path: Path, image: np.ndarray, target: np.ndarray, pred: np.ndarray,
                     region_names: Sequence[str], title: str = "", channel: int = 0) -> None:
    """PNG of ``image[channel]`` ``(C, H, W)`` with each region's true (solid) and predicted (dashed)
    contours (``target``/``pred`` ``(K, H, W)`` binary); the legend gives the slice's Dice."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from skimage import measure

    image, target, pred = np.asarray(image), np.asarray(target) > 0, np.asarray(pred) > 0
    fig = Figure(figsize=(5, 5.4), dpi=100)
    ax = fig.add_subplot()
    # Transposed with the origin at the bottom: first array axis left->right, second upwards.
    ax.imshow(_normalise(image[min(channel, image.shape[0] - 1)].astype(np.float32)).T, cmap="gray",
              origin="lower", interpolation="nearest")
    handles = []
    for k, (name, color) in enumerate(zip(region_names, _region_colors(len(region_names)))):
        for mask, style in ((target[k], "-"), (pred[k], "--")):
            for c in measure.find_contours(mask.T.astype(np.float32), 0.5):
                ax.plot(c[:, 1], c[:, 0], style, color=color, linewidth=1.3)
        denom = target[k].sum() + pred[k].sum()
        dice = 2 * np.logical_and(target[k], pred[k]).sum() / denom if denom else 1.0
        handles.append(Line2D([], [], color=color, label=f"{name} (Dice {dice:.2f})"))
    handles += [Line2D([], [], color="w", linestyle="-", label="true"),
                Line2D([], [], color="w", linestyle="--", label="predicted")]
    ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.5, facecolor="black", labelcolor="w")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    _save_figure(fig, Path(path))


def save_curves_png(path: Path, history: list[dict]) -> None:
    """Losses (left) and validation Dice (right) per epoch; missing values are gaps."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    fig = Figure(figsize=(10, 4), dpi=100)
    panels = ((fig.add_subplot(1, 2, 1), ("loss_seg", "loss_adv", "loss_critic"), "loss"),
              (fig.add_subplot(1, 2, 2), ["val_dice_mean"] + sorted({k for h in history for k in h
                                                                      if k.startswith("val_dice_")} - {"val_dice_mean"}),
               "validation Dice"))
    for ax, keys, label in panels:
        for key in keys:
            ys = [_as_float(h.get(key)) for h in history]
            if any(not math.isnan(y) for y in ys):
                ax.plot(epochs, ys, marker="o", markersize=3, label=key,
                        linewidth=2 if key == "val_dice_mean" else 1.2)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    _save_figure(fig, Path(path))


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _save_figure(fig: Any, path: Path) -> None:
    from segan.io_utils import atomic_path

    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


# --------------------------------------------------------------------------- comparison
_HIGHER = ("dice", "iou", "jaccard", "precision", "sensitivity", "recall", "specificity", "accuracy",
           "samples_per_s")
_LOWER = ("loss", "hd95", "hausdorff", "surface_distance", "error")
_KEY_PARAMS = ("seed", "model.segmentor", "data.spatial_dims", "train.epochs")


def metric_goal(key: str) -> str:
    """``'max'`` (Dice-like), ``'min'`` (losses, distances) or ``'last'`` (lr, memory, ...)."""
    k = key.lower()
    if any(w in k for w in _LOWER):
        return "min"
    if any(w in k for w in _HIGHER):
        return "max"
    return "last"


def _best(history: list[Any], goal: str) -> float | None:
    values = [(m.step, m.timestamp, m.value) for m in history if not math.isnan(m.value)]
    if not values:
        return None
    if goal == "max":
        return max(v for _, _, v in values)
    if goal == "min":
        return min(v for _, _, v in values)
    return max(values)[2]


@dataclass
class RunRow:
    """One run in a comparison: best value of every metric, plus the history of the compared one."""

    run_id: str
    run_name: str
    experiment: str
    status: str
    method: str
    group: str
    start_time: int
    duration_s: float | None
    params: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[tuple[int, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_name": self.run_name, "experiment": self.experiment,
                "method": self.method, "group": self.group, "status": self.status,
                "start_time": self.start_time, "duration_s": self.duration_s, "params": self.params,
                "metrics": self.metrics}


def _open_store(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    uri = resolve_tracking_uri(tracking_uri)
    _configure_http(uri)
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UserError(f"no MLflow store at {db}; train a model first (segan train), or pass --tracking-uri / "
                        "set MLFLOW_TRACKING_URI")
    return MlflowClient(uri), uri


def collect_runs(experiments: list[str], metric: str, group_by: str = "method", tracking_uri: str | None = None,
                 parent_run_id: str | None = None) -> list[RunRow]:
    """Rows for every run of ``experiments`` (all but an empty "Default" when none are named).

    Sweep parent runs are skipped; ``parent_run_id`` keeps only that sweep's children.
    """
    client, uri = _open_store(tracking_uri)
    try:
        all_exps = client.search_experiments()
        by_name = {e.name: e for e in all_exps}
        missing = [name for name in experiments if name not in by_name]
        if missing:
            raise UserError(f"experiment {', '.join(repr(m) for m in missing)} not found in {uri}; existing "
                            f"experiments: {', '.join(sorted(by_name)) or 'none'}")
        exps = [by_name[n] for n in dict.fromkeys(experiments)] if experiments else all_exps
        runs = []
        for exp in exps:
            filt = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else ""
            token = None
            while True:
                page = client.search_runs([exp.experiment_id], filter_string=filt, max_results=1000,
                                          page_token=token)
                runs += [(exp.name, r) for r in page if r.data.tags.get(SWEEP_ROLE_TAG) != "sweep"]
                token = page.token
                if not token:
                    break
        rows = []
        now = time.time() * 1000
        for exp_name, run in runs:
            info, data = run.info, run.data
            row = RunRow(run_id=info.run_id, run_name=info.run_name or "", experiment=exp_name, status=info.status,
                         method=data.tags.get("method") or data.params.get("method.name") or "-",
                         group=_group_value(run, group_by), start_time=info.start_time,
                         duration_s=((info.end_time or now) - info.start_time) / 1000 if info.start_time else None,
                         params={k: data.params[k] for k in _KEY_PARAMS if k in data.params})
            for key in sorted(data.metrics):
                if key.startswith("system/"):
                    continue
                history = client.get_metric_history(info.run_id, key)
                best = _best(history, metric_goal(key))
                if best is not None:
                    row.metrics[key] = best
                if key == metric:
                    row.history = sorted((m.step, m.value) for m in history)
            rows.append(row)
    except MlflowException as exc:
        raise UserError(f"MLflow store {uri} could not be read ({_short(exc)}); check --tracking-uri") from None
    return rows


def _group_value(run: Any, key: str) -> str:
    tags, params = run.data.tags, run.data.params
    for value in (tags.get(key), params.get(key), params.get(f"{key}.name")):
        if value is not None:
            return str(value)
    return {"status": run.info.status, "run_name": run.info.run_name}.get(key) or "-"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def _sort_rows(rows: list[RunRow], metric: str) -> list[RunRow]:
    sign = 1.0 if metric_goal(metric) == "min" else -1.0
    return sorted(rows, key=lambda r: (metric not in r.metrics, sign * r.metrics.get(metric, 0.0), r.run_name))


def group_stats(rows: list[RunRow], metrics: list[str]) -> list[dict[str, Any]]:
    """Per group (seeds): FINISHED runs only; mean and sample std (0 for one run) of each best metric."""
    groups: dict[str, list[RunRow]] = {}
    for row in rows:
        if row.status == "FINISHED":
            groups.setdefault(row.group, []).append(row)
    out = []
    for name, members in groups.items():
        entry: dict[str, Any] = {"group": name, "runs": len(members)}
        for key in metrics:
            vals = np.array([r.metrics[key] for r in members if key in r.metrics], dtype=float)
            entry[key] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, len(vals)) \
                if len(vals) else None
        out.append(entry)
    key0 = metrics[0]
    sign = 1.0 if metric_goal(key0) == "min" else -1.0
    return sorted(out, key=lambda e: (e[key0] is None, sign * (e[key0][0] if e[key0] else 0.0), e["group"]))


def _render_table(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def run_compare(experiments: list[str], metric: str = "val_dice_mean", group_by: str = "method",
                fmt: str = "table", plot: Path | None = None, tracking_uri: str | None = None,
                parent_run_id: str | None = None) -> str:
    """The comparison as text: ``table`` | ``markdown`` (runs, then mean ± std per group),
    ``csv`` (runs) or ``json`` (a list of runs with their best metrics). ``plot``: a PNG."""
    rows = collect_runs(experiments, metric, group_by, tracking_uri, parent_run_id)
    where = ", ".join(experiments) if experiments else "any experiment"
    if rows and not any(metric in r.metrics for r in rows):
        known = sorted({k for r in rows for k in r.metrics})
        raise UserError(f"metric {metric!r} is not logged by any run in {where}; logged metrics: "
                        f"{', '.join(known) or 'none'}")
    rows = _sort_rows(rows, metric)
    if plot is not None and rows:
        save_compare_png(Path(plot), rows, metric)
    if fmt == "json":
        return json.dumps([r.to_json() for r in rows], indent=2)
    metric_keys = sorted({k for r in rows for k in r.metrics})
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["run_id", "run_name", "experiment", "method", "group", "status", "duration_s",
                         *_KEY_PARAMS, *metric_keys])
        for r in rows:
            writer.writerow([r.run_id, r.run_name, r.experiment, r.method, r.group, r.status,
                             "" if r.duration_s is None else round(r.duration_s, 1),
                             *(r.params.get(p, "") for p in _KEY_PARAMS),
                             *(r.metrics.get(k, "") for k in metric_keys)])
        return buf.getvalue().rstrip("\n")
    if not rows:
        return f"no runs in {where}"
    shown = [metric] + [k for k in metric_keys if k.startswith("val_") and k != metric]
    extra_group = [] if group_by == "method" else [group_by]
    header = ["run_id", "run_name", "method", *extra_group, "seed", "segmentor", "epochs", *shown,
              "duration", "status"]
    body = [[r.run_id[:8], r.run_name, r.method, *([r.group] if extra_group else []), r.params.get("seed", "-"),
             r.params.get("model.segmentor", "-"), r.params.get("train.epochs", "-"),
             *(_fmt(r.metrics.get(k)) for k in shown), _fmt_duration(r.duration_s), r.status] for r in rows]
    markdown = fmt == "markdown"
    goal = {"max": "higher is better", "min": "lower is better", "last": "last value"}[metric_goal(metric)]
    parts = [f"Runs in {where}, best value per run, sorted by {metric} ({goal}):", "",
             _render_table(header, body, markdown)]
    stats = group_stats(rows, [k for k in shown if k.startswith(("val_dice", metric))] or [metric])
    if stats:
        keys = [k for k in stats[0] if k not in ("group", "runs")]
        g_body = [[s["group"], str(s["runs"]), *(("-" if s[k] is None else f"{s[k][0]:.4f} ± {s[k][1]:.4f}")
                                                 for k in keys)] for s in stats]
        parts += ["", f"Mean ± std per {group_by} over FINISHED runs (seeds):", "",
                  _render_table([group_by, "runs", *keys], g_body, markdown)]
    others = sum(r.status != "FINISHED" for r in rows)
    if others:
        parts += ["", f"{others} run(s) not FINISHED are listed above but not averaged."]
    if plot is not None:
        parts += ["", f"plot written to {plot}"]
    return "\n".join(parts)


def save_compare_png(path: Path, rows: list[RunRow], metric: str) -> None:
    """Left: ``metric`` per epoch for every run; right: mean ± std of its best value per group."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 4.5), dpi=100)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    groups = sorted({r.group for r in rows})
    colors = dict(zip(groups, _region_colors(len(groups))))
    for r in rows:
        if r.history:
            steps, values = zip(*r.history)
            ax1.plot(steps, values, color=colors[r.group], linewidth=1.2, alpha=0.85, marker="o", markersize=3,
                     linestyle="-" if r.status == "FINISHED" else ":", label=f"{r.run_name} ({r.group})")
    ax1.set_xlabel("epoch")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_ylabel(metric)
    ax1.set_title(f"{metric} per epoch")
    ax1.grid(alpha=0.3)
    if ax1.lines and len(rows) <= 16:
        ax1.legend(fontsize=6)
    stats = [s for s in group_stats(rows, [metric]) if s[metric] is not None]
    ax2.bar(range(len(stats)), [s[metric][0] for s in stats], yerr=[s[metric][1] for s in stats], capsize=5,
            color=[colors[s["group"]] for s in stats])
    ax2.set_xticks(range(len(stats)), [f"{s['group']}\n(n={s[metric][2]})" for s in stats])
    ax2.set_ylabel(f"best {metric}")
    ax2.set_title("mean ± std per group (FINISHED runs)")
    ax2.grid(alpha=0.3, axis="y")
    _save_figure(fig, path)
