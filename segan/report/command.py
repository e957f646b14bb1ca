"""``segan report``: parse, delegate to :mod:`segan.report`, print (registered by :mod:`segan.cli`)."""

from __future__ import annotations

from pathlib import Path

import click

from segan.errors import UserError


@click.command("report")
@click.option("-p", "--pred", "pred", type=click.Path(), default=None,
              help="A `segan predict` output folder: the QC page of its cases.")
@click.option("-e", "--experiment", "experiment", default=None, help="An MLflow experiment: its page.")
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False), default=None,
              help="HTML file to write [PRED/report.html with -p; required with -e].")
@click.option("--metric", default="val_dice_mean", show_default=True, help="With -e: the metric runs are ranked by.")
@click.option("--group-by", default="method", show_default=True, help="With -e: what mean ± std is taken over.")
@click.option("--tracking-uri", default=None, help="With -e: the MLflow store [$MLFLOW_TRACKING_URI or ./mlflow_runs].")
def report_command(pred: str | None, experiment: str | None, out: str | None, metric: str, group_by: str,
                   tracking_uri: str | None) -> None:
    """Write a self-contained HTML report (images embedded, opens offline): the QC page of a
    predictions folder (-p), or the page of an MLflow experiment (-e)."""
    if (pred is None) == (experiment is None):
        raise UserError("segan report: pass either -p PRED_DIR (a predictions folder) or -e EXPERIMENT "
                        "(an MLflow experiment), not " + ("both" if pred else "neither"))
    if pred is not None:
        from segan.report.predictions import write_predictions_report

        path = write_predictions_report(Path(pred), Path(out) if out else None)
        click.echo(f"wrote {path}")
        return
    if out is None:
        raise UserError(f"segan report -e {experiment}: pass -o FILE.html, where to write the page")
    from segan.report.experiment import write_experiment_report

    path, runs = write_experiment_report(experiment, Path(out), metric=metric, group_by=group_by,
                                         tracking_uri=tracking_uri)
    click.echo(f"wrote {path} ({runs} run(s) of experiment {experiment})")
