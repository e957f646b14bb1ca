"""``segan sweep --set-grid KEY=V1,V2,...``: grid cells, child names, and the label-efficiency plot.

Each ``--set-grid`` gives one axis; the sweep trains the cartesian product of the axes x
``--methods`` x ``--seeds``. A child's run name (and so its output folder) names its
method, cell and seed, plus the sweep's own hash, so no two children of one sweep and no
two sweeps share a folder. After the children, every numeric axis gets a figure: mean
best validation Dice against the axis value, one line per method, a ± std band over the
seeds (``label_efficiency.png`` for ``data.labeled_cases``, ``dice_vs_<key>.png`` for any
other key), saved in the sweep's folder and logged on the parent run, beside
``grid.json``, the children's results.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from segan.errors import UserError

#: keys the sweep sets itself, and the option that varies them instead
_RESERVED = {"seed": "--seeds", "method.name": "--methods", "data.datalist": "the sweep's shared split",
             "run_name": "the sweep's child names"}
LABELED_KEY = "data.labeled_cases"


@dataclass(frozen=True)
class GridAxis:
    """One ``--set-grid`` option: a config key and the values it takes (as written)."""

    key: str
    values: tuple[str, ...]

    @property
    def numeric(self) -> bool:
        return all(_number(v) is not None for v in self.values)


@dataclass
class ChildResult:
    """What one child of a sweep gave: its cell, exit code and best validation Dice."""

    method: str
    seed: int
    cell: dict[str, str]
    run_name: str
    exit_code: int
    best_metric: float | None = None  # best val_dice_mean; None if never validated
    run_id: str | None = None


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def split_values(text: str) -> list[str]:
    """``'2,4,8'`` -> ``['2', '4', '8']``; commas inside brackets stay (``'[32, 32],[64, 64]'``)."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    items.append(current.strip())
    return [i for i in items if i]


def parse_grid(specs: Sequence[str], overrides: Sequence[str] = ()) -> list[GridAxis]:
    """The axes of ``--set-grid KEY=V1,V2`` options; one ``UserError`` line per bad option."""
    axes: list[GridAxis] = []
    set_keys = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        values = tuple(dict.fromkeys(split_values(raw)))
        if not sep or not key or not values:
            raise UserError(f"--set-grid {spec!r}: expected KEY=V1,V2,..., e.g. --set-grid data.labeled_cases=2,4,8")
        if key in _RESERVED:
            raise UserError(f"--set-grid {spec!r}: {key} is set by {_RESERVED[key]}; "
                            + ("use that option instead" if key in ("seed", "method.name") else "grid another key"))
        if key in set_keys:
            raise UserError(f"--set-grid {spec!r}: {key} is also given with --set; keep one of them")
        if any(a.key == key for a in axes):
            raise UserError(f"--set-grid {spec!r}: {key} is gridded twice; give its values in one --set-grid")
        axes.append(GridAxis(key, values))
    return axes


def grid_cells(axes: Sequence[GridAxis]) -> list[dict[str, str]]:
    """The cartesian product of the axes, in the order given; ``[{}]`` without axes."""
    return [dict(zip((a.key for a in axes), combo)) for combo in itertools.product(*(a.values for a in axes))]


def cell_overrides(cell: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in cell.items()]


def cell_tag(cell: dict[str, str]) -> str:
    """A file-name-safe tag of a cell, e.g. ``labeled_cases2`` or ``labeled_cases2-lr0.001``."""
    parts = []
    for key, value in cell.items():
        safe = re.sub(r"[^A-Za-z0-9._]+", "_", value).strip("_") or "x"
        parts.append(f"{key.rsplit('.', 1)[-1]}{safe}")
    return "-".join(parts)


def child_run_name(method: str, seed: int, cell: dict[str, str], sweep_hash: str) -> str:
    """``METHOD[-CELL]-seedS-HASH``: unique within a sweep and across sweeps (the hash)."""
    tag = cell_tag(cell)
    return f"{method}-{tag + '-' if tag else ''}seed{seed}-{sweep_hash}"


def check_cells(axes: Sequence[GridAxis], datalist_path: str) -> None:
    """Fail before training when a ``data.labeled_cases`` value exceeds the training cases."""
    axis = next((a for a in axes if a.key == LABELED_KEY), None)
    if axis is None:
        return
    n_train = len(json.loads(Path(datalist_path).read_text()).get("training", []))
    bad = [v for v in axis.values if not (v.isdigit() and 1 <= int(v) <= n_train)]
    if bad:
        raise UserError(f"--set-grid {LABELED_KEY}: {', '.join(bad)} not in 1..{n_train} (the labelled training "
                        f"cases of the split {datalist_path}); e.g. --set-grid {LABELED_KEY}=1,{n_train}")


def efficiency_series(results: Sequence[ChildResult], key: str) -> dict[str, list[tuple[float, float, float, int]]]:
    """Per line (method, with the cell's other keys when there are several axes): sorted points
    ``(x, mean, sample std, n)`` of the finished children's best validation Dice."""
    groups: dict[str, dict[float, list[float]]] = {}
    for r in results:
        if r.exit_code != 0 or r.best_metric is None or not math.isfinite(r.best_metric) or key not in r.cell:
            continue
        others = ", ".join(f"{k}={v}" for k, v in r.cell.items() if k != key)
        label = f"{r.method} ({others})" if others else r.method
        x = _number(r.cell[key])
        if x is not None:
            groups.setdefault(label, {}).setdefault(x, []).append(r.best_metric)
    return {label: [(x, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                    for x, v in sorted(points.items())] for label, points in groups.items()}


def figure_name(key: str) -> str:
    return "label_efficiency.png" if key == LABELED_KEY else f"dice_vs_{re.sub(r'[^A-Za-z0-9]+', '_', key)}.png"


def write_grid_outputs(folder: Path, axes: Sequence[GridAxis], results: Sequence[ChildResult],
                       tracker: Any = None) -> list[Path]:
    """``grid.json`` and one figure per numeric axis in ``folder``, each logged on ``tracker``
    (the parent run) when given; returns the paths written."""
    from segan.io_utils import atomic_write_text
    from segan.tracking.plots import save_efficiency_png

    written = [folder / "grid.json"]
    atomic_write_text(written[0], json.dumps({"axes": [asdict(a) for a in axes],
                                              "children": [asdict(r) for r in results]}, indent=1))
    for axis in axes:
        series = efficiency_series(results, axis.key)
        if not axis.numeric or not series:
            continue
        path = folder / figure_name(axis.key)
        xlabel = "labelled training cases" if axis.key == LABELED_KEY else axis.key
        save_efficiency_png(path, series, xlabel=xlabel, ylabel="best val_dice_mean (mean ± std over seeds)",
                            title=f"validation Dice vs {axis.key}")
        written.append(path)
    if tracker is not None:
        for path in written:
            tracker.log_artifact(path)
    return written


@dataclass
class GridSummary:
    """Lines printed at the end of a grid sweep (``segan compare`` prints the full tables)."""

    lines: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, axes: Sequence[GridAxis], results: Sequence[ChildResult], written: Sequence[Path]) -> GridSummary:
        out = cls()
        for axis in axes:
            for label, points in efficiency_series(results, axis.key).items():
                cells = ", ".join(f"{axis.key}={x:g}: {m:.4f} ± {s:.4f} (n={n})" for x, m, s, n in points)
                out.lines.append(f"[sweep] {label}: {cells}")
        out.lines += [f"[sweep] wrote {p}" for p in written]
        return out
