"""Checkpoints: one ``.pt`` file holds everything training resumes from and inference needs.

Saved atomically; loaded with ``torch.load(weights_only=True)`` only (a checkpoint is
never trusted code), so it holds tensors, numbers, strings, lists and dicts only.

Keys: ``format``; ``config`` (resolved config dict); ``meta`` (see :func:`make_meta`);
``segmentor`` / ``critic`` state dicts; ``opt_seg`` / ``opt_critic`` / ``sched_seg`` /
``sched_critic`` states; ``epoch``, ``step``, ``best_metric``, ``rng``, ``history`` (per-epoch
records up to this checkpoint's epoch), ``mlflow_run_id``. Checkpoints of earlier versions
may also hold a ``scaler`` state, which is ignored (bf16 needs no loss scaling).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segan.errors import UserError

FORMAT = "segan-checkpoint/1"


def make_meta(*, channels: list[str], region_names: list[str], region_labels: list[list[int]],
              label_names: dict[int, str], spatial_dims: int, patch_size: list[int],
              preprocess: dict, dataset: str, train_fingerprint: dict | None = None) -> dict:
    """What inference needs besides the weights.

    ``region_labels[k]`` lists the label ids that output channel k covers (phantoms:
    whole = [1,2,3], core = [2,3], enhancing = [3]); :func:`segan.regions.regions_to_labels`
    paints them back into one label map. ``train_fingerprint`` (:func:`segan.qc.train_fingerprint`:
    the training cases' statistics, region volumes and the calibrated OOD reference) is
    stored when given; checkpoints without it predict without ``ood_score``.
    """
    extra = {"train_fingerprint": train_fingerprint} if train_fingerprint else {}
    return {
        "channels": list(channels),
        "region_names": list(region_names),
        "region_labels": [list(map(int, r)) for r in region_labels],
        "label_names": {int(k): str(v) for k, v in label_names.items()},
        "spatial_dims": int(spatial_dims),
        "patch_size": list(map(int, patch_size)),
        "preprocess": preprocess,
        "dataset": dataset,
        **extra,
    }


def save_checkpoint(state: dict, path: str | Path) -> None:
    from segan.io_utils import atomic_torch_save

    atomic_torch_save({"format": FORMAT, **state}, path)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A ``.pt`` file, or a training output folder (``best.pt``, else ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path}: folder holds no best.pt or last.pt; pass a checkpoint file or a training folder")
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; pass a .pt file or a training output folder")
    return path


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    import torch

    path = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable segan checkpoint ({type(exc).__name__}); "
                        "pass a best.pt/last.pt written by `segan train`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a segan checkpoint (format {FORMAT!r} expected)")
    return ckpt
