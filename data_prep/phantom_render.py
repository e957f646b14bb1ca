"""Turning phantom tissue maps into scans: contrast, partial volume, noise, voxel size,
orientation and stored data type.

Rendering: tissue map -> per-channel intensity lookup (MR: arbitrary units per
contrast; CT: Hounsfield units) -> partial-volume blur -> texture (and an MR bias
field) -> area-weighted averaging onto the output voxels (a 1x1x4 mm set averages four
1 mm slices into one, as a thick slice does) -> noise drawn on the output grid (Rician
for MR, Gaussian for CT) -> MR random gain per channel. The stored orientation and data
type are applied last, so every variant shows the same physical object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data_prep.phantom_anatomy import BG, ENHANCING, LESION, SKIN, smooth_field
from data_prep.phantom_spec import PhantomSpec

# MR intensity per tissue class (rows BG..LESION) and channel (T1, T1ce, T2, FLAIR),
# before bias and noise. Why these numbers: each tumour label coincides with some normal
# tissue in at least one channel (oedema ~ GM in T1/T1ce, ~ CAP in T2/FLAIR; necrosis ~
# CSF in T1/T2; enhancing ~ VESSEL in T1ce), and each pair differs in another channel.
# Small lesions (LESION) are T2/FLAIR-bright like the periventricular caps.
MR_CONTRAST = np.array([
    #  T1    T1ce   T2    FLAIR
    [0.00, 0.00, 0.00, 0.00],   # BG (outside the skull-stripped brain)
    [0.25, 0.26, 1.00, 0.16],   # CSF: bright T2, suppressed in FLAIR
    [0.56, 0.58, 0.64, 0.66],   # GM
    [0.80, 0.82, 0.44, 0.50],   # WM
    [0.50, 0.98, 0.38, 0.45],   # VESSEL / choroid plexus: enhance in T1ce only
    [0.60, 0.62, 0.78, 0.78],   # CAP: periventricular FLAIR-bright caps (not tumour)
    [0.56, 0.58, 0.84, 0.80],   # OEDEMA (label 1)
    [0.30, 0.32, 0.94, 0.58],   # NECROSIS / non-enhancing core (label 2)
    [0.58, 1.00, 0.70, 0.72],   # ENHANCING rim (label 3)
    [0.52, 0.54, 0.86, 0.82],   # LESION (small lesions)
], dtype=np.float32)
# One-channel T1-like MR: lesions are hypointense, between CSF and grey matter, so
# partial-volume cortex and sulci look like them and context is needed.
T1_CONTRAST = np.array([[0.00], [0.25], [0.56], [0.80], [0.50], [0.62], [0.44], [0.32], [0.60], [0.46]],
                       dtype=np.float32)
# CT in Hounsfield units, rows BG..SKIN: air outside, brain ~30-40, a tumour a little
# darker (oedema, necrosis) with a faintly enhancing rim, small lesions a little brighter
# (hyperdense), skull +700, subcutaneous fat -100, skin ~40.
CT_CONTRAST = np.array([-1000.0, 8.0, 40.0, 30.0, 48.0, 32.0, 20.0, 12.0, 52.0, 58.0, 700.0, -100.0, 40.0],
                       dtype=np.float32)[:, None]
CT_NOISE_HU = 6.0
CT_RANGE_HU = (-1024.0, 3071.0)
MR_NOISE = 0.035


@dataclass(frozen=True)
class Grid:
    """Generation grid (``size``^3 voxels of ``voxel`` mm, RAS) and the output grid.

    ``ratios``: output voxel size / generation voxel size per axis (>= 1); ``shape`` and
    ``affine``: the output grid in RAS, placed so that its voxels cover the generation
    grid's field of view (same physical object whatever the voxel size).
    """

    size: int
    voxel: float
    ratios: tuple[float, float, float]
    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def identity(self) -> bool:
        return all(r == 1 for r in self.ratios)


def make_grid(fov_mm: int, spacing: tuple[float, float, float]) -> Grid:
    """Grid for a field of view of ``fov_mm`` per side at ``spacing`` mm: generated at
    ``min(1, min(spacing))`` mm, so coarse voxels average finer anatomy (partial volume)."""
    voxel = min(1.0, min(spacing))
    size = int(round(fov_mm / voxel))
    ratios = tuple(float(s) / voxel for s in spacing)
    shape = tuple(int(np.floor(size / r + 1e-6)) for r in ratios)
    affine = np.diag([*(float(s) for s in spacing), 1.0])
    # Voxel j of the output covers generation voxels [j r, (j + 1) r): its centre sits at
    # generation index (j + 0.5) r - 0.5; the generation grid is centred on the origin.
    affine[:3, 3] = [(float(s) - voxel) / 2 - (size // 2) * voxel for s in spacing]
    return Grid(size, voxel, ratios, shape, affine)  # type: ignore[arg-type]


def _box_weights(n_in: int, ratio: float, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` overlap of output voxel ``[j r, (j+1) r)`` with input voxel ``[i, i+1)``, / r."""
    edges = np.arange(n_out + 1, dtype=np.float64) * ratio
    left = np.arange(n_in, dtype=np.float64)[None, :]
    overlap = np.minimum(edges[1:, None], left + 1) - np.maximum(edges[:-1, None], left)
    return (np.clip(overlap, 0.0, None) / ratio).astype(np.float32)


def downsample(volume: np.ndarray, grid: Grid) -> np.ndarray:
    """``(S, S, S)`` float on the generation grid -> ``grid.shape``: exact area (volume)
    averaging, one axis at a time; the identity when the voxel sizes agree."""
    out = volume
    for axis, (ratio, n_out) in enumerate(zip(grid.ratios, grid.shape)):
        if ratio == 1 and n_out == out.shape[axis]:
            continue
        weights = _box_weights(out.shape[axis], ratio, n_out)
        out = np.moveaxis(np.tensordot(weights, out, axes=(1, axis)), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def downsample_label(label: np.ndarray, grid: Grid) -> np.ndarray:
    """Nested label map (``label >= k`` shrinks with k) -> ``grid.shape`` uint8: a voxel
    gets label k where at least half of it is covered by labels >= k."""
    if grid.identity:
        return label
    out = np.zeros(grid.shape, dtype=np.uint8)
    for k in range(1, int(label.max()) + 1):
        out += downsample((label >= k).astype(np.float32), grid) >= 0.5
    return out


def render(rng: np.random.Generator, tissue: np.ndarray, label: np.ndarray, parts: dict[int, int],
           spec: PhantomSpec, grid: Grid) -> np.ndarray:
    """Scan ``(*grid.shape, C)`` float32 (RAS) from the generation-grid tissue and label maps.

    ``parts`` maps each label value to the tissue class it is rendered with.
    """
    size = tissue.shape[0]
    s = float(size)
    classes = tissue.copy()
    for value, tissue_class in parts.items():
        classes[label == value] = tissue_class
    ct = spec.modality == "ct"
    base = CT_CONTRAST if ct else (MR_CONTRAST if spec.channels == 4 else T1_CONTRAST)
    n_rows = SKIN + 1 if ct else max(ENHANCING, *parts.values()) + 1
    if ct:  # calibrated units: small additive differences between scanners, air stays -1000
        table = base[:n_rows] + rng.normal(0.0, 3.0, (n_rows, 1)).astype(np.float32)
        table[BG] = base[BG]
    else:  # intensities jitter a little per case, as between scanners
        table = base[:n_rows] * rng.uniform(0.96, 1.04, (n_rows, base.shape[1])).astype(np.float32)
    # Lesions infiltrate: near the border of label 1 the scan is a mix of lesion and the
    # tissue underneath (weight 0.6 at the edge, 1 from 2 voxels inside), so the visible
    # edge is soft while the label stays a hard mask, as in annotated scans.
    first = label == 1
    weight = np.ones(tissue.shape, dtype=np.float32)
    box = ndimage.find_objects(first.astype(np.uint8))[0]
    box = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)
    depth = ndimage.distance_transform_edt(label[box] > 0).astype(np.float32)
    weight[box] = np.where(first[box], np.clip(0.6 + 0.4 * (depth - 1) / 2, 0.6, 1.0), 1.0)
    texture = smooth_field(rng, size, s / 20)
    out = np.empty((*grid.shape, base.shape[1]), dtype=np.float32)
    if ct:
        img = ndimage.gaussian_filter(weight * table[classes, 0] + (1 - weight) * table[tissue, 0], sigma=0.7)
        img = downsample(img + 4.0 * texture * (tissue != BG), grid)
        img += rng.standard_normal(img.shape, dtype=np.float32) * CT_NOISE_HU
        out[..., 0] = np.clip(img, *CT_RANGE_HU)
        return out
    shared_bias = smooth_field(rng, size, s / 1.5)
    brain = tissue != BG
    if not grid.identity:
        brain = downsample(brain.astype(np.float32), grid) >= 0.5
    for ch in range(base.shape[1]):
        mixed = weight * table[classes, ch] + (1 - weight) * table[tissue, ch]
        img = ndimage.gaussian_filter(mixed, sigma=0.7)                  # partial volume
        bias = np.exp(0.10 * shared_bias + 0.05 * smooth_field(rng, size, s / 1.5))
        img = downsample(img * bias * (1 + 0.04 * texture), grid)
        noise_re = rng.standard_normal(img.shape, dtype=np.float32) * MR_NOISE
        noise_im = rng.standard_normal(img.shape, dtype=np.float32) * MR_NOISE
        img = np.sqrt((img + noise_re) ** 2 + noise_im ** 2)             # Rician magnitude
        gain = rng.uniform(300.0, 1500.0)                                # real scans are not in [0, 1]
        out[..., ch] = np.where(brain, img * gain, 0.0)
    return out


def reorient(image: np.ndarray, label: np.ndarray, affine: np.ndarray,
             code: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS-ordered ``image`` ``(X, Y, Z[, C])`` and ``label`` -> voxel axes ordered as ``code``
    (e.g. LPS flips x and y), with the affine that keeps every voxel where it was."""
    if code == "RAS":
        return image, label, affine
    import nibabel as nib

    xform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                            nib.orientations.axcodes2ornt(code))
    new_affine = affine @ nib.orientations.inv_ornt_aff(xform, label.shape)
    return (np.ascontiguousarray(nib.orientations.apply_orientation(image, xform)),
            np.ascontiguousarray(nib.orientations.apply_orientation(label, xform)), new_affine)


def encode(image: np.ndarray, spec: PhantomSpec,
           index: int) -> tuple[np.ndarray, type, tuple[float, float] | None]:
    """Stored voxels, their dtype and ``(scl_slope, scl_inter)`` (None: no scaling).

    int16: CT as ``HU + 1024`` with slope 1, inter -1024 (the usual scanner export); MR
    with a per-case slope mapping the maximum to 30000. uint8: each case rescaled from its
    own minimum..maximum to 0..255, without header scaling (the original units are lost,
    as in many exports). ``mixed`` alternates float32 (even cases) and int16 (odd).
    """
    kind = ("float32", "int16")[index % 2] if spec.dtype == "mixed" else spec.dtype
    if kind == "float32":
        return image.astype(np.float32, copy=False), np.float32, None
    if kind == "int16":
        if spec.modality == "ct":
            slope, inter = 1.0, -1024.0
        else:
            slope, inter = float(np.float32(max(float(np.abs(image).max()), 1e-6) / 30000.0)), 0.0
        stored = np.clip(np.rint((image - inter) / slope), -32768, 32767).astype(np.int16)
        return stored, np.int16, (slope, inter)
    lo, hi = float(image.min()), float(image.max())
    stored = np.rint((image - lo) / max(hi - lo, 1e-6) * 255.0).astype(np.uint8)
    return stored, np.uint8, None
