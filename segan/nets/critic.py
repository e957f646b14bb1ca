"""Critics: SegAN's multi-scale feature critic, the PatchGAN discriminator, an attention critic,
and AdvSemiSeg's fully convolutional discriminator.

Every critic maps ``(N, C_in, *spatial)`` to a list of tensors. The SegAN critic returns
its features per scale ``[x, block_1(x), ..., block_L(x)]``; the discriminators return
their intermediate outputs with the logits map last (as MONAI's ``PatchDiscriminator``
does), so the GAN losses take ``outputs[-1]``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from segan.config import ModelConfig


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _norm(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    return nn.Identity()


class SegANCritic(nn.Module):
    """Strided 4x4 conv blocks (Conv stride 2 + norm + LeakyReLU 0.2), as in the SegAN paper.

    Input: masked images ``(N, C*K, *spatial)`` (one masked copy of the C-channel image per
    region). Output: ``[x, f_1, ..., f_L]``, f_l of shape ``(N, channels[l-1], *spatial / 2**l)``.
    """

    def __init__(self, dims: int, in_channels: int, channels: list[int], norm: str = "batch") -> None:
        super().__init__()
        conv = _conv(dims)
        blocks = []
        prev = in_channels
        for i, ch in enumerate(channels):
            blocks.append(nn.Sequential(
                conv(prev, ch, kernel_size=4, stride=2, padding=1, bias=norm == "none" or i == 0),
                _norm("none" if i == 0 else norm, dims, ch),  # no norm on the first block (DCGAN practice)
                nn.LeakyReLU(0.2, inplace=True),
            ))
            prev = ch
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [x]
        for block in self.blocks:
            feats.append(block(feats[-1]))
        return feats


class SelfAttention(nn.Module):
    """SAGAN/fastai self-attention over positions: ``x + gamma * softmax(q k^T) v``."""

    def __init__(self, dims: int, channels: int) -> None:
        super().__init__()
        conv = _conv(dims)
        self.query = conv(channels, max(channels // 8, 1), 1)
        self.key = conv(channels, max(channels // 8, 1), 1)
        self.value = conv(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        q = self.query(x).flatten(2).transpose(1, 2)  # (N, P, C/8)
        k = self.key(x).flatten(2)  # (N, C/8, P)
        attn = torch.softmax(q @ k, dim=-1)  # (N, P, P)
        v = self.value(x).flatten(2)  # (N, C, P)
        return x + self.gamma * (v @ attn.transpose(1, 2)).view_as(x)


class PatchGANDiscriminator(nn.Module):
    """pix2pix / CycleGAN ``NLayerDiscriminator``, 2D or 3D; returns every layer's output, logits last.

    One Conv(4, stride 2) + LeakyReLU(0.2) per width in ``channels`` (norm after all but the
    first), then Conv(4, stride 1) at twice the last width + norm + LeakyReLU, then
    Conv(4, stride 1) to one logit per patch. ``channels=[64, 128, 256]`` is the classic
    70x70 PatchGAN (receptive field 1 -> 4 -> 7 -> 16 -> 34 -> 70).
    """

    def __init__(self, dims: int, in_channels: int, channels: list[int], norm: str = "batch") -> None:
        super().__init__()
        conv = _conv(dims)
        bias = norm != "batch"  # batch norm's shift makes a conv bias redundant
        widths = [*channels, 2 * channels[-1]]
        layers: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(widths):
            stride = 2 if i < len(channels) else 1
            layers.append(nn.Sequential(conv(prev, ch, 4, stride, 1, bias=bias or i == 0),
                                        _norm("none" if i == 0 else norm, dims, ch), nn.LeakyReLU(0.2, inplace=True)))
            prev = ch
        layers.append(conv(prev, 1, 4, 1, 1))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs


class AttentionCritic(nn.Module):
    """fastai ``gan_critic``-style discriminator; logits map last.

    Conv(4, stride 2) to ``channels[0]`` + Dropout(p/2); per further width: Conv(3) +
    Dropout(p) + Conv(4, stride 2) to that width (self-attention after the first such
    block); then Conv(3) and Conv(4, no padding) to one channel.
    """

    def __init__(self, dims: int, in_channels: int, channels: list[int], p: float = 0.15) -> None:
        super().__init__()
        conv = _conv(dims)
        drop = nn.Dropout2d if dims == 2 else nn.Dropout3d
        act = nn.LeakyReLU(0.2, inplace=True)
        ch = channels[0]
        layers: list[nn.Module] = [nn.Sequential(conv(in_channels, ch, 4, 2, 1), act, drop(p / 2))]
        for i, nxt in enumerate(channels[1:]):
            layers.append(nn.Sequential(
                conv(ch, ch, 3, 1, 1), act, drop(p),
                conv(ch, nxt, 4, 2, 1), act,
                *([SelfAttention(dims, nxt)] if i == 0 else []),
            ))
            ch = nxt
        layers.append(nn.Sequential(conv(ch, ch, 3, 1, 1), act, conv(ch, 1, 4, 1, 0)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs


class FCDiscriminator(nn.Module):
    """Hung et al. 2018 (AdvSemiSeg) fully convolutional discriminator, 2D or 3D; logits map last.

    One Conv(4, stride 2) + LeakyReLU(0.2) per width in ``channels`` (``norm`` after all but
    the first; the paper uses none), then a Conv(4, stride 2) classifier to one logit per
    position: ``(N, C_in, *s) -> (N, 1, *s / 2**(L+1))``. The paper's widths are
    ``[64, 128, 256, 512]``. The method upsamples the map to the mask's size
    (:func:`confidence_logits`), as the reference code does outside the network.
    """

    def __init__(self, dims: int, in_channels: int, channels: list[int], norm: str = "none") -> None:
        super().__init__()
        conv = _conv(dims)
        layers: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(channels):
            layers.append(nn.Sequential(conv(prev, ch, 4, 2, 1, bias=norm != "batch" or i == 0),
                                        _norm("none" if i == 0 else norm, dims, ch), nn.LeakyReLU(0.2, inplace=True)))
            prev = ch
        layers.append(conv(prev, 1, 4, 2, 1))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs


def upsample_logits(logits: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """A logits map ``(N, 1, *s')`` resized to ``size`` (bilinear in 2D, trilinear in 3D,
    ``align_corners=False``), in float32."""
    mode = "bilinear" if logits.dim() == 4 else "trilinear"
    return nn.functional.interpolate(logits.float(), size=tuple(size), mode=mode, align_corners=False)


def confidence_logits(critic: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A discriminator's logits map upsampled to the input's size: ``(N, C_in, *s) -> (N, 1, *s)`` float32.

    ``sigmoid`` of it is AdvSemiSeg's per-voxel confidence map. Works with any critic whose
    last output is a one-channel logits map (``fcn``, ``patchgan``, ``attention``).
    """
    return upsample_logits(critic(x)[-1], x.shape[2:])


CRITICS: dict[str, Callable[..., nn.Module]] = {
    "segan": lambda dims, c_in, cfg: SegANCritic(dims, c_in, cfg.critic_channels, cfg.critic_norm),
    "patchgan": lambda dims, c_in, cfg: PatchGANDiscriminator(dims, c_in, cfg.critic_channels, cfg.critic_norm),
    "attention": lambda dims, c_in, cfg: AttentionCritic(dims, c_in, cfg.critic_channels),
    "fcn": lambda dims, c_in, cfg: FCDiscriminator(dims, c_in, cfg.critic_channels, cfg.critic_norm),
}


def build_critic(cfg: ModelConfig, dims: int, in_channels: int) -> nn.Module:
    """The critic named by ``cfg.critic`` with one block per ``cfg.critic_channels`` width;
    ``in_channels`` depends on the method's critic input."""
    net = CRITICS[cfg.critic](dims, in_channels, cfg)
    if cfg.spectral_norm:
        for module in list(net.modules()):
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                spectral_norm(module)
    return net


def receptive_fields(net: nn.Module) -> list[int]:
    """Receptive field (voxels along one axis) after each conv of ``net``, in forward order.

    ``r_in = (r_out - 1) * stride + kernel`` read from the output back; equivalently,
    forward: ``r += (k - 1) * jump; jump *= stride``. A 3-layer PatchGAN gives 70.
    """
    r, jump, out = 1, 1, []
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.kernel_size[0] > 1:
            r += (m.kernel_size[0] - 1) * jump
            jump *= m.stride[0]
            out.append(r)
    return out
