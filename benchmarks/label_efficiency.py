"""Issue 12's label-efficiency benchmark: few labelled phantoms, the rest unlabelled, same wall clock per run.

For every phantom variant, labelled-case count, method and seed: ``segan train`` with
``--set data.labeled_cases=N`` (the other training images join the unlabelled stream;
the validation cases stay labelled), ``train.max_minutes=M``, ``train.threads=1``, then
``segan predict`` of the best checkpoint on ``imagesTs`` and ``segan evaluate`` against
``labelsTs`` (the protocol of ``benchmarks/compare_configs.py``, whose runner it reuses).
Prints a markdown table of mean ± std test Dice per (variant, method) and labelled count,
writes ``OUT/results.json``, ``OUT/label_efficiency.md`` and ``OUT/label_efficiency_<variant>.png``.

    python benchmarks/label_efficiency.py --out outputs/label_eff --minutes 15 --parallel 2
    # smoke: python benchmarks/label_efficiency.py --out /tmp/le --cases 6 --size 32 --labeled 1 \\
    #     --seeds 0 --minutes 0.05 --methods supervised=configs/supervised_2d.yaml --set train.val_max_cases=1

``--methods NAME=CONFIG[;KEY=VALUE...]`` (repeatable) replaces the default list; extra
``KEY=VALUE`` after ``;`` are ``--set`` for that method only. The default list is
supervised, meanteacher, bce + unlabelled (with the 20-epoch supervised start of the shipped
semi-supervised recipes), advsemi and segan + unlabelled, each with its shipped config.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_configs import Job, Result, _mean_std, run_job  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# bce + unlabelled gets the supervised first half of the shipped semi-supervised recipes
# (configs/advsemi_2d.yaml, configs/segan_semi_2d.yaml): configs/bce_2d.yaml is also the full-label baseline.
DEFAULT_METHODS = ["supervised=configs/supervised_2d.yaml", "meanteacher=configs/meanteacher_2d.yaml",
                   "bce+unlabelled=configs/bce_2d.yaml;method.adv_warmup_epochs=20",
                   "advsemi=configs/advsemi_2d.yaml", "segan+unlabelled=configs/segan_semi_2d.yaml"]


def parse_methods(specs: list[str] | None) -> list[tuple[str, str, list[str]]]:
    """``NAME=CONFIG[;K=V;...]`` -> (name, config, sets); by default :data:`DEFAULT_METHODS`."""
    if not specs:
        return parse_methods([spec.replace("=configs/", f"={REPO}/configs/", 1) for spec in DEFAULT_METHODS])
    out = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        config, *sets = rest.split(";")
        if not sep or not name or not config:
            raise SystemExit(f"error: --methods {spec!r}: expected NAME=CONFIG[;KEY=VALUE...]")
        if not Path(config).is_file():
            raise SystemExit(f"error: --methods {spec!r}: config {config} not found")
        out.append((name, config, [s for s in sets if s]))
    return out


def prepare(out: Path, variant: str, cases: int, size: int) -> Path:
    """The phantoms of ``variant`` (generated once into ``OUT/data-<variant>``)."""
    data = out / f"data-{variant}"
    if not (data / "dataset.json").is_file():
        proc = subprocess.run([sys.executable, "-m", "segan", "prepare", "phantoms", "--out", str(data), "--cases",
                               str(cases), "--size", str(size), "--variant", variant], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: segan prepare phantoms --variant {variant}: {proc.stderr.strip()}")
    return data


def cell(results: list[dict], variant: str, method: str, labeled: int) -> list[dict]:
    """The runs of one (variant, method, labelled count): a table cell, a plot point, a budget note."""
    return [r for r in results if (r["variant"], r["method"], r["labeled"]) == (variant, method, labeled)]


def table(results: list[dict], labeled: list[int]) -> str:
    lines = ["| variant | method | " + " | ".join(f"{n} labelled: test Dice" for n in labeled) + " |",
             "|---|---|" + "---|" * len(labeled)]
    for variant in dict.fromkeys(r["variant"] for r in results):
        for method in dict.fromkeys(r["method"] for r in results):
            cells = []
            for n in labeled:
                rs = cell(results, variant, method, n)
                done = [r["test_dice"] for r in rs if r["exit_code"] == 0]
                cells.append(f"{_mean_std(done)} (n={len([d for d in done if d == d])}/{len(rs)})")
            lines.append(f"| {variant} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unused_budget(results: list[dict], minutes: float, share: float = 0.8) -> list[str]:
    """A line per (variant, method, labelled count) with runs that stopped on their epochs before
    ``share`` of the budget: under one wall clock such a method could have trained longer, so the
    comparison is not budget-matched for it (e.g. the 40-epoch supervised recipe on a CPU)."""
    lines = []
    for key in dict.fromkeys((r["variant"], r["method"], r["labeled"]) for r in results):
        short = [r for r in cell(results, *key)
                 if r["exit_code"] == 0 and r["stop"] == "epochs" and r["train_minutes"] < share * minutes]
        if short:
            used = sorted(r["train_minutes"] for r in short)
            lines.append(f"note: {key[1]} ({key[0]}, {key[2]} labelled): {len(short)} run(s) stopped at their "
                         f"{short[0]['epochs']} epochs after {used[0]:.1f}-{used[-1]:.1f} of {minutes:g} min; "
                         f"the budget is not matched for it: give it more train.epochs to compare under one wall clock")
    return lines


def plot(path: Path, results: list[dict], variant: str) -> None:
    import statistics

    sys.path.insert(0, str(REPO))
    from segan.tracking.plots import save_efficiency_png

    series: dict[str, list] = {}
    for method in dict.fromkeys(r["method"] for r in results):
        points = []
        for n in sorted({r["labeled"] for r in results}):
            vals = [r["test_dice"] for r in cell(results, variant, method, n)
                    if r["exit_code"] == 0 and r["test_dice"] == r["test_dice"]]
            if vals:
                points.append((float(n), statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0,
                               len(vals)))
        if points:
            series[method] = points
    if series:
        save_efficiency_png(path, series, xlabel="labelled training cases", ylabel="test Dice (mean ± std over seeds)",
                            title=f"label efficiency, phantoms ({variant})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None, help="an MSD folder instead of generated phantoms")
    ap.add_argument("--variants", default="default", help="phantom variants, e.g. default,t1_2mm (1 channel)")
    ap.add_argument("--one-channel", action="store_true", help="also the 1-channel variant t1_2mm")
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--labeled", default="2,4")
    ap.add_argument("--methods", action="append", default=None, metavar="NAME=CONFIG[;K=V]")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--minutes", type=float, default=15.0, help="wall clock per run (train.max_minutes)")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every run")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    methods = parse_methods(args.methods)
    labeled = [int(n) for n in args.labeled.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = list(dict.fromkeys(args.variants.split(",") + (["t1_2mm"] if args.one_channel else [])))
    args.out.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[dict, Job, Path]] = []
    # seed-major order: a run cut short still has every method at the first seeds (jobs resume)
    for variant in variants:
        data = args.data if args.data else prepare(args.out, variant, args.cases, args.size)
        for seed in seeds:
            for n in labeled:
                for name, config, sets in methods:
                    tag = f"{variant}-l{n}-{name.replace('+', '_')}-seed{seed}"
                    job = Job(tag, config, seed, args.out / "runs" / tag, [f"data.labeled_cases={n}", *sets,
                                                                           *args.sets])
                    jobs.append(({"variant": variant, "method": name, "labeled": n}, job, data))
    print(f"{len(jobs)} runs of {args.minutes} min, {args.parallel} at a time", file=sys.stderr, flush=True)

    def run(item: tuple[dict, Job, Path]) -> dict:
        info, job, data = item
        result: Result = run_job(job, data, args.minutes)
        print(f"{job.name}: exit {result.exit_code}, test Dice {result.test_dice:.3f}", file=sys.stderr, flush=True)
        return {**info, **asdict(result)}

    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        results = list(pool.map(run, jobs))
    text = "\n".join([table(results, labeled), *unused_budget(results, args.minutes)])
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "label_efficiency.md").write_text(text + "\n")
    for variant in variants:
        plot(args.out / f"label_efficiency_{variant}.png", results, variant)
    print(text)
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
