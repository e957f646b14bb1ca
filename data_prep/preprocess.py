"""Preprocessing declared once, replayed exactly at inference, and undone onto the scan's grid.

Pipeline (MONAI transforms on ``MetaTensor`` s that carry the affine):

1. ``Orientation`` to ``spec["orientation"]`` (RAS: the last axis is then axial).
2. ``Spacing`` to ``spec["spacing"]`` mm (image bilinear); the label is resampled
   nearest-neighbour straight onto the image's new grid (``SpatialResample``), so both
   share one grid exactly. ``spacing: None`` keeps the native voxel size.
3. A foreground mask (:func:`foreground_mask`) that does *not* assume a zero background.
4. ``SpatialCrop`` to the mask's bounding box plus ``margin`` voxels (optional).
5. Per-channel intensity normalisation with statistics over the mask only:
   ``zscore`` (``NormalizeIntensity``), ``percentile`` (clip to the ``percentiles`` then
   scale to [0, 1], ``ScaleIntensityRange``), ``ct`` (data-set statistics: clip to the
   training set's foreground ``[low, high]``, then ``(x - mean) / std``, as nnU-Net does
   for CT; the numbers are in ``ct_stats``) or ``none``.

Inversion (:meth:`Preprocessor.invert`) is one resampling from the preprocessed grid
(its affine includes the crop offset) onto the original grid (original affine and
shape), so a crop, a resampling and a reorientation are undone in one interpolation,
and voxels outside the crop become 0.

:class:`CaseCache` stores preprocessed cases as ``.npy`` files keyed by the spec and the
source files' paths, sizes and mtimes, so training epochs never decode NIfTI again.
Arrays are stored in Fortran order: index order stays ``(C, X, Y, Z)`` but each axial
slice ``[..., z]`` is one contiguous block, which makes 2D slice sampling from a memory
map cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    NormalizeIntensity,
    Orientation,
    ScaleIntensityRange,
    Spacing,
    SpatialCrop,
    SpatialResample,
)

from data_prep.cache import default_cache_dir, entry_key  # noqa: F401 - default_cache_dir: re-exported
from data_prep.masks import foreground_mask  # noqa: F401 - re-exported
from segan.errors import UserError

if TYPE_CHECKING:
    from data_prep.msd import Case
    from segan.config import PreprocessConfig

SPEC_VERSION = 1
LOCATIONS_PER_LABEL = 2000
NORMALIZE_CHOICES = ("zscore", "percentile", "ct", "none")
# nibabel/MONAI world axes: (low end, high end) letters.
_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def spec_from_config(cfg: PreprocessConfig) -> dict:
    """The JSON-able preprocessing spec stored in checkpoints (everything but the cache folder).

    ``segan.data`` may add ``"channels": [indices]`` when ``data.channels`` picks a subset
    of the data set's channels; the :class:`Preprocessor` then selects them first.
    """
    spec = {
        "version": SPEC_VERSION,
        "orientation": str(cfg.orientation).upper(),
        "spacing": [float(s) for s in cfg.spacing] if cfg.spacing is not None else None,
        "normalize": str(cfg.normalize),
        "percentiles": [float(p) for p in cfg.percentiles],
        "crop_foreground": bool(cfg.crop_foreground),
        "margin": int(cfg.margin),
    }
    if cfg.normalize == "ct":  # only then: other specs (and their cache keys) stay as they were
        spec["ct_stats"] = [[float(v) for v in row] for row in (cfg.ct_stats or [])]
    return spec


def spec_hash(spec: dict) -> str:
    """Short stable hash of a spec (sorted-key JSON)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _validate_spec(spec: dict) -> dict:
    """Check a spec (possibly from a checkpoint) and fill defaults; errors name the key."""
    spec = dict(spec)
    version = int(spec.get("version", SPEC_VERSION))
    if version > SPEC_VERSION:
        raise UserError(f"preprocessing spec version {version} is newer than this segan ({SPEC_VERSION}); "
                        "upgrade segan to use this checkpoint")
    orient = str(spec.get("orientation", "RAS")).upper()
    if len(orient) != 3 or any(sum(c in pair for c in orient) != 1 for pair in _AXIS_LABELS):
        raise UserError(f"preprocess.orientation {orient!r} is not a 3-letter axis code such as RAS or LPS")
    spacing = spec.get("spacing")
    if spacing is not None:
        if len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
            raise UserError(f"preprocess.spacing {spacing!r} needs 3 positive numbers (mm) or null for native")
        spacing = [float(s) for s in spacing]
    normalize = spec.get("normalize", "zscore")
    if normalize not in NORMALIZE_CHOICES:
        raise UserError(f"preprocess.normalize is {normalize!r}; allowed values: {', '.join(NORMALIZE_CHOICES)}")
    if normalize == "ct":
        stats = spec.get("ct_stats") or []
        if not stats or any(len(row) != 4 or float(row[1]) <= float(row[0]) or float(row[3]) <= 0 for row in stats):
            raise UserError(f"preprocess.ct_stats {stats!r} needs one [low, high, mean, std] per channel "
                            "(low < high, std > 0) for preprocess.normalize: ct; `segan plan` writes them")
        spec["ct_stats"] = [[float(v) for v in row] for row in stats]
    lo, hi = (float(p) for p in spec.get("percentiles", [0.5, 99.5]))
    if not 0.0 <= lo < hi <= 100.0:
        raise UserError(f"preprocess.percentiles [{lo}, {hi}] must satisfy 0 <= low < high <= 100")
    margin = int(spec.get("margin", 0))
    if margin < 0:
        raise UserError(f"preprocess.margin {margin} must be >= 0")
    channels = spec.get("channels")
    if channels is not None:
        if not channels or any(int(c) < 0 for c in channels):
            raise UserError(f"preprocessing spec 'channels' {channels!r} must list channel indices >= 0")
        spec["channels"] = [int(c) for c in channels]
    spec.update(version=version, orientation=orient, spacing=spacing, normalize=normalize,
                percentiles=[lo, hi], crop_foreground=bool(spec.get("crop_foreground", True)), margin=margin)
    return spec


@dataclass
class PreprocessedCase:
    """One case on the preprocessed grid plus what is needed to map results back.

    ``image``: ``(C, x, y, z)`` float32; ``label``: ``(x, y, z)`` uint8 or None;
    ``affine``: 4x4 of the preprocessed (cropped) grid; ``original_shape`` / ``original_affine``:
    the scan's own grid ``(X, Y, Z)``. ``resampled_shape`` and ``crop_start``/``crop_end``
    describe the grid before the crop (informational; inversion uses the affines only).
    """

    image: np.ndarray
    label: np.ndarray | None
    original_shape: tuple
    original_affine: np.ndarray
    affine: np.ndarray
    resampled_shape: tuple = ()
    crop_start: list = field(default_factory=list)
    crop_end: list = field(default_factory=list)

    def meta(self) -> dict:
        """JSON-able geometry (everything but the arrays)."""
        return {
            "original_shape": [int(s) for s in self.original_shape],
            "original_affine": np.asarray(self.original_affine, dtype=float).tolist(),
            "affine": np.asarray(self.affine, dtype=float).tolist(),
            "shape": [int(s) for s in self.image.shape],
            "resampled_shape": [int(s) for s in self.resampled_shape],
            "crop_start": [int(s) for s in self.crop_start],
            "crop_end": [int(s) for s in self.crop_end],
        }


class Preprocessor:
    """Applies a preprocessing spec (see :func:`spec_from_config`) to one scan, and inverts it."""

    def __init__(self, spec: dict) -> None:
        self.spec = _validate_spec(spec)
        self._orient = Orientation(axcodes=self.spec["orientation"], labels=_AXIS_LABELS)
        spacing = self.spec["spacing"]
        self._spacing = Spacing(pixdim=spacing, mode="bilinear", padding_mode="border",
                                dtype=np.float32) if spacing else None

    def __call__(self, image: np.ndarray, affine: np.ndarray, label: np.ndarray | None = None) -> PreprocessedCase:
        """``image`` ``(C, X, Y, Z)`` on its native grid (``affine``), optional ``label`` ``(X, Y, Z)`` int.

        For training, the crop box also covers every labelled voxel, so no annotation
        is ever cut off (at inference there is no label and the box is the mask's).
        """
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 4:
            raise ValueError(f"image must be (C, X, Y, Z), got shape {image.shape}")
        if label is not None and tuple(label.shape) != tuple(image.shape[1:]):
            raise ValueError(f"label shape {tuple(label.shape)} differs from image shape {tuple(image.shape[1:])}")
        channels = self.spec.get("channels")
        if channels is not None:  # a model trained on a subset of the data set's channels
            if max(channels) >= image.shape[0]:
                raise UserError(f"the scan has {image.shape[0]} channel(s) but the preprocessing uses channel "
                                f"indices {channels}; give scans with the training data's channels")
            image = image[channels]
        affine = np.asarray(affine, dtype=np.float64)
        original_shape = tuple(int(s) for s in image.shape[1:])
        img = MetaTensor(torch.from_numpy(np.nan_to_num(image)), affine=torch.from_numpy(affine))
        img = self._orient(img)
        if self._spacing is not None:
            img = self._spacing(img)
        grid_affine = img.affine.clone()
        resampled_shape = tuple(int(s) for s in img.shape[1:])
        lab = None
        if label is not None:
            lab = MetaTensor(torch.from_numpy(np.asarray(label, dtype=np.float32)[None]),
                             affine=torch.from_numpy(affine))
            lab = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)(
                lab, dst_affine=grid_affine, spatial_size=resampled_shape)

        array = img.as_tensor().numpy()
        needs_mask = self.spec["crop_foreground"] or self.spec["normalize"] != "none"
        mask = foreground_mask(array) if needs_mask else np.ones(resampled_shape, dtype=bool)
        start, end = [0, 0, 0], list(resampled_shape)
        if self.spec["crop_foreground"]:
            box = mask if lab is None else (mask | (lab.as_tensor().numpy()[0] > 0))
            start, end = _bounding_box(box, self.spec["margin"])
            crop = SpatialCrop(roi_start=start, roi_end=end)
            img = crop(img)
            lab = crop(lab) if lab is not None else None
            mask = mask[start[0]:end[0], start[1]:end[1], start[2]:end[2]]
        out = self._normalize(img.as_tensor().numpy(), mask)
        label_out = None
        if lab is not None:
            label_out = np.rint(lab.as_tensor().numpy()[0]).astype(np.uint8)
        return PreprocessedCase(
            image=np.ascontiguousarray(out, dtype=np.float32), label=label_out,
            original_shape=original_shape, original_affine=affine,
            affine=img.affine.numpy().astype(np.float64), resampled_shape=resampled_shape,
            crop_start=start, crop_end=end,
        )

    def _normalize(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Per-channel statistics over the foreground ``mask``, applied to every voxel."""
        method = self.spec["normalize"]
        if method == "none":
            return image
        if not mask.any():
            mask = np.ones_like(mask)
        out = np.empty_like(image)
        for c, channel in enumerate(image):
            values = channel[mask]
            if method == "ct":
                index = self.spec["channels"][c] if "channels" in self.spec else c
                if index >= len(self.spec["ct_stats"]):
                    raise UserError(f"preprocess.ct_stats has {len(self.spec['ct_stats'])} row(s) but the scan "
                                    f"has channel {index}; give one [low, high, mean, std] per channel")
                low, high, mean, std = self.spec["ct_stats"][index]
                out[c] = (np.clip(channel, low, high) - mean) / std
                continue
            if method == "zscore":
                std = float(values.std())
                norm = NormalizeIntensity(subtrahend=float(values.mean()), divisor=std if std > 1e-8 else 1.0)
            else:
                lo, hi = np.percentile(values, self.spec["percentiles"])
                norm = ScaleIntensityRange(a_min=float(lo), a_max=float(max(hi, lo + 1e-8)),
                                           b_min=0.0, b_max=1.0, clip=True)
            out[c] = np.asarray(norm(channel))
        return out

    def invert(self, volume: np.ndarray, case: PreprocessedCase, mode: str = "bilinear") -> np.ndarray:
        """``(K, x, y, z)`` on the preprocessed grid -> ``(K, X, Y, Z)`` float32 on the scan's own grid.

        One ``SpatialResample`` from ``case.affine`` to ``case.original_affine`` with
        ``case.original_shape``: undoes crop (outside -> 0), spacing and orientation at
        once. ``mode``: ``"bilinear"`` for probabilities, ``"nearest"`` for label maps.
        When no resampling happened (native spacing) the inverse is exact indexing.
        """
        volume = np.asarray(volume, dtype=np.float32)
        if volume.ndim != 4 or tuple(volume.shape[1:]) != tuple(case.image.shape[1:]):
            raise ValueError(f"volume shape {volume.shape} does not match the preprocessed grid "
                             f"(K, {', '.join(str(s) for s in case.image.shape[1:])})")
        exact = _invert_by_indexing(volume, case)
        if exact is not None:
            return exact
        src = MetaTensor(torch.from_numpy(np.ascontiguousarray(volume)),
                         affine=torch.as_tensor(np.asarray(case.affine, dtype=np.float64)))
        out = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float32)(
            src, dst_affine=torch.as_tensor(np.asarray(case.original_affine, dtype=np.float64)),
            spatial_size=[int(s) for s in case.original_shape])
        return np.ascontiguousarray(out.as_tensor().numpy(), dtype=np.float32)


def _invert_by_indexing(volume: np.ndarray, case: PreprocessedCase) -> np.ndarray | None:
    """Exact inverse when the grids differ only by axis flips/permutations and whole-voxel shifts.

    That is the common case of native spacing (reorientation and crop only); indexing
    then copies voxels bit for bit instead of interpolating. Returns None otherwise.
    """
    # original voxel index -> preprocessed voxel index
    xform = np.linalg.solve(np.asarray(case.affine, dtype=np.float64),
                            np.asarray(case.original_affine, dtype=np.float64))
    rot, shift = xform[:3, :3], xform[:3, 3]
    if not (np.allclose(rot, np.rint(rot), atol=1e-4) and np.allclose(shift, np.rint(shift), atol=1e-3)):
        return None
    rot, shift = np.rint(rot).astype(int), np.rint(shift).astype(int)
    if not (np.all(np.abs(rot).sum(axis=0) == 1) and np.all(np.abs(rot).sum(axis=1) == 1)):
        return None
    perm = [int(np.flatnonzero(rot[:, j])[0]) for j in range(3)]  # source axis of each output axis
    moved = volume.transpose(0, *(1 + p for p in perm))
    out = np.zeros((volume.shape[0], *(int(s) for s in case.original_shape)), dtype=np.float32)
    dst, src = [], []
    for j, i in enumerate(perm):
        index = rot[i, j] * np.arange(out.shape[1 + j]) + shift[i]
        inside = (index >= 0) & (index < volume.shape[1 + i])
        dst.append(np.flatnonzero(inside))
        src.append(index[inside])
    out[(slice(None), *np.ix_(*dst))] = moved[(slice(None), *np.ix_(*src))]
    return out


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[list[int], list[int]]:
    """Start (inclusive) and end (exclusive) of ``mask``'s box grown by ``margin``, inside the volume."""
    start, end = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            start.append(0)
            end.append(mask.shape[axis])
            continue
        start.append(max(int(hits[0]) - margin, 0))
        end.append(min(int(hits[-1]) + 1 + margin, mask.shape[axis]))
    return start, end


# ---------------------------------------------------------------- cache
@dataclass
class CachedCase(PreprocessedCase):
    """A :class:`PreprocessedCase` read back from the cache; arrays are read-only memory maps."""

    name: str = ""
    path: Path | None = None
    # sampling aids computed once when cached: channel_min (C,), label_slices {id: [z...]},
    # label_locations {id: [[x, y, z], ...]} (at most LOCATIONS_PER_LABEL, seeded subsample)
    stats: dict = field(default_factory=dict)


class CaseCache:
    """On-disk cache of preprocessed cases: ``<cache_dir>/spec-<hash>/<case>-<key>/``.

    Each entry holds ``image.npy`` (Fortran order), ``label.npy`` (if labelled) and
    ``meta.json``; it is written in a temporary folder and renamed into place, so a
    crash or a concurrent writer (e.g. several DDP ranks) never leaves a partial entry.
    Edited source files get a new key (size and mtime are part of it). ``data_prep.cache``
    keeps the folder bounded (stale and least recently used entries go).
    """

    def __init__(self, cache_dir: Path, spec: dict) -> None:
        self.preprocessor = Preprocessor(spec)
        self.spec = self.preprocessor.spec
        self.spec_hash = spec_hash(self.spec)
        self.root = Path(cache_dir).expanduser() / f"spec-{self.spec_hash}"

    def entry_dir(self, case: Case) -> Path:
        """Where ``case`` is (or will be) cached."""
        key = entry_key(case.images, case.label, self.spec_hash)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case.name)[:80] or "case"
        return self.root / f"{safe}-{key}"

    def get(self, case: Case) -> CachedCase:
        """Preprocess ``case`` on first use and save it; afterwards return memory-mapped arrays."""
        entry = self.entry_dir(case)
        if not (entry / "meta.json").is_file():
            self._write(case, entry)
        else:
            try:
                os.utime(entry / "meta.json")  # the last use, for least-recently-used eviction
            except OSError:
                pass  # a read-only cache is still a cache
        return self._read(entry, case.name)

    def _write(self, case: Case, entry: Path) -> None:
        from data_prep.io import ScanError, load_image, load_label

        image, affine = load_image(case.images)
        label = None
        if case.label:
            label, label_affine = load_label(case.label)
            if label.shape != image.shape[1:]:
                raise ScanError(f"{case.label}: label shape {label.shape} differs from the image shape "
                                f"{image.shape[1:]}; the label must be on the image's grid")
            if not np.allclose(label_affine, affine, atol=1e-2):
                raise ScanError(f"{case.label}: label affine differs from the image's; resample the label "
                                "onto the image grid")
            if label.min() < 0 or label.max() > 255:
                raise ScanError(f"{case.label}: label ids must lie in 0..255, found {label.min()}..{label.max()}")
        pre = self.preprocessor(image, affine, label)
        self.root.mkdir(parents=True, exist_ok=True)
        spec_file = self.root / "spec.json"
        if not spec_file.exists():
            from segan.io_utils import atomic_write_text

            atomic_write_text(spec_file, json.dumps(self.spec, indent=2, sort_keys=True))
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=self.root))
        try:
            np.save(tmp / "image.npy", np.asfortranarray(pre.image))
            if pre.label is not None:
                np.save(tmp / "label.npy", np.asfortranarray(pre.label))
            meta = {"name": case.name, "images": [str(p) for p in case.images], "label": case.label,
                    "spec": self.spec, **pre.meta(), "stats": _sampling_stats(pre)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, entry)
            except OSError:
                if not (entry / "meta.json").is_file():  # not a concurrent writer's finished entry
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _read(entry: Path, name: str) -> CachedCase:
        meta: dict[str, Any] = json.loads((entry / "meta.json").read_text())
        label_file = entry / "label.npy"
        return CachedCase(
            image=np.load(entry / "image.npy", mmap_mode="r"),
            label=np.load(label_file, mmap_mode="r") if label_file.is_file() else None,
            original_shape=tuple(meta["original_shape"]),
            original_affine=np.asarray(meta["original_affine"], dtype=np.float64),
            affine=np.asarray(meta["affine"], dtype=np.float64),
            resampled_shape=tuple(meta["resampled_shape"]),
            crop_start=meta["crop_start"], crop_end=meta["crop_end"], name=name, path=entry,
            stats=meta.get("stats", {}),
        )


def _sampling_stats(pre: PreprocessedCase) -> dict:
    """Per-channel minimum (padding value) and where each label id lies (for fg sampling)."""
    stats: dict[str, Any] = {"channel_min": [float(v) for v in pre.image.min(axis=(1, 2, 3))],
                             "label_slices": {}, "label_locations": {}}
    if pre.label is None:
        return stats
    for lid in np.unique(pre.label):
        if lid == 0:
            continue
        hit = pre.label == lid
        stats["label_slices"][str(int(lid))] = np.flatnonzero(hit.any(axis=(0, 1))).tolist()
        where = np.argwhere(hit)
        if len(where) > LOCATIONS_PER_LABEL:
            pick = np.random.default_rng(int(lid)).choice(len(where), LOCATIONS_PER_LABEL, replace=False)
            where = where[np.sort(pick)]
        stats["label_locations"][str(int(lid))] = where.tolist()
    return stats
