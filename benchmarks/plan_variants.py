"""Planned configs vs the plain baseline on every phantom variant: test Dice, mean ± std over seeds.

For each variant: ``segan prepare phantoms --variant V`` (once), ``segan plan`` for each
method with the same ``--minutes`` budget (once), then per seed ``segan train -c PLAN``
(``benchmarks/compare_configs.py``'s protocol: ``train.max_minutes``, one thread, the
seed; ``segan predict`` of the best checkpoint on ``imagesTs``, ``segan evaluate``) and
``benchmarks/plain_unet.py`` with the same budget, seed and threads. Prints a markdown
table (variant x method, test Dice mean ± std, runs, epochs) and writes
``OUT/results.json`` / ``OUT/results.md``.

Resumable: every finished job leaves ``OUT/<variant>/<method>-seed<S>/result.json`` and
is skipped on the next call (``--fresh`` reruns). Smoke test (a couple of minutes)::

    python benchmarks/plan_variants.py --out outputs/plan_variants_smoke --minutes 0.2 --seeds 0 \\
        --variants default --cases 8 --size 32

The long version (the README's table; hours on 2 cores)::

    python benchmarks/plan_variants.py --out outputs/plan_variants --minutes 4 --seeds 0,1,2 --parallel 2

An *arm* is a planned method with ``--set`` overrides on top of its plan, compared in the
same run (``--arm`` is repeatable; name the arm in ``--methods``)::

    python benchmarks/plan_variants.py --out OUT --methods supervised,segan,segan_adaptive \
        --arm "segan_adaptive=segan;method.adv_balance=adaptive;method.adv_start=settled"
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
from compare_configs import Job, Result, _mean_std, run_job, segan  # noqa: E402

VARIANTS = ("default", "t1_2mm", "aniso_1x1x4", "ct_lps_int16", "small_lesions")
METHODS = ("supervised", "segan", "bce")
PLAIN = "plain_unet"


def prepare(out: Path, variant: str, cases: int, size: int) -> Path:
    """The variant's phantoms under ``OUT/data/<variant>`` (generated once, seed 0)."""
    data = out / "data" / variant
    if not (data / "dataset.json").is_file():
        proc = segan("prepare", "phantoms", "--out", data, "--variant", variant, "--cases", cases, "--size", size)
        if proc.returncode != 0:
            raise SystemExit(f"error: phantoms for {variant}: {proc.stderr.strip()}")
    return data


def plan(out: Path, data: Path, variant: str, method: str, minutes: float) -> Path:
    """``segan plan`` of the variant for ``method`` and the budget (written once)."""
    path = out / "plans" / f"{variant}-{method}.yaml"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = segan("plan", data, "--method", method, "--minutes", minutes, "-o", path)
        if proc.returncode != 0:
            raise SystemExit(f"error: plan {variant}/{method}: {proc.stderr.strip()}")
    return path


def run_plain(job_dir: Path, data: Path, seed: int, minutes: float) -> Result:
    job_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).with_name("plain_unet.py")), str(data), "--out", str(job_dir / "run"),
           "--minutes", str(minutes), "--seed", str(seed), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (job_dir / "log.txt").write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    result = Result(f"{PLAIN}-seed{seed}", PLAIN, seed, proc.returncode, stop="time budget")
    res_file = job_dir / "run" / "result.json"
    if proc.returncode == 0 and res_file.is_file():
        r = json.loads(res_file.read_text())
        result.val_dice = float(r.get("best_val_dice", float("nan")))
        result.test_dice = float(r.get("test_dice_mean", float("nan")))
        result.test_regions = dict(r.get("test_dice", {}))
        result.train_minutes = float(r.get("wall_seconds", 0.0)) / 60
        result.epochs = int(r.get("steps", 0))   # steps, not epochs: the plain script has none
    return result


def parse_arms(specs: list[str]) -> dict[str, tuple[str, list[str]]]:
    """``NAME=METHOD;KEY=VALUE;...`` -> {NAME: (METHOD, [KEY=VALUE, ...])}."""
    arms = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        method, *sets = [part for part in rest.split(";") if part]
        arms[name.strip()] = (method.strip(), [s.strip() for s in sets])
    return arms


def run_one(out: Path, variant: str, method: str, seed: int, minutes: float, cases: int, size: int,
            fresh: bool, arms: dict[str, tuple[str, list[str]]] | None = None) -> dict:
    job_dir = out / variant / f"{method}-seed{seed}"
    done = job_dir / "result.json"
    if done.is_file() and not fresh:
        return json.loads(done.read_text())
    data = prepare(out, variant, cases, size)
    if method == PLAIN:
        result = run_plain(job_dir, data, seed, minutes)
    else:
        base, sets = (arms or {}).get(method, (method, []))
        config = plan(out, data, variant, base, minutes)
        store = f"tracking.uri=sqlite:///{(out / 'mlflow.db').resolve()}"   # not ./mlflow_runs of the cwd
        result = run_job(Job(f"{method}-seed{seed}", str(config), seed, job_dir, [store, *sets]), data, minutes)
        result.config = method
    row = {"variant": variant, "method": method, **asdict(result)}
    if result.exit_code == 0:   # a failed job runs again next time
        done.write_text(json.dumps(row, indent=1) + "\n")
    return row


def markdown(rows: list[dict], variants: list[str], methods: list[str]) -> str:
    lines = ["| variant | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for v in variants:
        cells = []
        for m in methods:
            rs = [r for r in rows if r["variant"] == v and r["method"] == m]
            failed = sum(r["exit_code"] != 0 for r in rs)
            cell = f"{_mean_std([r['test_dice'] for r in rs])} (n={len(rs) - failed})"
            cells.append(cell + (f", {failed} failed" if failed else ""))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--methods", default=",".join((*METHODS, PLAIN)), help="segan methods and/or plain_unet")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--minutes", type=float, default=4.0, help="wall-clock training budget of every run")
    ap.add_argument("--cases", type=int, default=24, help="phantom cases per variant")
    ap.add_argument("--size", type=int, default=96, help="phantom field of view (mm)")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="rerun finished jobs too")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=METHOD;KEY=VALUE;...",
                    help="a planned METHOD with --set overrides, run as NAME (name it in --methods)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    variants = [v for v in args.variants.split(",") if v]
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    arms = parse_arms(args.arm)
    for v in variants:   # data and plans first, in order (cheap; keeps parallel jobs from racing on them)
        data = prepare(args.out, v, args.cases, args.size)
        for m in methods:
            if m != PLAIN:
                plan(args.out, data, v, arms.get(m, (m, []))[0], args.minutes)
    jobs = [(v, m, s) for v in variants for s in seeds for m in methods]
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        rows = list(pool.map(lambda j: run_one(args.out, *j, args.minutes, args.cases, args.size, args.fresh, arms),
                             jobs))
    table = markdown(rows, variants, methods)
    head = (f"test Dice (mean ± std over seeds {args.seeds}), {args.minutes:g} min per run, one thread, "
            f"{args.cases} cases of {args.size} mm per variant")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "results.md").write_text(f"{head}\n\n{table}\n")
    print(f"{head}\n\n{table}")
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
