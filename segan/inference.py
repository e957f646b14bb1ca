"""Batch prediction: scans in, uint8 masks out on each scan's own grid (same shape, same affine).

Per case: load (``data_prep.io.load_image``) -> check channels and non-finite voxels ->
replay the checkpoint's preprocessing (``data_prep.preprocess.Preprocessor``) -> whole-volume
prediction (``segan.predictor.Predictor``, the one implementation also behind
validation and the MLflow pyfunc: 2D slice batches or 3D Gaussian sliding window, optional
flip TTA, bf16 AMP on CUDA) -> probabilities resampled back onto the scan's grid
(bilinear, ``Preprocessor.invert``) -> averaged over the models of ``-m`` (``segan.ensemble``:
one model is an ensemble of one; ``--uncertainty`` maps) -> threshold and post-processing per region
(``segan.postprocess``) -> regions painted back to the data set's label ids
(``segan.regions.regions_to_labels``) -> ``OUTDIR/<case>.nii.gz`` with the input's affine.

Every case is independent: a bad file becomes one ``failed:`` line on stderr and a
``failed`` row in ``OUTDIR/predictions.csv``, and the batch goes on. Outputs are written
atomically and never over an existing file unless ``--overwrite``; ``--continue`` skips
cases whose outputs exist. Under ``torchrun`` (``WORLD_SIZE`` > 1) rank ``r`` takes cases
``r::N``, writes a partial CSV, and rank 0 merges them after a barrier (gloo).

NaN policy: non-finite voxels (NaN, +-inf) are replaced by the minimum finite value of
their channel, the case is predicted, and its CSV message (and a ``warning:`` line) says
how many voxels were replaced; a channel without any finite voxel fails the case.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_prep.io import CHANNEL_FILE, is_nifti, save_nifti, stem
from segan.errors import UserError
from segan.progress import Progress
from segan.ensemble import Ensemble
from segan.predictor import Predictor, resolve_model  # noqa: F401 - re-exported: segan.inference API
from segan.qc import case_qc

CSV_NAME = "predictions.csv"
CSV_COLUMNS = ("case", "inputs", "status", "message", "seconds", "output")
MODEL_INFO_NAME = "model.json"


@dataclass
class PredictOptions:
    """Command-line switches of ``segan predict``; ``None`` means "from the checkpoint's config"."""

    tta: bool = False
    probabilities: bool = False
    device: str = "auto"
    sw_batch: int | None = None
    overlap: float | None = None
    overwrite: bool = False
    resume: bool = False
    report: bool = False  # also write OUTDIR/report.html (segan.report)
    uncertainty: bool = False  # also <case>_unc.nii.gz and unc_* columns (segan.ensemble)


@dataclass
class CaseInput:
    """One case: its name (output stem) and its image files (one 3D/4D file, or one per channel)."""

    name: str
    paths: list[Path]
    problem: str | None = None  # set when the case is known to be unusable before loading

    @property
    def inputs(self) -> str:
        return ";".join(str(p) for p in self.paths)


@dataclass
class CaseResult:
    """One row of ``predictions.csv``."""

    case: str
    inputs: str
    status: str  # ok | failed | skipped
    message: str = ""
    seconds: float = 0.0
    output: str = ""
    # Quality columns after the fixed ones, in insertion order (e.g. ood_score, flags,
    # volume_ml_<region>, unc_mean_<region>): filled by whoever computes them.
    extra: dict[str, str] = field(default_factory=dict)
    # Lines for stderr (``warning: <inputs>: <line>``), not a CSV column: segan.qc's flags.
    warnings: list[str] = field(default_factory=list)

    def row(self) -> dict:
        return {"case": self.case, "inputs": self.inputs, "status": self.status, "message": self.message,
                "seconds": f"{self.seconds:.2f}", "output": self.output, **self.extra}


# ---------------------------------------------------------------- inputs
def _expand(pattern: str) -> list[Path]:
    """A file, a folder (its NIfTI files, not recursive) or a glob -> files; hidden files skipped."""
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith(".")]
        if not files:
            raise UserError(f"{path}: folder holds no .nii/.nii.gz files; pass a folder of scans, a file or a glob")
        return files
    if glob.has_magic(pattern):
        files = [Path(p) for p in glob.glob(os.path.expanduser(pattern))]
        files = [p for p in files if p.is_file() and is_nifti(p) and not p.name.startswith(".")]
        if not files:
            raise UserError(f"{pattern}: no .nii/.nii.gz files match this pattern; check the glob")
        return files
    raise UserError(f"{pattern}: no such file or folder; pass a scan, a folder of scans or a glob")


def find_cases(inputs: list[str]) -> list[CaseInput]:
    """Expand ``-i`` values into cases, sorted by name.

    MSD/nnU-Net channel files ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... in one
    folder become one case ``<case>`` when their indices run 0..n-1 without a gap;
    anything else is one case per file. Two cases with the same name (from different
    folders) would write the same output: the later ones are marked as problems.
    """
    if not inputs:
        raise UserError("no input given; pass -i with a scan, a folder or a glob")
    files: list[Path] = []
    seen: set[Path] = set()
    for pattern in inputs:
        for f in _expand(pattern):
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    groups: dict[tuple[Path, str], dict[int, Path]] = defaultdict(dict)
    cases: list[CaseInput] = []
    for f in files:
        m = CHANNEL_FILE.match(stem(f)) if is_nifti(f) else None
        if m:
            groups[(f.parent.resolve(), m["case"])][int(m["channel"])] = f
        else:
            cases.append(CaseInput(stem(f), [f]))
    for (_, name), by_index in groups.items():
        if sorted(by_index) == list(range(len(by_index))):
            cases.append(CaseInput(name, [by_index[i] for i in range(len(by_index))]))
        else:  # not a channel set (e.g. a lone case_0003): each file is its own case
            cases.extend(CaseInput(stem(f), [f]) for f in by_index.values())
    cases.sort(key=lambda c: (c.name, c.inputs))
    first: dict[str, CaseInput] = {}
    for case in cases:
        if not is_nifti(case.paths[0]):
            case.problem = f"{case.paths[0]}: not a .nii or .nii.gz file; convert it to NIfTI"
        elif case.name in first:
            case.problem = (f"{case.inputs}: case name '{case.name}' also comes from {first[case.name].inputs}; "
                            "predict the two folders into different output folders")
        else:
            first[case.name] = case
    return cases


def check_output_dir(out: Path, cases: list[CaseInput]) -> None:
    """Refuse an output folder that holds input scans (outputs would mix with, or replace, inputs)."""
    target = out.expanduser().resolve()
    for case in cases:
        for p in case.paths:
            if p.resolve().parent == target:
                raise UserError(f"{out}: output folder holds the input {p}; pass a different -o folder "
                                "(inputs are never written to)")
    if target.exists() and not target.is_dir():
        raise UserError(f"{out}: exists and is not a folder; pass a folder for -o")


# ---------------------------------------------------------------- one case
def _replace_nonfinite(image: np.ndarray, where: str) -> tuple[np.ndarray, str]:
    """NaN/inf voxels -> their channel's minimum finite value; returns the image and a note ('' if none)."""
    bad = ~np.isfinite(image)
    count = int(bad.sum())
    if not count:
        return image, ""
    image = image.copy()
    for c in range(image.shape[0]):
        finite = image[c][~bad[c]]
        if finite.size == 0:
            raise UserError(f"{where}: channel {c} holds no finite voxel (all NaN/inf); re-export the scan")
        image[c][bad[c]] = finite.min()
    return image, f"warning: {count} NaN/inf voxels replaced by their channel's minimum"


def predict_case(predictor: Ensemble, case: CaseInput, out: Path, opts: PredictOptions) -> CaseResult:
    """Predict one case into ``out``; never raises for a bad file (the result says what went wrong)."""
    from data_prep.io import load_image

    start = time.perf_counter()
    mask_path = out / f"{case.name}.nii.gz"
    prob_path = out / f"{case.name}_prob.nii.gz"
    unc_path = out / f"{case.name}_unc.nii.gz"
    wanted = [mask_path] + ([prob_path] if opts.probabilities else []) + ([unc_path] if opts.uncertainty else [])
    result = CaseResult(case.name, case.inputs, "ok", output=str(mask_path))
    try:
        if case.problem:
            raise UserError(case.problem)
        existing = [p for p in wanted if p.exists()]
        if opts.resume and len(existing) == len(wanted):
            result.status, result.message = "skipped", "output exists (--continue)"
            return result
        if existing and not opts.overwrite:
            raise UserError(f"{case.inputs}: output {existing[0]} exists; pass --overwrite to replace it "
                            "or --continue to skip finished cases")
        image, affine = load_image(case.paths)
        channels = list(predictor.meta["channels"])
        if image.shape[0] != len(channels):
            raise UserError(f"{case.inputs}: has {image.shape[0]} channel(s); the model expects {len(channels)} "
                            f"({', '.join(channels)}) as one 4D file or {stem(case.paths[0])}_0000.. channel files")
        image, note = _replace_nonfinite(image, case.inputs)
        pred = predictor.predict(image, affine, tta=opts.tta, uncertainty=opts.uncertainty)
        labels, prob = pred.labels, pred.prob
        if opts.probabilities:  # written before the mask: a present mask means a finished case
            save_nifti(prob_path, np.moveaxis(prob, 0, -1), affine, dtype=np.float32)
        if pred.unc is not None:
            from segan.ensemble import uncertainty_summary

            save_nifti(unc_path, np.moveaxis(pred.unc, 0, -1), affine, dtype=np.float32)
            result.extra.update(uncertainty_summary(pred.unc, pred.masks, list(predictor.meta["region_names"])))
        save_nifti(mask_path, labels, affine, dtype=np.uint8)
        result.message = note
        qc_columns, result.warnings = case_qc(predictor.meta, case.name, image, affine, labels, note)
        result.extra.update(qc_columns)
    except UserError as exc:
        result.status, result.message, result.output = "failed", str(exc), ""
    except Exception as exc:  # noqa: BLE001 - one bad case must not end the batch
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result.status, result.output = "failed", ""
        result.message = f"{case.inputs}: prediction failed ({type(exc).__name__}: {first})"
    finally:
        result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------- CSV and ranks
def write_csv(path: Path, results: list[CaseResult]) -> None:
    from segan.io_utils import atomic_write_text

    columns = list(CSV_COLUMNS)
    for r in results:  # the fixed columns, then every extra column any case has (blank where absent)
        columns += [k for k in r.extra if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    for r in results:
        writer.writerow(r.row())
    atomic_write_text(path, buf.getvalue())


def read_csv(path: Path) -> list[CaseResult]:
    with open(path, newline="") as fh:
        return [CaseResult(r["case"], r["inputs"], r["status"], r["message"], float(r["seconds"] or 0), r["output"],
                           extra={k: v for k, v in r.items() if k not in CSV_COLUMNS})
                for r in csv.DictReader(fh)]


def _partial_csv(out: Path, rank: int) -> Path:
    return out / f".predictions.rank{rank}.csv"


def run_predict(model: str | list[str], inputs: list[str], out: Path, opts: PredictOptions,
                tracking_uri: str | None = None) -> int:
    """``segan predict``: exit status 0 if every case is ok or skipped, 1 if any failed.

    ``model``: one ``-m`` value or several (an ensemble, :mod:`segan.ensemble`).

    Usage errors (no model, no input matched, output folder = an input folder) raise
    :class:`UserError` (exit 2) before anything is written.
    """
    from segan.io_utils import atomic_write_text
    from segan.runtime import resolve_device

    if opts.overwrite and opts.resume:
        raise UserError("--overwrite and --continue exclude each other; pass one of them")
    out = Path(out)
    cases = find_cases(list(inputs))
    check_output_dir(out, cases)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    models = [model] if isinstance(model, str) else list(model)
    device = resolve_device(opts.device, int(os.environ.get("LOCAL_RANK", "0")))
    predictor = Ensemble.load(models, device, sw_batch=opts.sw_batch, overlap=opts.overlap, tracking_uri=tracking_uri)
    out.mkdir(parents=True, exist_ok=True)

    dist = None
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")  # only a barrier and one sum: gloo works on CPU and GPU hosts
    if rank == 0:
        atomic_write_text(out / MODEL_INFO_NAME, predictor.info(
            models, predictor.uncertainty_kind(opts.tta) if opts.uncertainty else None))

    mine = cases[rank::world]
    results: list[CaseResult] = []
    # A bar with ETA on a terminal; one line per case when stderr is a file or a pipe.
    with Progress(len(mine), "predict", "case", enabled=rank == 0, leave=True) as bar:
        for case in mine:
            result = predict_case(predictor, case, out, opts)
            results.append(result)
            if result.status == "failed":
                bar.write(f"failed: {result.message}")
            elif result.message.startswith("warning:"):
                bar.write(f"warning: {case.inputs}: {result.message[len('warning: '):]}")
            for line in result.warnings:
                bar.write(f"warning: {case.inputs}: {line}")
            bar.done(f"{result.case} {result.status}", seconds=result.seconds)

    failed = sum(r.status == "failed" for r in results)
    if dist is None:
        write_csv(out / CSV_NAME, results)
    else:
        write_csv(_partial_csv(out, rank), results)
        total = torch.tensor([failed], dtype=torch.int64)
        dist.all_reduce(total)  # also the barrier: every partial CSV is on disk after this
        failed = int(total.item())
        if rank == 0:
            merged = [r for k in range(world) for r in read_csv(_partial_csv(out, k))]
            order = {c.inputs: i for i, c in enumerate(cases)}
            merged.sort(key=lambda r: order.get(r.inputs, len(order)))
            write_csv(out / CSV_NAME, merged)
            for k in range(world):
                _partial_csv(out, k).unlink(missing_ok=True)
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        counts = {s: 0 for s in ("ok", "skipped", "failed")}
        for r in read_csv(out / CSV_NAME):
            counts[r.status] = counts.get(r.status, 0) + 1
        print(f"{counts['ok']} predicted, {counts['skipped']} skipped, {counts['failed']} failed "
              f"-> {out / CSV_NAME}")
        if opts.report:
            from segan.report import write_predictions_report

            print(f"QC report -> {write_predictions_report(out)}")
    return 1 if failed else 0
