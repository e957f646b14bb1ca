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


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch multiplier: none, step (x gamma every step_epochs), cosine, poly (0.9)."""

    def factor(epoch: int) -> float:
        t = min(epoch / max(epochs, 1), 1.0)
        if cfg.schedule == "step":
            return cfg.gamma ** (epoch // max(cfg.step_epochs, 1))
        if cfg.schedule == "cosine":
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))
        if cfg.schedule == "poly":
            return max(1 - t, 0.0) ** 0.9
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
