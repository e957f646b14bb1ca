"""``segan describe``: per-layer output shapes, parameter counts, critic receptive fields."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from segan.config import Config
from segan.methods import METHODS
from segan.nets.critic import receptive_fields
from segan.nets.segmentor import build_segmentor


def _channels_and_regions(cfg: Config, in_channels: int | None) -> tuple[int, int]:
    """From the config, else the data set's dataset.json, else 4 channels / 3 regions."""
    n_in, n_out = len(cfg.data.channels or []) or None, len(cfg.data.regions or {}) or None
    meta = Path(cfg.data.root) / "dataset.json"
    if meta.is_file() and (n_in is None or n_out is None):
        info = json.loads(meta.read_text())
        chans = info.get("channel_names") or info.get("modality") or {}
        n_in = n_in or len(chans) or None
        regions = info.get("regions") or {k: v for k, v in (info.get("labels") or {}).items() if str(k) != "0"}
        n_out = n_out or len(regions) or None
    return in_channels or n_in or 4, n_out or 3


def _layer_table(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Header and one line per leaf layer (name, output shape, own parameters), in columns
    as wide as their longest entry."""
    rows: list[tuple[str, str, str]] = []
    hooks = []

    def hook(name):
        def fn(_m, _inp, out):
            shapes = [tuple(o.shape) for o in out] if isinstance(out, (list, tuple)) else [tuple(out.shape)]
            rows.append((name, str(shapes[-1]), f"{sum(p.numel() for p in _m.parameters(recurse=False)):,}"))
        return fn

    for name, m in model.named_modules():
        if name and not list(m.children()):
            hooks.append(m.register_forward_hook(hook(name)))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    table = [("layer", "output shape", "params"), *rows]
    w_name, w_shape, w_params = (max(len(r[i]) for r in table) for i in range(3))
    return [f"  {n:<{w_name}}  {s:<{w_shape}}  {p:>{w_params}}" for n, s, p in table]


def describe_models(cfg: Config, in_channels: int | None = None) -> str:
    dims = cfg.data.spatial_dims
    n_in, n_out = _channels_and_regions(cfg, in_channels)
    size = list(cfg.data.patch_size)
    seg = build_segmentor(cfg.model, dims, n_in, n_out)
    lines = [f"segmentor: {cfg.model.segmentor} {dims}D, {n_in} channels -> {n_out} regions, input {[1, n_in] + size}",
             *_layer_table(seg, torch.zeros([1, n_in] + size))]
    lines.append(f"  total parameters: {sum(p.numel() for p in seg.parameters()):,}")
    method = METHODS[cfg.method.name](cfg, n_in, n_out)
    critic = method.build_critic()
    if critic is None:
        lines.append(f"method {cfg.method.name}: no critic")
        return "\n".join(lines)
    c_in = critic_input_channels(critic)
    lines.append(f"critic: {cfg.model.critic} for method {cfg.method.name}, input {[1, c_in] + size}")
    outs = critic.eval()(torch.zeros([1, c_in] + size))
    fields = receptive_fields(critic)
    for i, o in enumerate(outs):
        rf = "1 (input)" if (cfg.model.critic == "segan" and i == 0) else None
        if rf is None:
            k = i - 1 if cfg.model.critic == "segan" else i
            rf = str(fields[min(k, len(fields) - 1)]) if fields else "?"
        lines.append(f"  scale {i}: shape {tuple(o.shape)}, receptive field {rf} voxels")
    lines.append(f"  receptive field per conv: {fields}")
    lines.append(f"  total parameters: {sum(p.numel() for p in critic.parameters()):,}")
    return "\n".join(lines)


def critic_input_channels(critic: nn.Module) -> int:
    first = next(m for m in critic.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    return first.in_channels
