"""Mean teacher (Tarvainen & Valpola 2017): a non-adversarial semi-supervised baseline.

The teacher is an exponential moving average of the student (the segmentor); on the
unlabelled batch the student's sigmoid probabilities are pulled towards the teacher's on a
noisy copy of the input (MSE), weighted by a sigmoid ramp-up (Laine & Aila 2017) that begins
at ``method.semi_warmup_epochs`` (0: from the first step, as the paper). Before it the loop
neither loads nor segments the unlabelled batch, so those epochs cost what supervised ones do;
the teacher follows the student throughout.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import torch
from torch import nn

from segan.methods.base import Family, Method, Step, Term, register


def sigmoid_rampup(epoch: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = epoch / length`` clipped to [0, 1]; 1 when ``length <= 0``."""
    if length <= 0:
        return 1.0
    t = min(max(epoch / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


@register("meanteacher")
class MeanTeacher(Method):
    """Supervised loss on the labelled batch + ramped consistency MSE with an EMA teacher."""

    uses_unlabeled = True
    loss_names = ("loss_seg", "loss_adv", "loss_cons")
    family = Family(
        settings={"model.critic": "none", "method.ema_decay": 0.99, "method.w_consistency": 1.0,
                  "method.consistency_rampup_epochs": 5.0, "method.consistency_noise": 0.1,
                  "method.semi_warmup_epochs": 0.0},
        allowed={"model.critic": (("none",), "the mean teacher trains no critic")},
    )

    def __init__(self, cfg, in_channels: int, n_regions: int) -> None:
        super().__init__(cfg, in_channels, n_regions)
        self.teacher: nn.Module | None = None

    def prepare(self, segmentor: nn.Module, device: torch.device) -> None:
        self.teacher = copy.deepcopy(getattr(segmentor, "module", segmentor)).to(device)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def needs_unlabeled(self, w_adv: float, epoch: float) -> bool:
        """From ``method.semi_warmup_epochs`` on (the consistency term's start)."""
        return epoch >= self.cfg.method.semi_warmup_epochs

    def segmentor_terms(self, critic, step: Step, w_adv: float) -> dict[str, Term]:
        terms = super().segmentor_terms(critic, step, w_adv)
        if step.has_unlabeled and self.teacher is not None:
            m = self.cfg.method
            with torch.no_grad():
                noisy = step.image_u + m.consistency_noise * torch.randn_like(step.image_u)
                target = torch.sigmoid(self.teacher(noisy).float())  # (M, K, *s)
            cons = torch.mean((step.prob_u - target) ** 2)
            ramp = sigmoid_rampup(step.epoch - m.semi_warmup_epochs, m.consistency_rampup_epochs)
            terms["loss_cons"] = Term(cons, m.w_consistency * ramp)
        return terms

    @torch.no_grad()
    def after_segmentor_step(self, segmentor: nn.Module, step: Step) -> None:
        """teacher <- d * teacher + (1 - d) * student, d ramped as ``min(1 - 1/(k+1), decay)``."""
        if self.teacher is None:
            return
        d = min(1.0 - 1.0 / (step.index + 2), self.cfg.method.ema_decay)
        student = getattr(segmentor, "module", segmentor)
        for t, s in zip(self.teacher.parameters(), student.parameters()):
            t.lerp_(s.detach(), 1.0 - d)
        for t, s in zip(self.teacher.buffers(), student.buffers()):
            t.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.teacher is not None and "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])
