"""AdvSemiSeg (Hung et al., BMVC 2018): a fully convolutional discriminator's per-voxel
confidence map, adversarial training on both streams, confidence-masked self-training.

The discriminator D sees a mask ``(N, K, *s)`` of sigmoid region probabilities (the image
too with ``method.critic_image``) and outputs per-voxel logits upsampled to the mask's size
(:func:`segan.nets.critic.confidence_logits`); ``sigmoid`` of them is the confidence map.

- D: BCE, truth maps of the labelled batch real (1), the segmentor's probabilities of the
  labelled and the unlabelled batch fake (0), ``(fake + real) / 2`` as the reference code.
- Segmentor: ``w_seg * seg + w_adv * BCE(D(S(x)), 1) + w_adv_unlabeled * BCE(D(S(x_u)), 1)
  + w_semi * L_semi``; ``L_semi`` is the BCE of the logits ``S(x_u)`` towards their own
  thresholded prediction ``S(x_u) > 0.5``, averaged over the voxels where D's confidence
  exceeds ``method.semi_threshold``, from ``method.semi_warmup_epochs`` on, and never before D
  trains (``method.adv_warmup_epochs`` / ``adv_start``): the voxel mask is D's confidence, which
  an untrained D cannot give, so the later of the two starts the term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segan.methods.base import Family, Method, Step, Term, register
from segan.nets.critic import confidence_logits, upsample_logits

ADVSEMI_FAMILY = Family(
    settings={
        "model.critic": "fcn",
        "model.critic_norm": "none",  # the paper's discriminator has no normalisation
        "method.clamp": None,
        # The code's semi-supervised recipe (README of hfslyc/AdvSemiSeg): lambda_adv_pred 0.01,
        # lambda_semi_adv 0.001 (unlabelled), lambda_semi 0.1, mask_T 0.2, semi_start 5000 of 20000 steps.
        "method.w_adv": 0.01,
        "method.w_adv_unlabeled": 0.001,
        "method.w_semi": 0.1,
        "method.semi_threshold": 0.2,
        "method.semi_warmup_epochs": 10.0,  # a quarter of the default 40 epochs, as 5000 of 20000 steps
        "method.adv_warmup_epochs": 0,  # D and the adversarial terms train from the first step
        "method.adv_ramp_epochs": 0,
    },
    allowed={"model.critic": (("fcn", "patchgan", "attention"),
                              "advsemi reads a one-channel logits map (upsampled to a per-voxel confidence "
                              "map), which the fcn, patchgan and attention critics return")},
)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over the voxels where ``keep`` is set; 0 (with a graph) when none is.

    ``logits``, ``target``: ``(M, K, *s)``; ``keep``: ``(M, 1, *s)`` bool, one voxel mask for all regions.
    """
    per_voxel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    weight = keep.to(per_voxel.dtype).expand_as(per_voxel)
    return (per_voxel * weight).sum() / weight.sum().clamp_min(1.0)


@register("advsemi")
class AdvSemi(Method):
    """Hung et al.'s adversarial semi-supervised segmentation; see the module docstring."""

    has_critic = True
    uses_unlabeled = True
    family = ADVSEMI_FAMILY
    # semi_fraction: the share of unlabelled voxels confident enough for L_semi (weight 0, logged only).
    loss_names = ("loss_seg", "loss_adv", "loss_adv_u", "loss_semi", "semi_fraction")

    @property
    def critic_in_channels(self) -> int:
        return self.n_regions + (self.in_channels if self.cfg.method.critic_image else 0)

    def critic_input(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([image, mask], 1) if self.cfg.method.critic_image else mask

    def confidence(self, critic, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-voxel confidence logits ``(N, 1, *s)`` of ``mask`` ``(N, K, *s)`` (float32)."""
        return confidence_logits(critic, self.critic_input(image, mask))

    def critic_loss(self, critic, step: Step) -> torch.Tensor:
        fake = self.critic_input(step.image, step.prob.detach())
        if step.has_unlabeled:
            fake = torch.cat([fake, self.critic_input(step.image_u, step.prob_u.detach())])
        fake_logits, real_logits = self.critic_pair(critic, fake, self.critic_input(step.image, step.target))
        size = step.target.shape[2:]
        fake_map, real_map = (upsample_logits(o[-1], size) for o in (fake_logits, real_logits))
        return 0.5 * (F.binary_cross_entropy_with_logits(fake_map, torch.zeros_like(fake_map))
                      + F.binary_cross_entropy_with_logits(real_map, torch.ones_like(real_map)))

    def segmentor_terms(self, critic, step: Step, w_adv: float) -> dict[str, Term]:
        terms = super().segmentor_terms(critic, step, w_adv)
        if critic is None:  # adversarial warm-up (none by default): segmentation only
            return terms
        m = self.cfg.method
        conf = self.confidence(critic, step.image, step.prob)
        terms["loss_adv"] = Term(F.binary_cross_entropy_with_logits(conf, torch.ones_like(conf)), w_adv)
        if not step.has_unlabeled:
            return terms
        ramp = w_adv / m.w_adv if m.w_adv > 0 else 0.0  # the adversarial ramp, when one is configured
        conf_u = self.confidence(critic, step.image_u, step.prob_u)  # (M, 1, *s)
        terms["loss_adv_u"] = Term(F.binary_cross_entropy_with_logits(conf_u, torch.ones_like(conf_u)),
                                   m.w_adv_unlabeled * ramp)
        if step.epoch >= m.semi_warmup_epochs and m.w_semi > 0:
            keep = torch.sigmoid(conf_u.detach()) > m.semi_threshold
            pseudo = (step.prob_u.detach() > 0.5).float()
            terms["loss_semi"] = Term(masked_bce(step.logits_u.float(), pseudo, keep), m.w_semi)
            terms["semi_fraction"] = Term(keep.float().mean(), 0.0)
        return terms

