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
    segmentor pads to its stride), 3D volumes in Gaussian-blended sliding windows of the
    training patch size, bf16 AMP on CUDA when the config's ``train.amp`` says so: exactly
    :meth:`segan.predictor.Predictor.masks`, the path ``segan predict`` takes. Needs segan
    installed where the model is loaded (GPU used when there is one).
    """

    def load_context(self, context: Any) -> None:
        import torch

        from segan.predictor import Predictor

        # The same loader and forward path as `segan predict` (segan.predictor.Predictor).
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"], device)

    # np.ndarray is a hint MLflow accepts without deriving a signature from it, so the tensor
    # signature logged with the model stays the one that is enforced.
    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        return self.predictor.masks(np.asarray(model_input, dtype=np.float32))


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
