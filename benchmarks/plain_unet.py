"""The plain baseline to beat: a supervised 2D U-Net a researcher writes in an afternoon.

Deliberately independent of segan's training code (no config, no cache, no sampler,
no trainer): nibabel, numpy, torch and MONAI's ``UNet`` and ``DiceLoss`` only.

- Data: the MSD folder's ``dataset.json`` (``training`` list, else ``imagesTr/`` paired
  with ``labelsTr/``); native voxel spacing, no resampling; whole 2D slices cut across
  the array axis that points most nearly inferior-superior (axial), zero-padded to a
  multiple of 16 per batch.
- Targets: one sigmoid channel per region of ``dataset.json`` (``regions``), else one per
  foreground label; Dice (MONAI, over the batch) + BCE; predictions painted back to
  label ids from the largest region to the smallest.
- Intensities: MR, per case and channel, z-score over the non-zero voxels; CT (a
  channel named ``CT`` in ``dataset.json``, or ``--modality ct``), clip to the 0.5 /
  99.5 percentiles of the training foreground (label > 0), then z-score with the
  training foreground's mean and std.
- Training: Adam, lr 1e-3, batch of 16 slices, half of them drawn from slices holding a
  label, random in-plane flips, a U-Net with channels 16-32-64-128 and instance norm;
  runs for ``--minutes`` of wall time (the training set is held in memory), validating on a held-out fifth of the training
  cases every tenth of the budget (the validation time counts) and keeping the best.
- Test: predicts ``imagesTs/`` on each scan's own grid (same shape and affine), writes
  the masks to ``OUT/predictions/`` and scores them with the same code as
  ``segan evaluate`` (Dice per region of ``dataset.json``, mean over cases and regions).

Prints (and writes ``OUT/result.json``) one JSON object with the test Dice per region
and its mean, the best validation Dice, steps trained and the wall time. Example::

    python benchmarks/plain_unet.py data/phantoms --out outputs/plain --minutes 4 --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DIVISOR = 16


# ------------------------------------------------------------------ data set
def read_dataset(root: Path) -> dict:
    """Training pairs, test images, channel names and regions of an MSD folder."""
    meta_file = root / "dataset.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}

    def resolve(rel: str) -> Path:
        return root / rel[2:] if rel.startswith("./") else root / rel

    if isinstance(meta.get("training"), list):
        training = [(resolve(e["image"]), resolve(e["label"])) for e in meta["training"]]
    else:
        training = [(p, root / "labelsTr" / p.name) for p in sorted((root / "imagesTr").glob("*.nii*"))]
    if isinstance(meta.get("test"), list):
        test = [resolve(e if isinstance(e, str) else e["image"]) for e in meta["test"]]
    else:
        test = sorted((root / "imagesTs").glob("*.nii*"))
    names = meta.get("channel_names") or meta.get("modality") or {}
    channels = [str(v) for _, v in sorted(names.items(), key=lambda kv: int(kv[0]))]
    labels = {int(k): v for k, v in meta.get("labels", {}).items() if str(k).isdigit() and int(k) > 0}
    regions = meta.get("regions") or {re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)): [lid]
                                      for lid, name in sorted(labels.items())}
    if not regions:  # no dataset.json: one region per label value found
        values = sorted(set(np.unique(np.asarray(nib.load(training[0][1]).dataobj)).astype(int)) - {0})
        regions = {f"label_{v}": [v] for v in values}
    return {"training": training, "test": test, "channels": channels,
            "regions": {k: [int(i) for i in v] for k, v in regions.items()}}


def load_scan(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """``(C, X, Y, Z)`` float32 (header scaling applied) and the image object."""
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    return np.ascontiguousarray(data), img


def axial_axis(affine: np.ndarray) -> int:
    """The array axis closest to the inferior-superior world axis."""
    return int(np.flatnonzero(nib.orientations.io_orientation(affine)[:, 0] == 2)[0])


class Normaliser:
    """MR: per-case z-score over non-zero voxels. CT: clip to training-foreground
    percentiles, then z-score with the training foreground's statistics."""

    def __init__(self, ct: list[bool], pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.ct = ct
        self.stats: dict[int, tuple[float, float, float, float]] = {}
        for c, is_ct in enumerate(ct):
            if is_ct:
                values = np.concatenate([image[c][label > 0] for image, label in pairs])
                lo, hi = np.percentile(values, [0.5, 99.5])
                clipped = np.clip(values, lo, hi)
                self.stats[c] = (float(lo), float(hi), float(clipped.mean()), float(clipped.std()) + 1e-8)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        out = np.empty_like(image)
        for c, channel in enumerate(image):
            if self.ct[c]:
                lo, hi, mean, std = self.stats[c]
                out[c] = (np.clip(channel, lo, hi) - mean) / std
            else:
                mask = channel != 0
                values = channel[mask] if mask.mean() < 0.95 and mask.any() else channel.ravel()
                out[c] = (channel - values.mean()) / (values.std() + 1e-8)
        return out


def to_slices(image: np.ndarray, axis: int) -> np.ndarray:
    """``(C, X, Y, Z)`` -> ``(S, C, H, W)`` slices across array axis ``axis``."""
    return np.ascontiguousarray(np.moveaxis(image, axis + 1, 0))


def pad_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """Stack ``(C, H, W)`` arrays zero-padded to a common size, a multiple of 16."""
    h = max(a.shape[1] for a in arrays)
    w = max(a.shape[2] for a in arrays)
    h, w = -(-h // DIVISOR) * DIVISOR, -(-w // DIVISOR) * DIVISOR
    out = np.zeros((len(arrays), arrays[0].shape[0], h, w), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, :, :a.shape[1], :a.shape[2]] = a
    return torch.from_numpy(out)


def paint(masks: np.ndarray, regions: list[list[int]]) -> np.ndarray:
    """``(K, ...)`` binary region masks -> label ids, largest region first; a region paints
    the smallest id that no smaller region nested in it claims."""
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    for k in sorted(range(len(regions)), key=lambda k: -len(regions[k])):
        inner = set().union(*(set(r) for r in regions if set(r) < set(regions[k])))
        out[masks[k]] = min(set(regions[k]) - inner or set(regions[k]))
    return out


# ------------------------------------------------------------------ model
def predict_volume(model: torch.nn.Module, image: np.ndarray, axis: int, device: torch.device,
                   batch: int = 32) -> np.ndarray:
    """Normalised ``(C, X, Y, Z)`` -> ``(K, X, Y, Z)`` bool, slice by slice."""
    slices = to_slices(image, axis)
    probs = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(slices), batch):
            chunk = slices[start:start + batch]
            logits = model(pad_batch(list(chunk)).to(device))[:, :, :chunk.shape[2], :chunk.shape[3]]
            probs.append((torch.sigmoid(logits) > 0.5).cpu().numpy())
    model.train()
    return np.moveaxis(np.concatenate(probs), 0, axis + 1)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    denom = pred.sum() + truth.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(pred, truth).sum() / denom)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="MSD folder (dataset.json, imagesTr/, labelsTr/, imagesTs/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=4.0, help="wall-clock training budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--modality", choices=["auto", "mr", "ct"], default="auto")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--gt", type=Path, default=None, help="test labels [DATA/labelsTs]")
    args = parser.parse_args(argv)

    from monai.losses import DiceLoss
    from monai.networks.nets import UNet

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    ds = read_dataset(args.data)
    region_ids = list(ds["regions"].values())

    raw = []
    for image_path, label_path in ds["training"]:
        image, img = load_scan(image_path)
        label = np.rint(np.asarray(nib.load(str(label_path)).dataobj)).astype(np.int16)
        raw.append((image, label, axial_axis(img.affine)))
    n_channels = raw[0][0].shape[0]
    names = ds["channels"] if len(ds["channels"]) == n_channels else [""] * n_channels
    ct = [args.modality == "ct" or (args.modality == "auto" and n.strip().lower() == "ct") for n in names]
    order = rng.permutation(len(raw))
    n_val = min(max(1, int(round(len(raw) * args.val_fraction))), len(raw) - 1)
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    normalise = Normaliser(ct, [(raw[i][0], raw[i][1]) for i in train_idx])
    cases = [(normalise(image), label, axis) for image, label, axis in raw]
    del raw

    # Training slices: (case, slice) pairs; half of every batch from slices with a label.
    slices = [(to_slices(cases[i][0], cases[i][2]), to_slices(np.stack(
        [np.isin(cases[i][1], r) for r in region_ids]).astype(np.float32), cases[i][2])) for i in train_idx]
    cases = {i: cases[i] for i in val_idx}   # the training volumes live on as slices only
    all_pairs = [(c, s) for c, (img, _) in enumerate(slices) for s in range(len(img))]
    fg_pairs = [(c, s) for c, s in all_pairs if slices[c][1][s].any()] or all_pairs

    model = UNet(spatial_dims=2, in_channels=n_channels, out_channels=len(region_ids), channels=(16, 32, 64, 128),
                 strides=(2, 2, 2), num_res_units=2, norm="INSTANCE").to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    dice_loss, bce = DiceLoss(sigmoid=True, batch=True), torch.nn.BCEWithLogitsLoss()

    def validate() -> float:
        scores = []
        for i in val_idx:
            image, label, axis = cases[i]
            masks = predict_volume(model, image, axis, device)
            scores += [dice(masks[k], np.isin(label, r)) for k, r in enumerate(region_ids)]
        return float(np.mean(scores))

    budget = args.minutes * 60.0
    val_every = max(budget / 10.0, 1.0)
    train_start = time.perf_counter()
    next_val, steps, best, best_state, history = val_every, 0, -1.0, None, []
    while True:
        elapsed = time.perf_counter() - train_start
        if elapsed >= next_val or elapsed >= budget:
            score = validate()
            history.append({"step": steps, "seconds": round(time.perf_counter() - train_start, 1), "val_dice": score})
            if score > best:
                best, best_state = score, copy.deepcopy(model.state_dict())
            next_val += val_every
            if elapsed >= budget:
                break
        imgs, tgts = [], []
        for b in range(args.batch):
            pool = fg_pairs if b % 2 == 0 else all_pairs
            c, s = pool[rng.integers(len(pool))]
            img, tgt = slices[c][0][s], slices[c][1][s]
            for ax in (1, 2):
                if rng.random() < 0.5:
                    img, tgt = np.flip(img, ax), np.flip(tgt, ax)
            imgs.append(img)
            tgts.append(tgt)
        x, y = pad_batch(imgs).to(device), pad_batch(tgts).to(device)
        logits = model(x)
        loss = dice_loss(logits, y) + bce(logits, y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        steps += 1
    train_seconds = time.perf_counter() - train_start
    model.load_state_dict(best_state)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(best_state, args.out / "best.pt")

    pred_dir = args.out / "predictions"
    pred_dir.mkdir(exist_ok=True)
    for path in ds["test"]:
        image, img = load_scan(path)
        masks = predict_volume(model, normalise(image), axial_axis(img.affine), device)
        out = nib.Nifti1Image(paint(masks, region_ids), img.affine, header=img.header)
        out.set_data_dtype(np.uint8)
        out.header.set_slope_inter(1.0, 0.0)
        nib.save(out, str(pred_dir / path.name))

    result = {"method": "plain_unet", "data": str(args.data), "seed": args.seed, "minutes": args.minutes,
              "threads": args.threads, "device": str(device), "steps": steps, "train_seconds": round(train_seconds, 1),
              "best_val_dice": best, "validation": history, "test_cases": len(ds["test"])}
    gt = args.gt or args.data / "labelsTs"
    if ds["test"] and gt.is_dir():
        sys.path.insert(0, str(REPO))
        from segan.metrics import evaluate_folders, metrics_csv, summarize

        regions_text = ";".join(f"{k}={','.join(map(str, v))}" for k, v in ds["regions"].items())
        results, regions = evaluate_folders(pred_dir, gt, regions_text)
        means = summarize(results, regions)
        (args.out / "metrics.csv").write_text(metrics_csv(results, regions, means))
        result.update(test_dice_mean=means["dice_mean"],
                      test_dice={k: means[f"dice_{k}"] for k in regions},
                      failed=[r.case for r in results if r.status == "failed"])
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
