"""Training data: preprocessed cases, reproducible 2D slice / 3D patch sampling, loaders.

``build_data(cfg)`` reads the data list (``data.datalist`` JSON, or the MSD folder
``data.root``), resolves channels and output regions, preprocesses every training and
validation case once through :class:`data_prep.preprocess.CaseCache`, and returns a
:class:`DataBundle`.

Training items are drawn, not enumerated: item ``i`` of epoch ``e`` comes from a numpy
``Generator`` seeded with ``(seed, e, i)``, which also seeds the MONAI augmentation
(``Compose.set_random_state``). The stream is therefore identical across runs, resumes,
worker counts and DDP ranks (a ``DistributedSampler`` just hands each rank other ``i``).

- 2D: an axial slice (last axis after RAS reorientation) of a random case; with
  probability ``fg_fraction`` among slices holding a region voxel and centred on one,
  else uniform; padded with the channel's minimum and cropped to ``patch_size``.
- 3D: a ``patch_size`` patch centred, with probability ``fg_fraction``, on a labelled
  voxel (``RandCropByPosNegLabel`` semantics; negatives are uniform positions), padded
  when the volume is smaller.

Arrays are read from the cache's memory maps (Fortran order: an axial slice is one
contiguous block), so memory stays small and workers start without copying volumes.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_prep.cache import default_cache_dir
from data_prep.preprocess import CachedCase, CaseCache, spec_from_config
from segan.config import AugmentConfig, Config
from segan.errors import UserError, did_you_mean
from segan.progress import track
from segan.regions import default_regions, labels_to_regions


@dataclass
class VolumeCase:
    """A whole preprocessed validation volume: ``image`` ``(C, X, Y, Z)`` float32 (may be a
    read-only memory map), ``target`` ``(K, X, Y, Z)`` float32 0/1 regions."""

    name: str
    image: np.ndarray
    target: np.ndarray


@dataclass
class DataBundle:
    train_set: Dataset  # PatchDataset: map-style, len = samples_per_epoch, has set_epoch(epoch)
    val_cases: list[VolumeCase]
    channels: list[str]
    region_names: list[str]
    region_labels: list[list[int]]
    label_names: dict[int, str]
    preprocess_spec: dict
    datalist: dict
    dataset_name: str
    # Image-only samples (``{"image": (C, *patch_size)}``), drawn beside the labelled batch for a method
    # that uses them; None without unlabelled data.
    unlabeled_set: Dataset | None = None
    # The labelled training and validation cases as files (data_prep.msd.Case), for the
    # checkpoint's fingerprint (segan.qc); empty for synthetic data (segan bench).
    source_cases: list = field(default_factory=list)


# ---------------------------------------------------------------- augmentation
def build_augmentation(aug: AugmentConfig, spatial_dims: int, patch_size: Sequence[int]):
    """MONAI dictionary transforms on ``{"image", "target"}`` (channel-first tensors), or None.

    Flips on every spatial axis, a small rotation/scaling (image bilinear with border
    padding, target nearest with zeros), then per-channel intensity scale and shift.
    """
    from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

    keys = ["image", "target"]
    steps: list[Any] = []
    if aug.flip_prob > 0:
        steps += [RandFlipd(keys, prob=aug.flip_prob, spatial_axis=axis) for axis in range(spatial_dims)]
    if aug.affine_prob > 0 and (aug.rotate_deg > 0 or aug.scale > 0):
        angle = math.radians(aug.rotate_deg)
        steps.append(RandAffined(
            keys, spatial_size=list(patch_size), prob=aug.affine_prob,
            rotate_range=[angle] if spatial_dims == 2 else [angle] * 3,
            scale_range=[aug.scale] * spatial_dims, mode=("bilinear", "nearest"),
            padding_mode=("border", "zeros"), cache_grid=True))
    if aug.intensity_prob > 0 and aug.intensity_scale > 0:
        steps.append(RandScaleIntensityd("image", factors=aug.intensity_scale, prob=aug.intensity_prob,
                                         channel_wise=True))
    if aug.intensity_prob > 0 and aug.intensity_shift > 0:
        steps.append(RandShiftIntensityd("image", offsets=aug.intensity_shift, prob=aug.intensity_prob,
                                         channel_wise=True))
    return Compose(steps) if steps else None


# ---------------------------------------------------------------- sampling
def _window(size: int, patch: int, rng: np.random.Generator, centre: int | None) -> int:
    """Start of a ``patch``-long window on an axis of length ``size`` (negative = padding before).

    The window stays inside the volume when it fits, and covers all of it when it does not;
    ``centre`` (a voxel index) places it around that voxel, else uniformly.
    """
    lo, hi = min(0, size - patch), max(0, size - patch)
    if centre is None:
        return int(rng.integers(lo, hi + 1))
    return int(np.clip(centre - patch // 2, lo, hi))


def _crop(volume: np.ndarray, start: Sequence[int], size: Sequence[int], fill: np.ndarray | float,
          dtype=np.float32) -> np.ndarray:
    """``(C, *spatial)`` -> ``(C, *size)`` window at ``start`` (may reach outside: ``fill``)."""
    out = np.empty((volume.shape[0], *size), dtype=dtype)
    out[...] = np.reshape(fill, (-1,) + (1,) * len(size)) if np.ndim(fill) else fill
    src, dst = [slice(None)], [slice(None)]
    for s0, n, dim in zip(start, size, volume.shape[1:]):
        a, b = max(s0, 0), min(s0 + n, dim)
        src.append(slice(a, b))
        dst.append(slice(a - s0, b - s0))
    out[tuple(dst)] = volume[tuple(src)]
    return out


class PatchDataset(Dataset):
    """Reproducible random training samples from cached cases.

    Each item is ``{"image": (C, *patch_size) float32, "target": (K, *patch_size) float32 0/1}``;
    with ``labeled=False`` (the unlabelled stream) just ``{"image": ...}``, sampled uniformly
    and augmented the same way (no label file is opened).
    Call :meth:`set_epoch` before iterating each epoch; the epoch lives in shared memory,
    so persistent DataLoader workers see it too.
    """

    def __init__(self, cases: list[CachedCase], region_labels: list[list[int]], spatial_dims: int,
                 patch_size: Sequence[int], fg_fraction: float, samples_per_epoch: int,
                 augment: AugmentConfig | None, seed: int, labeled: bool = True) -> None:
        if not cases:
            raise UserError("the data set has no training cases; add labelled cases or lower data.val_fraction")
        self.labeled = bool(labeled)
        self.files = [(str(c.path / "image.npy"), str(c.path / "label.npy") if labeled else None) for c in cases]
        self.names = [c.name for c in cases]
        self.region_labels = [list(r) for r in region_labels]
        self.spatial_dims = int(spatial_dims)
        self.patch_size = [int(p) for p in patch_size]
        self.fg_fraction = float(fg_fraction) if labeled else 0.0
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        ids = sorted({int(i) for r in self.region_labels for i in r})
        self.fg_ids = np.asarray(ids, dtype=np.uint8)
        self.pad = [np.asarray(c.stats["channel_min"], dtype=np.float32) for c in cases]
        # slices (2D) or voxels (3D) holding any region label, from the cache's stats
        self.fg_slices = [np.unique(np.asarray([z for i in ids for z in c.stats["label_slices"].get(str(i), [])],
                                               dtype=np.int64)) for c in cases]
        self.fg_voxels = [np.asarray([v for i in ids for v in c.stats["label_locations"].get(str(i), [])],
                                     dtype=np.int64).reshape(-1, 3) for c in cases]
        self.transform = build_augmentation(augment, self.spatial_dims, self.patch_size) if augment else None
        # One RandomState shared by every random transform, re-seeded per item: identical to
        # seeding each transform (set_random_state) but ~100x cheaper than new RandomStates.
        self._aug_state = np.random.RandomState(0)
        if self.transform is not None:
            from monai.transforms import Randomizable

            for step in self.transform.transforms:
                if isinstance(step, Randomizable):
                    step.set_random_state(state=self._aug_state)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._arrays: list[tuple[np.ndarray, np.ndarray | None]] | None = None

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = None  # memory maps are reopened in each worker
        return state

    def _open(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        if self._arrays is None:
            self._arrays = [(np.load(i, mmap_mode="r"), np.load(lab, mmap_mode="r") if lab else None)
                            for i, lab in self.files]
        return self._arrays

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        c = int(rng.integers(len(self.files)))
        image, label = self._open()[c]
        want_fg = rng.random() < self.fg_fraction
        if self.spatial_dims == 2:
            img, lab = self._sample_2d(rng, c, image, label, want_fg)
        else:
            img, lab = self._sample_3d(rng, c, image, label, want_fg)
        # The unlabelled stream carries an all-zero target through the shared transform (it keys on both).
        target = (labels_to_regions(lab[0], self.region_labels) if self.labeled
                  else np.zeros((1, *lab.shape[1:]), dtype=np.float32))
        sample = {"image": torch.from_numpy(img), "target": torch.from_numpy(target)}
        if self.transform is not None:
            from monai.data import get_track_meta, set_track_meta

            self._aug_state.seed(int(rng.integers(2**32)))
            tracking = get_track_meta()
            set_track_meta(False)  # plain tensors: no MetaTensor bookkeeping per sample
            try:
                sample = self.transform(sample)
            finally:
                set_track_meta(tracking)
        if not self.labeled:
            return {"image": sample["image"].contiguous().float()}
        return {"image": sample["image"].contiguous().float(), "target": sample["target"].contiguous().float()}

    def _sample_2d(self, rng, c, image, label, want_fg):
        fg = self.fg_slices[c]
        z = int(rng.choice(fg)) if want_fg and fg.size else int(rng.integers(image.shape[-1]))
        img2d = image[..., z]  # a contiguous block of the F-order map
        lab2d = label[None, ..., z] if label is not None else np.zeros((1, *image.shape[1:-1]), dtype=np.uint8)
        centre: list[int | None] = [None, None]
        if want_fg:
            hits = np.flatnonzero(np.isin(lab2d[0], self.fg_ids))
            if hits.size:
                centre = list(np.unravel_index(int(hits[rng.integers(hits.size)]), lab2d.shape[1:]))
        start = [_window(s, p, rng, ce) for s, p, ce in zip(img2d.shape[1:], self.patch_size, centre)]
        return (_crop(img2d, start, self.patch_size, self.pad[c]),
                _crop(lab2d, start, self.patch_size, 0, dtype=np.uint8))

    def _sample_3d(self, rng, c, image, label, want_fg):
        fg = self.fg_voxels[c]
        centre = list(fg[rng.integers(len(fg))]) if want_fg and len(fg) else [None, None, None]
        start = [_window(s, p, rng, ce) for s, p, ce in zip(image.shape[1:], self.patch_size, centre)]
        return (_crop(image, start, self.patch_size, self.pad[c]),
                _crop(label[None], start, self.patch_size, 0, dtype=np.uint8) if label is not None
                else np.zeros((1, *self.patch_size), dtype=np.uint8))


def make_loader(train_set: Dataset, batch_size: int, num_workers: int, sampler=None, seed: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``train_set`` in index order (the items are already random).

    Persistent workers and prefetching when ``num_workers > 0``; the last partial batch
    is dropped (BatchNorm dislikes a batch of one) unless the set is smaller than a batch.
    """
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra.update(persistent_workers=True, prefetch_factor=4)
    return DataLoader(train_set, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=len(train_set) >= batch_size,
                      generator=torch.Generator().manual_seed(int(seed)), **extra)


# ---------------------------------------------------------------- build
def _read_datalist(cfg: Config) -> dict:
    if cfg.data.datalist:
        path = Path(cfg.data.datalist)
        if not path.is_file():
            raise UserError(f"data.datalist {path}: file not found; write one with "
                            "`segan prepare check <root> --datalist FILE` or unset data.datalist")
        try:
            datalist = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"data.datalist {path}: not valid JSON; write it again with "
                            "`segan prepare check <root> --datalist FILE`") from None
        if not isinstance(datalist, dict) or "training" not in datalist:
            raise UserError(f"data.datalist {path}: has no 'training' list; write it with "
                            "`segan prepare check <root> --datalist FILE`")
        return datalist
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise UserError(f"data.root {root}: folder not found; generate a demo data set with "
                        f"`segan prepare phantoms --out {root}` or point to your data with --set data.root=FOLDER")
    from data_prep.datalist import make_datalist
    from data_prep.msd import load_dataset

    info = load_dataset(root)
    return make_datalist(info, seed=cfg.seed, val_fraction=cfg.data.val_fraction,
                         folds=cfg.data.folds, fold=cfg.data.fold)


def _resolve_channels(cfg: Config, available: list[str]) -> tuple[list[str], list[int] | None]:
    """Channel names to use and, when they are a subset/reordering, their indices."""
    if not cfg.data.channels:
        return list(available), None
    lookup = {name.lower(): i for i, name in enumerate(available)}
    indices = []
    for name in cfg.data.channels:
        key = str(name).lower()
        if key in lookup:
            indices.append(lookup[key])
        elif key.isdigit() and int(key) < len(available):
            indices.append(int(key))
        else:
            raise UserError(f"data.channels: {name!r} is not a channel of the data set"
                            f"{did_you_mean(name, available)}; available: {', '.join(available)}")
    names = [available[i] for i in indices]
    return names, (None if indices == list(range(len(available))) else indices)


def _resolve_regions(cfg: Config, datalist: dict, label_names: dict[int, str]) -> dict[str, list[int]]:
    regions = cfg.data.regions or datalist.get("regions") or default_regions(label_names)
    if not regions:
        raise UserError("data.regions: the data set defines no foreground labels; "
                        "set data.regions, e.g. --set 'data.regions={tumour: [1]}'")
    for name, ids in regions.items():
        bad = [i for i in ids if int(i) not in label_names or int(i) == 0]
        if not ids or bad:
            raise UserError(f"data.regions: region {name!r} uses label ids {bad or ids} that are not foreground "
                            f"labels of the data set ({', '.join(f'{k}={v}' for k, v in label_names.items())})")
    return {str(k): [int(i) for i in v] for k, v in regions.items()}


def _check_files(cases: list, datalist: dict, root: Path, label_names: dict[int, str], cache_dir: Path,
                 unlabeled: list | None = None) -> None:
    """``segan prepare check``'s per-case checks on the cases training reads, before anything
    else; a case that passed with the same files (paths, sizes, mtimes) is not read again.
    Raises one :class:`UserError` listing every problem."""
    from data_prep.cache import CheckRecord
    from data_prep.check import check_dataset
    from data_prep.msd import DatasetInfo

    info = DatasetInfo(root=root, name=str(datalist.get("name") or root.name),
                       layout=str(datalist.get("layout") or "msd"),
                       channel_names=list(datalist.get("channel_names") or []), labels=label_names,
                       regions=None, training=cases, test=[], unlabeled=list(unlabeled or []))
    _, problems = check_dataset(info, CheckRecord(cache_dir))
    if problems:
        listing = "\n".join(f"  {line}" for line in problems)
        raise UserError(f"{len(problems)} problem(s) in the training data of {root}; nothing was trained:\n"
                        f"{listing}\nfix them and train again (`segan prepare check {root}` lists every case)")


def _split_unlabeled(cfg: Config, datalist: dict) -> tuple[list[dict], list[dict]]:
    """(labelled training entries, unlabelled entries ``{"case", "image"}``) of the data list.

    ``data.labeled_cases: N`` keeps N training cases, chosen by the split seed (the data
    list's ``split.seed``, else ``seed``), and moves the others, without their labels, to the
    unlabelled stream; ``data.unlabeled`` scans join it. The choice is recorded in the data
    list (``labeled_cases``, ``unlabeled``) so the run's ``datalist.json`` artifact shows it.
    """
    from data_prep.msd import unlabeled_cases

    train = list(datalist["training"])
    unlabeled = [dict(e) for e in datalist.get("unlabeled") or []]
    n = cfg.data.labeled_cases
    if n is not None:
        if not 1 <= int(n) <= len(train):
            raise UserError(f"data.labeled_cases {n}: must be in 1..{len(train)} (the labelled training cases)")
        seed = int((datalist.get("split") or {}).get("seed", cfg.seed))
        order = sorted(train, key=lambda e: str(e.get("case") or e.get("image")))
        keep = set(np.random.default_rng(seed).permutation(len(order))[:int(n)].tolist())
        train = [e for i, e in enumerate(order) if i in keep]
        unlabeled += [{"case": e.get("case"), "image": e["image"]} for i, e in enumerate(order) if i not in keep]
        datalist["labeled_cases"] = [str(e.get("case") or e.get("image")) for e in train]
    if cfg.data.unlabeled:
        unlabeled += [{"case": c.name, "image": list(c.images)} for c in unlabeled_cases(cfg.data.unlabeled)]
    datalist["training"], datalist["unlabeled"] = train, unlabeled
    return train, unlabeled


def build_data(cfg: Config) -> DataBundle:
    """Data list -> file checks -> preprocessed (cached) cases -> training sample set and validation volumes."""
    from data_prep.cache import enforce_limit
    from data_prep.msd import entry_case

    datalist = _read_datalist(cfg)
    root = Path(datalist.get("root") or cfg.data.root)
    label_names = {int(k): str(v) for k, v in (datalist.get("labels") or {}).items()}
    cache_dir = Path(cfg.preprocess.cache_dir).expanduser() if cfg.preprocess.cache_dir else default_cache_dir()
    train_entries, unlabeled_entries = _split_unlabeled(cfg, datalist)
    val_entries = datalist.get("validation") or []
    where = Path(cfg.data.datalist) if cfg.data.datalist else root
    cases = [entry_case(root, e.get("image"), e.get("label"), where, name=str(e["case"]) if e.get("case") else None)
             for e in [*train_entries, *val_entries]]
    # Unlabelled entries never carry a label path: a label beside the scan is not opened.
    cases_u = [entry_case(root, e.get("image"), None, where, name=str(e["case"]) if e.get("case") else None)
               for e in unlabeled_entries]
    _check_files(cases, datalist, root, label_names, cache_dir, cases_u)
    channels, indices = _resolve_channels(cfg, list(datalist.get("channel_names") or []))
    regions = _resolve_regions(cfg, datalist, label_names)
    spec = spec_from_config(cfg.preprocess)
    if indices is not None:
        spec["channels"] = indices
    cache = CaseCache(cache_dir, spec)
    with ThreadPoolExecutor(max(1, cfg.data.num_workers)) as pool:  # NIfTI decoding and resampling release the GIL
        cached = list(track(pool.map(cache.get, cases + cases_u), len(cases) + len(cases_u), "preprocess", "case",
                            lines=False))  # a bar on a terminal; nothing in a batch log
    cached, cached_u = cached[:len(cases)], cached[len(cases):]
    enforce_limit(cache_dir, keep=[c.path for c in cached + cached_u])
    train_cached, val_cached = cached[:len(train_entries)], cached[len(train_entries):]
    if not channels and cached:  # a data list without channel names
        channels = [f"channel_{i}" for i in range(cached[0].image.shape[0])]
    region_labels = list(regions.values())
    train_set = PatchDataset(train_cached, region_labels, cfg.data.spatial_dims, cfg.data.patch_size,
                             cfg.data.fg_fraction, cfg.data.samples_per_epoch, cfg.data.augment, cfg.seed)
    unlabeled_set = (PatchDataset(cached_u, region_labels, cfg.data.spatial_dims, cfg.data.patch_size, 0.0,
                                  cfg.data.samples_per_epoch, cfg.data.augment, cfg.seed + 1, labeled=False)
                     if cached_u else None)  # another seed: its draws are not the labelled stream's
    val_cases = [VolumeCase(c.name, c.image, labels_to_regions(np.asarray(c.label), region_labels))
                 for c in val_cached]
    return DataBundle(train_set=train_set, val_cases=val_cases, channels=channels,
                      region_names=list(regions), region_labels=region_labels, label_names=label_names,
                      preprocess_spec=cache.spec, datalist=datalist,
                      dataset_name=str(datalist.get("name") or root.name), unlabeled_set=unlabeled_set,
                      source_cases=cases)
