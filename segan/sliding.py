"""Whole-volume prediction with a trained segmentor, shared by validation and inference.

2D models run slice by slice along the last (axial, after RAS reorientation) axis in
batches; 3D models use MONAI's sliding-window inference with Gaussian blending.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from segan.runtime import autocast


@torch.no_grad()
def predict_volume(model: nn.Module, image: torch.Tensor, spatial_dims: int, roi_size: list[int] | None = None,
                   sw_batch_size: int = 4, overlap: float = 0.5, tta: bool = False, amp: bool = False,
                   slice_batch: int = 32) -> torch.Tensor:
    """Probabilities ``(K, X, Y, Z)`` float32 for one preprocessed volume ``(C, X, Y, Z)``.

    ``image`` should already be on the model's device; ``amp`` turns on bf16 autocast on it
    (callers decide with :func:`segan.runtime.amp_enabled`). ``tta`` averages over every
    combination of flips of the model's spatial axes (4 passes in 2D, 8 in 3D).
    """
    device = image.device
    flips: list[tuple[int, ...]] = [()]
    if tta:
        axes = list(range(2, 2 + spatial_dims))
        flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def run(batch: torch.Tensor) -> torch.Tensor:  # (N, C, *s) -> probabilities (N, K, *s)
        total = None
        for dims in flips:
            x = batch.flip(dims) if dims else batch
            with autocast(device, amp):
                logits = model(x)
            prob = torch.sigmoid(logits.float())
            prob = prob.flip(dims) if dims else prob
            total = prob if total is None else total + prob
        return total / len(flips)

    if spatial_dims == 2:
        slices = image.permute(3, 0, 1, 2)  # (Z, C, X, Y)
        out = [run(slices[i:i + slice_batch]) for i in range(0, slices.shape[0], slice_batch)]
        return torch.cat(out).permute(1, 2, 3, 0).contiguous()
    from monai.inferers import sliding_window_inference

    roi = list(roi_size or image.shape[1:])
    roi = [min(r, s) for r, s in zip(roi, image.shape[1:])]
    prob = sliding_window_inference(image[None], roi, sw_batch_size, run, overlap=overlap, mode="gaussian")
    return torch.as_tensor(prob)[0].float()
