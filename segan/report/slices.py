"""Three orthogonal slices through a predicted mask, with each region's contour, as PNG bytes.

Volumes are turned to the closest RAS orientation first (``nibabel.orientations``), so
"axial", "coronal" and "sagittal" mean what they say whatever the scan's stored axis
order (LPS, LAS, ...), and each panel is drawn with its voxel aspect ratio (anisotropic
scans are not squashed). Panels: axial (R to the right, A up), coronal (R right, S up),
sagittal (A right, S up), all through the mask's centre of mass (the volume's centre
for an empty mask). matplotlib's ``Figure`` only (no pyplot, no GUI backend).
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

# (name, fixed axis, horizontal axis, vertical axis) on a RAS-ordered volume
PLANES = (("axial", 2, 0, 1), ("coronal", 1, 0, 2), ("sagittal", 0, 1, 2))


def region_colors(n: int) -> list[str]:
    """The colour of each region, as ``#rrggbb`` (the page's legend uses the same ones)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10"]
    return [to_hex(cmap(i % 10)) for i in range(n)]


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` ``(X, Y, Z, ...)`` on the grid of ``affine`` -> (the volume in the closest RAS
    axis order, its voxel spacing in mm ``(3,)`` in that order)."""
    from nibabel import orientations

    ornt = orientations.io_orientation(affine)
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    ras_spacing = np.empty(3)
    for axis in range(3):
        ras_spacing[int(ornt[axis, 0])] = spacing[axis]
    return orientations.apply_orientation(volume, ornt), ras_spacing


def mask_centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Voxel index of the centre of mass of ``labels > 0`` ``(X, Y, Z)``; the volume's centre if empty."""
    idx = np.argwhere(labels > 0)
    centre = idx.mean(axis=0) if len(idx) else (np.array(labels.shape) - 1) / 2
    return tuple(int(round(c)) for c in centre)  # type: ignore[return-value]


def _normalise(img: np.ndarray) -> np.ndarray:
    finite = img[np.isfinite(img)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    return np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img, dtype=float)


def _plane(volume: np.ndarray, fixed: int, index: int) -> np.ndarray:
    """The 2D slice ``index`` along axis ``fixed`` of an ``(X, Y, Z)`` volume, keeping axis order."""
    return np.take(volume, min(max(index, 0), volume.shape[fixed] - 1), axis=fixed)


def slices_png(labels: np.ndarray, affine: np.ndarray, regions: Sequence[tuple[str, Sequence[int]]],
               image: np.ndarray | None = None, uncertainty: np.ndarray | None = None,
               title: str = "", dpi: int = 80) -> bytes:
    """PNG of three orthogonal slices through the mask centre.

    Args:
        labels: the predicted label map ``(X, Y, Z)`` (integer label ids) on the grid of ``affine``.
        affine: its 4x4 voxel-to-world matrix.
        regions: ``(name, label ids)`` per region; region k's contour is drawn where
            ``labels`` is in its ids, in colour ``region_colors(K)[k]``.
        image: the scan channel to draw under the contours ``(X, Y, Z)``, same grid; ``None``
            draws the contours on black.
        uncertainty: a second row: the uncertainty map ``(X, Y, Z)`` or ``(X, Y, Z, K)``
            (the maximum over regions is shown) with the same contours.
    """
    from matplotlib.figure import Figure
    from skimage import measure

    labels_ras, spacing = to_ras(np.asarray(labels), affine)
    image_ras = to_ras(np.asarray(image, dtype=np.float32), affine)[0] if image is not None else None
    unc_ras = None
    if uncertainty is not None:
        unc = np.asarray(uncertainty, dtype=np.float32)
        unc_ras = to_ras(unc.max(axis=3) if unc.ndim == 4 else unc, affine)[0]
    centre = mask_centre(labels_ras)
    colors = region_colors(len(regions))
    rows = [("image", image_ras)] + ([("uncertainty", unc_ras)] if unc_ras is not None else [])
    fig = Figure(figsize=(9, 3.2 * len(rows)), dpi=dpi)
    unc_max = float(np.nanmax(unc_ras)) if unc_ras is not None and unc_ras.size else 0.0
    for r, (kind, background) in enumerate(rows):
        for p, (plane, fixed, h, v) in enumerate(PLANES):
            ax = fig.add_subplot(len(rows), 3, r * 3 + p + 1)
            lab = _plane(labels_ras, fixed, centre[fixed])
            aspect = spacing[v] / spacing[h]
            # rows of imshow's array are the vertical axis: transpose, origin at the bottom
            if kind == "uncertainty":
                shown = ax.imshow(_plane(background, fixed, centre[fixed]).T, cmap="magma", origin="lower",
                                  interpolation="nearest", aspect=aspect, vmin=0.0, vmax=unc_max or 1.0)
            else:
                bg = (_normalise(_plane(background, fixed, centre[fixed])) if background is not None
                      else np.zeros(lab.shape))
                ax.imshow(bg.T, cmap="gray", origin="lower", interpolation="nearest", aspect=aspect, vmin=0, vmax=1)
            for (_, ids), color in zip(regions, colors):
                mask = np.isin(lab, list(ids)).T.astype(np.float32)
                for c in measure.find_contours(mask, 0.5):
                    ax.plot(c[:, 1], c[:, 0], "-", color=color, linewidth=1.2)
            ax.set_title(f"{plane} {centre[fixed]}" + (" (uncertainty)" if kind == "uncertainty" else ""),
                         fontsize=8)
            ax.set_axis_off()
        if kind == "uncertainty":
            fig.colorbar(shown, ax=fig.axes[-3:], fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=9)
    return figure_png(fig)


def figure_png(fig) -> bytes:
    """A matplotlib ``Figure`` as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
