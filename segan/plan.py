"""``segan plan``: a training config derived from a data-set fingerprint (as nnU-Net does).

The rules live in :mod:`segan.plan_rules` (each a pure function of the fingerprint returning a
:class:`~segan.plan_rules.Decision`); here :func:`trial_step` times the planned step,
:func:`make_plan` chains the rules and the trial, and :func:`render_yaml` writes the
commented YAML that ``segan train -c`` loads. The method family's own keys (``w_adv``,
critic, warm-up, ...) are *not* written: resolving the file brings them from the method
(:func:`segan.config_layers.resolve_config`), so the planned file never conflicts with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from segan.errors import UserError
from segan.plan_rules import (DEFAULT_MEMORY_GB, VAL_FRACTION, VOXELS_PER_SECOND, Decision, format_values,
                              preprocessed_shape, rule_batch, rule_budget, rule_critic_start, rule_dims,
                              rule_normalize, rule_patch, rule_schedule, rule_spacing, target_of)


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


# ----------------------------------------------------------------------------- trial
def trial_step(model_values: dict[str, Any], dims: int, in_channels: int, out_channels: int,
               patch: list[int], batch: int, device: str, method: str, critic: bool = True) -> float:
    """Seconds of one whole training step of ``method`` with the planned model on a synthetic
    ``(batch, C, *patch)`` batch, as :class:`segan.bench_modes.ModeRunner` runs it: the critic update(s)
    and the segmentor update (the planned data has no unlabelled stream, so no unlabelled batch);
    the median of three steps after a warm-up one. ``critic=False``: the step as the loop runs it
    before the critic starts (``w_adv`` 0: no critic update, no adversarial term), which a budgeted
    adversarial plan times (:func:`rule_critic_start`). ``torch.cuda.OutOfMemoryError`` propagates."""
    import tempfile

    import torch

    from segan.bench_modes import ModeRunner
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
                    raise UserError(f"one patch of {format_values(patch)} does not fit on {device}; pass a smaller "
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
    if minutes is not None:   # measured under budgets only; a plan by epochs keeps the default cosine
        decisions.append(rule_schedule())
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
