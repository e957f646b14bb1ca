"""Ordered delivery of one MLflow run's calls; a store that is away keeps them queued, never lost.

Each call is an op ``(kind, payload)`` sent by ``RunOutbox._send_<kind>(**payload)``; ops go
first (run creation, params, tags, artifacts, the model, the final status), then metrics in
batches. When the store is unreachable (server down at start, or gone mid-run) one warning
is logged, the queue is kept and re-sent when the store answers again (at most one attempt
every ``retry_interval`` seconds), and :meth:`RunOutbox._close` writes whatever could not be
sent to a spill file (see :mod:`segan.tracking.unsent`). Nothing is dropped silently.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from segan.tracking.model import log_segmentor_model
from segan.tracking.store import get_or_create_experiment, is_transient, make_client, short, slug
from segan.tracking.unsent import Op, metric_to_dict, write_unsent

log = logging.getLogger(__name__)

_BATCH_PARAMS = 100  # MLflow's limits per log_batch call
_BATCH_METRICS = 1000


class RunOutbox:
    """The queue of one run and its sender; ``run_id`` is None until the run exists in the store."""

    retry_interval: float = 10.0  # seconds between attempts while the store is away
    finish_timeout: float = 30.0  # how long _close() keeps retrying before writing the spill file

    def __init__(self, uri: str, experiment: str, run_name: str, *, tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None, resume_run_id: str | None = None,
                 spill_dir: Path | None = None, start_time_ms: int | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = resume_run_id
        self.model_uri: str | None = None  # models:/<id> of the last logged segmentor
        self.spill_dir = Path(spill_dir) if spill_dir else None
        self._client = make_client(uri)
        self._tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            self._tags["mlflow.parentRunId"] = parent_run_id
        self._resume_run_id = resume_run_id
        self._start_ms = start_time_ms or int(time.time() * 1000)
        self._experiment_id: str | None = None
        self._run_ready = False
        self._logged_params: dict[str, str] = {}
        self._ops: list[Op] = []
        self._metrics: list[Metric] = []
        self._rejected: list[dict[str, Any]] = []  # refused by the store (bad value): kept for the spill file
        self._online = True
        self._last_try = -math.inf
        self._staging = Path(tempfile.mkdtemp(prefix="segan-mlflow-"))
        self._last_checkpoint_dir: Path | None = None  # the spill file goes beside the checkpoint
        self.spill_path: Path | None = None  # the spill file, once written

    def _close(self, status: str) -> None:
        """Queue the final ``status``, send everything, retrying for up to ``finish_timeout`` seconds;
        what still cannot be sent is written to ``mlflow_unsent_<run>.json`` with a warning naming it."""
        self._ops.append(("terminate", {"status": status, "end_time": int(time.time() * 1000)}))
        deadline = time.monotonic() + self.finish_timeout
        interrupted = False
        try:
            while not self._flush(force=True) and time.monotonic() < deadline:
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, keep the data
            interrupted = True
        if self.unsent:
            self._spill(status)
        else:
            shutil.rmtree(self._staging, ignore_errors=True)
        if interrupted:
            raise KeyboardInterrupt

    @property
    def unsent(self) -> bool:
        """Whether anything is still queued or was refused by the store."""
        return bool(self._ops or self._metrics or self._rejected)

    def _queue(self, kind: str, payload: dict[str, Any]) -> None:
        self._ops.append((kind, payload))
        self._flush()

    def _queue_once(self, kind: str, payload: dict[str, Any]) -> None:
        """Queue unless the same op still waits (e.g. best.pt logged again while the server is away)."""
        if (kind, payload) not in self._ops:
            self._queue(kind, payload)

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
                self._send(kind, [{"kind": kind, **payload}], getattr(self, f"_send_{kind}"), **payload)
                self._ops.pop(0)
            while self._metrics:
                chunk = self._metrics[:_BATCH_METRICS]
                self._send(f"{len(chunk)} metrics", [{"kind": "metric", **metric_to_dict(m)} for m in chunk],
                           self._client.log_batch, self.run_id, metrics=chunk)
                del self._metrics[: len(chunk)]
        except Exception as exc:
            if self._online:
                log.warning("MLflow tracking store %s is not answering (%s); training goes on, metrics and "
                            "artifacts are kept and sent once it answers", self.uri, short(exc))
            self._online = False
            return False
        if not self._online:
            log.warning("MLflow tracking store %s answers again; buffered metrics and artifacts were sent", self.uri)
        self._online = True
        return True

    def _send(self, what: str, items: list[dict[str, Any]], call: Any, *args: Any, **kwargs: Any) -> None:
        """``call(*args, **kwargs)``; a transient failure propagates (the items stay queued), any
        other failure (a refused value) moves ``items`` to the rejected list for the spill file."""
        try:
            call(*args, **kwargs)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning("MLflow refused %s of run %s (%s: %s); kept for the unsent file", what, self.run_id,
                        type(exc).__name__, short(exc))
            self._rejected.extend(items)

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

    def _spill(self, status: str) -> Path:
        """Write what could not be sent (and the files it needs) beside the checkpoint."""
        folder = self.spill_dir or self._last_checkpoint_dir or Path.cwd()
        header = {"tracking_uri": self.uri, "experiment": self.experiment, "run_name": self.run_name,
                  "run_id": self.run_id if self._run_ready else self._resume_run_id,
                  "start_time": self._start_ms, "status": status, "tags": self._tags}
        path = write_unsent(folder / f"mlflow_unsent_{self.run_id or slug(self.run_name)}.json", header,
                            self._ops, self._metrics, self._rejected, self._staging)
        self.spill_path = path
        log.warning("MLflow tracking store %s could not take %d metrics and %d other items of run %s; they are "
                    "saved in %s (send them later with segan.tracking.replay_unsent)", self.uri,
                    len(self._metrics), sum(kind != "terminate" for kind, _ in self._ops),
                    self.run_id or self.run_name, path)
        return path
