"""Optimizers and learning-rate schedules from :class:`~segan.config.OptimConfig`."""

from __future__ import annotations

import math

import torch

from segan.config import OptimConfig


def build_optimizer(params, cfg: OptimConfig, lr: float, device: torch.device,
                    betas: list[float] | None = None) -> torch.optim.Optimizer:
    """Adam / AdamW / RMSprop; fused kernels on CUDA when ``cfg.fused`` (plain on CPU)."""
    params = [p for p in params if p.requires_grad]
    fused = bool(cfg.fused and device.type == "cuda")
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    extra = {"fused": True} if fused else {"foreach": True}
    return cls(params, lr=lr, betas=tuple(betas or cfg.betas), weight_decay=cfg.weight_decay, **extra)


WSD_DECAY = 0.2  # the share of the run that ``wsd`` anneals over (the cooldown of Hägele et al.)


def _cosine(t: float) -> float:
    """Cosine from 1 at t=0 to 0.02 at t=1."""
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))


class ProgressSchedule:
    """Learning rate = base lr x ``factor(progress)``, progress in [0, 1].

    The trainer sets progress = max(epochs done / epochs, wall time used / ``train.max_minutes``),
    so a run with a time budget still anneals fully before the budget ends.
    Schedules: none, step (x gamma every ``step_epochs``), cosine (to 2 %), poly (power 0.9),
    wsd ("warmup-stable-decay" without the warm-up, Hägele et al. 2024): constant, then cosine
    to 2 % over the last ``WSD_DECAY`` of progress, so a short budget is not annealed before
    the harder structures are learned.
    """

    def __init__(self, opt: torch.optim.Optimizer, cfg: OptimConfig, epochs: int) -> None:
        self.opt, self.cfg, self.epochs = opt, cfg, max(epochs, 1)
        self.base = [float(g["lr"]) for g in opt.param_groups]
        self.progress = 0.0

    def factor(self, progress: float) -> float:
        t = min(max(progress, 0.0), 1.0)
        if self.cfg.schedule == "step":
            return self.cfg.gamma ** int(t * self.epochs // max(self.cfg.step_epochs, 1))
        if self.cfg.schedule == "cosine":
            return _cosine(t)
        if self.cfg.schedule == "wsd":
            return _cosine(max(t - (1 - WSD_DECAY), 0.0) / WSD_DECAY)
        if self.cfg.schedule == "poly":
            return (1 - t) ** 0.9
        return 1.0

    def step(self, progress: float) -> None:
        self.progress = float(progress)
        for group, base in zip(self.opt.param_groups, self.base):
            group["lr"] = base * self.factor(self.progress)

    def state_dict(self) -> dict:
        return {"base": list(self.base), "progress": self.progress}

    def load_state_dict(self, state: dict) -> None:
        self.base = [float(b) for b in state["base"]]
        self.step(float(state["progress"]))
