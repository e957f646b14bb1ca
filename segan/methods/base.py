"""The method contract, the registry, and a method's *family*: the settings it owns.

A method is one small object per training objective, found by name in :data:`METHODS`.
It declares a :class:`Family` (the critic it needs, the critic norms and clamp it works
with, its adversarial weight and warm-up), builds its critic, forms the critic's input,
and computes the critic's loss and the segmentor's adversarial term. The training loop
never branches on the method's name.

Shapes: image ``(N, C, *spatial)``, probabilities and targets ``(N, K, *spatial)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.utils import parametrize

from segan.config import Config


@dataclass(frozen=True)
class Family:
    """What a method owns.

    ``settings``: dotted config key -> value, applied after the dataclass defaults and
    before the YAML file (``segan.config.resolve_config``), so a config that does not set
    a key gets the method's value. ``allowed``: dotted key -> (values the method works
    with, why); an explicit value outside them exits 2 naming both keys.
    """

    settings: Mapping[str, Any] = field(default_factory=dict)
    allowed: Mapping[str, tuple[tuple[Any, ...], str]] = field(default_factory=dict)

    def conflicts(self, values: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
        """``(key, value, why)`` for every value in ``values`` (flat dotted keys) the method cannot use."""
        return [(key, values[key], why) for key, (ok, why) in self.allowed.items()
                if key in values and values[key] not in ok]


METHODS: dict[str, type["Method"]] = {}


def register(name: str) -> Callable[[type["Method"]], type["Method"]]:
    def deco(cls: type["Method"]) -> type["Method"]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def family_keys() -> set[str]:
    """Every config key some method owns (what a sweep drops from a file written for another method)."""
    return {key for cls in METHODS.values() for key in cls.family.settings}


def fused_pass_is_exact(critic: nn.Module) -> bool:
    """True when one forward over ``[a; b]`` equals two forwards over ``a`` and ``b``.

    Not so with batch norm in training mode (statistics over the mixed batch), dropout
    (other random masks) or spectral norm (one power iteration instead of two).
    """
    for m in critic.modules():
        if m.training and isinstance(m, _BatchNorm):
            return False
        if m.training and isinstance(m, _DropoutNd) and m.p > 0:
            return False
        if parametrize.is_parametrized(m):
            return False
    return True


class Method:
    """Supervised base: no critic, no adversarial term."""

    name: ClassVar[str] = "base"
    has_critic: ClassVar[bool] = False
    family: ClassVar[Family] = Family()

    def __init__(self, cfg: Config, in_channels: int, n_regions: int) -> None:
        self.cfg = cfg
        self.in_channels = in_channels
        self.n_regions = n_regions

    # ---------------------------------------------------------------- critic
    @property
    def critic_in_channels(self) -> int:
        """Channels of :meth:`critic_input`."""
        raise NotImplementedError

    def critic_input(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What the critic sees for an image ``(N, C, *s)`` and a mask ``(N, K, *s)``."""
        raise NotImplementedError

    def build_critic(self) -> nn.Module | None:
        if not self.has_critic:
            return None
        from segan.nets import build_critic

        return build_critic(self.cfg.model, self.cfg.data.spatial_dims, self.critic_in_channels)

    def critic_loss(self, critic: nn.Module, image: torch.Tensor, prob: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
        """The critic's loss to minimise, ``prob`` detached by the caller."""
        raise NotImplementedError

    def adversarial_loss(self, critic: nn.Module, image: torch.Tensor, prob: torch.Tensor,
                         target: torch.Tensor) -> torch.Tensor:
        """The segmentor's adversarial term (critic frozen by the caller)."""
        raise NotImplementedError

    @torch.no_grad()
    def after_critic_step(self, critic: nn.Module) -> None:
        """Weight clamp, when configured (SegAN / WGAN style Lipschitz constraint)."""
        c = self.cfg.method.clamp
        if c is None or not self.has_critic:
            return
        params = list(critic.parameters())
        if self.cfg.train.foreach_clamp:  # one kernel per dtype group; same values as the loop
            torch._foreach_clamp_min_(params, -c)
            torch._foreach_clamp_max_(params, c)
        else:  # how the reference code does it
            for p in params:
                p.data.clamp_(-c, c)

    def critic_pair(self, critic: nn.Module, fake: torch.Tensor,
                    real: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Critic outputs for the fake and the real input.

        ``train.fused_critic`` runs one pass over ``[fake; real]``, but only where that is
        exactly two passes (:func:`fused_pass_is_exact`): a speed switch never changes the maths.
        """
        if self.cfg.train.fused_critic and fused_pass_is_exact(critic):
            outs = critic(torch.cat([fake, real]))
            n = fake.shape[0]
            return [o[:n] for o in outs], [o[n:] for o in outs]
        return critic(fake), critic(real)
