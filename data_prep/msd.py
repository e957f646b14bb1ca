"""Read, validate and split NIfTI data sets: MSD (with or without ``dataset.json``) and BraTS.

Layouts (``DatasetInfo.layout``):

- ``msd``: ``dataset.json`` (MSD keys ``modality``/``labels``/``training``/``test``, or
  nnU-Net v2 ``channel_names``/``labels`` with list-valued regions and no file lists)
  beside ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` and optionally ``labelsTs/``.
- ``msd-nojson``: the same folders without ``dataset.json``; images are paired with
  labels by name; a case is one 3D/4D file (``case.nii.gz``) or one file per channel
  (``case_0000.nii.gz``, ``case_0001.nii.gz``...).
- ``brats``: one folder per case holding ``CASE_t1``, ``_t1ce``, ``_t2``, ``_flair``
  and ``_seg`` (BraTS 2023 ``-t1n``, ``-t1c``, ``-t2w``, ``-t2f``, ``-seg`` also read);
  channel order t1, t1ce, t2, flair. Cases without a segmentation are test cases when
  no case has one.

:mod:`data_prep.check` validates what this module finds (every problem one line, naming
the file and the fix); :mod:`data_prep.datalist` splits it into the data list that training
reads back.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.io import (CHANNEL_FILE, NIFTI_SUFFIXES, ScanError, is_nifti, load_label, nifti_files,
                          read_header, stem)
from segan.errors import UserError

BRATS_CHANNELS = ("t1", "t1ce", "t2", "flair")
# BraTS 2023 file suffixes -> the classic names, same channel order.
_BRATS_ALIASES = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair",
                  "t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}
_BRATS_FILE = re.compile(r"^(?P<case>.+?)[_-](?P<kind>t1ce|t1n|t1c|t1|t2w|t2f|t2|flair|seg)$", re.IGNORECASE)
# BraTS labels: 1 necrotic / non-enhancing core, 2 oedema, 4 enhancing (3 since BraTS 2023).
_BRATS_NAMES = {0: "background", 1: "necrotic / non-enhancing core", 2: "oedema", 3: "enhancing",
                4: "enhancing"}


@dataclass
class Case:
    """One case: ``images`` in channel order (one 4D file, or one 3D file per channel)."""

    name: str
    images: list[str]      # absolute paths
    label: str | None      # absolute path (may not exist: check_dataset reports it)


@dataclass
class DatasetInfo:
    root: Path
    name: str
    layout: str                              # "msd" | "msd-nojson" | "brats"
    channel_names: list[str]
    labels: dict[int, str]                   # includes 0: background
    regions: dict[str, list[int]] | None     # dataset.json "regions" / nnU-Net v2 lists / BraTS
    training: list[Case]
    test: list[Case]
    problems: list[str] = field(default_factory=list)   # found while reading the layout
    unlabeled: list[Case] = field(default_factory=list)  # image-only scans (``data.unlabeled``); labels never read


# --------------------------------------------------------------------- label cache
# Label values seen, per file: load_dataset needs them for folders without
# dataset.json and check_dataset needs them again; the cache makes one read do.
_LABEL_CACHE: dict[tuple[str, int, int], tuple[list[int], tuple[int, ...], np.ndarray] | str] = {}


def _label_summary(path: str) -> tuple[list[int], tuple[int, ...], np.ndarray]:
    """(sorted label values, shape, affine) of a label file; raises ScanError."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    hit = _LABEL_CACHE.get(key)
    if hit is None:
        try:
            data, affine = load_label(path)
            hit = (np.unique(data).astype(int).tolist(), tuple(data.shape), affine)
        except ScanError as exc:
            hit = str(exc)
        _LABEL_CACHE[key] = hit
    if isinstance(hit, str):
        raise ScanError(hit)
    return hit


def _seen_label_values(cases: list[Case]) -> set[int]:
    values: set[int] = set()
    for case in cases:
        if case.label and os.path.isfile(case.label):
            try:
                values.update(_label_summary(case.label)[0])
            except ScanError:
                pass  # check_dataset reports it
    return values


# ----------------------------------------------------------------------- discovery
def _find_by_stem(folder: Path, name: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        p = folder / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def _group_channels(files: list[Path], problems: list[str]) -> dict[str, list[str]]:
    """Case name -> image paths in channel order (``case_0000``... or one file)."""
    groups: dict[str, dict[int, Path]] = {}
    for p in files:
        m = CHANNEL_FILE.match(stem(p))
        case, channel = (m["case"], int(m["channel"])) if m else (stem(p), 0)
        slot = groups.setdefault(case, {})
        if channel in slot:
            problems.append(f"{p}: second file for case {case} channel {channel} (also {slot[channel].name}); "
                            "remove one of them")
            continue
        slot[channel] = p
    out = {}
    for case, slot in sorted(groups.items()):
        first = slot[min(slot)]
        if set(slot) == {0} and not CHANNEL_FILE.match(stem(first)):   # one 3D/4D file
            out[case] = [str(first)]
            continue
        # A gap (case_0000, case_0002) keeps the expected path so the check names it.
        ext = ".nii.gz" if first.name.endswith(".nii.gz") else ".nii"
        out[case] = [str(slot.get(c, first.parent / f"{case}_{c:04d}{ext}")) for c in range(max(slot) + 1)]
    return out


def _discover(root: Path, images: str, labels: str, problems: list[str],
              labels_required: bool) -> list[Case]:
    """Cases of ``root/images`` paired by name with ``root/labels``."""
    groups = _group_channels(nifti_files(root / images), problems)
    label_dir = root / labels
    cases = []
    for name, paths in groups.items():
        lab = _find_by_stem(label_dir, name)
        if lab is None and labels_required:
            lab = label_dir / f"{name}.nii.gz"      # expected; check_dataset reports it missing
        cases.append(Case(name, paths, str(lab) if lab else None))
    for lab in nifti_files(label_dir):
        if stem(lab) not in groups:
            problems.append(f"{lab}: label without an image in {images}/; add the image or remove the label")
    return cases


def _channel_count(case: Case) -> int | None:
    """Channels of a case from its headers (cheap), None if unreadable."""
    if len(case.images) > 1:
        return len(case.images)
    try:
        shape, _ = read_header(case.images[0])
    except (ScanError, OSError):
        return None
    return shape[3] if len(shape) == 4 else 1


def _infer_channel_names(cases: list[Case]) -> list[str]:
    counts = Counter(c for c in (_channel_count(case) for case in cases) if c)
    n = counts.most_common(1)[0][0] if counts else 1
    return [f"channel_{i}" for i in range(n)]


def _abs(root: Path, rel: str) -> str:
    return os.path.normpath(str(root / rel[2:] if rel.startswith("./") else root / rel))


# --------------------------------------------------------------------- dataset.json
def _parse_labels(raw: object, path: Path) -> tuple[dict[int, str], dict[str, list[int]] | None]:
    """MSD ``{"0": "background"}`` or nnU-Net v2 ``{"background": 0, "whole": [1, 2, 3]}``."""
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: 'labels' must be a non-empty mapping like "
                        '{"0": "background", "1": "tumour"}; fix the file')
    try:
        if all(str(k).strip().isdigit() for k in raw):
            return {int(k): str(v) for k, v in raw.items()}, None
        labels: dict[int, str] = {}
        regions: dict[str, list[int]] = {}
        for name, value in raw.items():
            if isinstance(value, list):
                regions[str(name)] = sorted(int(v) for v in value)
            else:
                labels[int(value)] = str(name)
                regions[str(name)] = [int(value)]
        if not any(isinstance(v, list) for v in raw.values()):
            return labels, None
        for ids in regions.values():
            for lid in ids:
                labels.setdefault(lid, f"label_{lid}")
        return labels, {k: v for k, v in regions.items() if v != [0]}
    except (TypeError, ValueError):
        raise UserError(f"{path}: 'labels' values must be integers (or lists of integers for regions); "
                        "fix the file") from None


def _parse_regions(raw: object, path: Path) -> dict[str, list[int]]:
    try:
        regions = {str(k): sorted(int(v) for v in ids) for k, ids in raw.items()}  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        raise UserError(f"{path}: 'regions' must map names to lists of label ids, "
                        'e.g. {"whole_tumour": [1, 2, 3]}; fix the file') from None
    return regions


def entry_case(root: Path, image: object, label: object, path: Path, name: str | None = None) -> Case:
    """A case from a file-list entry of ``dataset.json`` or of a data list (``path``, for messages),
    paths relative to ``root`` or absolute; ``./imagesTr/x.nii.gz`` listed but stored as
    ``x_0000...`` (nnU-Net v1 style) resolves to the channel files. ``name`` (a data list's
    ``case``) replaces the name taken from the first image."""
    if isinstance(image, str):
        images = [_abs(root, image)]
    elif isinstance(image, list) and image and all(isinstance(i, str) for i in image):
        images = [_abs(root, i) for i in image]
    else:
        raise UserError(f"{path}: entry {image!r} is not an image path; entries look like "
                        '{"image": "./imagesTr/case.nii.gz", "label": "./labelsTr/case.nii.gz"}')
    if len(images) == 1 and not os.path.exists(images[0]):
        folder, name = Path(images[0]).parent, stem(images[0])
        split = nifti_files(folder)
        channels = [str(p) for p in split if (m := CHANNEL_FILE.match(stem(p))) and m["case"] == name]
        if channels:
            images = channels
    if name is None:
        first = stem(images[0])
        m = CHANNEL_FILE.match(first)
        name = m["case"] if m and len(images) > 1 else first
    return Case(name, images, _abs(root, label) if isinstance(label, str) else None)


def _load_msd(root: Path, meta_path: Path) -> DatasetInfo:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{meta_path}: cannot be read ({type(exc).__name__}); check the file") from None
    except ValueError as exc:
        raise UserError(f"{meta_path}: not valid JSON ({exc}); fix the file") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: must hold a JSON object with 'labels' and 'modality'; fix the file")
    problems: list[str] = []
    labels, regions = _parse_labels(meta.get("labels"), meta_path)
    labels.setdefault(0, "background")
    if meta.get("regions") is not None:
        regions = _parse_regions(meta["regions"], meta_path)

    if isinstance(meta.get("training"), list):
        training = []
        for e in meta["training"]:
            if not isinstance(e, dict):
                raise UserError(f"{meta_path}: 'training' entry {e!r} must be an object with 'image' and 'label'")
            case = entry_case(root, e.get("image"), e.get("label"), meta_path)
            if case.label is None:   # listed without a label: expect it beside the others
                case.label = str(root / "labelsTr" / f"{case.name}.nii.gz")
            training.append(case)
    else:  # nnU-Net v2: no file list, cases are the files in imagesTr/
        training = _discover(root, "imagesTr", "labelsTr", problems, labels_required=True)
    if isinstance(meta.get("test"), list):
        test = []
        for e in meta["test"]:
            img, lab = (e.get("image"), e.get("label")) if isinstance(e, dict) else (e, None)
            case = entry_case(root, img, lab, meta_path)
            if case.label is None:
                found = _find_by_stem(root / "labelsTs", case.name)
                case.label = str(found) if found else None
            test.append(case)
    else:
        test = _discover(root, "imagesTs", "labelsTs", problems, labels_required=False)

    raw_channels = meta.get("channel_names", meta.get("modality"))
    if isinstance(raw_channels, dict) and raw_channels:
        try:
            channel_names = [str(v) for _, v in sorted(raw_channels.items(), key=lambda kv: int(kv[0]))]
        except ValueError:
            raise UserError(f"{meta_path}: 'modality'/'channel_names' keys must be channel indices "
                            '"0", "1", ...; fix the file') from None
    else:
        channel_names = _infer_channel_names(training + test)
    n_declared = meta.get("numTraining")
    if isinstance(n_declared, int) and n_declared != len(training):
        problems.append(f"{meta_path}: numTraining is {n_declared} but {len(training)} training cases were "
                        "found; fix numTraining or add the missing cases")
    return DatasetInfo(root, str(meta.get("name") or root.name), "msd", channel_names, labels, regions,
                       training, test, problems)


# ---------------------------------------------------------------------------- BraTS
def _brats_cases(root: Path) -> list[tuple[str, dict[str, Path]]]:
    """Sub-folders holding BraTS-named files: (case, {t1|t1ce|t2|flair|seg: path})."""
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files: dict[str, Path] = {}
        for f in nifti_files(sub):
            m = _BRATS_FILE.match(stem(f))
            if m:
                files.setdefault(_BRATS_ALIASES[m["kind"].lower()], f)
        if files:
            found.append((sub.name, files))
    return found


def _load_brats(root: Path, found: list[tuple[str, dict[str, Path]]]) -> DatasetInfo:
    any_seg = any("seg" in files for _, files in found)
    training, test = [], []
    for name, files in found:
        ext = ".nii.gz" if str(next(iter(files.values()))).endswith(".nii.gz") else ".nii"
        images = [str(files.get(ch, root / name / f"{name}_{ch}{ext}")) for ch in BRATS_CHANNELS]
        if "seg" in files or any_seg:
            training.append(Case(name, images, str(files.get("seg", root / name / f"{name}_seg{ext}"))))
        else:
            test.append(Case(name, images, None))
    seen = _seen_label_values(training) - {0}
    enhancing = 3 if 3 in seen and 4 not in seen else 4
    ids = sorted(seen | {1, 2, enhancing})
    labels = {0: "background", **{i: _BRATS_NAMES.get(i, f"label_{i}") for i in ids}}
    regions = {"whole_tumour": ids, "tumour_core": [i for i in ids if i != 2], "enhancing": [enhancing]}
    return DatasetInfo(root, root.name, "brats", list(BRATS_CHANNELS), labels, regions, training, test)


def load_dataset(root: Path) -> DatasetInfo:
    """Recognise the layout of ``root`` and list its cases (files are not read here,
    except label values for folders without ``dataset.json``).

    Raises :class:`UserError` if ``root`` is missing or holds no recognisable data set.
    """
    root = Path(root)
    if root.is_file() and root.name == "dataset.json":
        root = root.parent
    if not root.exists():
        raise UserError(f"{root}: folder not found; give the data set folder "
                        "(with dataset.json and imagesTr/, or BraTS case folders)")
    if not root.is_dir():
        raise UserError(f"{root}: is a file, not a data set folder; give the folder holding imagesTr/ "
                        "or the BraTS case folders")
    root = root.absolute()
    if (root / "dataset.json").is_file():
        return _load_msd(root, root / "dataset.json")
    if (root / "imagesTr").is_dir():
        problems: list[str] = []
        training = _discover(root, "imagesTr", "labelsTr", problems, labels_required=True)
        test = _discover(root, "imagesTs", "labelsTs", problems, labels_required=False)
        seen = _seen_label_values(training + test) | {0}
        labels = {v: ("background" if v == 0 else f"label_{v}") for v in sorted(seen)}
        return DatasetInfo(root, root.name, "msd-nojson", _infer_channel_names(training + test), labels,
                           None, training, test, problems)
    found = _brats_cases(root)
    if found:
        return _load_brats(root, found)
    raise UserError(f"{root}: not a recognisable data set: no dataset.json, no imagesTr/ folder and no "
                    "BraTS case folders (CASE/CASE_t1.nii.gz ... CASE_seg.nii.gz); point to the data set folder")


# ----------------------------------------------------------------------- unlabelled
def unlabeled_cases(source: str | Path) -> list[Case]:
    """Image-only cases of a folder or a glob of NIfTI scans (``data.unlabeled``), grouped by case
    like ``imagesTr/`` (``case_0000``... channel files or one 3D/4D file). Their ``label`` is None:
    a label file lying beside a scan is never looked at. Raises :class:`UserError` when nothing matches."""
    import glob

    text = str(source)
    if Path(text).expanduser().is_dir():
        files = nifti_files(Path(text).expanduser())
    else:
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text))
                       if Path(p).is_file() and is_nifti(p) and not Path(p).name.startswith("."))
    problems: list[str] = []
    groups = _group_channels(files, problems)
    if problems:
        raise UserError(problems[0])
    if not groups:
        raise UserError(f"data.unlabeled {text}: no NIfTI scans found; give a folder of scans or a glob "
                        "such as 'scans/*.nii.gz'")
    return [Case(name, paths, None) for name, paths in groups.items()]
