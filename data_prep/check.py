"""``segan prepare check``: read every file of a data set once and list every problem.

Each problem is one line ``FILE: problem; fix``; :func:`check_dataset` returns them with a
table row per case, :func:`run_check` prints both (or JSON) and writes the data list when
the set is clean.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_prep.datalist import make_datalist
from data_prep.io import ScanError, load_image
from data_prep.msd import Case, DatasetInfo, _label_summary, load_dataset, unlabeled_cases
from segan.errors import UserError

if TYPE_CHECKING:
    from data_prep.cache import CheckRecord


def _check_case(info: DatasetInfo, case: Case, split: str) -> tuple[dict, list[str]]:
    """Read a case's files once; return its table row and its problems."""
    problems: list[str] = []
    missing = ("listed in dataset.json but not found; fix the entry or restore the file"
               if info.layout == "msd" else "file not found; add it or remove the case")
    shape = affine = None
    channels = 0
    ref_path = None
    for path in case.images:
        if not os.path.exists(path):
            problems.append(f"{path}: {missing}")
            continue
        try:
            data, aff = load_image(path)          # (C, X, Y, Z) float32
        except ScanError as exc:
            problems.append(str(exc))
            continue
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if n_bad:
            problems.append(f"{path}: {n_bad} voxel(s) are NaN or infinite; re-export the scan or "
                            "replace them (e.g. with 0)")
        if shape is None:
            shape, affine, ref_path = tuple(data.shape[1:]), aff, path
        elif tuple(data.shape[1:]) != shape:
            problems.append(f"{path}: shape {tuple(data.shape[1:])} differs from {Path(ref_path).name} "
                            f"{shape}; resample the channels of case {case.name} to one grid")
        elif not np.allclose(aff, affine, atol=1e-3):
            problems.append(f"{path}: affine differs from {Path(ref_path).name}; register the channels of "
                            f"case {case.name} to one grid")
        channels += int(data.shape[0])
        del data
    values = None
    if case.label is None:
        if split == "training":
            problems.append(f"{case.images[0]}: case {case.name} has no label file; add it to the labels "
                            "folder or move the case to imagesTs/")
    elif not os.path.exists(case.label):
        fix = "fix the dataset.json entry" if info.layout == "msd" else "move the case to imagesTs/"
        problems.append(f"{case.label}: label file missing for case {case.name}; add it or {fix}")
    else:
        try:
            values, lshape, laff = _label_summary(case.label)
        except ScanError as exc:
            problems.append(str(exc))
        else:
            if shape is not None and lshape != shape:
                problems.append(f"{case.label}: shape {lshape} differs from image {Path(ref_path).name} "
                                f"{shape}; resample the label onto the image grid (nearest neighbour)")
            elif affine is not None and not np.allclose(laff, affine, atol=1e-3):
                diff = float(np.abs(laff - affine).max())
                problems.append(f"{case.label}: affine differs from image {Path(ref_path).name} (max "
                                f"difference {diff:.3g}); copy the image's affine into the label or resample it")
            extra = sorted(set(values) - set(info.labels))
            if extra:
                problems.append(f"{case.label}: label value(s) {extra} not in the declared labels "
                                f"{sorted(info.labels)}; fix the label map or declare them in dataset.json 'labels'")
    spacing = None if affine is None else [round(float(s), 4) for s in np.linalg.norm(affine[:3, :3], axis=0)]
    row = {"case": case.name, "split": split, "channels": channels or None,
           "shape": list(shape) if shape else None, "spacing": spacing, "labels": values,
           "status": "ok" if not problems else f"{len(problems)} problem(s)"}
    return row, problems


def check_dataset(info: DatasetInfo, record: CheckRecord | None = None) -> tuple[list[dict], list[str]]:
    """Validate every case; returns (one table row per case, every problem as one line
    ``FILE: problem; fix``). With a ``record`` (``data_prep.cache.CheckRecord``), a case that
    passed before with the same files is not read again, and clean cases are recorded."""
    rows: list[dict] = []
    problems: list[str] = list(info.problems)
    if not info.training:
        problems.append(f"{info.root}: no training cases found; put images in imagesTr/ and labels in labelsTr/")
    firsts: dict[str, str] = {}
    for split, cases in (("training", info.training), ("test", info.test), ("unlabeled", info.unlabeled)):
        for case in cases:
            known = record.get(case, info.labels) if record is not None else None
            if known is not None:
                row, case_problems = {**known, "split": split}, []
            else:
                row, case_problems = _check_case(info, case, split)
                if record is not None and not case_problems:
                    record.put(case, info.labels, row)
            rows.append(row)
            problems.extend(case_problems)
            firsts[case.name] = case.images[0]
    # Channel count: declared by dataset.json, else the most common one.
    counts = Counter(r["channels"] for r in rows if r["channels"])
    expected = len(info.channel_names) if info.layout == "msd" else (counts.most_common(1)[0][0] if counts else None)
    for row in rows:
        if row["channels"] and expected and row["channels"] != expected:
            problems.append(f"{firsts[row['case']]}: case {row['case']} has {row['channels']} channel(s), expected "
                            f"{expected} ({', '.join(info.channel_names)}); give every case the same channels")
            row["status"] = "channel count" if row["status"] == "ok" else row["status"] + ", channel count"
    if record is not None:
        record.save()
    return rows, problems


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if value else "-"
    return str(value)


def _table(rows: list[dict]) -> str:
    cols = [("case", "case"), ("split", "split"), ("channels", "ch"), ("shape", "shape"),
            ("spacing", "spacing (mm)"), ("labels", "labels"), ("status", "status")]
    cells = [[h for _, h in cols]] + [[_fmt(r[k]) if k != "labels" else
                                       (",".join(map(str, r[k])) if r[k] is not None else "-")
                                       for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def run_check(root: Path, as_json: bool, datalist: Path | None, seed: int, val_fraction: float,
              folds: int | None, fold: int | None = None, unlabeled: str | None = None) -> int:
    """``segan prepare check``: print the case table (or JSON) and every problem;
    write the data list if asked and the data set is clean (with ``folds``, fold ``fold``,
    default 0, validates). ``unlabeled``: a folder or glob of image-only scans, checked and
    listed too (split ``unlabeled``). Returns 0, or 2 on problems."""
    from segan.io_utils import atomic_write_text

    if fold is not None and folds is None:
        raise UserError(f"--fold {fold} needs --folds K (the number of cross-validation folds)")
    info = load_dataset(root)
    if unlabeled:
        info.unlabeled = unlabeled_cases(unlabeled)
    rows, problems = check_dataset(info)
    listing = make_datalist(info, seed, val_fraction, folds, fold or 0) if datalist and not problems else None
    labels = ", ".join(f"{k} {v}" for k, v in sorted(info.labels.items()))
    if as_json:
        report = {"root": str(info.root), "name": info.name, "layout": info.layout,
                  "channel_names": info.channel_names, "labels": {str(k): v for k, v in sorted(info.labels.items())},
                  "regions": info.regions, "cases": rows, "problems": problems, "ok": not problems}
        print(json.dumps(report, indent=2))
    else:
        extra = f" + {len(info.unlabeled)} unlabelled" if info.unlabeled else ""
        print(f"{info.root}: layout {info.layout}, {len(info.training)} training + {len(info.test)} test{extra} cases; "
              f"channels {', '.join(info.channel_names)}; labels {labels}")
        if rows:
            print(_table(rows))
        if problems:
            print(f"\n{len(problems)} problem(s):")
            for line in problems:
                print(f"  {line}")
        else:
            print("\nno problems found")
    if listing is not None:
        atomic_write_text(datalist, json.dumps(listing, indent=2) + "\n")
        msg = (f"data list written to {datalist}: {len(listing['training'])} training, "
               f"{len(listing['validation'])} validation, {len(listing['test'])} test cases")
        print(msg, file=sys.stderr if as_json else sys.stdout)
    if problems:
        tail = "; data list not written" if datalist else ""
        print(f"error: {len(problems)} problem(s) in {info.root}{tail}; fix them and run the check again",
              file=sys.stderr)
        return 2
    return 0
