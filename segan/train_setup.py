"""What ``segan train`` trains: a config file, or a plan made on the fly from ``--data``.

- ``--data DIR`` without ``-c``: plan DIR exactly as ``segan plan`` does
  (:func:`segan.plan.plan_data`), resolve the planned YAML like a file given with ``-c``
  (then ``--set`` on top), and keep the plan (``plan.yaml``, commented with each rule's
  reason) and the fingerprint (``fingerprint.json``) for the run folder and MLflow.
- ``-c CONFIG --data DIR``: the config is the recipe, nothing is planned; DIR only
  replaces where the data is (``data.root=DIR`` and ``data.datalist`` unset, or, for a
  data list ``.json``, ``data.datalist=FILE``), before any ``--set`` (which wins).
- ``--method M`` trains M: with ``-c``, the file's values of keys some method owns are
  dropped so M brings its own (as ``segan sweep`` does); when planning, M is planned.
- neither ``-c`` nor ``--data``: exit 2 with one line.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from segan.config import Config
from segan.errors import UserError

PLAN_FILE = "plan.yaml"
FINGERPRINT_FILE = "fingerprint.json"


@dataclass
class TrainSetup:
    """The resolved config and the files (name -> text) to keep beside the run (empty with ``-c``)."""

    config: Config
    inputs: dict[str, str] = field(default_factory=dict)
    planned: bool = False
    summary: str = ""  # the plan's decisions with their reasons, one a line (when planned)


def data_overrides(data: str | Path) -> list[str]:
    """``--set`` overrides that point a config at ``data`` (folder or data list)."""
    path = Path(data)
    if not path.exists():
        raise UserError(f"--data {path}: no such data-set folder or data list")
    if path.is_file():
        return [f"data.datalist={path.resolve()}"]
    return [f"data.root={path.resolve()}", "data.datalist=null"]


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_train_setup(config: Optional[str], data: Optional[str], overrides: list[str] | tuple[str, ...] = (),
                        method: Optional[str] = None, minutes: Optional[float] = None, dims: Optional[str] = None,
                        device: str = "auto", memory_gb: Optional[float] = None) -> TrainSetup:
    """The config ``segan train`` runs (rules in the module docstring).

    ``minutes``, ``device``: the plan's budget and device when planning; with ``-c`` they
    set ``train.max_minutes`` / ``train.device``. ``dims``, ``memory_gb``: planning only.
    """
    from segan.config_layers import resolve_config

    overrides = list(overrides)
    if config is None and data is None:
        raise UserError("segan train needs -c CONFIG.yaml or --data DIR (plans a config from the data, as "
                        "`segan plan` does); e.g. segan train --data data/phantoms --method segan")
    if config is not None:
        if dims is not None or memory_gb is not None:
            raise UserError("--dims and --memory-gb only apply when planning (--data without -c); "
                            "with -c set data.spatial_dims / data.patch_size in the config")
        sets = data_overrides(data) if data is not None else []
        if minutes is not None:
            sets.append(f"train.max_minutes={minutes}")
        if device != "auto":
            sets.append(f"train.device={device}")
        return TrainSetup(resolve_config(config, [*sets, *overrides], method=method).config)
    from segan.plan import plan_data

    # The trial times a step with the threads the run will use (`--set train.threads=1`).
    threads = resolve_config(None, [o for o in overrides if o.startswith("train.threads=")]).config.train.threads
    planned = plan_data(data, method=method or "segan", dims=dims or "auto", device=_device(device),
                        memory_gb=memory_gb, minutes=minutes, threads=threads)
    with tempfile.TemporaryDirectory(prefix="segan-plan-") as tmp:
        path = Path(tmp) / PLAN_FILE
        path.write_text(planned.yaml_text)
        cfg = resolve_config(path, overrides).config
    inputs = {PLAN_FILE: planned.yaml_text, FINGERPRINT_FILE: json.dumps(planned.fingerprint, indent=1) + "\n"}
    from segan.plan import format_plan

    return TrainSetup(cfg, inputs, planned=True, summary=format_plan(planned.plan))
