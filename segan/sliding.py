"""Prediction with a trained segmentor, shared by ``segan predict``, validation and the pyfunc model.

:func:`predict_batch` maps a batch in preprocessed space to probabilities: 2D models take
whole slices in chunks, 3D models use MONAI's sliding-window inference with Gaussian
blending; both optionally average over flips (TTA) under bf16 autocast (AMP).
:func:`predict_volume` runs one volume through it (2D: slice by slice along the last,
axial after RAS reorientation, axis).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from segan.runtime import autocast


@torch.no_grad()
def predict_batch(model: nn.Module, batch: torch.Tensor, spatial_dims: int, roi_size: list[int] | None = None,
                  sw_batch_size: int = 4, overlap: float = 0.5, tta: bool = False, amp: bool = False,
                  slice_batch: int = 32, per_flip: bool = False) -> torch.Tensor:
    """Probabilities ``(N, K, *spatial)`` float32 for a preprocessed batch ``(N, C, *spatial)``.

    ``spatial`` is ``(H, W)`` for 2D models (whole slices, ``slice_batch`` at a time; the
    segmentor pads to its stride) and ``(X, Y, Z)`` for 3D models (Gaussian-blended windows of
    ``roi_size``, clipped to the input). ``batch`` should already be on the model's device;
    ``amp`` turns on bf16 autocast on it (callers decide with :func:`segan.runtime.amp_enabled`).
    ``tta`` averages over every combination of flips of the spatial axes (4 passes in 2D, 8 in 3D).
    ``per_flip`` returns each flip's probabilities instead of their mean: ``(N, F, K, *spatial)``
    (``F`` = 1 without ``tta``); blending is linear, so their mean is the ``tta`` result.
    """
    device = batch.device
    flips: list[tuple[int, ...]] = [()]
    if tta:
        axes = list(range(2, 2 + spatial_dims))
        flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def run(x: torch.Tensor) -> torch.Tensor:  # (n, C, *s) -> (n, K, *s), or (n, F * K, *s) per flip
        total, each = None, []
        for dims in flips:
            xf = x.flip(dims) if dims else x
            with autocast(device, amp):
                logits = model(xf)
            prob = torch.sigmoid(logits.float())
            prob = prob.flip(dims) if dims else prob
            if per_flip:
                each.append(prob)
            else:
                total = prob if total is None else total + prob
        return torch.cat(each, 1) if per_flip else total / len(flips)

    def split(prob: torch.Tensor) -> torch.Tensor:  # (N, F * K, *s) -> (N, F, K, *s) when per_flip
        return prob.reshape(prob.shape[0], len(flips), -1, *prob.shape[2:]) if per_flip else prob

    if spatial_dims == 2:
        return split(torch.cat([run(batch[i:i + slice_batch]) for i in range(0, batch.shape[0], slice_batch)]))
    from monai.inferers import sliding_window_inference

    roi = list(roi_size or batch.shape[2:])
    roi = [min(r, s) for r, s in zip(roi, batch.shape[2:])]
    prob = sliding_window_inference(batch, roi, sw_batch_size, run, overlap=overlap, mode="gaussian")
    return split(torch.as_tensor(prob).float())


def predict_volume(model: nn.Module, image: torch.Tensor, spatial_dims: int, roi_size: list[int] | None = None,
                   sw_batch_size: int = 4, overlap: float = 0.5, tta: bool = False, amp: bool = False,
                   slice_batch: int = 32) -> torch.Tensor:
    """Probabilities ``(K, X, Y, Z)`` float32 for one preprocessed volume ``(C, X, Y, Z)``
    (see :func:`predict_batch`; 2D models see its axial slices ``(C, X, Y)``)."""
    kw = dict(sw_batch_size=sw_batch_size, overlap=overlap, tta=tta, amp=amp, slice_batch=slice_batch)
    if spatial_dims == 2:
        slices = image.permute(3, 0, 1, 2)  # (Z, C, X, Y)
        return predict_batch(model, slices, 2, roi_size, **kw).permute(1, 2, 3, 0).contiguous()
    return predict_batch(model, image[None], 3, roi_size, **kw)[0]
