"""Split a data set by case into the data list (JSON) that training reads back."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from data_prep.msd import Case, DatasetInfo
from segan.errors import UserError


def split_cases(names: list[str], seed: int, val_fraction: float, folds: int | None = None,
                fold: int = 0) -> tuple[list[str], list[str]]:
    """(training, validation) case names, both sorted; by case, never by slice.

    Deterministic for a seed and independent of the input order. With ``folds``, the
    shuffled cases are cut into ``folds`` near-equal parts and part ``fold`` validates.
    """
    unique = sorted(set(names))
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    if folds is not None:
        if folds < 2 or folds > len(unique):
            raise UserError(f"--folds {folds}: need 2 <= folds <= number of labelled cases ({len(unique)})")
        if not 0 <= fold < folds:
            raise UserError(f"fold {fold}: must be in 0..{folds - 1}")
        val = set(np.array_split(np.array(order, dtype=object), folds)[fold].tolist())
    else:
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"--val-fraction {val_fraction}: must be in [0, 1)")
        n_val = int(round(len(unique) * val_fraction))
        if val_fraction > 0 and len(unique) >= 2:
            n_val = min(max(n_val, 1), len(unique) - 1)
        val = set(order[:n_val])
    return [n for n in unique if n not in val], [n for n in unique if n in val]


def _fingerprint(cases: list[Case]) -> str:
    h = hashlib.sha256()
    for case in sorted(cases, key=lambda c: c.name):
        sizes = [os.path.getsize(p) if os.path.exists(p) else -1 for p in case.images + [case.label or ""]
                 if p]
        h.update(f"{case.name}\t{','.join(map(str, sizes))}\n".encode())
    return h.hexdigest()


def make_datalist(info: DatasetInfo, seed: int = 0, val_fraction: float = 0.2, folds: int | None = None,
                  fold: int = 0) -> dict:
    """The data list training reads: cases with absolute paths, split by case."""
    labelled = [c for c in info.training if c.label]
    train_names, val_names = split_cases([c.name for c in labelled], seed, val_fraction, folds, fold)
    by_name = {c.name: c for c in labelled}

    def entry(c: Case) -> dict:
        return {"case": c.name, "image": list(c.images), "label": c.label}

    return {
        "root": str(info.root),
        "name": info.name,
        "layout": info.layout,
        "channel_names": list(info.channel_names),
        "labels": {str(k): v for k, v in sorted(info.labels.items())},
        "regions": info.regions,
        "split": {"seed": seed, "val_fraction": val_fraction, "folds": folds, "fold": fold},
        "training": [entry(by_name[n]) for n in train_names],
        "validation": [entry(by_name[n]) for n in val_names],
        "test": [entry(c) for c in sorted(info.test, key=lambda c: c.name)],
        "fingerprint": _fingerprint(info.training + info.test),
    }
