"""Critics: SegAN's multi-scale feature critic, the PatchGAN discriminator, an attention critic.

Every critic maps ``(N, C_in, *spatial)`` to a list of tensors. The SegAN critic returns
its features per scale ``[x, block_1(x), ..., block_L(x)]``; the discriminators return
their intermediate outputs with the logits map last (MONAI's ``PatchDiscriminator``
convention), so the GAN losses take ``outputs[-1]``.
"""

from __future__ import annotations

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


class AttentionCritic(nn.Module):
    """fastai ``gan_critic``-style discriminator (REFERENCE.md section 4); logits map last."""

    def __init__(self, dims: int, in_channels: int, base: int = 64, n_blocks: int = 3, p: float = 0.15) -> None:
        super().__init__()
        conv = _conv(dims)
        drop = nn.Dropout2d if dims == 2 else nn.Dropout3d
        act = nn.LeakyReLU(0.2, inplace=True)
        layers: list[nn.Module] = [nn.Sequential(conv(in_channels, base, 4, 2, 1), act, drop(p / 2))]
        ch = base
        for i in range(n_blocks):
            layers.append(nn.Sequential(
                conv(ch, ch, 3, 1, 1), act, drop(p),
                conv(ch, ch * 2, 4, 2, 1), act,
                *( [SelfAttention(dims, ch * 2)] if i == 0 else [] ),
            ))
            ch *= 2
        layers.append(nn.Sequential(conv(ch, ch, 3, 1, 1), act, conv(ch, 1, 4, 1, 0)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs


def build_critic(cfg: ModelConfig, dims: int, in_channels: int) -> nn.Module:
    """The critic named by ``cfg.critic``; ``in_channels`` depends on the method's input."""
    if cfg.critic == "segan":
        net: nn.Module = SegANCritic(dims, in_channels, cfg.critic_channels, cfg.critic_norm)
    elif cfg.critic == "patchgan":
        from monai.networks.nets import PatchDiscriminator

        norm = cfg.critic_norm.upper() if cfg.critic_norm != "none" else None
        net = PatchDiscriminator(spatial_dims=dims, channels=cfg.critic_channels[0], in_channels=in_channels,
                                 num_layers_d=len(cfg.critic_channels), norm=norm)
    else:
        net = AttentionCritic(dims, in_channels, base=cfg.critic_channels[0], n_blocks=len(cfg.critic_channels))
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
