"""``segan plan``: a training config derived from a data-set fingerprint (as nnU-Net does).

Each rule is a small pure function of the fingerprint (:func:`data_prep.fingerprint.load_fingerprint`)
and of what came before it, returning :class:`Decision` s: the config keys it sets, their
values and one reason. :func:`make_plan` chains them; :func:`render_yaml` writes the
commented YAML that ``segan train -c`` loads. The method family's own keys (``w_adv``,
critic, warm-up, ...) are *not* written: resolving the file brings them from the method
(:func:`segan.config_layers.resolve_config`), so the planned file never conflicts with it.

Axes: the fingerprint's RAS axes, which are the preprocessed axes (``preprocess.orientation``
RAS); 2D training slices the last (axial) axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from segan.errors import UserError

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


@dataclass
class Plan:
    decisions: list[Decision] = field(default_factory=list)
    method: str = "segan"
    family: dict[str, Any] = field(default_factory=dict)

    def values(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method.name": self.method}
        for d in self.decisions:
            out.update(d.values)
        return out


def _fmt(values: list[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


# ----------------------------------------------------------------------------- rules
def rule_spacing(fp: dict) -> Decision:
    """Median spacing per axis; an axis coarser than ``ANISOTROPY_LIMIT`` x the finest one
    gets its 10th percentile instead (nnU-Net), never finer than the other axes' coarsest
    (never upsample the whole data set). ``null`` (native) when every case is already there."""
    s = fp["summary"]
    target = [float(v) for v in s["median_spacing"]]
    why = f"median spacing {_fmt(target)} mm"
    if s["anisotropy"] > ANISOTROPY_LIMIT:
        axis = max(range(3), key=lambda a: target[a])
        others = max(target[a] for a in range(3) if a != axis)
        target[axis] = max(float(s["spacing_p10"][axis]), others)
        why += (f"; anisotropy {s['anisotropy']:.2g} > {ANISOTROPY_LIMIT:g}: axis {axis} from its 10th percentile "
                f"-> {target[axis]:.3g} mm")
    native = all(all(abs(a - b) < 1e-3 for a, b in zip(c["spacing_ras"], target)) for c in fp["cases"])
    if native:
        return Decision("spacing", {"preprocess.spacing": None},
                        f"{why}; every case is already at {_fmt(target)} mm: native, no resampling")
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
                    f"median preprocessed shape {_fmt(shape)} voxels -> patch {_fmt(patch)} (cap {cap} on {device}); "
                    f"{depth} downsamplings -> bottleneck {_fmt(bottleneck)} voxels; widths from {BASE_WIDTH[device]} "
                    f"on {device}; critic widths {channels[:3]}")


def rule_batch(patch: list[int], dims: int, memory_gb: float, device: str = "cuda") -> Decision:
    """Batch from the memory budget (activations ~``BYTES_PER_VOXEL`` per input voxel,
    half the budget kept free), within the device's ``BATCH_RANGE``."""
    lo, hi = BATCH_RANGE[(dims, device)]
    fit = int(memory_gb * 1e9 * 0.5 / (math.prod(patch) * BYTES_PER_VOXEL))
    batch = max(lo, min(hi, fit))
    return Decision("batch", {"train.batch_size": batch},
                    f"{memory_gb:g} GB budget fits ~{fit} patches of {_fmt(patch)}; batch {batch} (range {lo}-{hi})")


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


# ----------------------------------------------------------------------------- trial
def trial_step(model_values: dict[str, Any], dims: int, in_channels: int, out_channels: int,
               patch: list[int], batch: int, device: str, method: str, critic: bool = True) -> float:
    """Seconds of one whole training step of ``method`` with the planned model on a synthetic
    ``(batch, C, *patch)`` batch, as :class:`segan.bench.ModeRunner` runs it: the critic update(s)
    and the segmentor update (the planned data has no unlabelled stream, so no unlabelled batch);
    the median of three steps after a warm-up one. ``critic=False``: the step as the loop runs it
    before the critic starts (``w_adv`` 0: no critic update, no adversarial term), which a budgeted
    adversarial plan times (:func:`rule_critic_start`). ``torch.cuda.OutOfMemoryError`` propagates."""
    import tempfile

    import torch

    from segan.bench import ModeRunner
    from segan.config_layers import resolve_config

    cfg = resolve_config(None, [f"method.name={method}"]).config
    cfg.data.spatial_dims, cfg.data.patch_size, cfg.train.batch_size = dims, list(patch), batch
    cfg.data.channels = [f"channel_{i}" for i in range(in_channels)]
    cfg.data.regions = {f"region_{k}": [k + 1] for k in range(out_channels)}
    for key in ("channels", "strides", "critic_channels"):
        if f"model.{key}" in model_values:
            setattr(cfg.model, key, list(model_values[f"model.{key}"]))
    with tempfile.TemporaryDirectory(prefix="segan-plan-") as tmp:
        runner = ModeRunner.build(cfg, "fast", torch.device(device), Path(tmp))
        if not critic:
            runner.w_adv = 0.0   # Trainer.train_step skips the critic at w_adv 0, as in a warm-up
        runner.run(1)  # warm-up
        return sorted(runner.run(1) for _ in range(3))[1]


def _fit(patch_d: Decision, batch_d: Decision, dims: int, fp: dict, device: str,
         method: str, threads: Optional[int] = None, critic: bool = True) -> tuple[float, str]:
    """Run the trial (``critic``: see :func:`trial_step`), halving the batch on out-of-memory;
    returns (seconds, note).

    ``threads``: the CPU threads the run will train with (``train.threads``); the trial runs
    with them, since a step timed on 2 threads planned twice the steps a 1-thread run can do."""
    import torch

    n_out = max(1, len([k for k in fp["labels"] if k != "foreground"]))
    patch = patch_d.values["data.patch_size"]
    batch = batch_d.values["train.batch_size"]
    what = f"{method} step" if critic else f"segmentor step ({method}'s critic starts later: critic_start)"
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        while True:
            try:
                s = trial_step(patch_d.values, dims, len(fp["channels"]), n_out, patch, batch, device, method, critic)
                batch_d.values["train.batch_size"] = batch
                return s, (f"trial {what} on {device} ({torch.get_num_threads()} CPU thread(s)): "
                           f"{s:.3g} s/step at batch {batch}")
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if batch <= 1:
                    raise UserError(f"one patch of {_fmt(patch)} does not fit on {device}; pass a smaller "
                                    "--memory-gb or --dims 2") from None
                batch //= 2
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the plan
def make_plan(fp: dict, method: str = "segan", dims: str = "auto", device: str = "cpu",
              memory_gb: Optional[float] = None, minutes: Optional[float] = None, trial: bool = True,
              threads: Optional[int] = None) -> Plan:
    """All rules in order; ``trial=False`` estimates the step time instead of measuring it;
    ``threads``: CPU threads of the trial (the run's ``train.threads``; default torch's)."""
    from segan.methods import METHODS

    if method not in METHODS:
        raise UserError(f"--method {method!r} is not a method; allowed: {', '.join(METHODS)}")
    memory = float(memory_gb) if memory_gb else DEFAULT_MEMORY_GB["cuda" if device.startswith("cuda") else "cpu"]
    kind = "cuda" if device.startswith("cuda") else "cpu"
    spacing = rule_spacing(fp)
    shape = preprocessed_shape(fp, target_of(spacing, fp))
    dims_d = rule_dims(fp, dims, kind, memory)
    nd = dims_d.values["data.spatial_dims"]
    patch_d = rule_patch(shape, nd, kind)
    batch_d = rule_batch(patch_d.values["data.patch_size"], nd, memory, kind)
    patch = patch_d.values["data.patch_size"]
    # A budgeted adversarial run is planned for its step without the critic (rule_critic_start).
    adversarial = METHODS[method].has_critic and minutes is not None
    if trial:
        step_s, note = _fit(patch_d, batch_d, nd, fp, device, method, threads, critic=not adversarial)
    else:
        step_s = math.prod(patch) * batch_d.values["train.batch_size"] / VOXELS_PER_SECOND[kind]
        note = f"trial skipped: ~{step_s:.3g} s/step estimated from {VOXELS_PER_SECOND[kind]:.0e} voxels/s"
    batch_d.reason += f"; {note}"
    # A validation pass: the median case in patch-sized windows, forward only (~1/3 of a step).
    windows = math.prod(shape) / math.prod(patch) if nd == 3 else shape[2] * math.prod(shape[:2]) / math.prod(patch)
    per_case = windows / batch_d.values["train.batch_size"] * step_s / 3
    n_val = max(1, int(round(fp["n_cases"] * VAL_FRACTION)))
    decisions = [spacing, dims_d, patch_d, batch_d, rule_normalize(fp),
                 rule_budget(minutes, step_s, fp["n_cases"], per_case * n_val)]
    if adversarial:
        decisions.append(rule_critic_start(method))
    device_d = Decision("device", {"train.device": device}, f"--device {device}")
    if threads:   # the budget was timed with them
        device_d.values["train.threads"] = threads
        device_d.reason += f"; {threads} CPU thread(s), as the trial was timed"
    family = dict(METHODS[method].family.settings)
    return Plan(decisions + [device_d], method=method, family=family)


def data_values(source: Path, fp: dict) -> Decision:
    if source.is_file():
        return Decision("data", {"data.root": str(fp["root"]), "data.datalist": str(source.resolve())},
                        "the data list given")
    return Decision("data", {"data.root": str(source.resolve())}, "the data-set folder given")


def render_yaml(plan: Plan) -> str:
    """The plan as YAML, each key preceded by its rule's reason as a comment."""
    lines = ["# Written by `segan plan`; each key's reason is the comment above it.",
             f"# The method family's settings come from method.name ({plan.method}) when this file is loaded:"]
    lines += [f"#   {k}: {yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
              for k, v in plan.family.items()]
    sections: dict[str, list[str]] = {}
    owners = [Decision("method", {"method.name": plan.method}, "--method")] + plan.decisions
    for d in owners:
        said: set[str] = set()   # the reason once per rule and section, above its first key
        for key, value in d.values.items():
            section, name = key.split(".", 1)
            text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
            comment = "" if section in said else f"  # {d.rule}: {d.reason}\n"
            said.add(section)
            sections.setdefault(section, []).append(f"{comment}  {name}: {text}")
    for section, body in sections.items():
        lines += [f"{section}:", *body]
    return "\n".join(lines) + "\n"


def format_plan(plan: Plan) -> str:
    return "\n".join(f"{d.rule}: {d.reason}" for d in plan.decisions)


@dataclass
class Planned:
    """What :func:`plan_data` returns: the plan, its commented YAML and the fingerprint it came from."""

    plan: Plan
    yaml_text: str
    fingerprint: dict


def plan_data(source: str | Path, method: str = "segan", dims: str = "auto", device: str = "cpu",
              memory_gb: Optional[float] = None, minutes: Optional[float] = None, trial: bool = True,
              threads: Optional[int] = None) -> Planned:
    """Fingerprint ``source`` (cached) and plan it; nothing written but the fingerprint cache.

    The one planner behind ``segan plan`` (:func:`run_plan`) and ``segan train --data``."""
    from data_prep.fingerprint import load_fingerprint

    source = Path(source)
    if not source.exists():
        raise UserError(f"{source}: no such data-set folder or data list")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device here; plan with --device cpu")
    fp, _, _ = load_fingerprint(source)
    plan = make_plan(fp, method=method, dims=dims, device=device, memory_gb=memory_gb, minutes=minutes, trial=trial,
                     threads=threads)
    plan.decisions.insert(0, data_values(source, fp))
    return Planned(plan, render_yaml(plan), fp)


def run_plan(source: str | Path, out: str | Path, method: str = "segan", dims: str = "auto", device: str = "cpu",
             memory_gb: Optional[float] = None, minutes: Optional[float] = None, trial: bool = True,
             threads: Optional[int] = None) -> Plan:
    """Fingerprint ``source``, plan, write ``out`` atomically and check it resolves."""
    from segan.config_layers import resolve_config
    from segan.io_utils import atomic_write_text

    planned = plan_data(source, method=method, dims=dims, device=device, memory_gb=memory_gb, minutes=minutes,
                        trial=trial, threads=threads)
    atomic_write_text(Path(out), planned.yaml_text)
    resolve_config(out)   # the written file must load as `segan train -c` loads it
    return planned.plan
