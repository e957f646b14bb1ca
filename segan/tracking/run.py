"""The run logger of a training job: params, metrics, artifacts, images and the model of one run.

Delivery (ordering, a store that is away, the spill file) is :class:`RunOutbox`'s; this class
decides what a run holds. Only rank 0 of a job logs; other ranks get a :class:`NullTracker`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric

from segan.tracking.meta import (STOP_REASON_TAG, STOP_REASONS, TRAINED_METRICS, git_commit, metric_key,
                                 package_versions, param_value)
from segan.tracking.model import MODEL_CHECKPOINT
from segan.tracking.outbox import RunOutbox
from segan.tracking.plots import save_curves_png, save_overlay_png
from segan.tracking.store import resolve_tracking_uri, short, sqlite_path

log = logging.getLogger(__name__)


class RunTracker(RunOutbox):
    """One MLflow run, logged from rank 0 of a training job; a store that is away never stops training.

    Every call queues its payload (see :class:`RunOutbox`) and tries to send the queue.
    ``run_id`` is None until the run exists in the store.
    """

    _system_monitor: Any = None
    _finished = False

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
        db = sqlite_path(uri)
        if db is not None:
            db.absolute().parent.mkdir(parents=True, exist_ok=True)
        tags = dict(tags or {})
        params = {k: param_value(v) for k, v in flatten(cfg_dict).items()}
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
        ``mlflow_unsent_<run>.json`` (see :func:`segan.tracking.replay_unsent`) with a warning naming it.
        """
        if self._finished:
            return
        self._finished = True
        self._stop_system_metrics()
        self._close(status)

    # ---------------------------------------------------------------- logging
    def log_params(self, params: dict) -> None:
        """Extra params (e.g. the data list fingerprint); a key keeps its first value."""
        self._queue("params", {"params": {str(k): param_value(v) for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Per-epoch (``step``) metrics; None values are skipped, NaN is kept (MLflow stores it)."""
        now = int(time.time() * 1000)
        self._metrics += [Metric(metric_key(k), float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        self._flush()

    def log_stop(self, reason: str, epochs_done: int, steps_done: int, train_seconds: float) -> None:
        """What was actually trained: tag ``segan.stop_reason`` (one of :data:`STOP_REASONS`) and
        metrics ``epochs_done``, ``steps_done``, ``train_seconds`` at step ``epochs_done``.

        Tags and metrics, not params: a resumed run updates them."""
        if reason not in STOP_REASONS:
            raise ValueError(f"stop reason {reason!r} is not one of {STOP_REASONS}")
        self._queue("tags", {"tags": {STOP_REASON_TAG: reason}})
        self.log_metrics(dict(zip(TRAINED_METRICS, (epochs_done, steps_done, train_seconds))), step=epochs_done)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file (sent when the store answers; a queued file is read at send time)."""
        path = Path(path)
        if not path.is_file():
            log.warning("MLflow: artifact %s does not exist; not logged", path)
            return
        if path.suffix == ".pt" or self._last_checkpoint_dir is None:  # where a spill file would go
            self._last_checkpoint_dir = path.absolute().parent
        self._queue_once("artifact", {"path": str(path.absolute()), "artifact_path": artifact_path})

    def log_overlay(self, image: np.ndarray, target: np.ndarray, pred: np.ndarray,
                    region_names: list[str], epoch: int, channel: int = 0) -> None:
        """Artifact ``overlays/epoch_XXX.png``: one slice, true (solid) and predicted (dashed) contours.

        ``image`` ``(C, H, W)``; ``target``/``pred`` ``(K, H, W)`` binary, one channel per region.
        """
        png = self._staging / f"epoch_{int(epoch):03d}.png"
        if self._render(f"overlay of epoch {epoch}", save_overlay_png, png, image, target, pred, region_names,
                        title=f"epoch {epoch}", channel=channel):
            self._queue("artifact", {"path": str(png), "artifact_path": "overlays"})

    def log_curves(self, history: list[dict]) -> None:
        """Artifact ``curves.png``: losses and validation Dice per epoch (one dict per epoch)."""
        png = self._staging / "curves.png"
        if self._render("curves", save_curves_png, png, history):
            # Queued once: while it waits, the file is redrawn in place with the newest curves.
            self._queue_once("artifact", {"path": str(png), "artifact_path": None})

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

    @staticmethod
    def _render(what: str, draw: Any, *args: Any, **kwargs: Any) -> bool:
        try:
            draw(*args, **kwargs)
            return True
        except Exception as exc:  # an image is not worth a training run
            log.warning("MLflow: %s not drawn (%s: %s)", what, type(exc).__name__, short(exc))
            return False

    def _start_system_metrics(self) -> None:
        """CPU/memory/GPU system metrics when psutil is installed and the run exists."""
        if not self._run_ready or importlib.util.find_spec("psutil") is None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system_monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.uri)
            self._system_monitor.start()
        except Exception as exc:  # optional: never a reason to stop training
            log.info("MLflow system metrics unavailable: %s", short(exc))
            self._system_monitor = None

    def _stop_system_metrics(self) -> None:
        if self._system_monitor is not None:
            with contextlib.suppress(Exception):
                self._system_monitor.finish()
            self._system_monitor = None


class NullTracker:
    """The tracker when tracking is off or on ranks other than 0: every call does nothing."""

    run_id: str | None = None
    model_uri: str | None = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_stop(self, reason: str, epochs_done: int, steps_done: int, train_seconds: float) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_overlay(self, image: np.ndarray, target: np.ndarray, pred: np.ndarray,
                    region_names: list[str], epoch: int, channel: int = 0) -> None: ...
    def log_curves(self, history: list[dict]) -> None: ...
    def log_model(self, checkpoint_path: Path, register: str | None = None) -> None: ...
    def finish(self, status: str) -> None: ...
