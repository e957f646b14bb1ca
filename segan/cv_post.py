"""Post-processing chosen on a cross-validation's out-of-fold predictions (as nnU-Net does).

After ``segan train --folds K`` every fold model predicts its own validation cases, which
it never trained on, on each scan's own grid. Per region, candidate post-processing
(:data:`THRESHOLDS` x keep-the-largest-component off/on; the config's ``min_size`` and
``fill_holes`` stay) is scored by the mean Dice over *all* those out-of-fold cases and all
regions, after the masks went through the label map ``segan predict`` writes (regions
nest, so a region's choice moves the others). Regions are visited in order, each keeping
its best candidate with the others fixed (coordinate ascent, one pass); a candidate
replaces the config's setting only when it raises that mean by at least :data:`MIN_GAIN`,
so noise on a few cases does not move a default.

The choice goes to ``cv.json`` (``"post"``: region -> ``{"threshold", "largest_component"}``)
and ``segan predict -m CVFOLDER`` applies it to the ensemble's averaged probabilities
(:func:`region_posts`). The test cases are never looked at.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

from segan.config import PostprocessConfig

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_GAIN = 0.002  # mean out-of-fold Dice a candidate must add to replace the config's setting


def candidates(base: PostprocessConfig) -> list[PostprocessConfig]:
    """The config's own setting first, then every threshold x largest-component pair."""
    out = [base]
    for t in THRESHOLDS:
        for largest in (False, True):
            c = dataclasses.replace(base, threshold=t, largest_component=largest)
            if c != base:
                out.append(c)
    return out


def region_posts(base: PostprocessConfig, chosen: dict[str, dict] | None,
                 region_names: list[str]) -> list[PostprocessConfig]:
    """One ``PostprocessConfig`` per region: ``base`` with ``chosen[region]``'s keys replaced."""
    chosen = chosen or {}
    return [dataclasses.replace(base, **{k: v for k, v in chosen.get(name, {}).items()
                                         if k in ("threshold", "largest_component")})
            for name in region_names]


def mean_dice(masks: np.ndarray, truth: np.ndarray, region_labels: list[list[int]]) -> float:
    """Mean Dice over regions of boolean ``masks`` ``(K, X, Y, Z)`` read back through the label map that
    ``segan predict`` writes, against boolean ``truth`` ``(K, X, Y, Z)`` (MONAI's ``compute_dice``: a region
    empty on both sides scores 1, as in :mod:`segan.metrics`)."""
    import torch
    from monai.metrics import compute_dice

    from segan.regions import labels_to_regions, regions_to_labels

    written = labels_to_regions(regions_to_labels(masks, region_labels), region_labels)
    dice = compute_dice(torch.from_numpy(np.asarray(written, dtype=np.float32))[None],
                        torch.from_numpy(np.asarray(truth, dtype=np.float32))[None],
                        include_background=True, ignore_empty=False)
    return float(dice.mean())


def case_score(prob: np.ndarray, truth: np.ndarray, posts: list[PostprocessConfig],
               region_labels: list[list[int]]) -> float:
    """:func:`mean_dice` of ``prob`` ``(K, X, Y, Z)`` post-processed with ``posts`` (one per region)."""
    from segan.postprocess import postprocess

    return mean_dice(postprocess(prob, posts), truth, region_labels)


def select(cases: list[tuple[Path, Path]], base: PostprocessConfig, region_names: list[str],
           region_labels: list[list[int]]) -> tuple[dict[str, dict], float, float]:
    """``cases``: ``(probabilities .npy (K, X, Y, Z), truth .npy (K, X, Y, Z) bool)`` per out-of-fold case.

    Returns (changed settings per region, mean Dice with the config's setting, mean Dice with the choice).
    Each pass over the regions reads every case once and post-processes the other regions once.
    """
    from segan.postprocess import postprocess

    def loaded():
        return ((np.load(p), np.load(t)) for p, t in cases)

    cands = candidates(base)
    posts = [base] * len(region_names)
    before = current = float(np.mean([case_score(prob, truth, posts, region_labels) for prob, truth in loaded()]))
    for k in range(len(region_names)):
        per_candidate: list[list[float]] = [[] for _ in cands]
        for prob, truth in loaded():
            masks = postprocess(prob, posts)
            for j, c in enumerate(cands[1:], start=1):  # cands[0] is base, scored as ``current``
                masks[k] = postprocess(prob[k:k + 1], c)[0]
                per_candidate[j].append(mean_dice(masks, truth, region_labels))
        scores = [current] + [float(np.mean(v)) for v in per_candidate[1:]]
        best = int(np.argmax(scores))
        if scores[best] >= current + MIN_GAIN:
            posts[k], current = cands[best], scores[best]
    chosen = {name: {"threshold": c.threshold, "largest_component": c.largest_component}
              for name, c in zip(region_names, posts) if c is not base}
    return chosen, before, current


def choose_postprocessing(folder: Path, fold_checkpoints: list[str], datalists: list[dict],
                          device: str = "cpu") -> dict:
    """Predict every fold's validation cases with that fold's model and :func:`select` on them.

    ``fold_checkpoints[i]`` (relative to ``folder``) belongs to ``datalists[i]``. Returns the
    ``cv.json`` entry ``{"post": {...}, "oof_dice_before": m0, "oof_dice_after": m1, "oof_cases": n}``.
    """
    import torch

    from data_prep.io import load_image, load_label
    from segan.predictor import Predictor
    from segan.regions import labels_to_regions

    with tempfile.TemporaryDirectory(prefix="segan-oof-") as tmp:
        cases: list[tuple[Path, Path]] = []
        meta = None
        for rel, datalist in zip(fold_checkpoints, datalists):
            predictor = Predictor.from_checkpoint(folder / rel, torch.device(device))
            meta, base = predictor.meta, predictor.post
            for item in datalist["validation"]:
                image, affine = load_image(item["image"])
                label, _ = load_label(item["label"])
                prob_path, truth_path = Path(tmp) / f"{len(cases)}_p.npy", Path(tmp) / f"{len(cases)}_t.npy"
                np.save(prob_path, predictor.scan_probabilities(image, affine).astype(np.float16))
                np.save(truth_path, labels_to_regions(label, meta["region_labels"]).astype(bool))
                cases.append((prob_path, truth_path))
        if meta is None or not cases:
            return {}
        print(f"[cv] choosing post-processing on {len(cases)} out-of-fold validation case(s)", file=sys.stderr)
        chosen, before, after = select(cases, base, list(meta["region_names"]), meta["region_labels"])
    return {"post": chosen, "oof_dice_before": before, "oof_dice_after": after, "oof_cases": len(cases)}
