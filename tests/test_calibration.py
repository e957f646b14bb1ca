"""Temperature scaling fitted on validation (segan.calibration): the fit, its storage and its use at prediction."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from segan.calibration import LOG_T_RANGE, apply_temperature, ece, fit_temperature, logit
from tests.conftest import SMOKE, run_cli


def test_fit_recovers_the_temperature_of_an_over_confident_model() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 200_000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(np.float32)  # truth drawn from sigmoid(z)
    overconfident = 3.0 * z  # the model's logits are 3x too large
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.05)
    before = ece(1 / (1 + np.exp(-overconfident)), y)
    after = ece(1 / (1 + np.exp(-overconfident / t)), y)
    assert before > 0.05 and after < 0.01


def test_apply_temperature_keeps_the_half_threshold_and_softens() -> None:
    prob = torch.tensor([[[0.02, 0.5, 0.9]], [[0.2, 0.6, 0.999]]]).permute(1, 0, 2)  # (N=1, K=2, 3)
    out = apply_temperature(prob, [2.0, 0.5], dim=1)
    assert torch.equal(out > 0.5, prob > 0.5)
    np.testing.assert_allclose(out[0, 0].numpy(), torch.sigmoid(logit(prob[0, 0]) / 2).numpy(), rtol=1e-5)
    assert out[0, 0, 2] < 0.9 and out[0, 1, 1] > 0.6  # T > 1 softens, T < 1 sharpens
    with pytest.raises(ValueError, match="1 temperatures for 2 regions"):
        apply_temperature(prob, [1.0], dim=1)


def test_training_fits_stores_and_prediction_applies_the_temperature(phantoms_small: Path, tmp_path: Path) -> None:
    from segan.checkpoint import load_checkpoint
    from segan.predictor import Predictor

    out = tmp_path / "run"
    proc = run_cli("train", "-c", SMOKE, "--out", out, "--set", f"data.root={phantoms_small}",
                   "--set", f"preprocess.cache_dir={tmp_path / 'cache'}", "--set", "train.epochs=1",
                   "--set", "train.fit_temperature=true", "--set", "tracking.enabled=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "temperature on the validation cases: whole_tumour T=" in proc.stderr
    ckpt = load_checkpoint(out / "best.pt")
    temps = ckpt["config"]["post"]["temperature"]
    low, high = np.exp(LOG_T_RANGE)
    assert len(temps) == 3 and all(low - 1e-6 <= t <= high + 1e-6 for t in temps)
    calibrated = Predictor.from_checkpoint(out / "best.pt", torch.device("cpu"))
    raw = copy.copy(calibrated)
    raw.post = dataclasses.replace(calibrated.post, temperature=None)
    x = np.random.default_rng(0).normal(size=(2, 4, 48, 48)).astype(np.float32)
    p_raw, p_cal = raw.probabilities(x), calibrated.probabilities(x)
    expected = torch.sigmoid(logit(p_raw) / torch.tensor(temps).view(1, 3, 1, 1))
    torch.testing.assert_close(p_cal, expected, rtol=1e-4, atol=1e-5)
    # a bad temperature in a config is one line, exit 2
    bad = run_cli("train", "-c", SMOKE, "--set", f"data.root={phantoms_small}", "--set", "post.temperature=[1, -1, 1]",
                  "--set", "tracking.enabled=false", cwd=tmp_path)
    assert bad.returncode == 2 and "post.temperature" in bad.stderr and "Traceback" not in bad.stderr
