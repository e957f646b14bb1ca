"""Post-processing of predicted region masks: threshold, small objects, largest component, holes.

Applied per output region (one sigmoid channel each) on the scan's own grid, after the
probabilities were mapped back, so ``min_size`` counts voxels of the input scan. The
steps run in this order, each optional (``PostprocessConfig`` in the checkpoint's config):

1. ``prob > threshold``;
2. drop connected objects smaller than ``min_size`` voxels
   (``skimage.morphology.remove_small_objects``);
3. keep only the largest connected component (``skimage.measure.label``);
4. fill enclosed holes (``scipy.ndimage.binary_fill_holes``, 3D cavities).

Connected means sharing a face, an edge or a corner (26-connectivity in 3D), so a thin
diagonal structure stays one object.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage import measure, morphology

from segan.config import PostprocessConfig


def keep_largest_component(mask: np.ndarray, connectivity: int | None = None) -> np.ndarray:
    """The largest connected component of a boolean mask (all False when the mask is empty).

    ``connectivity``: 1 = neighbours share a face, ``mask.ndim`` (default) = a face, an edge
    or a corner (``skimage.measure.label`` semantics).
    """
    components = measure.label(mask, connectivity=connectivity or mask.ndim)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax())


def clean_mask(mask: np.ndarray, largest_component: bool = False, min_size: int = 0,
               fill_holes: bool = False) -> np.ndarray:
    """``(X, Y, Z)`` boolean mask -> cleaned boolean mask of the same shape."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    connectivity = mask.ndim
    if min_size > 1:
        # skimage >= 0.26: objects of max_size voxels or fewer go, i.e. those under min_size.
        mask = morphology.remove_small_objects(mask, max_size=int(min_size) - 1, connectivity=connectivity)
    if largest_component and mask.any():
        mask = keep_largest_component(mask, connectivity)
    if fill_holes and mask.any():
        mask = ndimage.binary_fill_holes(mask)
    return mask


def postprocess(prob: np.ndarray, cfg: PostprocessConfig | Sequence[PostprocessConfig]) -> np.ndarray:
    """``(K, X, Y, Z)`` probabilities -> ``(K, X, Y, Z)`` boolean masks, one per region.

    ``cfg``: one setting for every region, or one per region (e.g. chosen by a cross-validation,
    :mod:`segan.cv_post`).
    """
    prob = np.asarray(prob)
    cfgs = [cfg] * len(prob) if isinstance(cfg, PostprocessConfig) else list(cfg)
    if len(cfgs) != len(prob):
        raise ValueError(f"{len(cfgs)} post-processing settings for {len(prob)} regions")
    return np.stack([
        clean_mask(p > c.threshold, largest_component=c.largest_component, min_size=c.min_size,
                   fill_holes=c.fill_holes)
        for p, c in zip(prob, cfgs)
    ])
