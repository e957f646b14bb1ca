"""Output regions: sets of label ids, one sigmoid channel each, and back to a label map.

Region-based training (as in nnU-Net's BraTS setup) lets nested structures overlap:
phantoms use whole = {1,2,3}, core = {2,3}, enhancing = {3}. Painting back goes from the
largest region to the smallest, each writing the label ids it adds over the regions
inside it, so whole/core/enhancing -> 1/2/3 and disjoint one-label regions map 1:1.
"""

from __future__ import annotations

import numpy as np


def labels_to_regions(label: np.ndarray, region_labels: list[list[int]]) -> np.ndarray:
    """``(X, Y[, Z])`` integer label map -> ``(K, X, Y[, Z])`` float32 0/1, one channel per region."""
    return np.stack([np.isin(label, r) for r in region_labels]).astype(np.float32)


def paint_order(region_labels: list[list[int]]) -> list[tuple[int, int]]:
    """``(region index, label id to paint)`` pairs, largest region first.

    The painted id is the smallest label of the region not covered by a smaller region
    nested inside it (whole {1,2,3} minus core {2,3} -> 1).
    """
    order = sorted(range(len(region_labels)), key=lambda k: -len(region_labels[k]))
    pairs = []
    for k in order:
        own = set(region_labels[k])
        for j, other in enumerate(region_labels):
            if j != k and set(other) < own:
                own -= set(other)
        pairs.append((k, int(min(own or set(region_labels[k])))))
    return pairs


def regions_to_labels(masks: np.ndarray, region_labels: list[list[int]]) -> np.ndarray:
    """``(K, X, Y, Z)`` binary masks -> ``(X, Y, Z)`` uint8 label map with the data set's ids."""
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    for k, label_id in paint_order(region_labels):
        out[masks[k] > 0] = label_id
    return out


def default_regions(labels: dict[int, str]) -> dict[str, list[int]]:
    """One region per foreground label (the MSD default): ``{'edema': [1], ...}``."""
    regions = {}
    for lid, name in sorted(labels.items()):
        if int(lid) == 0:
            continue
        key = str(name).strip().lower().replace(" ", "_") or f"label_{lid}"
        regions[key] = [int(lid)]
    return regions
