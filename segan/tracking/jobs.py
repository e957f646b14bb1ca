"""What the rest of segan calls to open runs: a training job's tracker, a spill file re-sent,
evaluation metrics added to an existing run."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from segan.errors import UserError
from segan.tracking.meta import default_run_name, metric_key
from segan.tracking.run import NullTracker, RunTracker
from segan.tracking.store import is_transient, open_store, resolve_tracking_uri, short
from segan.tracking.unsent import read_unsent, remove_unsent

log = logging.getLogger(__name__)


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


def replay_unsent(path: str | Path, tracking_uri: str | None = None) -> str | None:
    """Send a ``mlflow_unsent_*.json`` file written by :meth:`RunTracker.finish`; returns the run id.

    The run is reopened if the store has it, else created; then it is marked with the status
    it ended with. ``tracking_uri`` defaults to the store named in the file. The file is
    deleted once everything in it was sent.
    """
    path = Path(path)
    header, ops, metrics = read_unsent(path)
    uri = resolve_tracking_uri(tracking_uri or header["tracking_uri"])
    tracker = RunTracker(uri, header["experiment"], header["run_name"], tags=header["tags"],
                         resume_run_id=header["run_id"], spill_dir=path.parent, start_time_ms=header["start_time"])
    tracker._ops, tracker._metrics = ops, metrics
    if header.get("rejected"):
        log.warning("%s: %d items were refused by the store and are not re-sent", path, len(header["rejected"]))
    tracker.finish(header["status"])
    if tracker._ops or tracker._metrics:
        raise UserError(f"{path}: the MLflow store {uri} still does not answer; the file is kept")
    if tracker.spill_path != path:  # else the store refused items again and the file now holds them
        remove_unsent(path)
    return tracker.run_id


def log_metrics_to_run(run_id: str, metrics: dict[str, float], tracking_uri: str | None = None) -> None:
    """Add ``metrics`` (e.g. ``segan evaluate``'s means) to the existing run ``run_id``, at step 0.

    Raises :class:`UserError` (one line) when the store is missing or does not answer, or has
    no such active run. Keys are made MLflow-safe as training metrics are.
    """
    client, uri = open_store(tracking_uri)
    try:
        run = client.get_run(run_id)
        if run.info.lifecycle_stage != "active":
            raise UserError(f"MLflow run {run_id}: deleted in {uri}; restore it in the MLflow UI or pass another "
                            "run id")
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(metric_key(k), float(v), now, 0) for k, v in metrics.items()])
    except (MlflowException, OSError) as exc:  # OSError: requests' connection errors
        if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"MLflow run {run_id}: not found in {uri}; pass a run id from `segan compare` "
                            "or the MLflow UI, and the store it is in with --tracking-uri") from None
        if is_transient(exc):
            raise UserError(f"MLflow store {uri}: not answering ({short(exc)}); the metrics were not logged "
                            f"to run {run_id}; check --tracking-uri or start the server") from None
        raise UserError(f"MLflow run {run_id}: {uri} refused the metrics ({short(exc)})") from None
