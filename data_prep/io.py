"""Reading NIfTI scans with nibabel, with one clear message per kind of bad file.

Every loader raises :class:`ScanError` (a ``UserError``, exit status 2) whose message
names the file and says what is wrong and what to do. Intensities are read with
``scl_slope``/``scl_inter`` applied (nibabel's ``get_fdata``).
"""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from segan.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class ScanError(UserError):
    """A scan that cannot be used; the message names the file."""


def is_nifti(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def nifti_files(folder: str | Path) -> list[Path]:
    """NIfTI files of a folder, sorted; hidden files (macOS ``._x``, temp files) skipped;
    ``[]`` when the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))


def stem(path: str | Path) -> str:
    """File name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _open(path: Path):
    import nibabel as nib

    if not path.exists():
        raise ScanError(f"{path}: file not found; check the path")
    if path.stat().st_size == 0:
        raise ScanError(f"{path}: file is empty (0 bytes); re-export or remove it")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for non-NIfTI content
        raise ScanError(f"{path}: not a readable NIfTI file ({type(exc).__name__}); re-export it as .nii.gz") from None
    if not hasattr(img, "affine") or img.affine is None:
        raise ScanError(f"{path}: not a NIfTI image with an affine; re-export it as NIfTI")
    return img


def _read_data(img, path: Path) -> np.ndarray:
    try:
        return np.asarray(img.get_fdata(dtype=np.float32))
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise ScanError(f"{path}: file is truncated or corrupt ({type(exc).__name__}); re-copy or re-export it") from None


def read_header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine without reading the voxels (cheap)."""
    img = _open(Path(path))
    return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)


def load_image(paths: str | Path | Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """Load a scan as ``(C, X, Y, Z)`` float32 and its 4x4 affine.

    ``paths`` is one 3D/4D file (channels last, as in MSD) or one 3D file per channel
    (MSD ``case_0000.nii.gz``, ``case_0001.nii.gz``..., or BraTS ``_t1``, ``_t2``...).
    An ``(X, Y, Z, 1)`` file is a single-channel scan. Channel files must share shape
    and affine.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    channels: list[np.ndarray] = []
    affine = None
    for raw in paths:
        path = Path(raw)
        img = _open(path)
        data = _read_data(img, path)
        if data.ndim == 5 and data.shape[3] == 1:  # (X,Y,Z,1,C) from some converters
            data = data[:, :, :, 0, :]
        if data.ndim == 3:
            data = data[None]
        elif data.ndim == 4:
            data = np.moveaxis(data, -1, 0)
        else:
            raise ScanError(
                f"{path}: has {data.ndim} dimensions {tuple(data.shape)}; expected a 3D volume "
                "or a 4D (X,Y,Z,C) multi-channel volume"
            )
        if min(data.shape[1:]) < 2:
            raise ScanError(f"{path}: shape {tuple(data.shape[1:])} is a 2D image, not a 3D volume")
        if affine is None:
            affine = np.asarray(img.affine, dtype=np.float64)
        else:
            if data.shape[1:] != channels[0].shape[1:]:
                raise ScanError(f"{path}: shape {data.shape[1:]} differs from the case's first channel "
                                f"{channels[0].shape[1:]}; resample the channels to one grid")
            if not np.allclose(img.affine, affine, atol=1e-3):
                raise ScanError(f"{path}: affine differs from the case's first channel; register the channels")
        channels.append(data)
    if not channels:
        raise ScanError("no image files given for a case")
    return np.concatenate(channels, axis=0).astype(np.float32, copy=False), affine


def load_label(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a label map as ``(X, Y, Z)`` int array and its affine; (X,Y,Z,1) is accepted."""
    path = Path(path)
    img = _open(path)
    data = _read_data(img, path)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ScanError(f"{path}: label map has shape {tuple(data.shape)}; expected a 3D volume")
    if not np.all(np.isfinite(data)):
        raise ScanError(f"{path}: label map holds NaN/inf values; re-export it with integer labels")
    rounded = np.rint(data)
    if not np.allclose(rounded, data, atol=1e-3):
        raise ScanError(f"{path}: label map holds non-integer values; labels must be integers")
    return rounded.astype(np.int16), np.asarray(img.affine, dtype=np.float64)


def save_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray, dtype=np.uint8,
               scaling: tuple[float, float] | None = None, sform_only: bool = False) -> None:
    """Write ``data`` (X,Y,Z[,C]) atomically with the given affine (qform and sform set).

    ``scaling``: ``(scl_slope, scl_inter)`` stored in the header, so readers see
    ``data * slope + inter`` (``data`` is then the stored integers); ``sform_only``:
    qform code 0, the affine only in the sform (as some converters write).
    """
    import nibabel as nib

    from segan.io_utils import atomic_path

    path = Path(path)
    img = nib.Nifti1Image(np.asarray(data).astype(dtype, copy=False), np.asarray(affine, dtype=np.float64))
    if sform_only:
        img.set_qform(None, code=0)
    else:
        img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(dtype)
    if scaling is not None:
        img.header.set_slope_inter(*scaling)
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, str(tmp))
