"""Self-contained HTML reports people look at.

- :func:`write_predictions_report`: the QC page of a ``segan predict`` folder
  (``segan predict --report``, ``segan report -p PRED_DIR``), one row per case, most
  suspicious first, three orthogonal slices with contours per case.
- :func:`write_experiment_report`: the page of an MLflow experiment
  (``segan report -e EXPERIMENT``): the compare table, mean ± std per method, curves,
  validation overlays and a sweep's label-efficiency plot.

Modules: :mod:`~segan.report.html` (page, escaping, embedded images),
:mod:`~segan.report.slices` (the slice figure), :mod:`~segan.report.predictions`,
:mod:`~segan.report.experiment`, :mod:`~segan.report.command` (the ``segan report`` CLI).
"""

REPORT_NAME = "report.html"  # what `segan predict --report` writes into its output folder


def write_predictions_report(*args, **kwargs):
    """See :func:`segan.report.predictions.write_predictions_report` (imported on first use, so that
    ``segan --help``, which registers ``segan report``, does not import numpy or matplotlib)."""
    from segan.report.predictions import write_predictions_report as _write

    return _write(*args, **kwargs)


def write_experiment_report(*args, **kwargs):
    """See :func:`segan.report.experiment.write_experiment_report` (imported on first use: it needs mlflow)."""
    from segan.report.experiment import write_experiment_report as _write

    return _write(*args, **kwargs)


__all__ = ["REPORT_NAME", "write_experiment_report", "write_predictions_report"]
