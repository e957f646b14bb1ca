"""The segmentor as an MLflow pyfunc model, logged "from code": no pickles, the checkpoint is
loaded with ``weights_only=True``; and the way back from a model URI to a segan checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from segan.errors import UserError
from segan.tracking.meta import package_versions
from segan.tracking.store import mlflow_globals, open_store, short

MODEL_NAME = "model"  # name of the logged segmentor inside a run
MODEL_CHECKPOINT = "segmentor.pt"  # the checkpoint file inside the model's artifacts

# Copied into every logged model and run when the model is loaded: `segan.tracking` is a
# stable import path that models logged by any segan version rely on (re-exported there).
_MODEL_CODE = '''"""MLflow "model from code" entry point of a segan segmentor: see segan.tracking.SegmentorModel."""
import mlflow
from segan.tracking import SegmentorModel

mlflow.models.set_model(SegmentorModel())
'''


class SegmentorModel(mlflow.pyfunc.PythonModel):
    """pyfunc: float32 ``(N, C, *spatial)`` in preprocessed space -> uint8 masks ``(N, K, *spatial)``.

    ``spatial`` has ``spatial_dims`` axes (2: slices ``(H, W)``, 3: volumes ``(X, Y, Z)``), the
    channels are the checkpoint's ``meta.channels`` in order, already normalised the way the
    config's ``preprocess`` says. Each output channel is one region (``meta.region_names``):
    sigmoid > ``post.threshold`` (0.5). Inputs of any size: 2D slices go through whole (the
    segmentor pads to its stride), 3D volumes in sliding windows of the training patch size.
    Needs segan installed where the model is loaded (GPU used when there is one).
    """

    def load_context(self, context: Any) -> None:
        import dataclasses

        import torch

        from segan.checkpoint import load_checkpoint
        from segan.config import ModelConfig
        from segan.nets import build_segmentor

        ckpt = load_checkpoint(context.artifacts["checkpoint"])
        meta, cfg = ckpt["meta"], ckpt["config"]
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        model_cfg = ModelConfig(**{k: v for k, v in cfg["model"].items() if k in names})
        self.spatial_dims = int(meta["spatial_dims"])
        self.patch_size = [int(p) for p in meta["patch_size"]]
        post = cfg.get("post") or {}
        self.threshold = float(post.get("threshold", 0.5))
        self.overlap = float(post.get("overlap", 0.5))
        self.sw_batch_size = int(post.get("sw_batch_size", 4))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.out_channels = len(meta["region_names"])
        net = build_segmentor(model_cfg, self.spatial_dims, len(meta["channels"]), len(meta["region_names"]))
        net.load_state_dict(ckpt["segmentor"])
        self.net = net.to(self.device).eval()

    # np.ndarray is a hint MLflow accepts without deriving a signature from it, so the tensor
    # signature logged with the model stays the one that is enforced.
    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        import torch
        from monai.inferers import sliding_window_inference

        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a float32 array (N, C, {'H, W' if self.spatial_dims == 2 else 'X, Y, Z'}), "
                             f"got shape {x.shape}")
        batch = torch.from_numpy(x)
        with torch.inference_mode():
            if self.spatial_dims == 2:  # whole slices (the segmentor pads to its stride), a few at a time
                logits = torch.cat([self.net(b.to(self.device)).cpu()
                                    for b in batch.split(max(1, self.sw_batch_size * 4))]) if len(batch) else \
                    torch.zeros((0, self.out_channels, *x.shape[2:]))
            else:  # volumes: sliding windows of the training patch size
                logits = sliding_window_inference(batch.to(self.device), roi_size=self.patch_size,
                                                  sw_batch_size=self.sw_batch_size, predictor=self.net,
                                                  overlap=self.overlap).cpu()
            return (torch.sigmoid(logits) > self.threshold).to(torch.uint8).numpy()


def model_signature(meta: dict) -> Any:
    """Tensor signature: float32 ``(-1, C, -1, ...)`` in, uint8 ``(-1, K, -1, ...)`` out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    free = (-1,) * int(meta["spatial_dims"])
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(meta["channels"]), *free))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, len(meta["region_names"]), *free))]))


def log_segmentor_model(checkpoint: Path, *, uri: str, run_id: str | None, experiment_id: str,
                        register: str | None = None) -> Any:
    """Log a (slim) checkpoint as the pyfunc model ``model`` of ``run_id``; returns MLflow's ModelInfo."""
    from mlflow.models import Model

    from segan.checkpoint import load_checkpoint

    meta = load_checkpoint(checkpoint)["meta"]
    versions = package_versions()
    reqs = [f"{name}=={versions[f'version.{name}'].split('+')[0]}" for name in ("torch", "monai", "numpy", "mlflow")
            if f"version.{name}" in versions]
    with tempfile.TemporaryDirectory() as tmp, mlflow_globals(uri, experiment_id):
        code = Path(tmp) / "segan_model.py"
        code.write_text(_MODEL_CODE)
        return Model.log(artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                         python_model=str(code), artifacts={"checkpoint": str(checkpoint)},
                         signature=model_signature(meta), pip_requirements=reqs,
                         registered_model_name=register, flavor_name="pyfunc.ModelFromCode",
                         metadata={"segan_regions": list(meta["region_names"]),
                                   "segan_channels": list(meta["channels"])})


def download_checkpoint(model_uri: str, tracking_uri: str | None = None, dst: Path | None = None) -> Path:
    """Download the checkpoint behind ``runs:/<id>/model``, ``models:/<name>/<version>`` or any
    artifact URI of a ``.pt`` file; returns the local ``.pt`` path (for ``segan predict``)."""
    _, uri = open_store(tracking_uri)
    dst = Path(dst or tempfile.mkdtemp(prefix="segan-model-"))
    try:
        with mlflow_globals(uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise UserError(f"model {model_uri}: not found in MLflow store {uri} ({short(exc)}); pass runs:/<run id>/"
                        f"{MODEL_NAME} or models:/<name>/<version>") from None
    if local.is_file():
        return local
    found = sorted(local.rglob(MODEL_CHECKPOINT)) or sorted(local.rglob("*.pt"))
    if not found:
        raise UserError(f"model {model_uri}: holds no segan checkpoint (.pt); pass a model logged by segan train")
    return found[0]
