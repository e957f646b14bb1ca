"""The page of one MLflow experiment: ``segan report -e EXPERIMENT -o report.html``.

Sections, all from the store (nothing is retrained or re-evaluated):

1. the ``segan compare`` tables (:func:`segan.tracking.compare.compare_tables`: best
   value per run, then mean ± std per method over FINISHED runs) and its figure
   (:func:`segan.tracking.plots.save_compare_png`: the metric per epoch, bars per method);
2. the label-efficiency plot of every sweep parent run that logged one
   (artifact ``label_efficiency.png``);
3. per run (best first, at most ``max_runs``): its ``curves.png`` artifact (losses and
   validation Dice per epoch) and its last validation overlay (``overlays/epoch_XXX.png``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from segan.report.html import esc, img, page, table, write_page

LABEL_EFFICIENCY = "label_efficiency.png"
CURVES = "curves.png"
OVERLAYS = "overlays"
PARENT_TAG = "mlflow.parentRunId"


def _download(client: Any, run_id: str, path: str, tmp: Path) -> bytes | None:
    """The bytes of one artifact of a run; ``None`` if the run has no such artifact."""
    try:
        local = client.download_artifacts(run_id, path, str(tmp))
    except Exception:  # noqa: BLE001 - a missing artifact (or store) only loses that picture
        return None
    p = Path(local)
    return p.read_bytes() if p.is_file() else None


def _artifact_names(client: Any, run_id: str, path: str | None = None) -> list[str]:
    try:
        return [a.path for a in client.list_artifacts(run_id, path) if not a.is_dir]
    except Exception:  # noqa: BLE001
        return []


def _last_overlay(client: Any, run_id: str) -> str | None:
    """The newest ``overlays/epoch_XXX.png`` of a run (names sort by epoch: zero-padded)."""
    names = sorted(n for n in _artifact_names(client, run_id, OVERLAYS) if n.endswith(".png"))
    return names[-1] if names else None


def _parent_runs(client: Any, experiment: str) -> list[Any]:
    """Runs of ``experiment`` that are nobody's child (sweep and cross-validation parents among them)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs, token = [], None
    while True:
        page_ = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs += [r for r in page_ if PARENT_TAG not in r.data.tags]
        token = page_.token
        if not token:
            return runs


def _tables_html(tables: Any) -> str:
    caption, header, body = tables.runs
    parts = [f"<h2>Runs</h2><p>{esc(caption)}</p>", table(header, body)]
    if tables.groups:
        caption, header, body = tables.groups
        parts += [f"<h2>Mean ± std per group</h2><p>{esc(caption)}</p>", table(header, body)]
    parts += [f"<p class=\"msg\">{esc(n)}</p>" for n in tables.notes]
    return "\n".join(parts)


def experiment_html(experiment: str, metric: str = "val_dice_mean", group_by: str = "method",
                    tracking_uri: str | None = None, max_runs: int = 24) -> tuple[str, int]:
    """The page of ``experiment`` and its number of runs."""
    from segan.errors import UserError
    from segan.tracking.compare import _by_method, collect_runs, compare_tables, group_stats, sort_rows
    from segan.tracking.plots import save_compare_png
    from segan.tracking.store import mlflow_globals, open_store

    rows = collect_runs([experiment], metric, group_by, tracking_uri)
    if rows and not any(metric in r.metrics for r in rows):
        known = sorted({k for r in rows for k in r.metrics})
        raise UserError(f"metric {metric!r} is not logged by any run of experiment {experiment!r}; pass --metric "
                        f"with one of: {', '.join(known) or 'none'}")
    rows = sort_rows(rows, metric)
    client, uri = open_store(tracking_uri)
    sections: list[str] = []
    # mlflow_globals: no download progress bars on stderr
    with tempfile.TemporaryDirectory(prefix="segan-report-") as tmp_name, mlflow_globals(uri):
        tmp = Path(tmp_name)
        if not rows:
            sections.append(f"<p>No runs in experiment {esc(experiment)}.</p>")
        else:
            sections.append(_tables_html(compare_tables(rows, metric, group_by, f"Runs in {experiment}")))
            figure = tmp / "compare.png"
            save_compare_png(figure, rows, metric, group_stats(rows, [metric], _by_method(group_by)))
            sections.append(f"<h2>{esc(metric)} per epoch and per {esc(group_by)}</h2>"
                            + img(figure.read_bytes(), f"{metric} per epoch"))
        efficiency = []
        for run in _parent_runs(client, experiment):
            if LABEL_EFFICIENCY in _artifact_names(client, run.info.run_id):
                data = _download(client, run.info.run_id, LABEL_EFFICIENCY, tmp / run.info.run_id)
                name = run.info.run_name or run.info.run_id[:8]
                efficiency.append(f"<figure><figcaption>{esc(name)} ({esc(run.info.run_id[:8])})</figcaption>"
                                  f"{img(data, f'label efficiency of {name}')}</figure>")
        if efficiency:
            sections.append("<h2>Label efficiency</h2><div class=\"gallery\" id=\"label-efficiency\">"
                            + "".join(efficiency) + "</div>")
        sections.append(_runs_gallery(client, rows[:max_runs], metric, tmp))
        if len(rows) > max_runs:
            sections.append(f"<p class=\"msg\">{len(rows) - max_runs} more run(s) are in the tables above; "
                            f"their curves and overlays are not shown (the best {max_runs} are).</p>")
    subtitle = f"{len(rows)} run(s) · store {uri}"
    return page(f"segan experiment report: {experiment}", subtitle, sections), len(rows)


def _runs_gallery(client: Any, rows: list[Any], metric: str, tmp: Path) -> str:
    """Per run: training curves and the last validation overlay."""
    if not rows:
        return ""
    parts = ["<h2>Training curves and validation overlays per run</h2>"]
    for r in rows:
        folder = tmp / r.run_id
        curves = _download(client, r.run_id, CURVES, folder) if CURVES in _artifact_names(client, r.run_id) else None
        overlay_name = _last_overlay(client, r.run_id)
        overlay = _download(client, r.run_id, overlay_name, folder) if overlay_name else None
        best = r.metrics.get(metric)
        caption = (f"{r.run_name or r.run_id[:8]} · {r.method} · seed {r.params.get('seed', '-')} · {r.status}"
                   + (f" · best {metric} {best:.4f}" if best is not None else ""))
        overlay_caption = f"validation overlay {Path(overlay_name).name}" if overlay_name else "validation overlay"
        parts.append(f'<h3 data-run="{esc(r.run_name)}" id="run-{esc(r.run_id)}">{esc(caption)}</h3>'
                     '<div class="gallery">'
                     f"<figure><figcaption>training curves</figcaption>{img(curves, 'curves.png not logged')}"
                     "</figure>"
                     f"<figure><figcaption>{esc(overlay_caption)}</figcaption>"
                     f"{img(overlay, 'no overlay logged')}</figure></div>")
    return "\n".join(parts)


def write_experiment_report(experiment: str, out: str | Path, metric: str = "val_dice_mean",
                            group_by: str = "method", tracking_uri: str | None = None) -> tuple[Path, int]:
    """``segan report -e EXPERIMENT -o OUT``: write the page atomically; returns (path, number of runs)."""
    text, runs = experiment_html(experiment, metric, group_by, tracking_uri)
    return write_page(Path(out), text), runs
