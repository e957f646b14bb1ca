"""The rules of ``segan plan``: each a small pure function of the data-set fingerprint
(:func:`data_prep.fingerprint.load_fingerprint`) and of what came before it, returning a
:class:`Decision`: the config keys it sets, their values and one reason (the planned YAML's
comment). :func:`segan.plan.make_plan` chains them and runs the trial step.

Axes: the fingerprint's RAS axes, which are the preprocessed axes (``preprocess.orientation``
RAS); 2D training slices the last (axial) axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

ANISOTROPY_LIMIT = 3.0                     # nnU-Net's threshold for a "low-resolution" axis
BOTTLENECK = (4, 8)                        # voxels per axis at the U-Net's bottleneck
MAX_DEPTH = 5
PATCH_CAP = {(2, "cpu"): 256, (2, "cuda"): 512, (3, "cpu"): 64, (3, "cuda"): 160}
# Batch range per (dims, device); a CPU budget buys more, smaller steps (2D at most 16 there).
BATCH_RANGE = {(2, "cpu"): (2, 16), (2, "cuda"): (2, 32), (3, "cpu"): (2, 8), (3, "cuda"): (2, 8)}
# First-block width: nnU-Net's 32 on CUDA; 16 on CPU, where a minutes budget is sample-starved
# (t1_2mm, 3 min: width 16 test Dice 0.84 against 0.60-0.67 with width 32 at batch 32 or 16).
BASE_WIDTH = {"cpu": 16, "cuda": 32}
BYTES_PER_VOXEL = 3000                     # activations + gradients of a width-32 U-Net per input voxel, fp32
DEFAULT_MEMORY_GB = {"cpu": 4.0, "cuda": 8.0}
VOXELS_PER_SECOND = {"cpu": 2e5, "cuda": 2e7}   # training throughput guess when the trial is skipped
VAL_SHARE = 0.10                           # validation may take at most this share of the wall time
VAL_FRACTION = 0.2                         # data.val_fraction default


@dataclass
class Decision:
    """One rule's outcome: ``values`` (dotted config key -> value) and why."""

    rule: str
    values: dict[str, Any]
    reason: str


def format_values(values: list[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def rule_spacing(fp: dict) -> Decision:
    """Median spacing per axis; an axis coarser than ``ANISOTROPY_LIMIT`` x the finest one
    gets its 10th percentile instead (nnU-Net), never finer than the other axes' coarsest
    (never upsample the whole data set). ``null`` (native) when every case is already there."""
    s = fp["summary"]
    target = [float(v) for v in s["median_spacing"]]
    why = f"median spacing {format_values(target)} mm"
    if s["anisotropy"] > ANISOTROPY_LIMIT:
        axis = max(range(3), key=lambda a: target[a])
        others = max(target[a] for a in range(3) if a != axis)
        target[axis] = max(float(s["spacing_p10"][axis]), others)
        why += (f"; anisotropy {s['anisotropy']:.2g} > {ANISOTROPY_LIMIT:g}: axis {axis} from its 10th percentile "
                f"-> {target[axis]:.3g} mm")
    native = all(all(abs(a - b) < 1e-3 for a, b in zip(c["spacing_ras"], target)) for c in fp["cases"])
    if native:
        return Decision("spacing", {"preprocess.spacing": None},
                        f"{why}; every case is already at {format_values(target)} mm: native, no resampling")
    return Decision("spacing", {"preprocess.spacing": [round(v, 4) for v in target]},
                    f"{why}; no axis finer than the data (no upsampling of the whole set)")


def target_of(spacing: Decision, fp: dict) -> list[float]:
    value = spacing.values["preprocess.spacing"]
    return list(fp["summary"]["median_spacing"]) if value is None else list(value)


def preprocessed_shape(fp: dict, target: list[float]) -> list[int]:
    """Median case extent in voxels at ``target`` mm (before the foreground crop)."""
    return [max(1, int(round(mm / t))) for mm, t in zip(fp["summary"]["median_size_mm"], target)]


def rule_dims(fp: dict, requested: str, device: str, memory_gb: float) -> Decision:
    """``auto``: 2D on CPU (3D patches cost too much per step there) or when anisotropic
    (the coarse axis has too few voxels for 3D context); else 3D when a 3D patch of at
    least 64^3 at batch 2 fits the memory budget."""
    if requested in ("2", "3"):
        return Decision("dims", {"data.spatial_dims": int(requested)}, f"--dims {requested}")
    if device == "cpu":
        return Decision("dims", {"data.spatial_dims": 2}, "auto on CPU: 2D slices (3D steps are too slow on CPU)")
    if fp["summary"]["anisotropy"] > ANISOTROPY_LIMIT:
        return Decision("dims", {"data.spatial_dims": 2},
                        f"auto: anisotropy {fp['summary']['anisotropy']:.2g} > {ANISOTROPY_LIMIT:g}: 2D in-plane slices")
    need = 2 * 64 ** 3 * BYTES_PER_VOXEL / 1e9
    if memory_gb >= need:
        return Decision("dims", {"data.spatial_dims": 3}, f"auto on {device}: 3D, {memory_gb:g} GB fits 2 x 64^3 "
                        f"(~{need:.1f} GB)")
    return Decision("dims", {"data.spatial_dims": 2}, f"auto: {memory_gb:g} GB < {need:.1f} GB for 2 x 64^3: 2D")


def _depth(patch: list[int]) -> int:
    """Downsamplings until the smallest patch axis is 4-8 voxels at the bottleneck."""
    k = int(math.floor(math.log2(max(min(patch), BOTTLENECK[0]) / BOTTLENECK[0])))
    return max(1, min(MAX_DEPTH, k))


def rule_patch(shape: list[int], dims: int, device: str) -> Decision:
    """Patch as large as the median preprocessed shape (2D: its first two axes), capped
    per device, a multiple of 8; U-Net depth from the patch (bottleneck 4-8 voxels); widths
    double per level from ``BASE_WIDTH`` of the device, up to 320."""
    axes = shape[:2] if dims == 2 else shape
    cap = PATCH_CAP[(dims, device)]
    patch = [max(16, min(cap, int(math.ceil(s / 8) * 8))) for s in axes]
    depth = _depth(patch)
    channels = [min(320, BASE_WIDTH[device] * 2 ** i) for i in range(depth + 1)]
    bottleneck = [p // 2 ** depth for p in patch]
    # The critic (GAN methods) takes the segmentor's first three widths: the dataclass default
    # [64, 128, 256] made a SegAN step on CPU ~5x the planned segmentor step.
    values = {"data.patch_size": patch, "model.channels": channels, "model.strides": [2] * depth,
              "model.critic_channels": channels[:3]}
    return Decision("patch", values,
                    f"median preprocessed shape {format_values(shape)} voxels -> patch {format_values(patch)} "
                    f"(cap {cap} on {device}); {depth} downsamplings -> bottleneck {format_values(bottleneck)} "
                    f"voxels; widths from {BASE_WIDTH[device]} on {device}; critic widths {channels[:3]}")


def rule_batch(patch: list[int], dims: int, memory_gb: float, device: str = "cuda") -> Decision:
    """Batch from the memory budget (activations ~``BYTES_PER_VOXEL`` per input voxel,
    half the budget kept free), within the device's ``BATCH_RANGE``."""
    lo, hi = BATCH_RANGE[(dims, device)]
    fit = int(memory_gb * 1e9 * 0.5 / (math.prod(patch) * BYTES_PER_VOXEL))
    batch = max(lo, min(hi, fit))
    return Decision("batch", {"train.batch_size": batch},
                    f"{memory_gb:g} GB budget fits ~{fit} patches of {format_values(patch)}; "
                    f"batch {batch} (range {lo}-{hi})")


def rule_normalize(fp: dict) -> Decision:
    """CT: clip to the training set's foreground 0.5/99.5 percentiles, z-score with its
    mean/std (``normalize: ct``; mean/std of the unclipped foreground sample); MR and
    other: per-case foreground z-score (``zscore``)."""
    if fp["modality"] == "CT":
        stats = []
        for ch in fp["channels"]:
            fg = ch["foreground"] or ch["body"]
            stats.append([round(fg["p0.5"], 3), round(fg["p99.5"], 3), round(fg["mean"], 3),
                          round(max(fg["std"], 1e-3), 3)])
        return Decision("normalize", {"preprocess.normalize": "ct", "preprocess.ct_stats": stats},
                        f"CT ({fp['channels'][0]['modality_source']}): intensities mean the same in every scan; "
                        "clip to the foreground 0.5/99.5 percentiles, z-score with data-set statistics")
    return Decision("normalize", {"preprocess.normalize": "zscore"},
                    f"{fp['modality']}: intensities differ between scans; per-case foreground z-score")


def rule_budget(minutes: Optional[float], step_s: float, n_cases: int, val_pass_s: float) -> Decision:
    """Epochs and steps per epoch to fill ``minutes``; validation (one pass costs
    ``val_pass_s``) at most ``VAL_SHARE`` of it: every N epochs, then fewer cases."""
    if minutes is None:
        return Decision("budget", {}, "no --minutes: the config's epochs and validation every epoch")
    budget = minutes * 60.0
    steps = max(1, int(budget * (1 - VAL_SHARE) / step_s))
    per_epoch = max(10, min(250, steps // 40))
    epochs = max(1, steps // per_epoch)
    n_val = max(1, int(round(n_cases * VAL_FRACTION)))
    passes = budget * VAL_SHARE / max(val_pass_s, 1e-6)   # validation passes the budget allows
    val_every = max(1, int(math.ceil(epochs / max(1.0, math.floor(passes)))))
    values: dict[str, Any] = {"train.max_minutes": float(minutes), "train.epochs": epochs,
                              "train.steps_per_epoch": per_epoch, "train.val_every": val_every}
    why = (f"{minutes:g} min at ~{step_s:.3g} s/step: {epochs} epochs x {per_epoch} steps; a validation pass "
           f"~{val_pass_s:.3g} s on {n_val} case(s): every {val_every} epoch(s) keeps it under {VAL_SHARE:.0%}")
    if passes < 1:   # even one pass is too long: validate fewer cases, once at the end
        keep = max(1, int(n_val * passes))
        values.update({"train.val_every": epochs, "train.val_max_cases": keep})
        why += f"; one pass is too long, so {keep} validation case(s) every {epochs} epochs"
    return Decision("budget", values, why)


def rule_critic_start(method: str) -> Decision:
    """A method with a critic under a wall-clock plan: epochs are planned for the segmentor's
    step, and the critic starts once the segmentation loss has settled (``adv_start: settled``).

    Why: a critic step costs ~1.5x a segmentor step (CPU), and in a budget of minutes the
    epochs planned for the whole step left SegAN a third fewer segmentor steps than the
    supervised plan and 0.03-0.04 lower validation Dice on the phantoms (3 min, 1 thread;
    a critic started after the family's fixed warm-up, or with ``adv_start: settled`` but
    epochs still planned for the whole step, did no better). Planned for the segmentor, the run
    is supervised until its loss settles, then adversarial until the clock ends it; the
    learning-rate and adversarial schedules follow the time used, so it still anneals."""
    return Decision("critic_start", {"method.adv_start": "settled"},
                    f"{method} under a budget: epochs planned for the segmentor's step; the critic starts "
                    "when the segmentation loss has settled and the wall clock ends the run (schedules follow "
                    "the time used)")


def rule_schedule() -> Decision:
    """The learning-rate schedule of a run planned for a budget (``--minutes``): ``wsd``
    (constant, then cosine over the last 20 %).

    Why: a planned run is short (minutes, tens of epochs) and the schedule follows the time used,
    so plain cosine halves the rate by mid-run; on the default phantoms in 3 min it annealed
    before the enhancing region was learned (planned supervised 0.838 +- 0.021 test Dice over
    6 seeds against 0.875 with a constant rate and 0.876 for the plain baseline). ``wsd`` keeps
    the full rate for 80 % of the run and still anneals at the end."""
    return Decision("schedule", {"optim.schedule": "wsd"},
                    "constant learning rate, cosine to 2 % over the last 20 % of the run (wsd): a short "
                    "run annealed by cosine from the start stops learning the harder structures too early")
