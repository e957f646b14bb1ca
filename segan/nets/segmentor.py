"""The segmentor: a MONAI U-Net (UNet, BasicUNet or DynUNet), 2D or 3D, returning logits.

Inputs of any size are padded up to the multiple of the total stride the network needs
and the logits are cropped back, so whole volumes and odd slice sizes just work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segan.config import ModelConfig


class PadToStride(nn.Module):
    """Wrap ``net``: pad ``(N, C, *spatial)`` to multiples of ``divisor`` (edge replicated), crop the output back."""

    def __init__(self, net: nn.Module, divisor: int) -> None:
        super().__init__()
        self.net = net
        self.divisor = divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        extra = [(-s) % self.divisor for s in spatial]
        if not any(extra):
            return self.net(x)
        pad: list[int] = []
        for e in reversed(extra):  # F.pad wants the last dim first
            pad += [e // 2, e - e // 2]
        # Replicate the edge, not zeros: after z-scoring, 0 is the mean foreground intensity, so
        # a zero border put a band of "tissue" beside the (cropped) head edge that training never
        # showed (its patches pad with the channel minimum) and false positives grew there.
        y = self.net(F.pad(x, pad, mode="replicate"))
        slices = [slice(None), slice(None)] + [slice(e // 2, e // 2 + s) for e, s in zip(extra, spatial)]
        return y[tuple(slices)]


def build_segmentor(cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """U-Net mapping ``(N, in_channels, *spatial)`` to logits ``(N, out_channels, *spatial)``.

    One output channel per region; the sigmoid is applied by the losses and at inference.
    """
    from monai.networks.nets import BasicUNet, DynUNet, UNet

    norm = cfg.norm.upper()
    if cfg.segmentor == "unet":
        if len(cfg.channels) != len(cfg.strides) + 1:
            from segan.errors import UserError

            raise UserError("config key 'model.strides' needs one entry fewer than 'model.channels' "
                            f"(got {len(cfg.strides)} strides for {len(cfg.channels)} channel levels)")
        net: nn.Module = UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                              channels=tuple(cfg.channels), strides=tuple(cfg.strides),
                              num_res_units=cfg.num_res_units, norm=norm, dropout=cfg.dropout)
        divisor = math.prod(cfg.strides)
    elif cfg.segmentor == "basicunet":
        c = list(cfg.channels) + [cfg.channels[-1]] * max(0, 5 - len(cfg.channels))
        features = tuple(c[:5]) + (c[0],)  # BasicUNet: 5 encoder levels + the last decoder's width
        net = BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                        features=features, norm=(norm.lower(), {"affine": True}), dropout=cfg.dropout)
        divisor = 16
    else:  # dynunet (nnU-Net-style)
        if len(cfg.strides) < 2 or len(cfg.channels) < len(cfg.strides) + 1:
            from segan.errors import UserError

            raise UserError("model.segmentor dynunet needs at least 2 'model.strides' and one 'model.channels' "
                            f"entry more than strides (got {len(cfg.strides)} strides, {len(cfg.channels)} channel "
                            "levels); e.g. --set model.channels=[16,32,64] --set model.strides=[2,2]")
        strides = [1] + list(cfg.strides)
        net = DynUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                      kernel_size=[3] * len(strides), strides=strides, upsample_kernel_size=strides[1:],
                      filters=list(cfg.channels)[: len(strides)], norm_name=norm.lower(), dropout=cfg.dropout or None,
                      res_block=cfg.num_res_units > 0)
        divisor = math.prod(cfg.strides)
    return PadToStride(net, divisor)


def output_layer(net: nn.Module, out_channels: int) -> nn.Module:
    """The segmentor's last convolution (the one that writes the ``out_channels`` logits).

    Found as the last registered ``Conv``/``ConvTranspose`` module with ``out_channels``
    outputs, which for MONAI's UNet, BasicUNet and DynUNet is the layer producing the
    logits; used by the adaptive adversarial weight (``method.adv_balance: adaptive``).
    """
    from torch.nn.modules.conv import _ConvNd

    last = None
    for m in net.modules():
        if isinstance(m, _ConvNd) and m.out_channels == out_channels:
            last = m
    if last is None:
        raise ValueError(f"no convolution with {out_channels} output channels in {type(net).__name__}")
    return last
