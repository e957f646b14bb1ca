"""The one prediction implementation: a checkpoint in, probabilities and masks out.

:class:`Predictor` loads a checkpoint (validated config, the same path for ``segan predict``
and the MLflow pyfunc :class:`segan.tracking.SegmentorModel`) and maps preprocessed batches
(:meth:`Predictor.probabilities`, :meth:`Predictor.masks`) or whole scans
(:meth:`Predictor.predict`) through :func:`segan.sliding.predict_batch` with the
checkpoint's post settings: Gaussian blending (3D), flip TTA, threshold, bf16 AMP on CUDA.
Validation calls :func:`segan.sliding.predict_volume` on the model in training directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from segan.errors import UserError

if TYPE_CHECKING:
    from segan.config import PostprocessConfig


def resolve_model(model: str, tracking_uri: str | None = None) -> Path:
    """A checkpoint file, a training folder, or an MLflow ``runs:/`` / ``models:/`` URI -> local ``.pt``."""
    from segan.checkpoint import resolve_checkpoint_path

    if model.startswith(("runs:/", "models:/")):
        try:
            from segan.tracking import download_checkpoint
        except ImportError:
            raise UserError(f"{model}: MLflow model URIs need segan.tracking.download_checkpoint, which this "
                            "install lacks; download the checkpoint and pass its path") from None
        return resolve_checkpoint_path(download_checkpoint(model, tracking_uri))
    return resolve_checkpoint_path(model)


@dataclass
class Predictor:
    """A loaded segmentor plus everything needed to replay its preprocessing.

    ``meta`` is the checkpoint's meta (see :func:`segan.checkpoint.make_meta`), ``post`` its
    ``PostprocessConfig``; ``model`` maps ``(N, C, *spatial)`` to logits ``(N, K, *spatial)``.
    """

    model: nn.Module
    meta: dict
    post: PostprocessConfig
    device: torch.device
    amp: bool = False
    sw_batch: int = 4
    overlap: float = 0.5
    preprocessor: object = field(init=False)

    def __post_init__(self) -> None:
        from data_prep.preprocess import Preprocessor

        self.preprocessor = Preprocessor(self.meta["preprocess"])
        self.model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device, sw_batch: int | None = None,
                        overlap: float | None = None) -> "Predictor":
        from segan.checkpoint import load_checkpoint
        from segan.config import from_dict
        from segan.nets import build_segmentor
        from segan.runtime import amp_enabled

        ckpt = load_checkpoint(path)
        try:
            cfg = from_dict(ckpt["config"])
            meta = ckpt["meta"]
            model = build_segmentor(cfg.model, meta["spatial_dims"], len(meta["channels"]),
                                    len(meta["region_labels"]))
            model.load_state_dict(ckpt["segmentor"])
        except (KeyError, RuntimeError) as exc:
            raise UserError(f"{path}: checkpoint does not hold a usable segmentor ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a checkpoint written by "
                            "`segan train`") from None
        return cls(model=model, meta=meta, post=cfg.post, device=device,
                   amp=amp_enabled(cfg.train.amp, cfg.train.amp_cpu, device),
                   sw_batch=sw_batch or cfg.post.sw_batch_size,
                   overlap=cfg.post.overlap if overlap is None else overlap)

    @property
    def spatial_dims(self) -> int:
        return int(self.meta["spatial_dims"])

    def probabilities(self, batch: np.ndarray | torch.Tensor, tta: bool = False,
                      per_flip: bool = False) -> torch.Tensor:
        """Preprocessed float32 ``(N, C, H, W)`` (2D) or ``(N, C, X, Y, Z)`` (3D) -> probabilities
        ``(N, K, *spatial)`` float32 on the predictor's device, or ``(N, F, K, *spatial)`` with
        ``per_flip`` (one per TTA flip; see :func:`segan.sliding.predict_batch`)."""
        from segan.sliding import predict_batch

        x = torch.as_tensor(np.ascontiguousarray(batch, dtype=np.float32) if isinstance(batch, np.ndarray)
                            else batch, dtype=torch.float32)
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != len(self.meta["channels"]):
            axes = "H, W" if self.spatial_dims == 2 else "X, Y, Z"
            raise ValueError(f"expected a float32 array (N, {len(self.meta['channels'])}, {axes}), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            return torch.zeros((0, len(self.meta["region_names"]), *x.shape[2:]), device=self.device)
        prob = predict_batch(self.model, x.to(self.device), self.spatial_dims, list(self.meta["patch_size"]),
                             sw_batch_size=self.sw_batch, overlap=self.overlap, tta=tta, amp=self.amp,
                             per_flip=per_flip)
        if self.post.temperature:  # fitted on validation by train.fit_temperature (segan.calibration)
            from segan.calibration import apply_temperature

            prob = apply_temperature(prob, self.post.temperature, dim=2 if per_flip else 1)
        return prob

    def masks(self, batch: np.ndarray | torch.Tensor, tta: bool = False) -> np.ndarray:
        """Like :meth:`probabilities`, thresholded at ``post.threshold``: uint8 ``(N, K, *spatial)``.

        Only the threshold: the connected-component steps of ``post`` count voxels of the
        input scan, so they belong to :meth:`predict` on the scan's own grid.
        """
        return (self.probabilities(batch, tta) > self.post.threshold).to(torch.uint8).cpu().numpy()

    def scan_probabilities(self, image: np.ndarray, affine: np.ndarray, tta: bool = False,
                           per_flip: bool = False) -> np.ndarray:
        """``image`` ``(C, X, Y, Z)`` on its own grid (``affine``) -> probabilities ``(K, X, Y, Z)``
        float32 in [0, 1] on that same grid (``(F, K, X, Y, Z)`` with ``per_flip``, one per TTA flip).

        Replays the checkpoint's preprocessing, predicts, and resamples the probabilities back
        (bilinear, :meth:`data_prep.preprocess.Preprocessor.invert`)."""
        case = self.preprocessor(image, affine)
        x = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32))
        if self.spatial_dims == 2:  # axial slices (Z, C, X, Y) through the batch path, back to (.., K, X, Y, Z)
            prob = self.probabilities(x.permute(3, 0, 1, 2), tta, per_flip)
            prob = prob.permute(*range(1, prob.ndim), 0)
        else:
            prob = self.probabilities(x[None], tta, per_flip)[0]
        prob = prob.contiguous().cpu().numpy()
        lead = prob.shape[:-3]  # (K,) or (F, K)
        # Interpolate probabilities, not masks, then threshold: boundaries stay smooth on the scan's grid.
        prob = self.preprocessor.invert(prob.reshape(-1, *prob.shape[-3:]), case, mode="bilinear")
        return np.clip(prob, 0.0, 1.0).reshape(*lead, *prob.shape[1:])

    def region_masks(self, prob: np.ndarray) -> np.ndarray:
        """``(K, X, Y, Z)`` probabilities on the scan's grid -> boolean region masks ``(K, X, Y, Z)``
        (threshold and the connected-component steps of ``post``, :func:`segan.postprocess.postprocess`)."""
        from segan.postprocess import postprocess

        return postprocess(prob, self.post)

    def predict(self, image: np.ndarray, affine: np.ndarray, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``image`` ``(C, X, Y, Z)`` on its own grid (``affine``) -> (labels ``(X, Y, Z)`` uint8,
        probabilities ``(K, X, Y, Z)`` float32), both on that same grid."""
        from segan.regions import regions_to_labels

        prob = self.scan_probabilities(image, affine, tta)
        return regions_to_labels(self.region_masks(prob), self.meta["region_labels"]), prob
