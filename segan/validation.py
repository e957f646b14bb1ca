"""Validation on whole preprocessed volumes: Dice, expected calibration error (and at the end HD95) per region."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from segan.sliding import predict_volume

ECE_BINS = 15


@dataclass
class ValidationResult:
    metrics: dict[str, float]
    # one axial slice for overlays: image (C,H,W), target (K,H,W), prediction (K,H,W)
    overlay: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    per_case: dict[str, list[float]] = field(default_factory=dict)


def _overlay_slice(image: torch.Tensor, target: torch.Tensor, pred: torch.Tensor):
    z = int(target.sum(dim=(0, 1, 2)).argmax())  # the slice with the most foreground
    return (image[..., z].float().cpu().numpy(), target[..., z].cpu().numpy(), pred[..., z].cpu().numpy())


@torch.no_grad()
def validate(model: nn.Module, cases: list, region_names: list[str], spatial_dims: int, patch_size: list[int],
             device: torch.device, threshold: float = 0.5, amp: bool = False, hd95: bool = False,
             overlap: float = 0.5, sw_batch_size: int = 4) -> ValidationResult:
    """Predict each ``VolumeCase`` (image ``(C,X,Y,Z)``, target ``(K,X,Y,Z)``) and score it.

    Dice uses MONAI's ``compute_dice`` with ``ignore_empty=False``: a region absent from
    both prediction and truth scores 1, a false positive on an empty truth scores 0.
    ``val_ece_<region>``: MONAI's ``CalibrationErrorMetric`` (15 equal-width bins of the
    region's probability over every voxel of a case, |mean truth - mean probability| weighted
    by the bin's share of voxels), averaged over the cases.
    """
    from monai.metrics import CalibrationErrorMetric, compute_dice, compute_hausdorff_distance

    was_training = model.training
    model.eval()
    dices: list[torch.Tensor] = []
    hds: list[torch.Tensor] = []
    overlay = None
    per_case = {}
    # Per-case values from the metric's __call__, never ``aggregate()``: aggregating syncs its
    # buffer across ranks (an all_gather), and validation runs on rank 0 only, so under DDP
    # the other rank never joins and rank 0 blocks forever.
    ece = CalibrationErrorMetric(num_bins=ECE_BINS, include_background=True, metric_reduction="mean_batch")
    eces: list[torch.Tensor] = []
    for case in cases:
        image = torch.as_tensor(np.ascontiguousarray(case.image), device=device)
        target = torch.as_tensor(np.ascontiguousarray(case.target), device=device)
        prob = predict_volume(model, image, spatial_dims, patch_size, sw_batch_size=sw_batch_size,
                              overlap=overlap, amp=amp)
        pred = (prob > threshold).float()
        dice = compute_dice(pred[None], target[None], include_background=True, ignore_empty=False)[0]
        dices.append(dice.cpu())
        eces.append(ece(y_pred=prob[None].float(), y=target[None].float())[0].cpu())
        per_case[case.name] = dice.cpu().tolist()
        if hd95:
            with warnings.catch_warnings():  # MONAI 1.5+ deprecation chatter from its own internals
                warnings.simplefilter("ignore", FutureWarning)
                hd = compute_hausdorff_distance(pred[None].cpu(), target[None].cpu(), include_background=True,
                                                percentile=95)[0]
            hds.append(hd)
        if overlay is None:
            overlay = _overlay_slice(image, target, pred)
    model.train(was_training)
    metrics: dict[str, float] = {}
    if dices:
        d = torch.stack(dices).mean(0)
        for name, value in zip(region_names, d.tolist()):
            metrics[f"val_dice_{name}"] = float(value)
        metrics["val_dice_mean"] = float(d.mean())
        for name, value in zip(region_names, torch.stack(eces).nanmean(0).tolist()):
            metrics[f"val_ece_{name}"] = float(value)
    if hds:
        h = torch.stack(hds)
        for k, name in enumerate(region_names):
            finite = h[:, k][torch.isfinite(h[:, k])]  # inf/nan when a region is empty on one side
            if finite.numel():
                metrics[f"val_hd95_{name}"] = float(finite.mean())
    return ValidationResult(metrics, overlay, per_case)
