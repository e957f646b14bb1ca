"""Where runs go: the tracking URI, experiments, and what counts as a store that is away.

URI = ``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:////<cwd>/mlflow_runs/mlflow.db``.
Experiments in a SQLite store keep their artifacts beside the database
(``<db folder>/artifacts/<experiment>``), never in ``./mlruns``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from segan.errors import UserError

log = logging.getLogger(__name__)

STORE_DIR = "mlflow_runs"


def default_tracking_uri() -> str:
    """``sqlite:////abs/cwd/mlflow_runs/mlflow.db`` (four slashes: an absolute path)."""
    return "sqlite:///" + (Path.cwd() / STORE_DIR / "mlflow.db").as_posix()


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > :func:`default_tracking_uri`.

    The plain file store (a folder path or ``file:`` URI) is refused: MLflow 3 no longer
    supports it for tracking. For ``http(s)://`` stores, short MLflow timeouts are set (see
    :func:`_configure_http`), so a caller never talks to a server with MLflow's long defaults.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if "://" not in uri or uri.startswith("file:"):
        raise UserError(f"tracking URI {uri!r}: MLflow's folder store is not supported; use a database, "
                        "e.g. sqlite:///mlflow_runs/mlflow.db, or a server, e.g. http://127.0.0.1:5000")
    _configure_http(uri)
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths are relative to the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def _configure_http(uri: str) -> None:
    """Make a dead server cost seconds, not minutes: the tracker is the retry layer.

    MLflow's defaults (7 retries with exponential backoff, 120 s timeout) would stall a
    training step for minutes. Values the user exported are kept.
    """
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def open_store(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    """A client of an existing store, for reading: a missing SQLite file is a :class:`UserError`
    (and is not created, as opening it with MLflow would)."""
    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UserError(f"no MLflow store at {db}; train a model first (segan train), or pass --tracking-uri / "
                        "set MLFLOW_TRACKING_URI")
    return make_client(uri), uri


def slug(name: str) -> str:
    """``name`` as a file name: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database; else the server decides."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.absolute().parent / "artifacts" / slug(experiment)).as_uri()


@contextlib.contextmanager
def sqlite_create_lock(uri: str) -> Iterator[None]:
    """Serialise processes touching a SQLite store first: two runs started together would
    both run MLflow's schema migrations on a new file and one would crash
    (``duplicate column name``). A no-op for other stores."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / f".{db.name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def make_client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` whose store is opened (and, for a new SQLite file, created and
    migrated) while holding :func:`sqlite_create_lock`."""
    with sqlite_create_lock(uri):  # MlflowClient opens (creates, migrates) a SQLite store at once
        return MlflowClient(uri)


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


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying later: no answer, a timeout, a 5xx, a rate limit, an I/O error.

    MLflow wraps connection failures in an ``MlflowException`` with status 500; ``requests``
    errors are ``OSError``s. Anything else (a 4xx, a bug) is not retried.
    """
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status in (408, 429)
    try:  # a busy or locked SQLite file is worth another try too
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy ships with mlflow
        OperationalError = ()  # noqa: N806
    return isinstance(exc, (OSError, OperationalError))


def short(exc: BaseException) -> str:
    """The first line of an error message, at most 200 characters (MLflow's can be pages long)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


@contextlib.contextmanager
def mlflow_globals(uri: str, experiment_id: str | None = None) -> Iterator[None]:
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
