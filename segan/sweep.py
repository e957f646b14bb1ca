"""``segan sweep``: every method x seed as child runs of one parent MLflow run, then the comparison.

All children share the config's segmentor, epochs and data split: the split is written
once to a data list (unless the config already names one) and every child reads it, so
the seed changes initialisation, sampling and augmentation, never the validation cases.
A child whose method is not the config's own gets that method's family settings
(:func:`segan.config_layers.resolve_config` with ``method=``): the file's values for keys
a method owns are dropped, ``--set`` overrides come last and win. Every sweep gets a new
name (config and start time), so a re-run makes new runs and folders.
``--set-grid KEY=V1,V2`` (repeatable) adds a cartesian grid of config values
(:mod:`segan.sweep_grid`); a numeric axis ends with a figure of Dice against it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

from segan.errors import UserError, did_you_mean
from segan.progress import Progress


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"--{what} {text!r}: give a comma-separated list, e.g. --{what} "
                        + ("segan,bce,supervised" if what == "methods" else "0,1,2"))
    return list(dict.fromkeys(items))


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for item in parse_list(text, "seeds"):
        try:
            seeds.append(int(item))
        except ValueError:
            raise UserError(f"--seeds {text!r}: {item!r} is not an integer; e.g. --seeds 0,1,2") from None
    return seeds


def child_overrides(seed: int, datalist: str, run_name: str, overrides: list[str]) -> list[str]:
    """The ``--set`` list of one child: seed, split and run name, then the user's overrides."""
    return [f"seed={seed}", f"data.datalist={datalist}", f"run_name={run_name}", *overrides]


def _write_split(cfg, folder: Path) -> str:
    """The config's data list, or the split of ``data.root`` with the config's seed, saved once."""
    if cfg.data.datalist:
        return str(Path(cfg.data.datalist).absolute())
    from data_prep.datalist import make_datalist
    from data_prep.msd import load_dataset
    from segan.io_utils import atomic_write_text

    root = Path(cfg.data.root)
    if not root.is_dir():
        raise UserError(f"data.root {root}: folder not found; generate a demo data set with "
                        f"`segan prepare phantoms --out {root}` or point to your data with --set data.root=FOLDER")
    datalist = make_datalist(load_dataset(root), seed=cfg.seed, val_fraction=cfg.data.val_fraction,
                             folds=cfg.data.folds, fold=cfg.data.fold)
    path = folder / "datalist.json"
    atomic_write_text(path, json.dumps(datalist, indent=1))
    return str(path.absolute())


def run_sweep(config: str, methods: str, seeds: str, overrides: list[str], tracking_uri: str | None,
              grid: Sequence[str] = ()) -> int:
    """Train every (grid cell, method, seed) as a child of one parent run; print the comparison.

    ``grid``: ``--set-grid KEY=V1,V2`` options (cartesian product; none = one empty cell).

    Returns 0 when every child finished, 130 when interrupted (the parent run is KILLED),
    else the exit status of the first child that did not finish (the others still run).
    """
    from segan.config import load_config, to_dict
    from segan.config_layers import resolve_config
    from segan.methods import METHODS
    from segan.tracking import SWEEP_ROLE_TAG, RunTracker, config_hash, run_compare
    from segan.sweep_grid import (ChildResult, GridSummary, cell_overrides, check_cells, child_run_name,
                                  grid_cells, parse_grid, write_grid_outputs)
    from segan.train_run import run_training

    method_list = parse_list(methods, "methods")
    unknown = [m for m in method_list if m not in METHODS]
    if unknown:
        hint = did_you_mean(unknown[0], METHODS) if len(unknown) == 1 else ""
        raise UserError(f"--methods: unknown method {', '.join(unknown)}{hint}; allowed: {', '.join(METHODS)}")
    seed_list = parse_seeds(seeds)
    axes = parse_grid(grid, overrides)
    base = load_config(config, overrides)
    if not base.tracking.enabled:
        raise UserError("tracking.enabled is false; a sweep compares its runs in MLflow, so remove "
                        "--set tracking.enabled=false")
    uri = tracking_uri or base.tracking.uri
    # The start time makes every sweep new: a re-run adds runs and folders, it never overwrites.
    key = {"cfg": to_dict(base), "methods": method_list, "seeds": seed_list, "started": time.time_ns(),
           **({"grid": [(a.key, a.values) for a in axes]} if axes else {})}
    name = f"sweep-{config_hash(key)}"
    folder = Path("outputs") / base.experiment / name
    folder.mkdir(parents=True, exist_ok=True)
    datalist = _write_split(base, folder)
    # Every child config is built (and validated) before anything trains.
    check_cells(axes, datalist)
    children = []
    for cell in grid_cells(axes):
        for method in method_list:
            for seed in seed_list:
                run_name = child_run_name(method, seed, cell, name.removeprefix("sweep-"))
                cfg = resolve_config(config, child_overrides(seed, datalist, run_name,
                                                             [*overrides, *cell_overrides(cell)]), method=method).config
                out = Path("outputs") / cfg.experiment / run_name
                if out.exists():  # never train into an earlier run's folder
                    raise UserError(f"{out} exists already; the sweep would overwrite it: run it again "
                                    "(a new sweep gets a new name) or move that folder away")
                children.append((method, seed, cell, cfg))

    parent = RunTracker.start(to_dict(base), tracking_uri=uri, experiment=base.experiment, run_name=name,
                              tags={SWEEP_ROLE_TAG: "sweep", "sweep.methods": ",".join(method_list),
                                    "sweep.seeds": ",".join(map(str, seed_list)),
                                    **({"sweep.grid": " ".join(f"{a.key}={','.join(a.values)}" for a in axes)}
                                       if axes else {})}, spill_dir=folder)
    if parent.run_id is None:
        print(f"[sweep] warning: MLflow store not reachable; child runs will not be nested under {name}",
              file=sys.stderr)
    parent.log_artifact(Path(datalist), "sweep")
    failed: list[tuple[str, int, int]] = []
    results: list[ChildResult] = []
    status = "FINISHED"
    runs = Progress(len(children), "[sweep] run", bar=False)  # one line per child, with its seconds and ETA
    try:
        for i, (method, seed, cell, cfg) in enumerate(children, 1):
            where = "".join(f", {k}={v}" for k, v in cell.items())
            runs.write(f"[sweep] {i}/{len(children)}: {method}, seed {seed}{where}")
            result = run_training(cfg, out_dir=None, resume=None, tracking_uri=tracking_uri, register=None,
                                  parent_run_id=parent.run_id)
            first, *more = result.summary().splitlines()  # an error message follows on its own line
            runs.done(f"{method}, seed {seed}{where}: {first}")
            for line in more:
                runs.write(line)
            best = result.best_metric if result.best_metric is not None and result.best_metric > -1e30 else None
            results.append(ChildResult(method, seed, dict(cell), cfg.run_name or "", result.exit_code, best,
                                       result.run_id))
            if result.exit_code == 130:
                status = "KILLED"
                break
            if result.exit_code != 0:
                failed.append((method, seed, result.exit_code))
        if axes:
            written = write_grid_outputs(folder, axes, results, parent)
            print("\n".join(GridSummary.of(axes, results, written).lines), file=sys.stderr, flush=True)
    except BaseException:
        parent.finish("FAILED")
        raise
    if failed and status == "FINISHED":
        status = "FAILED"
    parent.finish(status)
    try:
        group_by = axes[0].key if len(axes) == 1 else "method"
        print(run_compare([base.experiment], metric="val_dice_mean", group_by=group_by, fmt="table",
                          plot=folder / "compare.png", tracking_uri=uri, parent_run_id=parent.run_id))
    except UserError as exc:
        print(f"[sweep] no comparison: {exc}", file=sys.stderr)
    if status == "KILLED":
        return 130
    if failed:
        print("[sweep] not finished: " + ", ".join(f"{m} seed {s} (exit {c})" for m, s, c in failed),
              file=sys.stderr)
        return failed[0][2]
    return 0
