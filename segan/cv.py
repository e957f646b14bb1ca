"""``segan train --folds K``: K-fold cross-validation as child runs of one parent MLflow run.

The labelled training cases of ``data.root`` are cut once into K folds (the config's seed,
:func:`data_prep.datalist.split_cases`); fold ``i`` trains on the other folds and validates on
fold ``i``; the test cases stay out. Every fold's data list is written before anything
trains (``OUTDIR/fold_i/datalist.json``, the recorded split), the fold models go to
``OUTDIR/fold_i/`` as child runs of the parent run, and the parent gets the CV mean ± std of
every validation Dice (best epoch of each fold). ``OUTDIR/cv.json`` lists the fold
checkpoints: ``segan predict -m OUTDIR`` averages them (:mod:`segan.ensemble`), then applies
the post-processing chosen on the folds' out-of-fold predictions (:mod:`segan.cv_post`, also in
``cv.json``; the parent run logs ``oof_dice_before`` / ``oof_dice_after``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from segan.errors import UserError

CV_FILE = "cv.json"
CV_ROLE = "cv"  # value of the segan.role tag on the parent run


def fold_datalists(cfg, folds: int) -> list[dict]:
    """One data list per fold of ``cfg.data.root``'s labelled training cases (seed ``cfg.seed``)."""
    from data_prep import msd
    from data_prep.datalist import make_datalist

    if cfg.data.datalist:
        raise UserError(f"data.datalist {cfg.data.datalist}: --folds splits data.root itself; drop data.datalist "
                        "and set data.root to the data-set folder")
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise UserError(f"data.root {root}: folder not found; point to your data with --set data.root=FOLDER")
    info = msd.load_dataset(root)
    return [make_datalist(info, seed=cfg.seed, folds=folds, fold=i) for i in range(folds)]


def cv_summary(records: list[dict]) -> dict[str, float]:
    """``cv_<metric>_mean`` / ``cv_<metric>_std`` (population std) of every ``val_dice*`` over the folds."""
    keys = sorted({k for r in records for k in r if k.startswith("val_dice")})
    out: dict[str, float] = {}
    for k in keys:
        values = [float(r[k]) for r in records if k in r]
        mean = sum(values) / len(values)
        out[f"cv_{k}_mean"] = mean
        out[f"cv_{k}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return out


def run_cv(config: str, folds: int, overrides: list[str], out_dir: str | None, tracking_uri: str | None) -> int:
    """Train the K fold models; print and log the CV mean ± std; write ``cv.json``.

    Returns 0 when every fold finished, 130 when interrupted, else the first failing fold's status.
    """
    from segan.config import load_config, to_dict
    from segan.io_utils import atomic_write_text
    from segan.tracking import SWEEP_ROLE_TAG, RunTracker, config_hash
    from segan.train_run import run_training

    base = load_config(config, overrides)
    name = f"cv{folds}-{config_hash({'cfg': to_dict(base), 'started': time.time_ns()})}"
    folder = Path(out_dir) if out_dir else Path("outputs") / base.experiment / name
    if (folder / CV_FILE).exists():
        raise UserError(f"--out {folder}: holds a finished cross-validation ({CV_FILE}); choose another --out")
    lists = fold_datalists(base, folds)  # before anything is written: a bad split exits 2 here
    children = []
    for i, datalist in enumerate(lists):
        path = folder / f"fold_{i}" / "datalist.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(datalist, indent=1))
        cfg = load_config(config, [*overrides, f"data.datalist={path.absolute()}", f"run_name=fold{i}-{name}"])
        children.append((i, cfg))
    tags = {SWEEP_ROLE_TAG: CV_ROLE, "cv.folds": str(folds), "method": base.method.name}
    parent = RunTracker.start(to_dict(base), tracking_uri=tracking_uri or base.tracking.uri,
                              experiment=base.experiment, run_name=name, tags=tags, spill_dir=folder) \
        if base.tracking.enabled else None
    records, checkpoints, code, status = [], [], 0, "FINISHED"
    try:
        for i, cfg in children:
            print(f"[cv] fold {i + 1}/{folds}: validates on {len(lists[i]['validation'])} case(s)", file=sys.stderr)
            result = run_training(cfg, out_dir=folder / f"fold_{i}", tracking_uri=tracking_uri,
                                  parent_run_id=parent.run_id if parent else None)
            print(f"[cv] fold {i}: {result.summary()}", file=sys.stderr)
            if result.exit_code == 130:
                status, code = "KILLED", 130
                break
            if result.exit_code != 0:
                status, code = "FAILED", code or result.exit_code
                continue
            best = "best.pt" if (folder / f"fold_{i}" / "best.pt").exists() else "last.pt"
            checkpoints.append(f"fold_{i}/{best}")
            records.append({"fold": i, "run_id": result.run_id, "epochs": result.epochs_done,
                            **{k: v for k, v in result.best_metrics.items() if k.startswith("val_dice")}})
    except BaseException:
        if parent:
            parent.finish("FAILED")
        raise
    summary = cv_summary(records) if records else {}
    post: dict = {}
    if status == "FINISHED":
        from segan.cv_post import choose_postprocessing
        from segan.runtime import resolve_device

        post = choose_postprocessing(folder, checkpoints, [lists[r["fold"]] for r in records],
                                     device=str(resolve_device(base.train.device)))
        if post:
            summary.update({k: post[k] for k in ("oof_dice_before", "oof_dice_after")})
            print(f"[cv] post-processing chosen on the out-of-fold cases: {post['post'] or 'the config as it is'} "
                  f"(mean Dice {post['oof_dice_before']:.4f} -> {post['oof_dice_after']:.4f})", file=sys.stderr)
    if parent:
        if summary:
            parent.log_metrics(summary, step=0)
        parent.finish(status)
    if status == "FINISHED":
        atomic_write_text(folder / CV_FILE, json.dumps(
            {"k": folds, "folds": checkpoints, "metric": "val_dice_mean",
             "mean": summary.get("cv_val_dice_mean_mean"), "std": summary.get("cv_val_dice_mean_std"),
             "per_fold": records, "run_id": parent.run_id if parent else None, **post}, indent=2) + "\n")
    lines = [f"{k[3:-5]}: {v:.4f} ± {summary[k[:-5] + '_std']:.4f}" for k, v in summary.items() if k.endswith("_mean")]
    print(f"{status}: {len(records)}/{folds} folds; CV (best epoch per fold) " + "; ".join(lines)
          + (f"; model: {folder} (segan predict -m {folder})" if status == "FINISHED" else ""))
    return code
