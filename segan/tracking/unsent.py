"""The spill file: what a run could not send, kept on disk until :func:`segan.tracking.replay_unsent`.

``mlflow_unsent_<run>.json`` holds the run's identity, its queued operations (params, tags,
artifacts, the model) and metrics in their original order, plus the items the store refused.
Images and model files it needs lie beside it in ``mlflow_unsent_<run>_files/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mlflow.entities import Metric

from segan.errors import UserError
from segan.io_utils import atomic_write_text

UNSENT_FORMAT = "segan-mlflow-unsent/1"
Op = tuple[str, dict[str, Any]]  # (kind, payload): one queued call of RunTracker._send_<kind>(**payload)
_FILE_KEYS = ("path", "checkpoint")  # payload keys that name a local file


def metric_to_dict(m: Metric) -> dict[str, Any]:
    return {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}


def metric_from_dict(d: dict[str, Any]) -> Metric:
    return Metric(d["key"], d["value"], d["timestamp"], d["step"])


def write_unsent(path: Path, header: dict[str, Any], ops: list[Op], metrics: list[Metric],
                 rejected: list[dict[str, Any]], staging: Path) -> Path:
    """Write the spill file ``path``; ``staging`` (rendered images, slim checkpoints) is moved
    to ``<path stem>_files`` when a queued op still needs a file in it, else deleted."""
    files = path.with_name(path.stem + "_files")
    staged = lambda v: Path(v).is_relative_to(staging)  # noqa: E731
    if any(staged(p[k]) for _, p in ops for k in _FILE_KEYS if k in p):
        shutil.rmtree(files, ignore_errors=True)
        files.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), files)
        ops = [(kind, {k: str(files / Path(v).relative_to(staging)) if k in _FILE_KEYS and staged(v) else v
                       for k, v in p.items()}) for kind, p in ops]
    else:
        shutil.rmtree(staging, ignore_errors=True)
    data = {"format": UNSENT_FORMAT, **header,
            "ops": [{"kind": kind, **p} for kind, p in ops if kind != "terminate"],
            "metrics": [metric_to_dict(m) for m in metrics],
            "rejected": rejected}
    atomic_write_text(path, json.dumps(data, indent=1))
    return path


def read_unsent(path: Path) -> tuple[dict[str, Any], list[Op], list[Metric]]:
    """``(header, ops, metrics)`` of a spill file; the header has ``tracking_uri``, ``experiment``,
    ``run_name``, ``run_id``, ``start_time``, ``status``, ``tags`` and ``rejected``."""
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != UNSENT_FORMAT:
            raise ValueError
    except (OSError, ValueError):
        raise UserError(f"{path}: not an unsent-MLflow file written by segan training") from None
    ops = [(op.pop("kind"), op) for op in data.pop("ops")]
    metrics = [metric_from_dict(m) for m in data.pop("metrics")]
    return data, ops, metrics


def remove_unsent(path: Path) -> None:
    """Delete a spill file and its files once everything in it was sent."""
    path.unlink()
    shutil.rmtree(path.with_name(path.stem + "_files"), ignore_errors=True)
