"""Does per-case uncertainty rank the bad masks first? Spearman(uncertainty, 1 - Dice).

Input: a folder written by ``segan predict ... --uncertainty`` (its ``predictions.csv``
holds the per-case ``uncertainty`` column: mean over regions of the mean uncertainty inside
the predicted mask, see :mod:`segan.ensemble`) and the ground-truth label folder. The Dice
comes from the same code as ``segan evaluate`` (:func:`segan.metrics.evaluate_folders`,
regions from ``dataset.json`` or the predictions' ``model.json``), averaged over regions per
case. Cases without an uncertainty (every mask empty), a failed prediction or a missing
ground truth are left out and counted.

Prints one JSON object: ``spearman`` (rho), ``p_value``, ``cases`` used, ``left_out``, the
uncertainty kind (``variance`` or ``entropy``) and the per-case pairs. Example::

    segan predict -m outputs/cv -i data/phantoms/imagesTs -o preds --uncertainty
    python benchmarks/uncertainty_error.py -p preds -g data/phantoms/labelsTs
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def correlate(pred: Path, gt: Path, column: str = "uncertainty") -> dict:
    """Spearman correlation between ``column`` of ``pred/predictions.csv`` and 1 - mean Dice per case."""
    import numpy as np
    from scipy.stats import spearmanr

    from segan.errors import UserError
    from segan.inference import CSV_NAME, MODEL_INFO_NAME, read_csv
    from segan.metrics import evaluate_folders

    if not (pred / CSV_NAME).is_file():
        raise UserError(f"{pred / CSV_NAME}: not found; pass -p with a folder written by `segan predict --uncertainty`")
    rows = {r.case: r for r in read_csv(pred / CSV_NAME)}
    if not any(column in r.extra for r in rows.values()):
        raise UserError(f"{pred / CSV_NAME}: has no '{column}' column; predict again with --uncertainty")
    metrics, _ = evaluate_folders(pred, gt)
    pairs, left_out = [], []
    for m in metrics:
        row = rows.get(m.case)
        value = row.extra.get(column, "") if row else ""
        if m.status != "ok" or not value or row.status != "ok":
            left_out.append(m.case)
            continue
        dice = float(np.mean([v["dice"] for v in m.values.values()]))
        pairs.append({"case": m.case, "uncertainty": float(value), "error": 1.0 - dice})
    if len(pairs) < 3:
        raise UserError(f"{pred}: only {len(pairs)} case(s) with an uncertainty and a ground truth in {gt}; "
                        "a correlation needs at least 3")
    rho, p = spearmanr([c["uncertainty"] for c in pairs], [c["error"] for c in pairs])
    try:
        kind = json.loads((pred / MODEL_INFO_NAME).read_text()).get("uncertainty")
    except (OSError, ValueError):
        kind = None
    clean = (lambda x: None if x is None or math.isnan(x) else round(float(x), 4))
    return {"spearman": clean(rho), "p_value": clean(p), "cases": len(pairs), "left_out": left_out,
            "column": column, "kind": kind, "pairs": pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-p", "--pred", type=Path, required=True, help="`segan predict --uncertainty` folder")
    parser.add_argument("-g", "--gt", type=Path, required=True, help="ground-truth label folder")
    parser.add_argument("--column", default="uncertainty", help="predictions.csv column (e.g. unc_mean_<region>)")
    args = parser.parse_args(argv)
    from segan.errors import UserError

    try:
        result = correlate(args.pred, args.gt, args.column)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
