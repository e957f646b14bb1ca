"""``segan compare``: the best value of every metric per run, then mean ± std per group (seeds).

A Dice-like metric's best value is its maximum, a loss's or a distance's its minimum, any
other metric's its last value. FAILED, KILLED and RUNNING runs are listed, not averaged.
Every run also shows what it actually trained (epochs and steps done, why it stopped, the
training wall time; "-" for runs logged before segan recorded them), and a comparison whose
runs stopped for different reasons says so.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from segan.errors import UserError, did_you_mean
from segan.tracking.meta import STOP_REASON_TAG, TRAINED_METRICS
from segan.tracking.plots import save_compare_png
from segan.tracking.store import open_store, short

SWEEP_ROLE_TAG = "segan.role"  # "sweep" / "cv" on a parent run (no val metrics; compare skips it)
_HIGHER = ("dice", "iou", "jaccard", "precision", "sensitivity", "recall", "specificity", "accuracy",
           "samples_per_s")
_LOWER = ("loss", "hd95", "hausdorff", "surface_distance", "error", "ece")
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
    # What was actually trained (None: not recorded, e.g. a run from before segan recorded it)
    stop_reason: str | None = None
    epochs_done: int | None = None
    steps_done: int | None = None
    train_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_name": self.run_name, "experiment": self.experiment,
                "method": self.method, "group": self.group, "status": self.status,
                "start_time": self.start_time, "duration_s": self.duration_s, "params": self.params,
                "stop_reason": self.stop_reason, "epochs_done": self.epochs_done, "steps_done": self.steps_done,
                "train_seconds": self.train_seconds, "metrics": self.metrics}

    @property
    def epochs(self) -> str:
        """Epochs trained / configured, e.g. ``24/40``; ``-`` for what is not known."""
        done = "-" if self.epochs_done is None else str(self.epochs_done)
        return f"{done}/{self.params['train.epochs']}" if "train.epochs" in self.params else done


def collect_runs(experiments: list[str], metric: str, group_by: str = "method", tracking_uri: str | None = None,
                 parent_run_id: str | None = None, filter_string: str | None = None,
                 histories: bool = True) -> list[RunRow]:
    """Rows for every run of ``experiments`` (all but an empty "Default" when none are named).

    Sweep parent runs are skipped; ``parent_run_id`` keeps only that sweep's children;
    ``filter_string`` (MLflow's search syntax, as in the UI's search box) keeps the runs it
    matches. ``histories=False`` skips reading metric histories (rows without metrics).
    """
    client, uri = open_store(tracking_uri)
    try:
        all_exps = client.search_experiments()
        by_name = {e.name: e for e in all_exps}
        missing = [name for name in experiments if name not in by_name]
        if missing:
            raise UserError(f"experiment {', '.join(repr(m) for m in missing)} not found in {uri}"
                            f"{did_you_mean(missing[0], by_name)}; existing "
                            f"experiments: {', '.join(sorted(by_name)) or 'none'}")
        exps = [by_name[n] for n in dict.fromkeys(experiments)] if experiments else all_exps
        parent = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else ""
        filt = " and ".join(f for f in (parent, filter_string) if f)
        now = time.time() * 1000
        return [_row(client, exp.name, run, metric, group_by, now, histories) for exp in exps
                for run in _search_runs(client, exp.experiment_id, filt)]
    except MlflowException as exc:
        if filter_string and exc.error_code == "INVALID_PARAMETER_VALUE":
            raise UserError(f"--filter {filter_string!r}: not an MLflow search filter ({short(exc)}); e.g. "
                            "--filter \"params.seed = '0'\" or --filter 'attributes.start_time >= 1718000000000'"
                            ) from None
        raise UserError(f"MLflow store {uri} could not be read ({short(exc)}); check --tracking-uri") from None


def _search_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> Iterator[Any]:
    """Every run of an experiment (page by page) but sweep parents."""
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        yield from (r for r in page if r.data.tags.get(SWEEP_ROLE_TAG) not in ("sweep", "cv"))
        token = page.token
        if not token:
            return


def _row(client: MlflowClient, experiment: str, run: Any, metric: str, group_by: str, now_ms: float,
         histories: bool = True) -> RunRow:
    """A run's row: the best value of each metric (system metrics aside) and the history of ``metric``."""
    info, data = run.info, run.data
    row = RunRow(run_id=info.run_id, run_name=info.run_name or "", experiment=experiment, status=info.status,
                 method=data.tags.get("method") or data.params.get("method.name") or "-",
                 group=_group_value(run, group_by), start_time=info.start_time,
                 duration_s=((info.end_time or now_ms) - info.start_time) / 1000 if info.start_time else None,
                 params={k: data.params[k] for k in _KEY_PARAMS if k in data.params})
    if info.status != "RUNNING":  # a resumed run still carries the reason its last session stopped
        row.stop_reason = data.tags.get(STOP_REASON_TAG)
    trained = [data.metrics.get(k) for k in TRAINED_METRICS]  # the latest values
    row.epochs_done, row.steps_done = (None if v is None else int(v) for v in trained[:2])
    row.train_seconds = trained[2]
    for key in sorted(data.metrics) if histories else ():
        if key.startswith("system/") or key in TRAINED_METRICS:
            continue
        history = client.get_metric_history(info.run_id, key)
        best = _best(history, metric_goal(key))
        if best is not None:
            row.metrics[key] = best
        if key == metric:
            row.history = sorted((m.step, m.value) for m in history)
    return row


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


def sort_rows(rows: list[RunRow], metric: str) -> list[RunRow]:
    """Best ``metric`` first (its goal decides the direction); runs without it last."""
    sign = 1.0 if metric_goal(metric) == "min" else -1.0
    return sorted(rows, key=lambda r: (metric not in r.metrics, sign * r.metrics.get(metric, 0.0), r.run_name))


def _by_method(group_by: str) -> bool:
    """Whether groups are (method, value) pairs: any ``--group-by`` but the method itself."""
    return group_by not in ("method", "method.name")


def _value_order(value: str) -> tuple:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def group_stats(rows: list[RunRow], metrics: list[str], by_method: bool = False) -> list[dict[str, Any]]:
    """Per group (seeds): FINISHED runs only; mean and sample std (0 for one run) of each best metric.

    ``by_method``: groups are (method, group value) pairs (``--group-by data.n_labeled``: one
    group per method and label count), ordered by method, then value (numbers as numbers);
    each entry then has ``method`` and ``label`` (``"bce, 4"``) too. Otherwise groups are
    ordered best first.
    """
    groups: dict[tuple[str, str], list[RunRow]] = {}
    for row in rows:
        if row.status == "FINISHED":
            groups.setdefault((row.method if by_method else "", row.group), []).append(row)
    out = []
    for (method, name), members in groups.items():
        entry: dict[str, Any] = {"group": name, "runs": len(members)}
        if by_method:
            entry.update(method=method, label=f"{method}, {name}")
        for key in metrics:
            vals = np.array([r.metrics[key] for r in members if key in r.metrics], dtype=float)
            entry[key] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, len(vals)) \
                if len(vals) else None
        out.append(entry)
    if by_method:
        return sorted(out, key=lambda e: (e["method"], _value_order(e["group"])))
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
                parent_run_id: str | None = None, filter_string: str | None = None) -> str:
    """The comparison as text: ``table`` | ``markdown`` (runs, then mean ± std per group),
    ``csv`` (runs) or ``json`` (a list of runs with their best metrics). ``plot``: a PNG.
    ``filter_string``: only the runs this MLflow search filter matches; the table then says
    how many runs of the experiments it left out."""
    rows = collect_runs(experiments, metric, group_by, tracking_uri, parent_run_id, filter_string)
    where = ", ".join(experiments) if experiments else "any experiment"
    note = ""
    if filter_string:
        others = len(collect_runs(experiments, metric, group_by, tracking_uri, parent_run_id,
                                  histories=False)) - len(rows)
        all_runs = shlex.join(["segan", "compare", *(a for e in experiments for a in ("-e", e))])
        note = (f"\n\n{others} other run(s) in {where} do not match --filter {filter_string!r} and are not "
                f"shown; `{all_runs}` lists every run" if others else "")
    if rows and not any(metric in r.metrics for r in rows):
        known = sorted({k for r in rows for k in r.metrics})
        raise UserError(f"metric {metric!r} is not logged by any run in {where}{did_you_mean(metric, known)}; "
                        "logged metrics: "
                        f"{', '.join(known) or 'none'}")
    rows = sort_rows(rows, metric)
    if plot is not None and rows:
        save_compare_png(Path(plot), rows, metric, group_stats(rows, [metric], _by_method(group_by)))
    if fmt == "json":
        return json.dumps([r.to_json() for r in rows], indent=2)
    if fmt == "csv":
        return _csv(rows)
    if not rows:
        return f"no runs in {where}" + (f" match --filter {filter_string!r}" if filter_string else "") + note
    text = _report(rows, metric, group_by, f"Runs in {where}", markdown=fmt == "markdown")
    return text + note + (f"\n\nplot written to {plot}" if plot is not None else "")


def _csv(rows: list[RunRow]) -> str:
    metric_keys = sorted({k for r in rows for k in r.metrics})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run_id", "run_name", "experiment", "method", "group", "status", "duration_s",
                     "stop_reason", "epochs_done", "steps_done", "train_seconds", *_KEY_PARAMS, *metric_keys])
    for r in rows:
        blank = lambda v: "" if v is None else v  # noqa: E731
        writer.writerow([r.run_id, r.run_name, r.experiment, r.method, r.group, r.status,
                         "" if r.duration_s is None else round(r.duration_s, 1), blank(r.stop_reason),
                         blank(r.epochs_done), blank(r.steps_done),
                         "" if r.train_seconds is None else round(r.train_seconds, 1),
                         *(r.params.get(p, "") for p in _KEY_PARAMS), *(r.metrics.get(k, "") for k in metric_keys)])
    return buf.getvalue().rstrip("\n")


@dataclass
class CompareTables:
    """What ``segan compare`` shows, as cells (rendered as text, markdown or HTML by the caller).

    ``runs``: ``(caption, header, body)`` of the runs table; ``groups``: the same for
    mean ± std per group (``None`` when no run FINISHED); ``notes``: lines after them.
    """

    runs: tuple[str, list[str], list[list[str]]]
    groups: tuple[str, list[str], list[list[str]]] | None
    notes: list[str]


def compare_tables(rows: list[RunRow], metric: str, group_by: str, title: str) -> CompareTables:
    """The runs table (``metric`` first, then the other validation metrics), then mean ± std per group;
    ``rows`` sorted (:func:`sort_rows`)."""
    shown = [metric] + sorted({k for r in rows for k in r.metrics if k.startswith("val_") and k != metric})
    extra_group = [] if group_by == "method" else [group_by]
    header = ["run_id", "run_name", "method", *extra_group, "seed", "segmentor", *shown, "epochs", "steps",
              "stopped", "train time", "status"]
    body = [[r.run_id[:8], r.run_name, r.method, *([r.group] if extra_group else []), r.params.get("seed", "-"),
             r.params.get("model.segmentor", "-"), *(_fmt(r.metrics.get(k)) for k in shown), r.epochs,
             "-" if r.steps_done is None else str(r.steps_done), r.stop_reason or "-",
             _fmt_duration(r.train_seconds), r.status] for r in rows]
    goal = {"max": "higher is better", "min": "lower is better", "last": "last value"}[metric_goal(metric)]
    tables = CompareTables((f"{title}, best value per run, sorted by {metric} ({goal}):", header, body), None, [])
    by_method = _by_method(group_by)
    stats = group_stats(rows, [k for k in shown if k.startswith(("val_dice", metric))] or [metric], by_method)
    if stats:
        keys = [k for k in stats[0] if k not in ("group", "runs", "method", "label")]
        finished = [r for r in rows if r.status == "FINISHED"]
        g_body = [[*([s["method"]] if by_method else []), s["group"], str(s["runs"]),
                   *(("-" if s[k] is None else f"{s[k][0]:.4f} ± {s[k][1]:.4f}") for k in keys),
                   stopped_summary([r for r in finished if r.group == s["group"]
                                    and (not by_method or r.method == s["method"])])] for s in stats]
        per = f"method and {group_by}" if by_method else group_by
        tables.groups = (f"Mean ± std per {per} over FINISHED runs (seeds):",
                         [*(["method"] if by_method else []), group_by, "runs", *keys, "stopped"], g_body)
    others = sum(r.status != "FINISHED" for r in rows)
    if others:
        tables.notes.append(f"{others} run(s) not FINISHED are listed above but not averaged.")
    note = stop_reason_note(rows)
    if note:
        tables.notes.append(note)
    return tables


def _report(rows: list[RunRow], metric: str, group_by: str, title: str, markdown: bool) -> str:
    """:func:`compare_tables` as text."""
    tables = compare_tables(rows, metric, group_by, title)
    caption, header, body = tables.runs
    parts = [caption, "", _render_table(header, body, markdown)]
    if tables.groups:
        caption, header, body = tables.groups
        parts += ["", caption, "", _render_table(header, body, markdown)]
    for note in tables.notes:
        parts += ["", note]
    return "\n".join(parts)


def _by_reason(rows: list[RunRow]) -> dict[str, list[RunRow]]:
    out: dict[str, list[RunRow]] = {}
    for r in rows:
        if r.stop_reason:
            out.setdefault(r.stop_reason, []).append(r)
    return out


def stopped_summary(rows: list[RunRow]) -> str:
    """Why a group's runs stopped: ``epochs``, or ``mixed (epochs: 2, time budget: 1)``; ``-`` if not recorded."""
    counts = {reason: len(members) for reason, members in _by_reason(rows).items()}
    if len(counts) < 2:
        return next(iter(counts), "-")
    return "mixed (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())) + ")"


def stop_reason_note(rows: list[RunRow], names_per_reason: int = 4) -> str:
    """A ``note:`` line when the compared runs stopped for different reasons, naming the runs; else ''."""
    groups = _by_reason(rows)
    if len(groups) < 2:
        return ""

    def names(members: list[RunRow]) -> str:
        shown = ", ".join(r.run_name or r.run_id[:8] for r in members[:names_per_reason])
        return shown + (f" and {len(members) - names_per_reason} more" if len(members) > names_per_reason else "")

    listed = "; ".join(f"{reason}: {names(members)}" for reason, members in sorted(groups.items()))
    return (f"note: runs stopped for different reasons ({listed}) — they were not trained alike; compare runs "
            "that stopped alike (e.g. give every run the time to finish its epochs: train.max_minutes)")
