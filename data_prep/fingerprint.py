"""Fingerprint of a data set's labelled training cases: what planning needs to know about the data.

Per case: shape, voxel spacing and orientation code (also reordered to RAS axes, the
order preprocessing works in); per channel, intensity percentiles (0.5, 5, 50, 95,
99.5), mean and std over the foreground (label > 0, as nnU-Net) and over the body mask
(:func:`data_prep.masks.foreground_mask`, as preprocessing uses); per label, volume in mL and the number
of connected components (26-connectivity, as :mod:`segan.postprocess`). Over the data
set: median shape and spacing, 10th-percentile spacing per axis, anisotropy (largest /
smallest median spacing), pooled intensity statistics, and each channel's modality
(``CT`` when ``dataset.json`` names it so or its intensities look like Hounsfield units:
air near -1000, many voxels below -500; ``MR`` for MR contrast names; else ``other``).

The result is a JSON-able dict, cached as a file keyed by the version, the sampling
settings and every file's path, size and mtime: a second call on unchanged data costs
one ``stat`` per file. The cache sits beside a data list (``LIST.fingerprint.json``)
or, for a data-set folder, in ``$SEGAN_CACHE/fingerprints/``.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segan.errors import UserError

FINGERPRINT_VERSION = 1
PERCENTILES = (0.5, 5.0, 50.0, 95.0, 99.5)
SAMPLES_PER_CASE = 20_000        # intensity samples per case and mask (nnU-Net: 10 000 foreground voxels)
MASK_MAX_VOXELS = 8_000_000      # body mask on a strided copy above this (a 512^2 x 300 CT)
CT_NAMES = ("ct",)
MR_NAME_PREFIXES = ("t1", "t2", "flair", "fla", "pd", "dwi", "adc", "swi", "mr", "dce", "perf", "cbv")
AIR_HU = (-1100.0, -900.0)


@dataclass
class _Case:
    name: str
    images: list[str]
    label: str


def _stats(values: np.ndarray) -> dict[str, float]:
    """Percentiles ``p0.5`` ... ``p99.5``, ``mean`` and ``std`` of a 1D sample."""
    if values.size == 0:
        return {}
    values = values.astype(np.float64)
    out = {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}
    out.update(mean=float(values.mean()), std=float(values.std()))
    return out


def _sample(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if values.size <= SAMPLES_PER_CASE:
        return values
    return values[np.sort(rng.choice(values.size, SAMPLES_PER_CASE, replace=False))]


def _body_mask(image: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Body mask (on a strided grid for very large scans) and the matching voxel stride."""
    from data_prep.masks import foreground_mask

    step = int(np.ceil((np.prod(image.shape[1:]) / MASK_MAX_VOXELS) ** (1 / 3)))
    strided = (slice(None, None, step),) * 3
    return foreground_mask(np.ascontiguousarray(image[(slice(None), *strided)])), strided


def _components(mask: np.ndarray) -> int:
    """Connected components of a 3D mask (26-connectivity), counted inside its bounding box."""
    from scipy import ndimage

    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box:
        return 0
    return int(ndimage.label(mask[box[0]], structure=np.ones((3, 3, 3), dtype=bool))[1])


def _case_fingerprint(case: _Case, label_ids: list[int]) -> tuple[dict, list[dict[str, np.ndarray]]]:
    """One case's JSON row and its intensity samples per channel (``fg``, ``body``)."""
    from data_prep.io import ScanError, load_image, load_label

    image, affine = load_image(case.images)              # (C, X, Y, Z), scaling applied
    label, label_affine = load_label(case.label)
    if label.shape != image.shape[1:]:
        raise ScanError(f"{case.label}: label shape {label.shape} differs from the image shape "
                        f"{image.shape[1:]}; run `segan prepare check` on the data set")
    return case_statistics(case.name, image, affine, label, label_ids)


def case_statistics(name: str, image: np.ndarray, affine: np.ndarray, label: np.ndarray,
                    label_ids: list[int]) -> tuple[dict, list[dict[str, np.ndarray]]]:
    """The fingerprint row of one case held in memory, and its intensity samples per channel.

    Args:
        name: the case name; it seeds the intensity sampling (the same case gives the same row).
        image: ``(C, X, Y, Z)`` raw intensities (scaling applied, before any normalisation).
        affine: the ``(4, 4)`` voxel-to-world matrix.
        label: ``(X, Y, Z)`` integer label map on the image's grid (a prediction works too:
            :mod:`segan.qc` describes predicted cases with this function).
        label_ids: ``[0, id1, id2, ...]``; 0 stands for the whole foreground (label > 0).
    """
    import nibabel as nib

    rng = np.random.default_rng(zlib.crc32(name.encode()))
    spacing = np.round(np.linalg.norm(affine[:3, :3], axis=0), 5)   # float32 headers: 0.69999999 -> 0.7
    ras_axis = nib.orientations.io_orientation(affine)[:, 0].astype(int)   # RAS axis of each array axis
    shape_ras, spacing_ras = [0] * 3, [0.0] * 3
    for axis, target in enumerate(ras_axis):
        shape_ras[target], spacing_ras[target] = int(image.shape[1 + axis]), float(spacing[axis])
    fg = label > 0
    body, strided = _body_mask(image)
    step = max(1, image[0].size // 1_000_000)
    channels, samples = [], []
    for channel in image:
        fg_values = _sample(channel[fg], rng)
        body_values = _sample(channel[strided][body], rng)
        all_values = channel.ravel()[::step]
        channels.append({"foreground": _stats(fg_values), "body": _stats(body_values),
                         "min": float(channel.min()), "max": float(channel.max()),
                         "fraction_below_-500": float(np.mean(all_values < -500)),
                         "fraction_air_hu": float(np.mean((all_values >= AIR_HU[0]) & (all_values <= AIR_HU[1])))})
        samples.append({"fg": fg_values, "body": body_values})
    voxel_ml = float(np.prod(spacing)) / 1000.0
    present = set(np.unique(label).tolist()) - {0}
    labels = {}
    for lid in label_ids:
        if lid > 0 and present == {lid}:      # the only label: its mask is the foreground's
            labels[str(lid)] = dict(labels["foreground"])
            continue
        mask = label == lid if lid > 0 else fg
        labels[str(lid) if lid > 0 else "foreground"] = {"volume_ml": int(mask.sum()) * voxel_ml,
                                                          "components": _components(mask)}
    row = {"case": name, "shape": [int(s) for s in image.shape[1:]], "spacing": [float(s) for s in spacing],
           "orientation": "".join(nib.aff2axcodes(affine)), "shape_ras": shape_ras, "spacing_ras": spacing_ras,
           "channels": channels, "labels": labels, "foreground_fraction": float(fg.mean()),
           "body_fraction": float(body.mean())}
    return row, samples


def _modality(name: str, channel_rows: list[dict]) -> tuple[str, str]:
    """``(CT | MR | other, why)``: the channel's name in ``dataset.json`` (CT, or an MR
    contrast), else CT if the intensities look like Hounsfield units (air near -1000,
    many voxels below -500)."""
    key = name.strip().lower()
    if key in CT_NAMES:
        return "CT", "dataset.json"
    if key.startswith(MR_NAME_PREFIXES):
        return "MR", "dataset.json"
    below = np.median([c["fraction_below_-500"] for c in channel_rows])
    air = np.median([c["fraction_air_hu"] for c in channel_rows])
    if below >= 0.05 and air >= 0.02:
        return "CT", "HU-like intensities"
    return "other", "default"


def _summary(rows: list[dict]) -> dict:
    shapes = np.array([r["shape_ras"] for r in rows], dtype=float)
    spacings = np.array([r["spacing_ras"] for r in rows], dtype=float)
    median_spacing = np.median(spacings, axis=0)
    orientations: dict[str, int] = {}
    for r in rows:
        orientations[r["orientation"]] = orientations.get(r["orientation"], 0) + 1
    return {"axes": "RAS",
            "median_shape": [float(v) for v in np.median(shapes, axis=0)],
            "median_spacing": [float(v) for v in median_spacing],
            "spacing_p10": [float(v) for v in np.percentile(spacings, 10, axis=0)],
            "median_size_mm": [float(v) for v in np.median(shapes * spacings, axis=0)],
            "anisotropy": float(median_spacing.max() / median_spacing.min()),
            "orientations": orientations}


def compute_fingerprint(name: str, root: str, channel_names: list[str], label_names: dict[int, str],
                        cases: list[_Case]) -> dict:
    """The fingerprint of ``cases`` (every file read once); see the module docstring."""
    if not cases:
        raise UserError(f"{root}: no labelled training cases; a fingerprint needs images with labels "
                        "(imagesTr/ and labelsTr/)")
    label_ids = [0] + sorted(k for k in label_names if k > 0)     # 0 stands for the whole foreground
    rows, pooled = [], []
    for case in cases:
        row, samples = _case_fingerprint(case, label_ids)
        if rows and len(row["channels"]) != len(rows[0]["channels"]):
            raise UserError(f"{case.images[0]}: case {case.name} has {len(row['channels'])} channel(s) but "
                            f"{rows[0]['case']} has {len(rows[0]['channels'])}; give every case the same channels")
        rows.append(row)
        pooled.append(samples)
    names = list(channel_names) if len(channel_names) == len(rows[0]["channels"]) else \
        [f"channel_{i}" for i in range(len(rows[0]["channels"]))]
    channels = []
    for c, cname in enumerate(names):
        per_case = [r["channels"][c] for r in rows]
        modality, reason = _modality(cname, per_case)
        channels.append({
            "name": cname, "modality": modality, "modality_source": reason,
            "foreground": _stats(np.concatenate([p[c]["fg"] for p in pooled])),
            "body": _stats(np.concatenate([p[c]["body"] for p in pooled])),
            "min": float(min(x["min"] for x in per_case)), "max": float(max(x["max"] for x in per_case))})
    labels = {}
    for key in ["foreground"] + [str(k) for k in label_ids[1:]]:
        volumes = [r["labels"][key]["volume_ml"] for r in rows]
        components = [r["labels"][key]["components"] for r in rows]
        labels[key] = {"name": "foreground" if key == "foreground" else label_names[int(key)],
                       "cases_present": int(sum(v > 0 for v in volumes)),
                       "volume_ml": {"median": float(np.median(volumes)), "min": float(min(volumes)),
                                     "max": float(max(volumes))},
                       "components": {"median": float(np.median(components)), "max": int(max(components))}}
    modalities = {ch["modality"] for ch in channels}
    return {"version": FINGERPRINT_VERSION, "name": name, "root": root, "n_cases": len(rows),
            "modality": modalities.pop() if len(modalities) == 1 else "mixed", "channels": channels,
            "labels": labels, "summary": _summary(rows), "cases": rows}


# ----------------------------------------------------------------------- sources and cache
def _source(path: Path) -> tuple[str, str, list[str], dict[int, str], list[_Case], Path]:
    """(name, root, channel names, labels, labelled training cases, default cache file) of a
    data-set folder or of a data list written by ``segan prepare check --datalist``."""
    if path.is_file() and path.suffix == ".json" and path.name != "dataset.json":
        try:
            listing = json.loads(path.read_text())
            entries = list(listing["training"]) + list(listing.get("validation", []))
            cases = [_Case(e["case"], list(e["image"]), e["label"]) for e in entries if e.get("label")]
            labels = {int(k): str(v) for k, v in listing["labels"].items()}
            channel_names = list(listing["channel_names"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path}: not a data list from `segan prepare check --datalist`; give that file "
                            "or the data-set folder") from None
        return (str(listing.get("name", path.stem)), str(listing.get("root", path.parent)), channel_names, labels,
                sorted(cases, key=lambda c: c.name), path.with_name(path.stem + ".fingerprint.json"))
    from data_prep.cache import default_cache_dir
    from data_prep.msd import load_dataset

    info = load_dataset(path)
    cases = [_Case(c.name, list(c.images), c.label) for c in info.training if c.label]
    if not any(Path(c.label).is_file() for c in cases):
        cases = []   # labels declared but none on disk: no labelled case (one missing: its own error)
    digest = hashlib.sha256(str(info.root).encode()).hexdigest()[:12]
    cache = default_cache_dir() / "fingerprints" / f"{Path(info.root).name}-{digest}.json"
    return info.name, str(info.root), list(info.channel_names), dict(info.labels), cases, cache


def _cache_key(cases: list[_Case]) -> str:
    from data_prep.cache import file_key

    files = [[c.name, [file_key(p) for p in c.images], file_key(c.label)] for c in cases]
    settings = [FINGERPRINT_VERSION, PERCENTILES, SAMPLES_PER_CASE, MASK_MAX_VOXELS]
    return hashlib.sha256(json.dumps([settings, files]).encode()).hexdigest()


def load_fingerprint(source: str | Path, cache_file: str | Path | None = None,
                     refresh: bool = False) -> tuple[dict, Path, bool]:
    """Fingerprint of a data-set folder or data list: ``(fingerprint, cache file, from cache)``.

    Recomputed when any file's path, size or mtime changed, the settings changed, or
    ``refresh``; a cache that cannot be written is not an error (the result is returned).
    """
    name, root, channel_names, labels, cases, default_cache = _source(Path(source))
    cache = Path(cache_file) if cache_file else default_cache
    fp, from_cache = _cached(cache, _cache_key(cases) if cases else "", refresh,
                             lambda: compute_fingerprint(name, root, channel_names, labels, cases))
    return fp, cache, from_cache


def fingerprint_of_cases(name: str, root: str, channel_names: list[str], label_names: dict[int, str],
                         cases: list, cache_dir: str | Path | None = None) -> dict:
    """The fingerprint of exactly ``cases`` (objects with ``name``, ``images``, ``label``, e.g.
    :class:`data_prep.msd.Case`): what a training run read, its split and channels as given.

    Cached like :func:`load_fingerprint`, in ``CACHE_DIR/fingerprints/cases-<key>.json``
    (``CACHE_DIR``: ``cache_dir`` or ``$SEGAN_CACHE``), keyed by every file and the labels.
    """
    from data_prep.cache import default_cache_dir

    key = hashlib.sha256(json.dumps([_cache_key(cases) if cases else "", name, list(channel_names),
                                     sorted((int(k), str(v)) for k, v in label_names.items())]).encode()).hexdigest()
    cache = Path(cache_dir or default_cache_dir()) / "fingerprints" / f"cases-{key[:16]}.json"
    return _cached(cache, key, False, lambda: compute_fingerprint(name, root, channel_names, label_names, cases))[0]


def _cached(cache: Path, key: str, refresh: bool, compute) -> tuple[dict, bool]:
    """``(fingerprint, from cache)``: the cache file when it holds ``key``, else ``compute()``
    written there (a cache that cannot be written is not an error)."""
    from segan.io_utils import atomic_write_text

    if key and not refresh and cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                return stored["fingerprint"], True
        except (OSError, ValueError, AttributeError):
            pass  # unreadable cache: recompute and replace it
    fp = compute()
    try:
        atomic_write_text(cache, json.dumps({"key": key, "fingerprint": fp}) + "\n")
    except OSError:
        pass
    return fp, False


def format_fingerprint(fp: dict, cache: Path, from_cache: bool) -> str:
    """A few lines for the terminal: geometry, channels, labels, where the cache is."""
    summary = fp["summary"]

    def join(values: list[float]) -> str:
        return " x ".join(f"{v:g}" for v in values)

    orientations = ", ".join(f"{k} {v}" for k, v in summary["orientations"].items())
    lines = [f"{fp['root']}: {fp['n_cases']} labelled training case(s), modality {fp['modality']}",
             f"  median shape {join(summary['median_shape'])} voxels (RAS axes), median spacing "
             f"{join(summary['median_spacing'])} mm, 10th percentile {join(summary['spacing_p10'])} mm, "
             f"anisotropy {summary['anisotropy']:.2g}; orientations {orientations}"]
    for ch in fp["channels"]:
        fg = ch["foreground"]
        values = (f"p0.5/p50/p99.5 {fg['p0.5']:.4g}/{fg['p50']:.4g}/{fg['p99.5']:.4g}, mean {fg['mean']:.4g}, "
                  f"std {fg['std']:.4g}") if fg else "no labelled voxels"
        lines.append(f"  channel {ch['name']}: {ch['modality']} ({ch['modality_source']}); foreground {values}")
    for key, lab in fp["labels"].items():
        vol, comp = lab["volume_ml"], lab["components"]
        title = "foreground (label > 0)" if key == "foreground" else f"label {key} {lab['name']}"
        lines.append(f"  {title}: in {lab['cases_present']}/{fp['n_cases']} cases, median "
                     f"{vol['median']:.3g} mL ({vol['min']:.3g}-{vol['max']:.3g}), components median "
                     f"{comp['median']:g}, max {comp['max']}")
    lines.append(f"{'read from' if from_cache else 'written to'} {cache}")
    return "\n".join(lines)
