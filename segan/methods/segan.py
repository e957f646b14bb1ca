"""SegAN (Xue et al., Neuroinformatics 2018): a multi-scale L1 critic on masked images."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from segan.losses import multiscale_l1
from segan.methods.base import Family, Method, Step, Term, register


def masked_images(image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """One masked copy of the image per region: ``(N, C, *s) x (N, K, *s) -> (N, K*C, *s)``."""
    return (masks.unsqueeze(2) * image.unsqueeze(1)).flatten(1, 2)


SEGAN_FAMILY = Family(
    settings={
        "model.critic": "segan",
        # Instance norm: per-sample, so the fused [fake; real] critic pass is exact, and the
        # same choice works in 2D and 3D (batch norm measured the same on the phantoms).
        "model.critic_norm": "instance",
        "method.clamp": 0.05,  # the reference code's clamp
        "method.w_adv": 0.1,  # feature-normalised L1 weighted against Dice+BCE (1.0 over-segments)
        "method.l1_weighting": "paper",
        "method.feature_norm": True,
        "method.adv_warmup_epochs": 2,
        "method.adv_ramp_epochs": 3,
    },
    allowed={"model.critic": (("segan",), "the SegAN objective compares the critic's features at every "
                                          "scale, which only the segan critic returns")},
)


@register("segan")
class SegAN(Method):
    """The critic maximises the multi-scale L1 between the features of ``image * prediction``
    and ``image * truth``; the segmentor minimises it."""

    has_critic = True
    family = SEGAN_FAMILY

    @property
    def critic_in_channels(self) -> int:
        return self.in_channels * self.n_regions

    def critic_input(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_images(image, mask)

    def _l1(self, fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
        m = self.cfg.method
        return multiscale_l1([f.float() for f in fake], [r.float() for r in real], m.l1_weighting, m.feature_norm)

    def critic_loss(self, critic, step: Step):
        fake, real = self.critic_pair(critic, self.critic_input(step.image, step.prob.detach()),
                                      self.critic_input(step.image, step.target))
        return -self._l1(fake, real)

    def segmentor_terms(self, critic, step: Step, w_adv: float) -> dict[str, Term]:
        terms = super().segmentor_terms(critic, step, w_adv)
        if critic is not None:
            fake = critic(self.critic_input(step.image, step.prob))
            # The target branch does not depend on the segmentor: no graph needed (same values).
            with torch.no_grad() if self.cfg.train.target_no_grad else nullcontext():
                real = critic(self.critic_input(step.image, step.target))
            terms["loss_adv"] = Term(self._l1(fake, real), w_adv)
        return terms
