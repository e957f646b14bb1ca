"""The QC report of a predictions folder: one row per case, the most suspicious first.

Reads what ``segan predict`` left in the folder: ``predictions.csv`` (the fixed columns
``case, inputs, status, message, seconds, output`` and any quality columns after them,
each optional: ``ood_score``, ``flags`` (``;``-separated), ``volume_ml_<region>``,
``unc_mean_<region>``, ``unc_boundary_<region>``, ``uncertainty``), ``model.json`` (the
regions) and the files: ``<case>.nii.gz`` (mask), ``<case>_unc.nii.gz`` (uncertainty map,
when predicted with ``--uncertainty``) and the input scans named in ``inputs``.

Order: failed cases, then by number of flags, then ``ood_score``, then uncertainty
(``uncertainty``, else the mean of the ``unc_mean_<region>`` columns), all descending,
then by name. Region volumes come from ``volume_ml_<region>`` when the CSV has them, else
from the mask (voxel count x voxel volume of the mask's affine).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segan.errors import UserError
from segan.report import REPORT_NAME
from segan.report.html import esc, img, page, table, write_page


@dataclass
class CaseView:
    """One row of the report: the CSV row read back, what the report derives, the picture."""

    case: str
    status: str
    message: str
    seconds: float
    inputs: list[str]
    flags: list[str] = field(default_factory=list)
    ood_score: float | None = None
    uncertainty: float | None = None
    volumes: dict[str, float | None] = field(default_factory=dict)
    png: bytes | None = None
    note: str = ""  # why there is no (complete) picture

    def sort_key(self) -> tuple:
        neg = lambda v: -v if v is not None and not math.isnan(v) else math.inf  # noqa: E731 - absent last
        return (self.status != "failed", -len(self.flags), neg(self.ood_score), neg(self.uncertainty), self.case)


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def _regions(pred_dir: Path) -> tuple[list[tuple[str, list[int]]], str]:
    """(name, label ids) per region from ``model.json``, and the model's name ('' if unknown)."""
    info_path = pred_dir / "model.json"
    if not info_path.is_file():
        return [], ""
    try:
        info = json.loads(info_path.read_text())
        regions = [(str(name), [int(i) for i in ids]) for name, ids in dict(info["regions"]).items()]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{info_path}: not the model.json `segan predict` writes ({type(exc).__name__}: {exc}); "
                        "predict the folder again") from None
    return regions, str(info.get("model", ""))


def _regions_from_masks(pred_dir: Path) -> list[tuple[str, list[int]]]:
    """Without ``model.json``: one region per label id found in the first mask of the folder."""
    import nibabel as nib

    for path in sorted(pred_dir.glob("*.nii.gz")):
        if not path.name.endswith(("_unc.nii.gz", "_prob.nii.gz")):
            ids = np.unique(np.asarray(nib.load(str(path)).dataobj).astype(np.int64))
            return [(f"label {i}", [int(i)]) for i in ids if i > 0]
    return []


def _existing(text: str, pred_dir: Path) -> Path | None:
    """A path from the CSV: as written (absolute or relative to the cwd), else relative to the folder."""
    if not text:
        return None
    for path in (Path(text), pred_dir / text, pred_dir / Path(text).name):
        if path.is_file():
            return path
    return None


def _volumes_from_mask(labels: np.ndarray, affine: np.ndarray,
                       regions: list[tuple[str, list[int]]]) -> dict[str, float]:
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    return {name: float(np.isin(labels, ids).sum()) * voxel_ml for name, ids in regions}


def _render(view: CaseView, pred_dir: Path, output: str, regions: list[tuple[str, list[int]]],
            wanted_volumes: bool) -> None:
    """Load the mask (and scan, and uncertainty map) of one case: its picture and volumes."""
    import nibabel as nib

    from data_prep.io import load_image
    from segan.report.slices import slices_png

    mask_path = pred_dir / f"{view.case}.nii.gz"
    if not mask_path.is_file():
        mask_path = _existing(output, pred_dir) or mask_path
    if not mask_path.is_file():
        view.note = f"no mask {mask_path}"
        return
    nii = nib.load(str(mask_path))
    labels = np.asarray(nii.dataobj).astype(np.int32)
    labels = labels.reshape(labels.shape[:3]) if labels.ndim == 4 and labels.shape[3] == 1 else labels
    affine = nii.affine
    if wanted_volumes:
        view.volumes = _volumes_from_mask(labels, affine, regions)
    image = None
    paths = [_existing(p, pred_dir) for p in view.inputs]
    if paths and all(paths):
        scan, _ = load_image(paths)
        if scan.shape[1:] == labels.shape:
            image = scan[0]
        else:
            view.note = f"scan shape {scan.shape[1:]} differs from the mask's {labels.shape}; contours on black"
    else:
        view.note = "input scan not found (predicted from another folder?); contours on black"
    unc = None
    unc_path = pred_dir / f"{view.case}_unc.nii.gz"
    if unc_path.is_file():
        unc = np.asarray(nib.load(str(unc_path)).dataobj, dtype=np.float32)
        if unc.shape[:3] != labels.shape:
            unc, view.note = None, f"{unc_path.name}: shape {unc.shape} differs from the mask's {labels.shape}"
    view.png = slices_png(labels, affine, regions, image=image, uncertainty=unc)


def load_views(pred_dir: Path, regions: list[tuple[str, list[int]]], render: bool = True) -> list[CaseView]:
    """Every row of ``PRED_DIR/predictions.csv`` as a :class:`CaseView`, most suspicious first."""
    from segan.inference import CSV_NAME, read_csv

    csv_path = pred_dir / CSV_NAME
    if not csv_path.is_file():
        raise UserError(f"{pred_dir}: no {CSV_NAME}; pass the -o folder of `segan predict` (or predict into it first)")
    try:
        results = read_csv(csv_path)
    except (KeyError, ValueError) as exc:
        raise UserError(f"{csv_path}: not the CSV `segan predict` writes ({type(exc).__name__}: {exc}); "
                        "predict the folder again") from None
    views = []
    for r in results:
        view = CaseView(r.case, r.status, r.message, r.seconds, [p for p in r.inputs.split(";") if p],
                        flags=[f.strip() for f in r.extra.get("flags", "").split(";") if f.strip()],
                        ood_score=_float(r.extra.get("ood_score")))
        view.uncertainty = _float(r.extra.get("uncertainty"))
        unc_means = [v for k, v in r.extra.items() if k.startswith("unc_mean_") and _float(v) is not None]
        if view.uncertainty is None and unc_means:
            view.uncertainty = float(np.mean([float(v) for v in unc_means]))
        csv_volumes = {name: _float(r.extra.get(f"volume_ml_{name}")) for name, _ in regions}
        from_csv = bool(regions) and all(f"volume_ml_{name}" in r.extra for name, _ in regions)
        view.volumes = csv_volumes if from_csv else {}
        if render and r.status != "failed":
            try:
                _render(view, pred_dir, r.output, regions, wanted_volumes=not from_csv)
            except Exception as exc:  # noqa: BLE001 - one unreadable file must not lose the report
                view.note = f"could not draw: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        views.append(view)
    return sorted(views, key=CaseView.sort_key)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(rank: int, view: CaseView, regions: list[tuple[str, list[int]]], with_unc: bool) -> list[str]:
    flags = [f'<span class="flag failed">failed</span>'] if view.status == "failed" else []
    flags += [f'<span class="flag">{esc(f)}</span>' for f in view.flags]
    status = f'<span class="ok">{esc(view.status)}</span>' if view.status == "ok" else esc(view.status)
    picture = img(view.png, f"slices of {view.case}", cls="slices") if view.png else ""
    notes = " ".join(esc(t) for t in (view.message, view.note) if t)
    cells = [str(rank), f'<code>{esc(view.case)}</code><div class="msg">{notes}</div>', status, " ".join(flags) or "-",
             f'<span class="num">{_fmt(view.ood_score)}</span>']
    if with_unc:
        cells.append(_fmt(view.uncertainty, 4))
    cells += [_fmt(view.volumes.get(name)) for name, _ in regions]
    cells += [_fmt(view.seconds), picture]
    return cells


def predictions_html(pred_dir: Path, views: list[CaseView], regions: list[tuple[str, list[int]]],
                     model: str) -> str:
    """The report page of ``views`` (already sorted)."""
    from segan.report.slices import region_colors

    with_unc = any(v.uncertainty is not None for v in views)
    failed = sum(v.status == "failed" for v in views)
    flagged = sum(bool(v.flags) for v in views)
    header = ["#", "case", "status", "flags", "ood score", *(["uncertainty"] if with_unc else []),
              *(f"{name} (mL)" for name, _ in regions), "seconds", "slices through the mask centre"]
    attrs = [f'id="case-{esc(v.case)}" data-case="{esc(v.case)}" class="'
             f'{"failed" if v.status == "failed" else "flagged" if v.flags else "ok"}"' for v in views]
    legend = "".join(f'<span style="border-color:{c}">{esc(name)} = labels {esc(",".join(map(str, ids)))}</span>'
                     for (name, ids), c in zip(regions, region_colors(len(regions))))
    summary = (f"<p>{len(views)} case(s): {len(views) - failed} predicted, {failed} failed, {flagged} flagged. "
               "Sorted most suspicious first: failed, then number of flags, out-of-distribution score, "
               "uncertainty. Slices: axial, coronal, sagittal through the mask's centre of mass "
               "(R to the right); contours per region:</p>"
               f'<p class="legend">{legend or "regions unknown (no model.json)"}</p>')
    body = table(header, [_row(i + 1, v, regions, with_unc) for i, v in enumerate(views)], attrs, raw=True)
    subtitle = f"{pred_dir}" + (f" · model {model}" if model else "")
    return page("segan prediction QC report", subtitle, [summary, body])


def write_predictions_report(pred_dir: str | Path, out: str | Path | None = None) -> Path:
    """``segan predict --report`` / ``segan report -p PRED_DIR``: write ``out``
    (default ``PRED_DIR/report.html``), one self-contained page; returns its path."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"{pred_dir}: no such folder; pass the -o folder of `segan predict`")
    regions, model = _regions(pred_dir)
    if not regions:
        regions = _regions_from_masks(pred_dir)
    views = load_views(pred_dir, regions)
    out = Path(out) if out else pred_dir / REPORT_NAME
    return write_page(out, predictions_html(pred_dir, views, regions, model))
