"""Losses: SegAN's multi-scale L1 and feature matching, GAN objectives, Dice-based segmentation losses.

All losses take logits where a probability would be unsafe under autocast
(BCE-with-logits, never sigmoid + BCELoss). GAN targets are expanded to the
prediction's shape, so one real/fake label serves a single logit and a patch map alike.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Reference-code weights for the input and six block outputs (github YuanXue1993/SegAN).
REFERENCE_WEIGHTS = (1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 4.0)


def multiscale_l1(fake: list[torch.Tensor], real: list[torch.Tensor], weighting: str = "paper",
                  feature_norm: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """SegAN's ``l_mae`` between two feature stacks (lists of ``(N, C_i, *spatial_i)``).

    ``paper``: mean over scales of each scale's mean absolute difference.
    ``reference``: one mean absolute difference over the concatenation of all scales,
    scale i weighted by ``REFERENCE_WEIGHTS[i]`` (as the reference code does).
    ``feature_norm`` divides each scale's L1 by ``mean|f| + mean|r|`` (detached): a
    relative L1 in [0, 1] by the triangle inequality, so neither one scale nor the
    critic's growing activations can swamp the segmentation loss (the literal SegAN
    L1 grows to ~10x the Dice term within ~100 steps and masks come out too large).
    """
    if weighting == "paper":
        terms = []
        for f, r in zip(fake, real):
            term = (f - r).abs().mean()
            if feature_norm:
                term = term / _scale(f, r, eps)
            terms.append(term)
        return torch.stack(terms).mean()
    total = fake[0].new_zeros(())
    count = 0
    for i, (f, r) in enumerate(zip(fake, real)):
        w = REFERENCE_WEIGHTS[min(i, len(REFERENCE_WEIGHTS) - 1)]
        diff = (f - r).abs().sum()
        if feature_norm:
            diff = diff / _scale(f, r, eps)
        total = total + w * diff
        count += f.numel()
    return total / count


def feature_matching(fake: list[torch.Tensor], real: list[torch.Tensor], feature_norm: bool = False,
                     real_weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Multi-scale feature matching of batch statistics (s4GAN, Mittal et al. 2019, per scale).

    ``fake``, ``real``: feature stacks (lists of ``(M, C_i, *s_i)`` and ``(N, C_i, *s_i)``;
    the batch sizes may differ). Per scale, each channel's mean over the batch and the
    positions, then the mean absolute difference of those ``C_i`` means; the mean over
    scales. ``feature_norm`` divides each scale by ``mean|mu_f| + mean|mu_r|`` (detached),
    as :func:`multiscale_l1` does, which bounds it in [0, 1]. ``real_weight`` ``(N,)``: the
    real items' weights in their mean (e.g. 0/1 to keep some; all zero counts every item).
    """
    if real_weight is not None:
        w = real_weight.float()
        w = torch.where(w.sum() > 0, w, torch.ones_like(w))  # no item kept: all of them (no host sync)
        w = w / w.sum()
    terms = []
    for f, r in zip(fake, real):
        dims = [0, *range(2, f.dim())]
        mu_f = f.mean(dim=dims)  # (C_i,)
        if real_weight is None:
            mu_r = r.mean(dim=dims)
        else:
            mu_r = (r.mean(dim=dims[1:]) * w[:, None]).sum(0)
        term = (mu_f - mu_r).abs().mean()
        if feature_norm:
            term = term / _scale(mu_f, mu_r, eps)
        terms.append(term)
    return torch.stack(terms).mean()


def _scale(f: torch.Tensor, r: torch.Tensor, eps: float) -> torch.Tensor:
    return (f.detach().abs().mean() + r.detach().abs().mean() + eps)


def _expand(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, value)


class GANObjective:
    """A GAN objective: ``critic(real_logits, fake_logits)`` and ``generator(fake_logits)``."""

    name = "base"

    def critic(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generator(self, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class VanillaGAN(GANObjective):
    """BCE-with-logits; generator uses the non-saturating ``-log D(G(z))`` form."""

    name = "vanilla"

    def critic(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        loss_real = F.binary_cross_entropy_with_logits(real, _expand(1.0, real))
        loss_fake = F.binary_cross_entropy_with_logits(fake, _expand(0.0, fake))
        return (loss_real + loss_fake) / 2

    def generator(self, fake: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(fake, _expand(1.0, fake))


class LSGAN(GANObjective):
    """Least squares: MSE to 1 (real) and 0 (fake)."""

    name = "lsgan"

    def critic(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return (F.mse_loss(real, _expand(1.0, real)) + F.mse_loss(fake, _expand(0.0, fake))) / 2

    def generator(self, fake: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(fake, _expand(1.0, fake))


class WGAN(GANObjective):
    """Wasserstein: critic minimises ``-mean(real) + mean(fake)`` (add the gradient penalty)."""

    name = "wgangp"

    def critic(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return -real.mean() + fake.mean()

    def generator(self, fake: torch.Tensor) -> torch.Tensor:
        return -fake.mean()


class Hinge(GANObjective):
    name = "hinge"

    def critic(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()

    def generator(self, fake: torch.Tensor) -> torch.Tensor:
        return -fake.mean()


GAN_OBJECTIVES: dict[str, type[GANObjective]] = {c.name: c for c in (VanillaGAN, LSGAN, WGAN, Hinge)}


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     lam: float = 10.0) -> torch.Tensor:
    """WGAN-GP: ``lam * E[(||grad_x D(x_hat)||_2 - 1)^2]`` on random interpolates of real and fake."""
    eps = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device, dtype=real.dtype)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    out = critic(x_hat)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return lam * ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


class SegmentationLoss(nn.Module):
    """Soft Dice on sigmoid outputs (MONAI), optionally plus BCE-with-logits.

    ``batch=True`` computes Dice over the whole batch: per-slice Dice on an empty slice
    costs ~1 whatever the prediction, which drowns the signal in 2D training. MONAI's
    ``DiceCELoss`` is not used because for several output channels it applies softmax
    cross-entropy, which is wrong for overlapping (nested) sigmoid regions.
    Input logits and targets ``(N, K, *spatial)``.
    """

    def __init__(self, kind: str = "dicebce", batch: bool = True) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, batch=batch, smooth_nr=1e-5, smooth_dr=1e-5)
        self.use_bce = kind == "dicebce"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        loss = self.dice(logits, target)
        if self.use_bce:
            loss = loss + F.binary_cross_entropy_with_logits(logits, target)
        return loss
