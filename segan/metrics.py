"""Evaluation of predicted label maps against ground truth: Dice, IoU, HD95, precision, sensitivity.

Per case and per region (a region is a set of label ids, e.g. whole tumour = {1, 2, 3}),
with MONAI's metrics (``compute_dice``, ``compute_iou``, ``compute_hausdorff_distance``,
``get_confusion_matrix`` + ``compute_confusion_matrix_metric``) on the ground truth's own
grid; HD95 is in millimetres (voxel spacing from the ground truth's affine).

Conventions where a ratio is 0/0 or a distance undefined:

- a region empty in both prediction and truth scores Dice = IoU = precision =
  sensitivity = 1 and HD95 = 0 (nothing to find, nothing found);
- a region empty on exactly one side scores 0 for the undefined ratio and HD95 = the
  diagonal of the ground-truth volume in mm (the worst possible distance), so misses
  and false alarms weigh on the means instead of dropping out of them;
- a missing or unreadable prediction, or one on another grid, is a **failure**: every
  region scores Dice = IoU = precision = sensitivity = 0 and the worst HD95, and the
  case's status is ``failed`` (counted in the means, exit status 1).

Cases are matched by file stem (``case.nii.gz`` <-> ``case.nii.gz`` or ``case.nii``). Swapped
folders are refused (exit 2): a ``-g`` folder holding what ``segan predict`` writes
(``model.json``, ``predictions.csv``, ``*_prob`` maps) beside a ``-p`` folder holding none of it.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.io import nifti_files, stem
from segan.errors import UserError
from segan.progress import Progress

METRICS = ("dice", "iou", "hd95", "precision", "sensitivity")


@dataclass
class CaseMetrics:
    """One evaluated case; ``values[region][metric]`` (empty when the ground truth is unusable)."""

    case: str
    status: str  # ok | failed | skipped
    message: str = ""
    values: dict[str, dict[str, float]] = field(default_factory=dict)


# ---------------------------------------------------------------- regions
def parse_regions(text: str) -> dict[str, list[int]]:
    """``"whole=1,2,3;core=2,3"`` -> ``{"whole": [1, 2, 3], "core": [2, 3]}``."""
    regions: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, ids = part.partition("=")
        name = name.strip()
        try:
            labels = [int(v) for v in ids.split(",") if v.strip()]
        except ValueError:
            labels = []
        if not name or not labels or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or min(labels) < 1:
            raise UserError(f"--regions {text!r}: '{part}' is not name=id,id,...; "
                            "e.g. --regions 'whole=1,2,3;core=2,3' (ids >= 1)")
        regions[name] = labels
    if not regions:
        raise UserError(f"--regions {text!r}: no region given; e.g. --regions 'whole=1,2,3;core=2,3'")
    return regions


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve_regions(regions: str | None, pred: Path, gt: Path, found_labels: set[int]) -> dict[str, list[int]]:
    """Regions from ``--regions``; else ``dataset.json`` (beside or in the GT folder) ``regions``;
    else the predicting model's regions (``PRED/model.json``); else one region per label id found."""
    if regions:
        return parse_regions(regions)
    names: dict[int, str] = {}
    for candidate in (gt.parent / "dataset.json", gt / "dataset.json"):
        data = _read_json(candidate)
        if isinstance(data.get("regions"), dict) and data["regions"]:
            return {str(k): [int(i) for i in v] for k, v in data["regions"].items()}
        if isinstance(data.get("labels"), dict):
            names = {int(k): str(v) for k, v in data["labels"].items() if str(k).lstrip("-").isdigit()}
    model = _read_json(pred / "model.json")
    if isinstance(model.get("regions"), dict) and model["regions"]:
        return {str(k): [int(i) for i in v] for k, v in model["regions"].items()}
    from segan.regions import default_regions

    regions_found = default_regions({lid: names.get(lid, f"label_{lid}") for lid in sorted(found_labels)})
    if not regions_found:
        raise UserError(f"{gt}: the ground truth holds no foreground label; pass --regions 'name=1,2'")
    return regions_found


# ---------------------------------------------------------------- metrics of one case
def _worst_distance(shape: tuple[int, ...], spacing: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(shape) * spacing))


def failed_values(regions: dict[str, list[int]], worst_hd95: float) -> dict[str, dict[str, float]]:
    return {name: {"dice": 0.0, "iou": 0.0, "hd95": worst_hd95, "precision": 0.0, "sensitivity": 0.0}
            for name in regions}


def case_metrics(pred: np.ndarray, gt: np.ndarray, regions: dict[str, list[int]],
                 spacing: np.ndarray | list[float] | None = None) -> dict[str, dict[str, float]]:
    """``pred`` and ``gt`` ``(X, Y, Z)`` label maps on one grid -> ``{region: {metric: value}}``.

    ``spacing`` (mm per voxel along X, Y, Z; default 1) scales HD95.
    """
    import torch
    from monai.metrics import (
        compute_confusion_matrix_metric,
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        get_confusion_matrix,
    )

    from segan.regions import labels_to_regions

    spacing = np.ones(gt.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    groups = list(regions.values())
    p = torch.from_numpy(labels_to_regions(pred, groups))[None]  # (1, K, X, Y, Z)
    g = torch.from_numpy(labels_to_regions(gt, groups))[None]
    with warnings.catch_warnings():  # MONAI warns about empty masks; the conventions below handle them
        warnings.simplefilter("ignore")
        dice = compute_dice(p, g, include_background=True, ignore_empty=False)[0]
        iou = compute_iou(p, g, include_background=True, ignore_empty=False)[0]
        cm = get_confusion_matrix(p, g, include_background=True)
        precision = compute_confusion_matrix_metric("precision", cm)[0]
        sensitivity = compute_confusion_matrix_metric("sensitivity", cm)[0]
        hd95 = compute_hausdorff_distance(p, g, include_background=True, percentile=95,
                                          spacing=spacing.tolist())[0]
    worst = _worst_distance(gt.shape, spacing)
    out: dict[str, dict[str, float]] = {}
    for k, name in enumerate(regions):
        p_any, g_any = bool(p[0, k].any()), bool(g[0, k].any())
        both_empty = not p_any and not g_any
        undefined = 1.0 if both_empty else 0.0

        def fix(v: float) -> float:
            return undefined if not np.isfinite(v) else float(v)

        out[name] = {
            "dice": fix(float(dice[k])),
            "iou": fix(float(iou[k])),
            "hd95": 0.0 if both_empty else (float(hd95[k]) if p_any and g_any else worst),
            "precision": fix(float(precision[k])),
            "sensitivity": fix(float(sensitivity[k])),
        }
    return out


# ---------------------------------------------------------------- folders
def _files_by_stem(folder: Path) -> dict[str, Path]:
    """``{stem: path}`` of a folder's NIfTI files (one per stem: the first in name order)."""
    files: dict[str, Path] = {}
    for p in nifti_files(folder):
        files.setdefault(stem(p), p)
    return files


def _prediction_signs(folder: Path) -> list[str]:
    """What only ``segan predict`` writes into a folder: ``model.json``, ``predictions.csv``, ``*_prob`` maps."""
    from segan.inference import CSV_NAME, MODEL_INFO_NAME

    signs = [name for name in (MODEL_INFO_NAME, CSV_NAME) if (folder / name).is_file()]
    probs = [name for name in _files_by_stem(folder) if name.endswith("_prob")]
    if probs:
        signs.append(f"{len(probs)} probability map(s) ({probs[0]}...)")
    return signs


def check_not_swapped(pred: Path, gt: Path, other_args: list[str]) -> None:
    """Refuse ``-p GT -g PRED``: the ``-g`` folder holds what ``segan predict`` writes and the
    ``-p`` folder does not, and (when its ``model.json`` names the model's regions) the ``-g``
    masks hold only that model's label ids. Two prediction folders (agreement between two
    models) are not refused. ``other_args``: the rest of the command, for the suggested one."""
    from segan.inference import MODEL_INFO_NAME

    signs = _prediction_signs(gt)
    if not signs or _prediction_signs(pred):
        return
    regions = _read_json(gt / MODEL_INFO_NAME).get("regions")
    model_ids = {int(i) for ids in regions.values() for i in ids} if isinstance(regions, dict) else set()
    if model_ids:
        from data_prep.io import load_label

        values: set[int] = set()
        masks = [p for name, p in _files_by_stem(gt).items() if not name.endswith(("_prob", "_unc"))]
        for path in masks[:3]:  # a few masks settle it
            try:
                values.update(int(v) for v in np.unique(load_label(path)[0]) if v > 0)
            except UserError:
                continue
        if values - model_ids:
            return  # labels the model cannot write: not (only) its predictions
        signs.append(f"masks with only the model's label ids ({', '.join(map(str, sorted(values))) or 'none'})")
    command = shlex.join(["segan", "evaluate", "-p", str(gt), "-g", str(pred), *other_args])
    raise UserError(f"-p and -g look swapped: -g {gt} holds {', '.join(signs)}, as a `segan predict` output "
                    f"folder does, and -p {pred} holds none of these; give the predictions to -p and the ground "
                    f"truth to -g: {command}")


def evaluate_folders(pred: Path, gt: Path, regions: str | None = None) -> tuple[list[CaseMetrics], dict]:
    """Score every ground-truth case in ``gt`` against ``pred/<stem>.nii[.gz]``.

    Returns the per-case results (ground-truth order, then predictions without ground truth
    as ``skipped``) and the resolved regions.
    """
    from data_prep.io import load_label

    if not gt.is_dir():
        raise UserError(f"{gt}: ground-truth folder not found; pass -g with a folder of label maps")
    if not pred.is_dir():
        raise UserError(f"{pred}: prediction folder not found; pass -p with the folder `segan predict` wrote")
    gt_files = _files_by_stem(gt)
    if not gt_files:
        raise UserError(f"{gt}: holds no .nii/.nii.gz label maps; pass -g with a folder of ground-truth masks")
    pred_files = {k: v for k, v in _files_by_stem(pred).items() if not k.endswith(("_prob", "_unc"))}

    truths: dict[str, tuple[np.ndarray, np.ndarray] | str] = {}
    found: set[int] = set()
    for name, path in gt_files.items():
        try:
            truths[name] = load_label(path)
            found.update(int(v) for v in np.unique(truths[name][0]) if v > 0)
        except UserError as exc:
            truths[name] = f"ground truth unusable: {exc}"
    resolved = resolve_regions(regions, pred, gt, found)

    results: list[CaseMetrics] = []
    with Progress(len(truths), "evaluate", "case") as bar:  # a bar on a terminal, else one line per case
        for name, truth in truths.items():
            results.append(_score_case(name, truth, pred, pred_files.get(name), resolved))
            bar.done(f"{name} {results[-1].status}")
    for name in sorted(set(pred_files) - set(gt_files)):
        results.append(CaseMetrics(name, "skipped", f"{pred_files[name]}: no ground truth in {gt}"))
    return results, resolved


def _score_case(name: str, truth: tuple[np.ndarray, np.ndarray] | str, pred: Path, pred_file: Path | None,
                resolved: dict[str, list[int]]) -> CaseMetrics:
    """One ground-truth case against its prediction (``pred_file``, None when missing)."""
    from data_prep.io import load_label

    if isinstance(truth, str):
        return CaseMetrics(name, "failed", truth)
    label, affine = truth
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    worst = failed_values(resolved, _worst_distance(label.shape, spacing))
    if pred_file is None:
        return CaseMetrics(name, "failed", f"{pred / (name + '.nii.gz')}: prediction missing", worst)
    try:
        mask, pred_affine = load_label(pred_file)
    except UserError as exc:
        return CaseMetrics(name, "failed", f"prediction unreadable: {exc}", worst)
    if mask.shape != label.shape:
        return CaseMetrics(name, "failed", f"{pred_file}: shape {mask.shape} differs from the "
                           f"ground truth's {label.shape}; predict on the ground truth's grid", worst)
    if not np.allclose(pred_affine, affine, atol=1e-3):
        return CaseMetrics(name, "failed", f"{pred_file}: affine differs from the ground "
                           "truth's; the mask is not on the scan's grid", worst)
    return CaseMetrics(name, "ok", "", case_metrics(mask, label, resolved, spacing))


def summarize(results: list[CaseMetrics], regions: dict[str, list[int]]) -> dict[str, float]:
    """Means over scored cases (ok and failed): ``{metric}_{region}`` and ``{metric}_mean`` (over regions)."""
    scored = [r for r in results if r.status in ("ok", "failed") and r.values]
    means: dict[str, float] = {}
    for metric in METRICS:
        per_region = []
        for name in regions:
            vals = [r.values[name][metric] for r in scored]
            means[f"{metric}_{name}"] = float(np.mean(vals)) if vals else float("nan")
            per_region.append(means[f"{metric}_{name}"])
        means[f"{metric}_mean"] = float(np.mean(per_region)) if per_region else float("nan")
    return means


# ---------------------------------------------------------------- output
def _columns(regions: dict[str, list[int]]) -> list[str]:
    return ["case", "status", "message"] + [f"{m}_{name}" for name in regions for m in METRICS]


def metrics_csv(results: list[CaseMetrics], regions: dict[str, list[int]], means: dict[str, float]) -> str:
    """One row per case (``{metric}_{region}`` columns) and a final ``mean`` row."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(regions))
    writer.writeheader()
    for r in results:
        row = {"case": r.case, "status": r.status, "message": r.message}
        for name in regions:
            for m in METRICS:
                row[f"{m}_{name}"] = f"{r.values[name][m]:.6g}" if r.values else ""
        writer.writerow(row)
    mean_row = {"case": "mean", "status": "", "message": ""}
    mean_row.update({f"{m}_{name}": f"{means[f'{m}_{name}']:.6g}" for name in regions for m in METRICS})
    writer.writerow(mean_row)
    return buf.getvalue()


def format_table(results: list[CaseMetrics], regions: dict[str, list[int]], means: dict[str, float]) -> str:
    """Per-case Dice per region, then the mean of every metric per region."""
    names = list(regions)
    width = max([len("case")] + [len(r.case) for r in results])
    lines = [f"{'case':<{width}}  {'status':<7}  " + "  ".join(f"{'dice_' + n:>{max(10, len(n) + 5)}}" for n in names)]
    for r in results:
        cells = [f"{r.values[n]['dice']:>{max(10, len(n) + 5)}.4f}" if r.values else f"{'-':>{max(10, len(n) + 5)}}"
                 for n in names]
        lines.append(f"{r.case:<{width}}  {r.status:<7}  " + "  ".join(cells))
    scored = sum(r.status in ("ok", "failed") and bool(r.values) for r in results)
    failed = sum(r.status == "failed" for r in results)
    lines.append("")
    lines.append(f"mean over {scored} case(s), {failed} failed (failures count as Dice 0):")
    rwidth = max([len("region")] + [len(n) for n in names] + [len("mean")])
    lines.append(f"{'region':<{rwidth}}  " + "  ".join(f"{m:>11}" for m in METRICS))
    for n in names + ["mean"]:
        lines.append(f"{n:<{rwidth}}  " + "  ".join(f"{means[f'{m}_{n}']:>11.4f}" for m in METRICS))
    return "\n".join(lines)


def _log_to_run(run_id: str, means: dict[str, float], tracking_uri: str | None) -> None:
    metrics = {f"eval_{k}": v for k, v in means.items() if np.isfinite(v)}
    try:
        from segan.tracking import log_metrics_to_run
    except ImportError:
        raise UserError(f"--run {run_id}: MLflow logging needs segan.tracking.log_metrics_to_run, which this "
                        "install lacks; the metrics CSV and table are complete") from None
    try:
        log_metrics_to_run(run_id, metrics, tracking_uri)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any MLflow failure becomes one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"--run {run_id}: could not log to MLflow ({type(exc).__name__}: {first}); "
                        "check the run id and --tracking-uri") from None


def run_evaluate(pred: Path, gt: Path, regions: str | None = None, out: Path | None = None,
                 run_id: str | None = None, tracking_uri: str | None = None) -> int:
    """``segan evaluate``: print the table, write ``out`` (CSV), log means to ``run_id``.

    Exit status 0 if every ground-truth case was scored, 1 if any failed.
    """
    from segan.io_utils import atomic_write_text

    other_args = [*(["--regions", regions] if regions else []), *(["--out", str(out)] if out else []),
                  *(["--run", run_id] if run_id else []), *(["--tracking-uri", tracking_uri] if tracking_uri else [])]
    check_not_swapped(Path(pred), Path(gt), other_args)
    results, resolved = evaluate_folders(Path(pred), Path(gt), regions)
    means = summarize(results, resolved)
    for r in results:
        if r.status == "failed":
            print(f"failed: {r.case}: {r.message}", file=sys.stderr)
    if out is not None:
        atomic_write_text(Path(out), metrics_csv(results, resolved, means))
    print(format_table(results, resolved, means))
    if out is not None:
        print(f"per-case metrics written to {Path(out).absolute()}")
    if run_id:
        _log_to_run(run_id, means, tracking_uri)
    return 1 if any(r.status == "failed" for r in results) else 0
