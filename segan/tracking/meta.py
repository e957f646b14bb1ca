"""What identifies a run: its name, its params (config, package versions, git commit), metric keys,
and the record of what was actually trained (written by training, read by ``segan compare``)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "monai", "mlflow", "numpy", "segan")
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value

# What a training run actually did, set when it ends however it ends: the tag says why it
# stopped, the metrics (logged at the last epoch) how far it got. A configured `train.epochs`
# says nothing about a run that stopped on the clock, diverged or was killed.
STOP_REASON_TAG = "segan.stop_reason"
STOP_REASONS = ("epochs", "time budget", "diverged", "killed", "error")
TRAINED_METRICS = ("epochs_done", "steps_done", "train_seconds")


def package_versions() -> dict[str, str]:
    """``{'version.torch': '2.13.0+cpu', ...}`` for the packages that shape a result."""
    out = {}
    for name in PACKAGES:
        try:
            out[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The commit of the segan source tree, or None (no git, not a checkout, any failure)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def param_value(value: Any) -> str:
    """A param as MLflow stores it: lists and dicts as JSON, cut to MLflow's length limit."""
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_LEN else text[: MAX_PARAM_LEN - 3] + "..."


def metric_key(name: str) -> str:
    """A name MLflow accepts (letters, digits, ``_ - . : /`` and spaces); e.g. region names."""
    return re.sub(r"[^\w.\- :/]", "_", str(name))


def config_hash(cfg_dict: dict) -> str:
    """8 hex digits that change with any value of the (resolved) config."""
    return hashlib.sha1(json.dumps(cfg_dict, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_run_name(cfg_dict: dict, started_ns: int | None = None) -> str:
    """``<method>-<hash>`` of the resolved config and the start time: a repeated run gets its own name."""
    method = (cfg_dict.get("method") or {}).get("name", "run")
    started = time.time_ns() if started_ns is None else started_ns
    return f"{method}-{config_hash({'config': cfg_dict, 'started': started})[:6]}"
