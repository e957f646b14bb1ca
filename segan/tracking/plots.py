"""PNG figures of a run and of a comparison: a validation overlay, training curves, runs compared.

matplotlib is imported inside each function (``Figure``, no pyplot: no GUI backend, thread-safe).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from segan.tracking.compare import RunRow


def _normalise(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    return np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img, dtype=float)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def save_overlay_png(path: Path, image: np.ndarray, target: np.ndarray, pred: np.ndarray,
                     region_names: Sequence[str], title: str = "", channel: int = 0) -> None:
    """PNG of ``image[channel]`` ``(C, H, W)`` with each region's true (solid) and predicted (dashed)
    contours (``target``/``pred`` ``(K, H, W)`` binary); the legend gives the slice's Dice."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from skimage import measure

    image, target, pred = np.asarray(image), np.asarray(target) > 0, np.asarray(pred) > 0
    fig = Figure(figsize=(5, 5.4), dpi=100)
    ax = fig.add_subplot()
    # Transposed with the origin at the bottom: first array axis left->right, second upwards.
    ax.imshow(_normalise(image[min(channel, image.shape[0] - 1)].astype(np.float32)).T, cmap="gray",
              origin="lower", interpolation="nearest")
    handles = []
    for k, (name, color) in enumerate(zip(region_names, _colors(len(region_names)))):
        for mask, style in ((target[k], "-"), (pred[k], "--")):
            for c in measure.find_contours(mask.T.astype(np.float32), 0.5):
                ax.plot(c[:, 1], c[:, 0], style, color=color, linewidth=1.3)
        denom = target[k].sum() + pred[k].sum()
        dice = 2 * np.logical_and(target[k], pred[k]).sum() / denom if denom else 1.0
        handles.append(Line2D([], [], color=color, label=f"{name} (Dice {dice:.2f})"))
    handles += [Line2D([], [], color="w", linestyle="-", label="true"),
                Line2D([], [], color="w", linestyle="--", label="predicted")]
    ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.5, facecolor="black", labelcolor="w")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    _save_figure(fig, Path(path))


def save_curves_png(path: Path, history: list[dict]) -> None:
    """Losses (left) and validation Dice (right) per epoch; missing values are gaps."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    fig = Figure(figsize=(10, 4), dpi=100)
    named = ("loss_seg", "loss_adv", "loss_critic")  # every method's, then the method's own terms
    losses = [*named, *sorted({k for h in history for k in h if k.startswith("loss_")} - set(named))]
    panels = ((fig.add_subplot(1, 2, 1), losses, "loss"),
              (fig.add_subplot(1, 2, 2), ["val_dice_mean"] + sorted({k for h in history for k in h
                                                                      if k.startswith("val_dice_")} - {"val_dice_mean"}),
               "validation Dice"))
    for ax, keys, label in panels:
        for key in keys:
            ys = [_as_float(h.get(key)) for h in history]
            if any(not math.isnan(y) for y in ys):
                ax.plot(epochs, ys, marker="o", markersize=3, label=key,
                        linewidth=2 if key == "val_dice_mean" else 1.2)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    _save_figure(fig, Path(path))


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _save_figure(fig: Any, path: Path) -> None:
    from segan.io_utils import atomic_path

    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")




def save_compare_png(path: Path, rows: list[RunRow], metric: str, stats: list[dict[str, Any]]) -> None:
    """Left: ``metric`` per epoch for every run; right: mean ± std of its best value per group.

    ``stats``: :func:`segan.tracking.compare.group_stats` of ``rows`` for ``metric``.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 4.5), dpi=100)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    groups = sorted({r.group for r in rows})
    colors = dict(zip(groups, _colors(len(groups))))
    for r in rows:
        if r.history:
            steps, values = zip(*r.history)
            ax1.plot(steps, values, color=colors[r.group], linewidth=1.2, alpha=0.85, marker="o", markersize=3,
                     linestyle="-" if r.status == "FINISHED" else ":", label=f"{r.run_name} ({r.group})")
    ax1.set_xlabel("epoch")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_ylabel(metric)
    ax1.set_title(f"{metric} per epoch")
    ax1.grid(alpha=0.3)
    if ax1.lines and len(rows) <= 16:
        ax1.legend(fontsize=6)
    stats = [s for s in stats if s[metric] is not None]
    ax2.bar(range(len(stats)), [s[metric][0] for s in stats], yerr=[s[metric][1] for s in stats], capsize=5,
            color=[colors[s["group"]] for s in stats])
    ax2.set_xticks(range(len(stats)), [f"{s.get('label', s['group'])}\n(n={s[metric][2]})" for s in stats])
    ax2.set_ylabel(f"best {metric}")
    ax2.set_title("mean ± std per group (FINISHED runs)")
    ax2.grid(alpha=0.3, axis="y")
    _save_figure(fig, path)


def save_efficiency_png(path: Path, series: dict[str, list[tuple[float, float, float, int]]], xlabel: str,
                        ylabel: str, title: str = "") -> None:
    """One line per ``series`` label through its points ``(x, mean, std, n)``, a ± std band
    around it (a label-efficiency curve: Dice against the number of labelled cases)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5), dpi=100)
    ax = fig.add_subplot()
    xs_all = sorted({p[0] for points in series.values() for p in points})
    for (label, points), color in zip(sorted(series.items()), _colors(len(series))):
        xs, means, stds, ns = (np.array(v, dtype=float) for v in zip(*points))
        ax.plot(xs, means, marker="o", markersize=4, linewidth=1.6, color=color,
                label=f"{label} (n={int(ns.min())}–{int(ns.max())})" if ns.min() != ns.max() else
                f"{label} (n={int(ns[0])})")
        ax.fill_between(xs, means - stds, means + stds, color=color, alpha=0.18, linewidth=0)
    if xs_all:
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    _save_figure(fig, path)
