"""Is the K-fold ensemble better than its best fold? Test Dice of every fold, of the plain average, and of
the ensemble with the post-processing the CV chose on its out-of-fold cases (``segan predict -m CVFOLDER``).

Input: a folder written by ``segan train --folds K`` and an MSD folder with ``imagesTs``/``labelsTs``.
A CV folder written before the out-of-fold choice existed gets it in a copy of its ``cv.json``
under ``OUT/cv_model`` (:mod:`segan.cv_post`; the CV folder is never written). Every prediction is ``segan predict`` and every score
``segan evaluate`` (subprocesses, as a user runs them); prints a markdown table and writes
``OUT/cv_ensemble.json``.

    segan train -c configs/supervised_2d.yaml --folds 5 --out outputs/cv5
    python benchmarks/cv_ensemble.py outputs/cv5 --data data/phantoms --out outputs/cv5_test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_configs import _test_dice, segan  # noqa: E402


def with_post(cv_folder: Path, out: Path) -> tuple[Path, dict]:
    """The CV model to predict with and its ``cv.json``: ``cv_folder`` itself when its ``cv.json`` holds the
    out-of-fold choice; else ``OUT/cv_model/cv.json``, a copy with the choice added and absolute fold
    paths (the CV folder, an input, is never written)."""
    from segan.cv_post import choose_postprocessing
    from segan.io_utils import atomic_write_text

    cv = json.loads((cv_folder / "cv.json").read_text())
    if "post" in cv:
        return cv_folder, cv
    lists = [json.loads((cv_folder / Path(f).parent / "datalist.json").read_text()) for f in cv["folds"]]
    cv.update(choose_postprocessing(cv_folder, cv["folds"], lists))
    cv["folds"] = [str((cv_folder / f).resolve()) for f in cv["folds"]]
    model = out / "cv_model"
    model.mkdir(parents=True, exist_ok=True)
    atomic_write_text(model / "cv.json", json.dumps(cv, indent=2) + "\n")
    return model, cv


def score(models: list[Path], data: Path, out: Path, log: Path) -> tuple[float, dict]:
    """``segan predict`` (every model in ``models`` as one ``-m``) + ``segan evaluate``: mean test Dice, per region."""
    args = [a for m in models for a in ("-m", m)]
    pred = segan("predict", *args, "-i", data / "imagesTs", "-o", out, "--overwrite", log=log)
    if pred.returncode != 0:
        raise SystemExit(f"error: segan predict {' '.join(map(str, args))} failed; see {log}")
    ev = segan("evaluate", "-p", out, "-g", data / "labelsTs", "--out", out / "metrics.csv", log=log)
    if ev.returncode not in (0, 1):
        raise SystemExit(f"error: segan evaluate -p {out} failed; see {log}")
    return _test_dice(out / "metrics.csv")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cv_folder", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="MSD folder with imagesTs/labelsTs")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    model, cv = with_post(args.cv_folder, args.out)
    folds = [model / f for f in cv["folds"]]
    rows = []
    for i, fold in enumerate(folds):
        rows.append((f"fold {i}", *score([fold], args.data, args.out / f"fold_{i}", log)))
    rows.append(("ensemble, plain average (threshold 0.5)", *score(folds, args.data, args.out / "ensemble_plain", log)))
    rows.append(("ensemble + out-of-fold post-processing (segan predict -m CV)",
                 *score([model], args.data, args.out / "ensemble", log)))
    regions = list(rows[0][2])
    lines = ["| model | test Dice mean | " + " | ".join(regions) + " |", "|---|---:|" + "---:|" * len(regions)]
    lines += [f"| {name} | {mean:.3f} | " + " | ".join(f"{per[r]:.3f}" for r in regions) + " |"
              for name, mean, per in rows]
    best = max(m for n, m, _ in rows if n.startswith("fold"))
    lines.append(f"\nbest fold {best:.3f}; ensemble {rows[-1][1]:.3f} ({rows[-1][1] - best:+.3f}); "
                 f"post-processing chosen: {cv.get('post') or 'none'} (out-of-fold mean Dice "
                 f"{cv.get('oof_dice_before', float('nan')):.4f} -> {cv.get('oof_dice_after', float('nan')):.4f})")
    text = "\n".join(lines)
    (args.out / "cv_ensemble.json").write_text(json.dumps(
        {"rows": [{"model": n, "test_dice": m, "regions": p} for n, m, p in rows], "post": cv.get("post"),
         "oof_dice_before": cv.get("oof_dice_before"), "oof_dice_after": cv.get("oof_dice_after")}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
