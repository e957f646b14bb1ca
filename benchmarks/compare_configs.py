"""Train several configs x seeds under one wall-clock budget, then score each on the test scans.

The protocol of the README's phantom results table: every run is ``segan train`` with
``--set train.max_minutes=M --set train.threads=1 --set seed=S`` (the seed also draws the
train/validation split, as in a plain ``segan train``), ``--parallel`` runs side by side;
then ``segan predict`` of the best checkpoint on ``DATA/imagesTs`` and ``segan evaluate``
against ``DATA/labelsTs``. Prints a markdown table (one row per run, then mean ± std per
config) and writes everything to ``OUT/results.json``.

    python benchmarks/compare_configs.py --data data/phantoms --out outputs/table \\
        --configs configs/supervised_2d.yaml configs/segan_2d.yaml configs/bce_2d.yaml \\
        --seeds 0,1,2 --minutes 15 --parallel 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Job:
    name: str  # <config stem>-seed<S>
    config: str
    seed: int
    out: Path
    sets: list[str] = field(default_factory=list)


@dataclass
class Result:
    name: str
    config: str
    seed: int
    exit_code: int
    stop: str = ""
    epochs: int = 0
    best_epoch: int = 0
    val_dice: float = float("nan")
    val_regions: dict = field(default_factory=dict)
    test_dice: float = float("nan")
    test_regions: dict = field(default_factory=dict)
    train_minutes: float = 0.0


def segan(*args: object, log: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m segan ARGS`` as a subprocess (no shell), output appended to ``log``."""
    proc = subprocess.run([sys.executable, "-m", "segan", *map(str, args)], capture_output=True, text=True)
    if log is not None:
        with open(log, "a") as fh:
            fh.write(f"$ segan {' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}\n")
    return proc


def _val_from_checkpoint(run: Path) -> tuple[int, int, float, dict]:
    import torch

    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    record = best["history"][-1] if best.get("history") else {}
    regions = {k.removeprefix("val_dice_"): v for k, v in record.items()
               if k.startswith("val_dice_") and k != "val_dice_mean"}
    return int(last["epoch"]), int(best["epoch"]), float(best["best_metric"]), regions


def _test_dice(csv_path: Path) -> tuple[float, dict]:
    rows = list(csv.DictReader(open(csv_path)))
    mean = next(r for r in rows if r["case"] == "mean")
    regions = {k.removeprefix("dice_"): float(v) for k, v in mean.items() if k.startswith("dice_")}
    return statistics.mean(regions.values()), regions


def run_job(job: Job, data: Path, minutes: float) -> Result:
    """Train, predict and score one job; a job whose ``result.json`` holds the same request is not run again."""
    job.out.mkdir(parents=True, exist_ok=True)
    done, request = job.out / "result.json", {"config": job.config, "seed": job.seed, "sets": job.sets,
                                              "minutes": minutes, "data": str(data)}
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("request") == request:
            return Result(**saved["result"])
    result = _run_job(job, data, minutes)
    if result.exit_code == 0:  # failed jobs run again next time
        from segan.io_utils import atomic_write_text  # a job cut short never leaves half a result

        atomic_write_text(done, json.dumps({"request": request, "result": asdict(result)}, indent=1))
    return result


def _run_job(job: Job, data: Path, minutes: float) -> Result:
    log = job.out / "log.txt"
    start = time.monotonic()
    train = segan("train", "-c", job.config, "--out", job.out / "run", "--set", f"data.root={data}",
                  "--set", f"train.max_minutes={minutes}", "--set", "train.threads=1", "--set", f"seed={job.seed}",
                  "--set", "train.progress=false", *[a for s in job.sets for a in ("--set", s)], log=log)
    result = Result(job.name, job.config, job.seed, train.returncode,
                    train_minutes=(time.monotonic() - start) / 60)
    # the summary line reads "FINISHED (stopped: time budget): 40 epochs, ..."
    stops = [line.split("stopped: ", 1)[1].split(")")[0].strip() for line in (train.stdout + train.stderr).splitlines()
             if "stopped: " in line]
    result.stop = stops[-1] if stops else ""
    if train.returncode != 0 or not (job.out / "run" / "best.pt").exists():
        return result
    result.epochs, result.best_epoch, result.val_dice, result.val_regions = _val_from_checkpoint(job.out / "run")
    pred = segan("predict", "-m", job.out / "run", "-i", data / "imagesTs", "-o", job.out / "preds", "--overwrite",
                 log=log)
    ev = segan("evaluate", "-p", job.out / "preds", "-g", data / "labelsTs", "--out", job.out / "metrics.csv",
               log=log)
    if pred.returncode == 0 and ev.returncode == 0:
        result.test_dice, result.test_regions = _test_dice(job.out / "metrics.csv")
    return result


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def markdown(results: list[Result]) -> str:
    def regions(d: dict) -> str:
        return " / ".join(f"{v:.3f}" for v in d.values())

    lines = ["| run | seed | stop | epochs | best epoch | best val Dice (regions) | test Dice (regions) |",
             "|---|---:|---|---:|---:|---|---|"]
    for r in results:
        lines.append(f"| {Path(r.config).stem} | {r.seed} | {r.stop or f'exit {r.exit_code}'} | {r.epochs} | "
                     f"{r.best_epoch} | {r.val_dice:.3f} ({regions(r.val_regions)}) | "
                     f"{r.test_dice:.3f} ({regions(r.test_regions)}) |")
    lines += ["", "| config | runs | val Dice mean ± std | test Dice mean ± std |", "|---|---:|---|---|"]
    for config in dict.fromkeys(r.config for r in results):
        rs = [r for r in results if r.config == config]
        lines.append(f"| {Path(config).stem} | {len(rs)} | {_mean_std([r.val_dice for r in rs])} | "
                     f"{_mean_std([r.test_dice for r in rs])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="MSD folder with imagesTs/labelsTs")
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every run")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [Job(f"{Path(c).stem}-seed{s}", c, s, args.out / f"{Path(c).stem}-seed{s}", list(args.sets))
            for s in seeds for c in args.configs]
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        results = list(pool.map(lambda j: run_job(j, args.data, args.minutes), jobs))
    table = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    return 0 if all(r.exit_code == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
