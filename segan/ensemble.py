"""Ensembles and uncertainty: ``segan predict -m A -m B ...`` or ``-m <cv folder>``.

Every ``segan predict`` runs an :class:`Ensemble`; one model is an ensemble of one, so
there is one prediction path. Each member is a :class:`segan.predictor.Predictor`: it
replays its own checkpoint's preprocessing and maps its probabilities back onto the scan's
own grid (:meth:`~segan.predictor.Predictor.scan_probabilities`); the ensemble averages
those ``(K, X, Y, Z)`` maps, then thresholds and post-processes once with the first
member's ``post`` settings (or a CV folder's out-of-fold choice, below). Members must predict
the same regions (names and label ids) from the same channels, else :class:`~segan.errors.UserError` (exit 2) names both models.

Uncertainty (``--uncertainty``), per region and voxel, on the scan's grid:

- with two or more *members* (models x flip-TTA passes when ``--tta``): the variance
  (population, ``ddof=0``) of the members' probabilities, in [0, 0.25];
- with a single member: the binary predictive entropy of the probability,
  ``-p log2 p - (1-p) log2 (1-p)``, in bits, in [0, 1].

:data:`UNC_KINDS` names them; ``model.json`` records which one a folder holds.

A cross-validation folder (written by ``segan train --folds K``) holds ``cv.json`` with
``{"folds": ["fold_0/best.pt", ...]}``, paths relative to the folder; ``-m FOLDER``
expands to those checkpoints, and its ``"post"`` (per-region threshold and largest component,
chosen on the folds' out-of-fold predictions by :mod:`segan.cv_post`) replaces the members'
``post`` for the averaged probabilities; ``model.json`` records it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from segan.errors import UserError
from segan.predictor import Predictor, resolve_model

if TYPE_CHECKING:
    from segan.config import PostprocessConfig

CV_FILE = "cv.json"
UNC_KINDS = {"variance": "variance of the members' probabilities (models x TTA flips)",
             "entropy": "binary predictive entropy of the probability, in bits"}


# ---------------------------------------------------------------- models
def expand_models(models: list[str], tracking_uri: str | None = None) -> list[tuple[str, Path]]:
    """``-m`` values -> ``(source, local checkpoint)`` pairs, in order.

    A folder with ``cv.json`` gives its folds (source ``FOLDER/<fold path>``); anything else
    goes through :func:`segan.predictor.resolve_model` (checkpoint, training folder, MLflow URI).
    """
    if not models:
        raise UserError("no model given; pass -m with a checkpoint, a training folder or a cv folder")
    out: list[tuple[str, Path]] = []
    for model in models:
        folder = Path(model).expanduser()
        if not model.startswith(("runs:/", "models:/")) and (folder / CV_FILE).is_file():
            for rel in _cv_folds(folder / CV_FILE):
                out.append((str(folder / rel), resolve_model(str(folder / rel))))
        else:
            out.append((model, resolve_model(model, tracking_uri)))
    return out


def _cv_folds(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({type(exc).__name__}); rewrite it as "
                        '{"folds": ["fold_0/best.pt", ...]}') from None
    folds = data.get("folds") if isinstance(data, dict) else None
    if not isinstance(folds, list) or not folds or not all(isinstance(f, str) and f for f in folds):
        raise UserError(f"{path}: key 'folds' must be a non-empty list of checkpoint paths relative to "
                        f"{path.parent}, e.g. [\"fold_0/best.pt\"]")
    return folds


def cv_post_choice(models: list[str]) -> dict | None:
    """The post-processing a cross-validation chose on its out-of-fold cases (``cv.json`` ``"post"``,
    :mod:`segan.cv_post`), when ``models`` is that one CV folder; else None (each model's own ``post``)."""
    if len(models) != 1 or models[0].startswith(("runs:/", "models:/")):
        return None
    path = Path(models[0]).expanduser() / CV_FILE
    if not path.is_file():
        return None
    post = json.loads(path.read_text()).get("post")  # readable: expand_models parsed it already
    return post if isinstance(post, dict) else None


def _regions(meta: dict) -> list[tuple[str, list[int]]]:
    return [(str(n), [int(i) for i in ids]) for n, ids in zip(meta["region_names"], meta["region_labels"])]


def _describe(regions: list[tuple[str, list[int]]]) -> str:
    return ", ".join(f"{n}={','.join(map(str, ids))}" for n, ids in regions)


@dataclass
class EnsembleOutput:
    """One scan's prediction, all on the scan's own grid ``(X, Y, Z)``.

    ``labels`` uint8 label map; ``prob`` float32 ``(K, X, Y, Z)`` mean probability; ``masks``
    bool ``(K, X, Y, Z)`` post-processed region masks; ``unc`` float32 ``(K, X, Y, Z)`` or None.
    """

    labels: np.ndarray
    prob: np.ndarray
    masks: np.ndarray
    unc: np.ndarray | None = None


@dataclass
class Ensemble:
    """Members (one :class:`Predictor` per checkpoint) and where they came from."""

    members: list[Predictor]
    sources: list[tuple[str, Path]]
    # one PostprocessConfig per region: the first member's post, or a CV's out-of-fold choice
    posts: list[PostprocessConfig]
    post_source: str | None = None  # the cv.json the choice came from

    @classmethod
    def load(cls, models: list[str], device: torch.device, sw_batch: int | None = None,
             overlap: float | None = None, tracking_uri: str | None = None) -> "Ensemble":
        sources = expand_models(models, tracking_uri)
        members = [Predictor.from_checkpoint(path, device, sw_batch=sw_batch, overlap=overlap)
                   for _, path in sources]
        from segan.cv_post import region_posts

        chosen = cv_post_choice(models)
        ensemble = cls(members, sources, region_posts(members[0].post, chosen, list(members[0].meta["region_names"])),
                       str(Path(models[0]) / CV_FILE) if chosen is not None else None)
        ensemble.check_compatible()
        return ensemble

    def check_compatible(self) -> None:
        """Same regions (names, label ids, order) and channels in every member, else UserError."""
        first, (src0, _) = self.members[0].meta, self.sources[0]
        for member, (src, _) in zip(self.members[1:], self.sources[1:]):
            if _regions(member.meta) != _regions(first):
                raise UserError(f"{src}: predicts regions {_describe(_regions(member.meta))} but {src0} predicts "
                                f"{_describe(_regions(first))}; ensemble only models trained for the same regions")
            if list(member.meta["channels"]) != list(first["channels"]):
                raise UserError(f"{src}: expects channels {', '.join(member.meta['channels'])} but {src0} expects "
                                f"{', '.join(first['channels'])}; ensemble only models with the same input channels")

    @property
    def meta(self) -> dict:
        """The first member's meta: channels and regions are the same in every member."""
        return self.members[0].meta

    def uncertainty_kind(self, tta: bool) -> str:
        """``"variance"`` with two or more members (models x flips), else ``"entropy"``."""
        flips = 2 ** self.members[0].spatial_dims if tta else 1
        return "variance" if len(self.members) * flips >= 2 else "entropy"

    def predict(self, image: np.ndarray, affine: np.ndarray, tta: bool = False,
                uncertainty: bool = False) -> EnsembleOutput:
        """``image`` ``(C, X, Y, Z)`` on its own grid -> :class:`EnsembleOutput` on that grid."""
        from segan.postprocess import postprocess
        from segan.regions import regions_to_labels

        kind = self.uncertainty_kind(tta) if uncertainty else None
        per_flip = kind == "variance" and tta
        total = total_sq = None
        count = 0
        for member in self.members:
            p = member.scan_probabilities(image, affine, tta, per_flip=per_flip)
            p = p if per_flip else p[None]  # (F, K, X, Y, Z)
            p64 = p.astype(np.float64)
            total = p64.sum(0) if total is None else total + p64.sum(0)
            if kind == "variance":
                sq = (p64 ** 2).sum(0)
                total_sq = sq if total_sq is None else total_sq + sq
            count += p.shape[0]
        prob = (total / count).astype(np.float32)
        unc = None
        if kind == "variance":
            unc = np.clip(total_sq / count - (total / count) ** 2, 0.0, None).astype(np.float32)
        elif kind == "entropy":
            unc = binary_entropy(prob)
        masks = postprocess(prob, self.posts)
        return EnsembleOutput(regions_to_labels(masks, self.meta["region_labels"]), prob, masks, unc)

    def info(self, given: list[str], uncertainty: str | None) -> str:
        """``model.json``: every member, the shared channels and regions, the uncertainty kind."""
        meta = self.meta
        info = {"model": given[0] if len(given) == 1 else list(given), "checkpoint": str(self.sources[0][1]),
                "models": [{"model": src, "checkpoint": str(path)} for src, path in self.sources],
                "dataset": meta.get("dataset"), "channels": meta["channels"],
                "regions": dict(zip(meta["region_names"], meta["region_labels"])),
                "labels": {str(k): v for k, v in meta.get("label_names", {}).items()},
                "uncertainty": uncertainty}
        if self.post_source is not None:
            info["post"] = {"from": self.post_source, **{
                name: {"threshold": c.threshold, "largest_component": c.largest_component}
                for name, c in zip(meta["region_names"], self.posts)}}
        return json.dumps(info, indent=2) + "\n"


# ---------------------------------------------------------------- uncertainty
def binary_entropy(prob: np.ndarray) -> np.ndarray:
    """Voxel-wise ``-p log2 p - (1-p) log2(1-p)`` in bits (0 at p = 0 or 1, 1 at p = 0.5), float32."""
    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-12, 1 - 1e-12)
    h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.where((prob <= 0) | (prob >= 1), 0.0, h).astype(np.float32)


def boundary(mask: np.ndarray) -> np.ndarray:
    """The voxels of a boolean mask next to its outside: ``mask XOR eroded mask`` (face neighbours)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    return mask ^ ndimage.binary_erosion(mask, border_value=0)


def uncertainty_summary(unc: np.ndarray, masks: np.ndarray, region_names: list[str]) -> dict[str, str]:
    """Per-case CSV columns from ``unc`` and ``masks`` ``(K, X, Y, Z)``.

    ``unc_mean_<region>`` (mean inside the predicted mask), ``unc_boundary_<region>`` (mean on
    its boundary, :func:`boundary`), blank for an empty mask; ``uncertainty``: mean of the
    non-blank ``unc_mean_*`` (blank when every mask is empty), first. Values as ``%.4f``.
    """
    cols: dict[str, str] = {}
    means = []
    for k, name in enumerate(region_names):
        inside = np.asarray(masks[k], dtype=bool)
        edge = boundary(inside)
        mean = float(unc[k][inside].mean()) if inside.any() else None
        cols[f"unc_mean_{name}"] = "" if mean is None else f"{mean:.4f}"
        cols[f"unc_boundary_{name}"] = f"{float(unc[k][edge].mean()):.4f}" if edge.any() else ""
        if mean is not None:
            means.append(mean)
    return {"uncertainty": f"{np.mean(means):.4f}" if means else "", **cols}
