"""Training methods, one small object each, found by name in :data:`METHODS`.

A method owns its critic and says how the critic and the segmentor's adversarial term
are computed; the training loop never branches on the method's name. Per iteration
the loop runs ``critic_loss`` (segmentor output detached) for the critic's optimizer,
then ``adversarial_loss`` with the critic frozen, weighted into the segmentor's loss.

Shapes: image ``(N, C, *spatial)``, probabilities and targets ``(N, K, *spatial)``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ClassVar

import torch
from torch import nn

from segan.config import Config
from segan.losses import GAN_OBJECTIVES, gradient_penalty, multiscale_l1

METHODS: dict[str, type["Method"]] = {}


def register(name: str) -> Callable[[type["Method"]], type["Method"]]:
    def deco(cls: type["Method"]) -> type["Method"]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def masked_images(image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """One masked copy of the image per region: ``(N, C, *s) x (N, K, *s) -> (N, K*C, *s)``."""
    return (masks.unsqueeze(2) * image.unsqueeze(1)).flatten(1, 2)


class Method:
    """Supervised base: no critic, no adversarial term."""

    name: ClassVar[str] = "base"
    has_critic: ClassVar[bool] = False

    def __init__(self, cfg: Config, in_channels: int, n_regions: int) -> None:
        self.cfg = cfg
        self.in_channels = in_channels
        self.n_regions = n_regions
        # perf switches (segan bench compares them): one critic pass over [fake; real]
        self.fused_critic = cfg.train.fused_critic

    def build_critic(self) -> nn.Module | None:
        return None

    def critic_loss(self, critic: nn.Module, image: torch.Tensor, prob: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adversarial_loss(self, critic: nn.Module, image: torch.Tensor, prob: torch.Tensor,
                         target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def after_critic_step(self, critic: nn.Module) -> None:
        """Weight clamp, when configured (SegAN / WGAN style Lipschitz constraint)."""
        c = self.cfg.method.clamp
        if c is None or not self.has_critic:
            return
        params = [p for p in critic.parameters()]
        if self.cfg.train.foreach_clamp:
            torch._foreach_clamp_min_(params, -c)
            torch._foreach_clamp_max_(params, c)
        else:  # how the reference code does it
            for p in params:
                p.data.clamp_(-c, c)

    def _critic_pair(self, critic: nn.Module, fake: torch.Tensor, real: torch.Tensor):
        """Critic outputs for fake and real inputs, in one pass when ``fused_critic``."""
        if self.fused_critic:
            outs = critic(torch.cat([fake, real]))
            n = fake.shape[0]
            return [o[:n] for o in outs], [o[n:] for o in outs]
        return critic(fake), critic(real)


@register("supervised")
class Supervised(Method):
    """Plain U-Net with the segmentation loss only."""


@register("segan")
class SegAN(Method):
    """SegAN (Xue et al. 2018): the critic maximises the multi-scale L1 between the
    features of ``image * prediction`` and ``image * truth``; the segmentor minimises it."""

    has_critic = True

    def build_critic(self) -> nn.Module:
        from segan.nets import build_critic

        return build_critic(self.cfg.model, self.cfg.data.spatial_dims, self.in_channels * self.n_regions)

    def _l1(self, fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
        m = self.cfg.method
        return multiscale_l1([f.float() for f in fake], [r.float() for r in real], m.l1_weighting, m.feature_norm)

    def critic_loss(self, critic, image, prob, target):
        fake, real = self._critic_pair(critic, masked_images(image, prob), masked_images(image, target))
        return -self._l1(fake, real)

    def adversarial_loss(self, critic, image, prob, target):
        fake = critic(masked_images(image, prob))
        # The target branch does not depend on the segmentor: no graph needed.
        with torch.no_grad() if self.cfg.train.target_no_grad else nullcontext():
            real = critic(masked_images(image, target))
        return self._l1(fake, real)


class PatchGAN(Method):
    """Conditional GAN baseline (pix2pix / Luc et al.): the discriminator sees the image
    concatenated with a mask; (image, truth) is real, (image, prediction) is fake."""

    has_critic = True
    objective: ClassVar[str] = "vanilla"

    def __init__(self, cfg: Config, in_channels: int, n_regions: int) -> None:
        super().__init__(cfg, in_channels, n_regions)
        self.gan = GAN_OBJECTIVES[self.objective]()

    def build_critic(self) -> nn.Module:
        from segan.nets import build_critic

        return build_critic(self.cfg.model, self.cfg.data.spatial_dims, self.in_channels + self.n_regions)

    def critic_loss(self, critic, image, prob, target):
        fake_in, real_in = torch.cat([image, prob], 1), torch.cat([image, target], 1)
        fake, real = self._critic_pair(critic, fake_in, real_in)
        return self.gan.critic(real[-1].float(), fake[-1].float())

    def adversarial_loss(self, critic, image, prob, target):
        return self.gan.generator(critic(torch.cat([image, prob], 1))[-1].float())


@register("bce")
class BCEGAN(PatchGAN):
    objective = "vanilla"


@register("lsgan")
class LSGANMethod(PatchGAN):
    objective = "lsgan"


@register("wgangp")
class WGANGP(PatchGAN):
    """WGAN with gradient penalty (lambda = ``method.gp_lambda``, 10 by default)."""

    objective = "wgangp"

    def critic_loss(self, critic, image, prob, target):
        loss = super().critic_loss(critic, image, prob, target)
        real_in, fake_in = torch.cat([image, target], 1), torch.cat([image, prob], 1)
        return loss + gradient_penalty(lambda x: critic(x)[-1].float(), real_in, fake_in, self.cfg.method.gp_lambda)


@register("hinge")
class HingeGAN(PatchGAN):
    objective = "hinge"
