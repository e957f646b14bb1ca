"""SegAN (Xue et al., Neuroinformatics 2018): a multi-scale L1 critic on masked images.

With an unlabelled stream and ``method.w_semi_fm > 0``, the segmentor also matches the
critic's per-scale batch statistics of ``x_u * S(x_u)`` to those of the labelled ``x * y``
(s4GAN's feature matching, Mittal et al. 2019, on SegAN's critic); without one, nothing changes.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from segan.losses import feature_matching, multiscale_l1
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
        "method.w_semi_fm": 0.1,  # s4GAN's lambda_fm; used only when the data has an unlabelled stream
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
    def uses_unlabeled(self) -> bool:  # type: ignore[override]
        """The unlabelled batch is drawn only when the feature matching is on."""
        return self.cfg.method.w_semi_fm > 0

    @property
    def loss_names(self) -> tuple[str, ...]:  # type: ignore[override]
        """``loss_semi_fm`` is logged only when the config gives the data an unlabelled stream."""
        return ("loss_seg", "loss_adv", "loss_semi_fm") if self.draws_unlabeled else ("loss_seg", "loss_adv")

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
        m = self.cfg.method
        if critic is not None:
            fake = critic(self.critic_input(step.image, step.prob))
            # The target branch does not depend on the segmentor: no graph needed (same values).
            with torch.no_grad() if self.cfg.train.target_no_grad else nullcontext():
                real = critic(self.critic_input(step.image, step.target))
            terms["loss_adv"] = Term(self._l1(fake, real), w_adv)
            if step.has_unlabeled and m.w_semi_fm > 0:
                terms["loss_semi_fm"] = self._feature_matching(critic, step, real, w_adv)
        return terms

    def _feature_matching(self, critic, step: Step, real: list[torch.Tensor], w_adv: float) -> Term:
        """Batch statistics of the critic's features of ``x_u * S(x_u)`` against the labelled
        ``x * y`` (only the labelled items drawn like the unlabelled ones where the batch says
        which, ``step.uniform``, else all); weighted ``w_semi_fm`` times the adversarial ramp."""
        m = self.cfg.method
        fake_u = critic(self.critic_input(step.image_u, step.prob_u))
        value = feature_matching([f.float() for f in fake_u], [r.float().detach() for r in real], m.feature_norm,
                                 real_weight=step.uniform)
        return Term(value, m.w_semi_fm * (w_adv / m.w_adv if m.w_adv > 0 else 0.0))
