"""Shared test helpers: the CLI as a real subprocess, small phantom data sets, the smoke config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def make_phantoms(factory: pytest.TempPathFactory, name: str, size: int, seed: int, cases: int = 6,
                  test_fraction: float = 0.34) -> Path:
    """A phantom set in MSD layout under a fresh temporary folder (for module-scoped fixtures)."""
    from data_prep.phantoms import generate

    out = factory.mktemp(name) / "phantoms"
    generate(out, cases=cases, size=size, seed=seed, test_fraction=test_fraction)
    return out


def smoke_config(root: str | Path, tmp_path: Path, *extra: str):
    """``configs/smoke.yaml`` on ``root``, its cache under ``tmp_path``, no tracking, then ``extra`` overrides."""
    from segan.config import load_config

    return load_config(SMOKE, [f"data.root={root}", f"preprocess.cache_dir={tmp_path / 'cache'}",
                               "tracking.enabled=false", *extra])


def run_cli(*args: object, cwd: str | Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m segan ARGS`` in a subprocess; text stdout/stderr captured.

    ``env`` entries are added to the current environment; the repository is put on
    ``PYTHONPATH`` so the package imports even from another working directory.
    """
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH")) if p)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "segan", *map(str, args)], capture_output=True, text=True,
                          cwd=str(cwd) if cwd else None, env=full_env, timeout=timeout)


def tiny_sweep_workspace(tmp_path: Path, db_template: Path, monkeypatch: pytest.MonkeyPatch, experiment: str,
                         *extra: str) -> tuple[str, list[str]]:
    """Work in ``tmp_path`` with a copy of the template MLflow store as ``mlflow_runs/mlflow.db``;
    returns the default tracking URI and the ``--set`` list of a few-second 2D training on
    ``tmp_path/phantoms`` (32^2 patches, a 2-level U-Net, one step), then ``extra``."""
    import shutil

    from segan import tracking

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlflow_runs").mkdir()
    shutil.copyfile(db_template, tmp_path / "mlflow_runs" / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sets = [f"data.root={tmp_path / 'phantoms'}", f"preprocess.cache_dir={tmp_path / 'cache'}",
            f"experiment={experiment}", "train.epochs=1", "train.steps_per_epoch=1", "train.batch_size=2",
            "train.val_max_cases=1", "data.patch_size=[32, 32]", "model.channels=[4, 8]", "model.strides=[2]",
            "model.critic_channels=[4, 8]", *extra]
    return tracking.default_tracking_uri(), sets


@pytest.fixture(scope="session")
def phantoms_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-case, 48^3, seed-0 phantom set in MSD layout (4 training, 2 test cases).

    Shared by the whole session: treat it as read-only (copy it to change it).
    """
    from data_prep.phantoms import generate

    root = tmp_path_factory.mktemp("phantoms_small")
    generate(root, cases=6, size=48, seed=0, test_fraction=0.25)
    return root
