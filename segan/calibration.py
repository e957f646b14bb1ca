"""Temperature scaling (Guo et al., ICML 2017) of each region's probabilities, fitted on validation.

A segmentor trained with Dice + BCE is often over-confident: its probabilities sit near 0 or 1
even where it is wrong, so uncertainty maps and ``_prob`` files say less than they could. One
scalar ``T_k`` per region rescales the logit, ``p' = sigmoid(logit(p) / T_k)``: masks at the
0.5 threshold do not change (the sign of the logit stays), only the confidence does.

With ``train.fit_temperature: true`` the run fits ``T_k`` after training on the validation
cases with the best checkpoint's segmentor (minimum binary cross-entropy over a uniform
sample of voxels, 1-D bounded search on ``log T``), writes it into that checkpoint's
``post.temperature`` (so :class:`segan.predictor.Predictor` applies it to every prediction,
ensembles and uncertainty maps included) and logs ``temperature_<region>`` with the expected
calibration error on the fitted voxels before and after (``calib_ece_<region>_before`` /
``_after``, :func:`ece`, the metric of validation's ``val_ece_*``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EPS = 1e-6
LOG_T_RANGE = (-3.0, 3.0)        # T in [0.05, 20]
SAMPLES_PER_CASE = 200_000       # voxels per case and region used for the fit


def logit(prob: torch.Tensor | np.ndarray):
    """``log p - log(1 - p)`` with ``p`` clipped to ``[EPS, 1 - EPS]`` (torch or numpy, same type back)."""
    if isinstance(prob, torch.Tensor):
        p = prob.float().clamp(EPS, 1 - EPS)
        return torch.log(p) - torch.log1p(-p)
    p = np.clip(np.asarray(prob, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(prob: torch.Tensor, temperature: list[float], dim: int) -> torch.Tensor:
    """``prob`` with region axis ``dim`` of length ``K`` -> ``sigmoid(logit(prob) / T_k)``, float32."""
    t = torch.as_tensor(temperature, dtype=torch.float32, device=prob.device)
    if t.numel() != prob.shape[dim]:
        raise ValueError(f"{t.numel()} temperatures for {prob.shape[dim]} regions")
    shape = [1] * prob.ndim
    shape[dim] = -1
    return torch.sigmoid(logit(prob) / t.view(shape))


def fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The ``T`` minimising the mean BCE of ``sigmoid(z / T)`` against ``y`` (both 1-D)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        # BCE with logits, stable: max(s, 0) - s*y + log(1 + exp(-|s|))
        return float(np.mean(np.maximum(s, 0) - s * y + np.log1p(np.exp(-np.abs(s)))))

    return float(np.exp(minimize_scalar(nll, bounds=LOG_T_RANGE, method="bounded").x))


def ece(prob: np.ndarray, y: np.ndarray) -> float:
    """Expected calibration error of 1-D probabilities against 0/1 truth: MONAI's
    ``CalibrationErrorMetric`` with the bins of validation's ``val_ece_*`` (one ECE in the code base)."""
    from monai.metrics import CalibrationErrorMetric

    from segan.validation import ECE_BINS

    metric = CalibrationErrorMetric(num_bins=ECE_BINS, include_background=True, metric_reduction="mean")
    value = metric(y_pred=torch.as_tensor(np.asarray(prob), dtype=torch.float32)[None, None],
                   y=torch.as_tensor(np.asarray(y), dtype=torch.float32)[None, None])
    return float(value.reshape(-1)[0])


@torch.no_grad()
def calibrate(model: torch.nn.Module, cases: list, region_names: list[str], spatial_dims: int,
              patch_size: list[int], device: torch.device, amp: bool = False, overlap: float = 0.5,
              sw_batch_size: int = 4, seed: int = 0) -> tuple[list[float], dict[str, float]]:
    """Fit one temperature per region on ``cases`` (``VolumeCase``: image ``(C,X,Y,Z)``, target ``(K,X,Y,Z)``).

    Returns (temperatures, metrics ``temperature_<region>``, ``calib_ece_<region>_before`` / ``_after``).
    """
    from segan.sliding import predict_volume

    rng = np.random.default_rng(seed)
    k = len(region_names)
    zs: list[list[np.ndarray]] = [[] for _ in range(k)]
    ys: list[list[np.ndarray]] = [[] for _ in range(k)]
    was_training = model.training
    model.eval()
    for case in cases:
        image = torch.as_tensor(np.ascontiguousarray(case.image), device=device)
        prob = predict_volume(model, image, spatial_dims, patch_size, sw_batch_size=sw_batch_size,
                              overlap=overlap, amp=amp).float().cpu().numpy().reshape(k, -1)
        target = np.asarray(case.target, dtype=np.float32).reshape(k, -1)
        n = prob.shape[1]
        pick = rng.choice(n, size=min(n, SAMPLES_PER_CASE), replace=False) if n > SAMPLES_PER_CASE else slice(None)
        for r in range(k):
            zs[r].append(logit(prob[r][pick]))
            ys[r].append(target[r][pick])
    model.train(was_training)
    temperatures, metrics = [], {}
    for r, name in enumerate(region_names):
        z, y = np.concatenate(zs[r]), np.concatenate(ys[r])
        t = fit_temperature(z, y)
        temperatures.append(t)
        metrics[f"temperature_{name}"] = t
        metrics[f"calib_ece_{name}_before"] = ece(1.0 / (1.0 + np.exp(-z)), y)
        metrics[f"calib_ece_{name}_after"] = ece(1.0 / (1.0 + np.exp(-z / t)), y)
    return temperatures, metrics


def store_temperature(checkpoint: Path, temperatures: list[float]) -> None:
    """Write ``post.temperature`` into ``checkpoint``'s config (atomically; weights untouched)."""
    from segan.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(checkpoint)
    ckpt.setdefault("config", {}).setdefault("post", {})["temperature"] = [float(t) for t in temperatures]
    ckpt.pop("format", None)
    save_checkpoint(ckpt, checkpoint)
