"""Conditional GAN baselines (pix2pix / Luc et al. 2016) with a PatchGAN discriminator.

The discriminator sees the image concatenated with a mask; (image, truth) is real,
(image, prediction) is fake. The objectives (BCE-with-logits, LSGAN, hinge, WGAN-GP)
read the discriminator's logits map, its last output.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from segan.losses import GAN_OBJECTIVES, gradient_penalty
from segan.methods.base import Family, Method, Step, Term, register

_LOGITS_CRITICS = (("patchgan", "attention"), "a GAN objective reads a logits map, which the patchgan and "
                                              "attention critics return (the segan critic returns features)")

PATCHGAN_FAMILY = Family(
    settings={"model.critic": "patchgan", "model.critic_norm": "batch", "method.clamp": None,
              "method.w_adv": 0.05, "method.adv_warmup_epochs": 1, "method.adv_ramp_epochs": 2},
    allowed={"model.critic": _LOGITS_CRITICS},
)

WGANGP_FAMILY = Family(
    settings={**PATCHGAN_FAMILY.settings, "model.critic_norm": "instance", "method.w_adv": 0.01,
              "method.gp_lambda": 10.0},
    allowed={
        "model.critic": _LOGITS_CRITICS,
        "model.critic_norm": (("instance", "none"), "batch norm mixes the samples of a batch, which breaks the "
                                                    "per-sample gradient penalty (Gulrajani et al. 2017)"),
        "method.clamp": ((None,), "the gradient penalty replaces weight clipping (Gulrajani et al. 2017)"),
    },
)


class PatchGAN(Method):
    """Discriminator on ``image || mask``; ``objective`` names a :data:`segan.losses.GAN_OBJECTIVES` entry."""

    has_critic = True
    family = PATCHGAN_FAMILY
    objective: ClassVar[str] = "vanilla"
    # With an unlabelled stream, (x_u, S(x_u)) are fakes too; without one, nothing changes.
    uses_unlabeled = True

    def __init__(self, cfg, in_channels: int, n_regions: int) -> None:
        super().__init__(cfg, in_channels, n_regions)
        self.gan = GAN_OBJECTIVES[self.objective]()

    @property
    def critic_in_channels(self) -> int:
        return self.in_channels + self.n_regions

    def critic_input(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([image, mask], 1)

    def _fakes(self, step: Step, detach: bool) -> torch.Tensor:
        """Critic input of the segmentations: ``(N [+ M], C + K, *s)``, the unlabelled batch appended when drawn."""
        fake = self.critic_input(step.image, step.prob.detach() if detach else step.prob)
        if step.has_unlabeled:
            prob_u = step.prob_u.detach() if detach else step.prob_u
            fake = torch.cat([fake, self.critic_input(step.image_u, prob_u)])
        return fake

    def critic_loss(self, critic, step: Step):
        fake, real = self.critic_pair(critic, self._fakes(step, detach=True),
                                      self.critic_input(step.image, step.target))
        return self.gan.critic(real[-1].float(), fake[-1].float())

    def segmentor_terms(self, critic, step: Step, w_adv: float) -> dict[str, Term]:
        terms = super().segmentor_terms(critic, step, w_adv)
        if critic is not None:
            fake = critic(self._fakes(step, detach=False))[-1].float()
            terms["loss_adv"] = Term(self.gan.generator(fake), w_adv)
        return terms


@register("bce")
class BCEGAN(PatchGAN):
    """Vanilla GAN: BCE-with-logits, non-saturating generator loss."""

    objective = "vanilla"


@register("lsgan")
class LSGANMethod(PatchGAN):
    """Least-squares GAN: MSE to 1 (real) and 0 (fake)."""

    objective = "lsgan"


@register("hinge")
class HingeGAN(PatchGAN):
    """Hinge loss (SAGAN / BigGAN)."""

    objective = "hinge"


@register("wgangp")
class WGANGP(PatchGAN):
    """WGAN with gradient penalty (lambda = ``method.gp_lambda``)."""

    objective = "wgangp"
    family = WGANGP_FAMILY

    def critic_loss(self, critic, step: Step):
        loss = super().critic_loss(critic, step)
        real_in = self.critic_input(step.image, step.target)
        fake_in = self.critic_input(step.image, step.prob.detach())
        return loss + gradient_penalty(lambda x: critic(x)[-1].float(), real_in, fake_in, self.cfg.method.gp_lambda)
