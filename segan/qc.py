"""Quality checks of predicted cases: an out-of-distribution score and sanity flags.

Training side (:func:`train_fingerprint`, called once when the first checkpoint is
saved): the data-set fingerprint of exactly the training and validation cases
(:func:`data_prep.fingerprint.fingerprint_of_cases`, cached, the same statistics as
``segan prepare fingerprint``), restricted to the model's channels, plus

- ``regions``: each output region's volume in mL over the training cases (min, smallest
  non-zero, median, max), for the ``tiny_mask`` / ``huge_mask`` flags;
- ``ood``: the reference of every score feature (median and robust scale over the
  training cases), each training/validation case's own score and the threshold
  ``max(OOD_MARGIN * max(own scores), OOD_MIN_THRESHOLD)``: by construction no case the
  model was trained or validated on is flagged.

It is stored as ``meta["train_fingerprint"]`` of the checkpoint (JSON-like values only).

OOD score of a case: the largest robust z, ``|value - median| / scale`` with ``scale =
max(1.4826 * MAD, floor)``, over features that do not depend on the model's prediction
(a poorly trained model must not make its own cases look foreign):

- ``spacing_x|y|z``: log voxel size along the RAS axes (floor ``log 1.25``);
- ``body_fraction``: log share of the field of view inside the body mask (floor ``log 1.25``);
- ``<channel> body pQ`` for Q in 0.5, 5, 50, 95, 99.5: raw intensity percentiles inside
  the body mask (floor 5 % of the training p5-p95 range);
- ``<channel> body pQ normalised``: the same percentiles as ``(pQ - mean) / std`` of the
  body, i.e. the histogram's shape whatever the scanner's scaling (floor 0.1);
- ``<channel> outside training range``: share of the scan's voxels below the training
  minimum or above the training maximum of the channel (0 for every training case;
  scale 0.01, so z = percent of voxels).

Prediction side (:func:`case_qc`): ``predictions.csv`` columns ``ood_score``,
``ood_threshold``, ``ood_feature`` (the feature that gave the score, with its z; only with
a fingerprint), ``flags`` and ``volume_ml_<region>``, and one warning per flag.
"""

from __future__ import annotations

import math
import sys

import numpy as np

QC_VERSION = 1
PERCENTILE_KEYS = ("p0.5", "p5", "p50", "p95", "p99.5")
OOD_MARGIN = 1.5              # threshold = margin x the largest score of the model's own cases ...
OOD_MIN_THRESHOLD = 3.0       # ... and at least this (robust z units)
LOG_FLOOR = math.log(1.25)    # spacing, body fraction: a 25 % change is one unit at least
SHAPE_FLOOR = 0.1             # normalised percentiles (units of the body's std)
INTENSITY_FLOOR = 0.05        # x the training p5-p95 range of the channel
OUTSIDE_SCALE = 0.01          # share of voxels outside the training range: 1 % = one unit
VOLUME_MARGIN = 2.0           # tiny: < smallest training volume / 2; huge: > largest x 2
RESAMPLE_FACTOR = 2.0         # heavily_resampled: spacing / target spacing > 2 (or < 1/2) on an axis
FLAGS = ("out_of_distribution", "empty_mask", "tiny_mask", "huge_mask", "nan_replaced", "heavily_resampled")
AXES = ("x", "y", "z")


# ---------------------------------------------------------------- features
def _features(row: dict, channel_names: list[str], outside: list[float] | None = None) -> dict[str, float]:
    """Score features of one fingerprint row (see the module docstring); ``outside``: per
    channel share of voxels outside the training range (0 for training rows)."""
    feats = {f"spacing_{a}": math.log(s) for a, s in zip(AXES, row["spacing_ras"])}
    feats["body_fraction"] = math.log(max(float(row["body_fraction"]), 1e-6))
    for c, (name, ch) in enumerate(zip(channel_names, row["channels"])):
        body = ch["body"]
        if not body:
            continue
        for q in PERCENTILE_KEYS:
            feats[f"{name} body {q}"] = float(body[q])
        std = float(body["std"])
        for q in PERCENTILE_KEYS:
            feats[f"{name} body {q} normalised"] = (float(body[q]) - float(body["mean"])) / std if std > 0 else 0.0
        feats[f"{name} outside training range"] = float(outside[c]) if outside else 0.0
    return feats


def _floor(name: str, medians: dict[str, float]) -> float:
    if name.startswith("spacing_") or name == "body_fraction":
        return LOG_FLOOR
    if name.endswith(" normalised"):
        return SHAPE_FLOOR
    channel = name.rsplit(" body ", 1)[0]
    spread = medians.get(f"{channel} body p95", 0.0) - medians.get(f"{channel} body p5", 0.0)
    return max(INTENSITY_FLOOR * spread, 1e-6)


def _reference(rows_feats: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per feature ``{"median", "scale"}`` over the training cases."""
    names = [n for n in rows_feats[0] if all(n in f for f in rows_feats)]
    medians = {n: float(np.median([f[n] for f in rows_feats])) for n in names}
    ref = {}
    for n in names:
        if n.endswith(" outside training range"):
            ref[n] = {"median": 0.0, "scale": OUTSIDE_SCALE}
            continue
        mad = float(np.median([abs(f[n] - medians[n]) for f in rows_feats]))
        ref[n] = {"median": medians[n], "scale": max(1.4826 * mad, _floor(n, medians))}
    return ref


def ood_score(feats: dict[str, float], reference: dict[str, dict[str, float]]) -> tuple[float, str, float]:
    """``(score, feature, signed z)``: the largest ``|z|`` over the features both sides know."""
    best, best_name, best_z = 0.0, "", 0.0
    for name, ref in reference.items():
        if name in feats:
            z = (feats[name] - ref["median"]) / ref["scale"]
            if abs(z) > best:
                best, best_name, best_z = abs(z), name, z
    return best, best_name, best_z


# ---------------------------------------------------------------- training side
def _region_volumes(rows: list[dict], region_labels: list[list[int]]) -> list[list[float]]:
    """Per training case, each region's volume in mL (labels are disjoint: a region's volume is
    the sum of its labels')."""
    return [[sum(float(r["labels"].get(str(i), {}).get("volume_ml", 0.0)) for i in ids) for ids in region_labels]
            for r in rows]


def build_train_qc(fp: dict, channel_indices: list[int] | None, region_names: list[str],
                   region_labels: list[list[int]]) -> dict:
    """The checkpoint's ``train_fingerprint`` from a data-set fingerprint with per-case rows."""
    rows = [dict(r) for r in fp["cases"]]
    channels = list(fp["channels"])
    if channel_indices is not None:  # the model reads a subset of the data set's channels
        channels = [channels[i] for i in channel_indices]
        for r in rows:
            r["channels"] = [r["channels"][i] for i in channel_indices]
    names = [ch["name"] for ch in channels]
    feats = [_features(r, names) for r in rows]
    reference = _reference(feats)
    own = {r["case"]: round(ood_score(f, reference)[0], 4) for r, f in zip(rows, feats)}
    threshold = max(OOD_MARGIN * max(own.values()), OOD_MIN_THRESHOLD)
    volumes = np.asarray(_region_volumes(rows, region_labels), dtype=float)  # (cases, regions)
    regions = {}
    for k, name in enumerate(region_names):
        v = volumes[:, k]
        present = v[v > 0]
        regions[name] = {"cases_present": int(present.size),
                         "volume_ml": {"min": float(v.min()), "min_present": float(present.min()) if present.size
                                       else 0.0, "median": float(np.median(v)), "max": float(v.max())}}
    fg = [float(r["foreground_fraction"]) for r in rows]
    return {"version": QC_VERSION, "fingerprint_version": fp["version"], "name": fp["name"], "n_cases": len(rows),
            "modality": fp["modality"], "channels": channels, "labels": fp["labels"], "summary": fp["summary"],
            "foreground_fraction": {"min": min(fg), "median": float(np.median(fg)), "max": max(fg)},
            "regions": regions,
            "ood": {"features": reference, "threshold": float(threshold), "margin": OOD_MARGIN,
                    "min_threshold": OOD_MIN_THRESHOLD, "own_scores": own}}


def train_fingerprint(data, cache_dir=None) -> dict | None:
    """``meta["train_fingerprint"]`` of a :class:`segan.data.DataBundle`'s labelled training and
    validation cases; None for synthetic data (no files) or when it cannot be computed
    (one ``warning:`` line: the checkpoint is still written, prediction runs without OOD)."""
    from data_prep.fingerprint import fingerprint_of_cases

    cases = [c for c in getattr(data, "source_cases", []) if c.label]
    if not cases:
        return None
    try:
        d = data.datalist
        channel_names = list(d.get("channel_names") or [])
        if isinstance(d.get("channel_names"), dict):
            channel_names = [d["channel_names"][k] for k in sorted(d["channel_names"], key=int)]
        fp = fingerprint_of_cases(data.dataset_name, str(d.get("root", "")), channel_names, data.label_names,
                                  cases, cache_dir)
        return build_train_qc(fp, data.preprocess_spec.get("channels"), data.region_names, data.region_labels)
    except Exception as exc:  # noqa: BLE001 - a missing fingerprint must not lose the checkpoint
        print(f"warning: training-data fingerprint not computed ({type(exc).__name__}: {exc}); "
              "predictions of this model get no ood_score", file=sys.stderr)
        return None


# ---------------------------------------------------------------- prediction side
def _spacing_ras(affine: np.ndarray) -> list[float]:
    import nibabel as nib

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    out = [0.0] * 3
    for axis, target in enumerate(nib.orientations.io_orientation(affine)[:, 0].astype(int)):
        out[target] = float(spacing[axis])
    return out


def _outside(image: np.ndarray, channels: list[dict]) -> list[float]:
    step = max(1, image[0].size // 2_000_000)
    return [float(np.mean((ch.ravel()[::step] < ref["min"]) | (ch.ravel()[::step] > ref["max"])))
            for ch, ref in zip(image, channels)]


def _ood(meta: dict, name: str, image: np.ndarray, affine: np.ndarray, labels: np.ndarray,
         tf: dict) -> tuple[float, float, str, float]:
    from data_prep.fingerprint import case_statistics

    spec_channels = meta.get("preprocess", {}).get("channels")
    if spec_channels is not None and max(spec_channels) < image.shape[0]:
        image = image[spec_channels]  # what the Preprocessor feeds the model
    row, _ = case_statistics(name, image, affine, labels, [0])
    feats = _features(row, [ch["name"] for ch in tf["channels"]], _outside(image, tf["channels"]))
    score, feature, z = ood_score(feats, tf["ood"]["features"])
    return score, float(tf["ood"]["threshold"]), feature, z


def case_qc(meta: dict, name: str, image: np.ndarray, affine: np.ndarray, labels: np.ndarray,
            nan_note: str = "") -> tuple[dict[str, str], list[str]]:
    """Quality columns and warnings of one predicted case.

    Args:
        meta: the checkpoint's meta; ``train_fingerprint`` is optional (older checkpoints:
            no ``ood_*`` columns, the flags that need no fingerprint).
        name: the case name (seeds the intensity sampling as the fingerprint does).
        image: ``(C, X, Y, Z)`` raw intensities as predicted (non-finite voxels replaced).
        affine: ``(4, 4)``; labels: ``(X, Y, Z)`` the predicted label map on the scan's grid.
        nan_note: the NaN replacement note of :mod:`segan.inference` ('' when none).

    Returns:
        ``(columns, warnings)``: ``ood_score``, ``ood_threshold``, ``ood_feature``, ``flags``
        (``;``-separated, from :data:`FLAGS`), ``volume_ml_<region>``; one line per flag
        (``nan_replaced`` has its own warning already: ``nan_note``).
    """
    try:
        return _case_qc(meta, name, image, affine, labels, nan_note)
    except Exception as exc:  # noqa: BLE001 - the mask is written; a QC bug must not fail the case
        return {"flags": ""}, [f"quality checks failed ({type(exc).__name__}: {exc})"]


def _case_qc(meta, name, image, affine, labels, nan_note):
    from segan.regions import labels_to_regions

    tf = meta.get("train_fingerprint") or None
    flags: dict[str, str] = {}
    cols: dict[str, str] = {}
    if tf and tf.get("ood"):
        score, threshold, feature, z = _ood(meta, name, image, affine, labels, tf)
        cols.update(ood_score=f"{score:.2f}", ood_threshold=f"{threshold:.2f}",
                    ood_feature=f"{feature} (z {z:+.1f})" if feature else "")
        if score > threshold:
            flags["out_of_distribution"] = (f"ood score {score:.1f} > threshold {threshold:.1f} (largest: "
                                            f"{feature}, robust z {z:+.1f} against the training cases)")
    voxel_ml = float(np.prod(np.linalg.norm(affine[:3, :3], axis=0))) / 1000.0
    regions = labels_to_regions(labels, meta["region_labels"])  # (K, X, Y, Z)
    volumes = {r: float(regions[k].sum()) * voxel_ml for k, r in enumerate(meta["region_names"])}
    if not labels.any():
        flags["empty_mask"] = "the predicted mask is empty (no region voxel)"
    ranges = (tf or {}).get("regions") or {}
    tiny, huge = [], []
    for region, v in volumes.items():
        ref = ranges.get(region, {}).get("volume_ml")
        if not ref:
            continue
        if 0 < v < ref["min_present"] / VOLUME_MARGIN:
            tiny.append(f"{region} {v:.3g} mL < {ref['min_present']:.3g} / {VOLUME_MARGIN:g}")
        if ref["max"] > 0 and v > ref["max"] * VOLUME_MARGIN:
            huge.append(f"{region} {v:.3g} mL > {ref['max']:.3g} x {VOLUME_MARGIN:g}")
    if tiny:
        flags["tiny_mask"] = "smaller than any training case: " + ", ".join(tiny)
    if huge:
        flags["huge_mask"] = "larger than any training case: " + ", ".join(huge)
    if nan_note:
        flags["nan_replaced"] = ""
    target = meta.get("preprocess", {}).get("spacing")
    if target:
        spacing = _spacing_ras(affine)
        far = [f"{a} {s:.3g} mm vs {t:.3g}" for a, s, t in zip(AXES, spacing, target)
               if max(s / t, t / s) > RESAMPLE_FACTOR]
        if far:
            flags["heavily_resampled"] = (f"spacing more than {RESAMPLE_FACTOR:g}x from the training target "
                                          f"spacing on {', '.join(far)}")
    ordered = [f for f in FLAGS if f in flags]
    cols["flags"] = ";".join(ordered)
    cols.update({f"volume_ml_{r}": f"{v:.3f}" for r, v in volumes.items()})
    return cols, [f"{f}: {flags[f]}" for f in ordered if flags[f]]
