"""MLflow: where runs go, a run logger that survives a dead server, the served model, ``segan compare``.

The only package that imports mlflow. Modules, one concern each:

- :mod:`~segan.tracking.store`: the tracking URI (``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` >
  ``sqlite:////<cwd>/mlflow_runs/mlflow.db``), experiments, what counts as a store that is away.
- :mod:`~segan.tracking.meta`: a run's name and params (config, package versions, git commit).
- :mod:`~segan.tracking.outbox`: ordered delivery; a store that is away keeps calls queued.
- :mod:`~segan.tracking.unsent`: the spill file of what a run could not send.
- :mod:`~segan.tracking.run`: :class:`RunTracker` (what a run holds) and :class:`NullTracker`.
- :mod:`~segan.tracking.jobs`: :func:`make_tracker`, :func:`replay_unsent`, :func:`log_metrics_to_run`.
- :mod:`~segan.tracking.model`: :class:`SegmentorModel` (pyfunc "model from code", no pickles).
- :mod:`~segan.tracking.plots`: validation overlays, training curves, the comparison figure.
- :mod:`~segan.tracking.compare`: :func:`run_compare` (best metric per run, mean ± std per group).

Every public name is importable from ``segan.tracking``. Logged models import
``segan.tracking.SegmentorModel`` by that path, so it must stay here.
"""

from mlflow.tracking import MlflowClient  # the client segan uses, for callers reading a store back

from segan.tracking.compare import (SWEEP_ROLE_TAG, RunRow, collect_runs, group_stats, metric_goal,
                                    run_compare)
from segan.tracking.jobs import log_metrics_to_run, make_tracker, replay_unsent
from segan.tracking.meta import PACKAGES, config_hash, default_run_name, git_commit, metric_key, package_versions
from segan.tracking.model import (MODEL_CHECKPOINT, MODEL_NAME, SegmentorModel, download_checkpoint,
                                  log_segmentor_model, model_signature)
from segan.tracking.plots import save_compare_png, save_curves_png, save_overlay_png
from segan.tracking.run import NullTracker, RunTracker
from segan.tracking.store import (STORE_DIR, artifact_location, default_tracking_uri, get_or_create_experiment,
                                  resolve_tracking_uri)

__all__ = [
    "MODEL_CHECKPOINT", "MODEL_NAME", "PACKAGES", "STORE_DIR", "SWEEP_ROLE_TAG", "MlflowClient", "NullTracker",
    "RunRow", "RunTracker", "SegmentorModel", "artifact_location", "collect_runs", "config_hash",
    "default_run_name", "default_tracking_uri", "download_checkpoint", "get_or_create_experiment", "git_commit",
    "group_stats", "log_metrics_to_run", "log_segmentor_model", "make_tracker", "metric_goal", "metric_key",
    "model_signature", "package_versions", "replay_unsent", "resolve_tracking_uri", "run_compare",
    "save_compare_png", "save_curves_png", "save_overlay_png",
]
