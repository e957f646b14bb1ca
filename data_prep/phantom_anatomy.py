"""Geometry of the synthetic phantoms: tissue maps and lesion label maps on a cubic grid.

Everything here lives on the *generation grid*: a cube of ``size`` isotropic voxels in
RAS index order (x left-right, y posterior-anterior, z inferior-superior). Contrast,
noise, resampling to the output voxel size and file encoding are
:mod:`data_prep.phantom_render`'s concern.

``extent`` scales the head inside the field of view (1 = a brain filling about 75 %
of it, as in skull-stripped MR; CT shrinks it so that skull, fat and skin fit around it).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

# Tissue classes of the rendering (not the labels): the row of a contrast table.
# OEDEMA..ENHANCING are the tumour's nested parts, LESION the small-lesion tissue,
# BONE..SKIN the layers around the brain that only CT renders (MR is skull-stripped).
BG, CSF, GM, WM, VESSEL, CAP, OEDEMA, NECROSIS, ENHANCING, LESION, BONE, FAT, SKIN = range(13)
# Head layers outside the brain, thickness as a fraction of the scaled field of view.
_LAYERS = ((BONE, 0.045), (FAT, 0.025), (SKIN, 0.012))

Accept = Callable[[np.ndarray], bool]


# --------------------------------------------------------------------- random fields
def _linear_weights(size: int, low: int, factor: int) -> np.ndarray:
    """``(size, low)`` matrix of linear-interpolation weights from a grid of step ``factor``."""
    pos = np.arange(size, dtype=np.float64) / factor
    left = np.minimum(np.floor(pos).astype(int), low - 2)
    frac = pos - left
    w = np.zeros((size, low), dtype=np.float32)
    w[np.arange(size), left] = 1 - frac
    w[np.arange(size), left + 1] = frac
    return w


def smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """``(size, size, size)`` float32 Gaussian random field, zero mean, unit std.

    ``scale`` is the correlation length in voxels. Drawn on a coarse grid (about
    three samples per correlation length) and upsampled trilinearly, one axis at a
    time as a matrix product: far cheaper than blurring full-resolution noise.
    """
    factor = max(1, int(scale / 3))
    low = -(-size // factor) + 2
    noise = rng.standard_normal((low, low, low)).astype(np.float32)
    field = ndimage.gaussian_filter(noise, sigma=scale / factor, mode="wrap")
    if factor > 1:
        w = _linear_weights(size, low, factor)
        field = np.tensordot(w, field, axes=(1, 0))                        # (S, l, l)
        field = np.tensordot(w, field, axes=(1, 1)).transpose(1, 0, 2)     # (S, S, l)
        field = field @ w.T                                                # (S, S, S)
    field = np.ascontiguousarray(field[:size, :size, :size], dtype=np.float32)
    field -= field.mean()
    return field / (field.std() + 1e-8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel coordinates centred on the volume, each broadcastable to (size,)*3."""
    ax = np.arange(size, dtype=np.float32) - (size - 1) / 2
    return ax[:, None, None], ax[None, :, None], ax[None, None, :]


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    """Normalised radius ``sqrt(sum(((p - c) / r)^2))``; < 1 inside the ellipsoid."""
    return np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                   + ((z - centre[2]) / radii[2]) ** 2)


# ----------------------------------------------------------------------- anatomy
def anatomy(rng: np.random.Generator, size: int, extent: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map ``(S, S, S)`` uint8 (BG..CAP) and the brain's normalised radius ``rho``
    (``< 1`` inside the brain, about ``1 + d / R`` at distance ``d`` outside)."""
    x, y, z = _grid(size)
    s = float(size) * extent
    # Brain: an ellipsoid (RAS: x left-right, y posterior-anterior, z inferior-superior)
    # with a smooth, low-frequency deformation of its surface.
    radii = s * np.array([0.37, 0.44, 0.36]) * rng.uniform(0.92, 1.05, 3)
    rho = _ellipsoid(x, y, z, (0.0, 0.0, s * 0.02), radii)
    rho = rho * (1 + 0.04 * smooth_field(rng, size, s / 4))
    brain = rho < 1.0
    depth = (1.0 - rho) * radii.mean()            # approx. distance from the surface (mm)

    tissue = np.full((size,) * 3, WM, dtype=np.uint8)
    # Cortex of varying thickness, cut by CSF-filled sulci (sheets where a band-pass
    # field crosses zero, reaching into the cortex from the surface).
    thickness = s * 0.06 * (1 + 0.3 * smooth_field(rng, size, s / 6))
    cortex = depth < thickness
    tissue[cortex] = GM
    folds = smooth_field(rng, size, s / 16)
    sulci = cortex & (np.abs(folds) < 0.22) & (depth < thickness * 0.9)
    tissue[sulci | (depth < 1.0)] = CSF
    # Deep grey nuclei (basal ganglia / thalamus-like), both hemispheres.
    for side in (-1, 1):
        c = (side * s * 0.11, s * rng.uniform(-0.03, 0.03), s * 0.0)
        tissue[_ellipsoid(x, y, z, c, s * np.array([0.06, 0.09, 0.07])) < 1] = GM
    # Lateral ventricles with FLAIR-bright periventricular caps at their horns.
    vent_scale = rng.uniform(0.8, 1.3)
    for side in (-1, 1):
        c = (side * s * 0.05, s * 0.0, s * 0.07)
        r = s * np.array([0.035, 0.17, 0.06]) * vent_scale
        vr = _ellipsoid(x, y, z, c, r)
        caps = (vr < 1.35) & (np.abs(y) > r[1] * 0.6)
        tissue[caps & (tissue == WM)] = CAP
        tissue[vr < 1] = CSF
    # Choroid plexus: small enhancing blobs inside the ventricles.
    blobs = smooth_field(rng, size, s / 24)
    tissue[(tissue == CSF) & (depth > s * 0.15) & (blobs > 1.6)] = VESSEL
    # Vessels: curves where two smooth fields both cross zero (enhance in T1ce).
    f1, f2 = smooth_field(rng, size, s / 10), smooth_field(rng, size, s / 10)
    vessels = (np.abs(f1) < 0.07) & (np.abs(f2) < 0.07) & (depth > 1.0)
    tissue[vessels] = VESSEL
    tissue[~brain] = BG
    return tissue, rho


def add_head_layers(tissue: np.ndarray, rho: np.ndarray, extent: float) -> None:
    """Paint skull (BONE), subcutaneous FAT and SKIN around the brain, in place (CT)."""
    radius = tissue.shape[0] * extent * 0.39      # nominal mean brain radius (voxels)
    inner = 1.0
    for tissue_class, thickness in _LAYERS:
        outer = inner + thickness * tissue.shape[0] * extent / radius
        tissue[(rho >= inner) & (rho < outer)] = tissue_class
        inner = outer


# ----------------------------------------------------------------------- lesions
def tumour(rng: np.random.Generator, size: int, rho: np.ndarray, extent: float = 1.0,
           radius: tuple[float, float] = (0.12, 0.22), accept: Accept | None = None) -> np.ndarray:
    """Nested tumour label map ``(S, S, S)`` uint8: 1 oedema, 2 core, 3 enhancing.

    ``radius``: range of the whole tumour's radius as a fraction of the scaled field of
    view; ``accept(label)`` may reject a draw (e.g. one whose labels vanish on a coarse grid).
    """
    x, y, z = _grid(size)
    s = float(size) * extent
    inside = ndimage.binary_erosion(rho < 1.0, iterations=2)
    candidates = np.flatnonzero(rho.ravel() < 0.6)   # tumour centres well inside the brain
    for _ in range(20):  # redraw the rare tumour that leaves a label empty
        ijk = np.unravel_index(candidates[rng.integers(len(candidates))], rho.shape)
        centre = np.array(ijk, dtype=np.float64) - (size - 1) / 2
        r_whole = s * rng.uniform(*radius) * rng.uniform(0.8, 1.2, 3)
        q = _ellipsoid(x, y, z, centre, r_whole)
        whole = (q + 0.35 * smooth_field(rng, size, s / 10) < 1.0) & inside
        # Core: a smaller, off-centre blob inside the oedema.
        k = rng.uniform(0.45, 0.7)
        c_core = centre + rng.uniform(-0.25, 0.25, 3) * r_whole * (1 - k)
        q_core = _ellipsoid(x, y, z, c_core, r_whole * k) + 0.25 * smooth_field(rng, size, s / 14)
        core = (q_core < 1.0) & whole
        # Enhancing rim: the core's outer shell, interrupted in places.
        inner = q_core < 1.0 - rng.uniform(0.25, 0.45)
        gaps = smooth_field(rng, size, s / 12) < -0.8
        rim = core & ~inner & ~gaps
        label = np.zeros((size,) * 3, dtype=np.uint8)
        label[whole] = 1
        label[core] = 2
        label[rim] = 3
        counts = np.bincount(label.ravel(), minlength=4)
        if counts[1:].min() >= max(8, (size // 16) ** 3) and (accept is None or accept(label)):
            return label
    raise RuntimeError("could not draw a tumour with all three labels")  # pragma: no cover


def small_lesions(rng: np.random.Generator, size: int, rho: np.ndarray, tissue: np.ndarray,
                  extent: float = 1.0, count: tuple[int, int] = (6, 12),
                  radius: tuple[float, float] = (0.025, 0.05), accept: Accept | None = None) -> np.ndarray:
    """Label map ``(S, S, S)`` uint8 with ``count`` small irregular lesions (label 1) in
    the white matter, as in multiple sclerosis; radii as a fraction of the field of view."""
    x, y, z = _grid(size)
    s = float(size) * extent
    inside = ndimage.binary_erosion(rho < 1.0, iterations=2)
    candidates = np.flatnonzero((rho.ravel() < 0.8) & (tissue.ravel() == WM))
    shape_noise = smooth_field(rng, size, s / 24)
    for _ in range(20):
        label = np.zeros((size,) * 3, dtype=np.uint8)
        for _ in range(int(rng.integers(count[0], count[1] + 1))):
            ijk = np.unravel_index(candidates[rng.integers(len(candidates))], rho.shape)
            centre = np.array(ijk, dtype=np.float64) - (size - 1) / 2
            radii = s * rng.uniform(*radius) * rng.uniform(0.7, 1.3, 3)
            label[(_ellipsoid(x, y, z, centre, radii) + 0.3 * shape_noise < 1.0) & inside] = 1
        if label.sum() >= 8 and (accept is None or accept(label)):
            return label
    raise RuntimeError("could not draw small lesions")  # pragma: no cover
