"""How much, and from when, the adversarial term counts: ``method.adv_balance`` and ``method.adv_start``.

- :func:`adaptive_weight`: VQGAN's adaptive weight (Esser et al. 2021, eq. 7),
  ``||grad_L L_seg|| / (||grad_L L_adv|| + 1e-4)`` at the segmentor's last layer ``L``,
  clamped to ``[0, max]`` and detached, so the adversarial gradient reaching the logits is
  ``w_adv`` times the size of the segmentation gradient whatever the data, critic or loss scale.
- :class:`AdversarialSchedule`: ``w_adv(t)``: zero during the warm-up, then a linear ramp over
  ``adv_ramp_epochs``; the warm-up ends after ``adv_warmup_epochs`` (``adv_start: epoch``) or
  once the epoch's segmentation loss has settled (``adv_start: settled``).

Both are used by :class:`segan.methods.Method` (:meth:`~segan.methods.Method.balance`,
``Method.schedule``): the training loop calls them without knowing which is configured.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from segan.config import MethodConfig

EPS = 1e-4  # VQGAN's


def adaptive_weight(seg: torch.Tensor, adv: torch.Tensor, last: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """``clamp(||d seg / d last|| / (||d adv / d last|| + 1e-4), 0, max_weight)``, detached.

    ``seg``, ``adv``: scalar losses whose graphs reach ``last`` (a weight tensor of the
    segmentor, e.g. its output convolution's); the graphs are kept for the backward that follows.
    An ``adv`` that does not reach ``last`` counts as a zero gradient.
    """
    (g_seg,) = torch.autograd.grad(seg, last, retain_graph=True, allow_unused=True)
    (g_adv,) = torch.autograd.grad(adv, last, retain_graph=True, allow_unused=True)
    n_seg = g_seg.float().norm() if g_seg is not None else seg.new_zeros(())
    n_adv = g_adv.float().norm() if g_adv is not None else seg.new_zeros(())
    return (n_seg / (n_adv + EPS)).clamp(0.0, max_weight).detach()


def ramped(w_adv: float, since: float, ramp_epochs: int) -> float:
    """``w_adv`` ramped linearly over ``ramp_epochs`` from ``since`` epochs after the start (0 before)."""
    if since < 0:
        return 0.0
    if ramp_epochs > 0:
        return w_adv * min(1.0, since / ramp_epochs)
    return w_adv


class AdversarialSchedule:
    """``w_adv`` at a schedule position (epochs, fractional); the start as configured.

    ``adv_start: epoch``: a pure function of the epoch (``start = adv_warmup_epochs``), as
    before these options. ``adv_start: settled``: :meth:`end_epoch` receives each epoch's
    mean ``loss_seg``; the start is the first epoch end, no earlier than
    ``adv_warmup_epochs``, after ``adv_settle_epochs`` epochs in a row that each improved the
    loss by less than ``adv_settle_tol`` (relative to the epoch before), with the loss at most
    ``adv_settle_below`` x the first epoch's; never, if it never settles (then the run is
    supervised). Why the last condition: the relative test alone takes the slow plateau of a
    model that has not learned the structure yet (Dice + BCE still ~1.3-1.7 from ~1.8, low
    contrast or tiny lesions in a short budget) for convergence, and the critic then costs a
    third of the remaining steps for nothing. The state (losses seen, start) is saved with the run.
    """

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg
        self.losses: list[float] = []
        self.start: float | None = float(cfg.adv_warmup_epochs) if cfg.adv_start == "epoch" else None

    def weight(self, epoch: float) -> float:
        if self.start is None:
            return 0.0
        return ramped(self.cfg.w_adv, epoch - self.start, self.cfg.adv_ramp_epochs)

    def trained_by(self, epoch: float) -> bool:
        """Whether ``w_adv`` was above 0 at some position before ``epoch`` (the critic trained)."""
        return self.start is not None and self.start < epoch and self.cfg.w_adv > 0

    def end_epoch(self, epoch: float, loss_seg: float | None) -> None:
        """After an epoch: ``epoch`` (schedule position reached), its mean segmentation loss."""
        if self.start is not None or loss_seg is None:
            return
        self.losses.append(float(loss_seg))
        k = self.cfg.adv_settle_epochs
        if len(self.losses) < k + 1 or epoch < self.cfg.adv_warmup_epochs:
            return
        recent = self.losses[-(k + 1):]
        gains = [(a - b) / max(abs(a), 1e-8) for a, b in zip(recent, recent[1:])]
        learned = self.losses[-1] <= self.cfg.adv_settle_below * self.losses[0]
        if learned and all(g < self.cfg.adv_settle_tol for g in gains):
            self.start = float(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Empty for ``adv_start: epoch`` (nothing to remember)."""
        if self.cfg.adv_start == "epoch":
            return {}
        return {"losses": list(self.losses), "start": self.start}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "losses" in state:
            self.losses = [float(v) for v in state["losses"]]
            self.start = None if state.get("start") is None else float(state["start"])
