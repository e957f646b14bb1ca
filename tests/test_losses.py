"""segan's losses against independently re-computed worked values: the BCE term of the
segmentation loss, the GAN objectives, the gradient penalty, the multi-scale L1, the PatchGAN
receptive field (test vectors from the pix2pix / SegAN maths, 4 decimals)."""

import math

import pytest
import torch
import torch.nn.functional as F

from segan.config import ModelConfig
from segan.losses import GAN_OBJECTIVES, SegmentationLoss, gradient_penalty, multiscale_l1
from segan.nets.critic import build_critic, receptive_fields

LOGITS_3X3 = torch.tensor([[1.9072, 1.1079, 1.4906], [-0.6584, -0.0512, 0.7608], [-0.0614, 0.6583, 0.1095]])
TARGET_3X3 = torch.tensor([[0.0, 1, 1], [1, 1, 1], [0, 0, 0]])
LOGITS_2X3 = torch.tensor([[0.7, -0.1, 0.2], [-1.587, -0.5907, 0.3]])
CLASSES = torch.tensor([1, 2])


def _bce_term(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The BCE part of segan's Dice+BCE loss: ``dicebce`` minus ``dice`` on the same input."""
    return (SegmentationLoss("dicebce")(logits, target) - SegmentationLoss("dice")(logits, target)).item()


def test_segmentation_loss_bce_term_is_bce_with_logits():
    # Worked example: BCE-with-logits (= BCE of the sigmoid) of these logits is 0.8000.
    logits, target = LOGITS_3X3.view(1, 1, 3, 3), TARGET_3X3.view(1, 1, 3, 3)
    assert _bce_term(logits, target) == pytest.approx(0.8000, abs=1e-4)
    # soft Dice on the sigmoid: 1 - (2 sum(p y) + 1e-5) / (sum p + sum y + 1e-5) = 0.4204
    assert SegmentationLoss("dice")(logits, target).item() == pytest.approx(0.4204, abs=1e-4)
    assert SegmentationLoss("dicebce")(logits, target).item() == pytest.approx(0.4204 + 0.8000, abs=1e-4)


def test_segmentation_loss_treats_each_region_as_its_own_binary_problem():
    # Regions are nested (whole ⊃ core ⊃ enhancing): one sigmoid per output channel, not a
    # softmax over channels. On one-hot targets of classes [1, 2] the per-channel
    # BCE-with-logits is 0.6378; a softmax cross-entropy would give 0.9833 (and BCE of the
    # softmax 0.5649), which is why MONAI's DiceCELoss is not used.
    logits = LOGITS_2X3.view(2, 3, 1)  # (N, K, spatial): two samples, three regions
    one_hot = F.one_hot(CLASSES, 3).float().view(2, 3, 1)
    bce = _bce_term(logits, one_hot)
    assert bce == pytest.approx(0.6378, abs=1e-4)
    assert abs(bce - 0.9833) > 0.3 and abs(bce - 0.5649) > 0.05


def test_vanilla_gan_generator_and_critic_worked_values():
    gan = GAN_OBJECTIVES["vanilla"]()
    # Generator: fakes labelled real (non-saturating -log D(G(z))); logits all 1.5 -> -log sigmoid(1.5).
    assert gan.generator(torch.full((10, 64), 1.5)).item() == pytest.approx(0.2014, abs=1e-4)
    assert gan.generator(torch.full((10, 64), 1.5)).item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))))
    # Critic: (loss on reals labelled 1 + loss on fakes labelled 0) / 2. The fake half of the
    # worked example (logits [1.2, -0.5] labelled 0) is 0.9687; reals at 1.5 cost 0.2014.
    fake = torch.tensor([1.2, -0.5])
    assert gan.critic(torch.full((2,), 1.5), fake).item() == pytest.approx((0.2014 + 0.9687) / 2, abs=1e-4)
    # A patch map: the one label is expanded to every patch.
    patch = torch.full((2, 1, 30, 30), 1.5)
    assert gan.generator(patch).item() == pytest.approx(0.2014, abs=1e-4)
    assert gan.critic(patch, -patch).item() == pytest.approx(0.2014, abs=1e-4)  # both halves right with margin 1.5


def test_lsgan_wgan_hinge_values():
    real, fake = torch.tensor([0.8, 1.2]), torch.tensor([0.1, -0.3])
    assert GAN_OBJECTIVES["lsgan"]().critic(real, fake).item() == pytest.approx(((0.04 + 0.04) / 2 + (0.01 + 0.09) / 2) / 2)
    assert GAN_OBJECTIVES["lsgan"]().generator(fake).item() == pytest.approx((0.81 + 1.69) / 2)
    assert GAN_OBJECTIVES["wgangp"]().critic(real, fake).item() == pytest.approx(-1.0 + -0.1)
    assert GAN_OBJECTIVES["hinge"]().critic(real, fake).item() == pytest.approx((0.2 + 0.0) / 2 + (1.1 + 0.7) / 2)


def test_gradient_penalty_of_linear_critic():
    # D(x) = sum(w * x) has gradient w everywhere: penalty = lam * (||w|| - 1)^2
    w = torch.tensor([3.0, 4.0])
    real, fake = torch.randn(5, 2), torch.randn(5, 2)
    gp = gradient_penalty(lambda x: (x * w).sum(1), real, fake, lam=10.0)
    assert gp.item() == pytest.approx(10.0 * (5.0 - 1.0) ** 2, rel=1e-5)


def test_patchgan_receptive_field_is_70():
    critic = build_critic(ModelConfig(critic="patchgan", critic_channels=[64, 128, 256]), 2, 4)
    assert receptive_fields(critic)[-1] == 70
    out = critic(torch.randn(1, 4, 256, 256))[-1]
    assert out.shape == (1, 1, 30, 30)


def test_multiscale_l1_paper_and_reference_weighting():
    fake = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 2, 2)]
    real = [torch.ones(1, 1, 4, 4), torch.full((1, 2, 2, 2), 3.0)]
    # paper: mean over scales of per-scale mean |diff| = (1 + 3) / 2
    assert multiscale_l1(fake, real, "paper").item() == pytest.approx(2.0)
    # reference: weights 1, 1 over the concatenation: (16*1*1 + 8*3*1) / 24
    assert multiscale_l1(fake, real, "reference").item() == pytest.approx((16 + 24) / 24)
    # feature normalisation makes each scale relative, in [0, 1]: |0-1|/(0+1), |0-3|/(0+3)
    assert multiscale_l1(fake, real, "paper", feature_norm=True).item() == pytest.approx(1.0, abs=1e-5)
    half = [torch.full((1, 1, 4, 4), 0.5), torch.full((1, 2, 2, 2), 1.5)]
    assert multiscale_l1(half, real, "paper", feature_norm=True).item() == pytest.approx(0.5 / 1.5, abs=1e-5)
    seven = [torch.zeros(1, 1, 2, 2)] * 7
    ones = [torch.ones(1, 1, 2, 2)] * 7
    assert multiscale_l1(seven, ones, "reference").item() == pytest.approx((1 + 1 + 2 + 2 + 2 + 2 + 4) / 7)


def test_segmentation_loss_batch_dice_ignores_empty_slices():
    target = torch.zeros(4, 1, 8, 8)
    target[0, 0, 2:6, 2:6] = 1
    logits = torch.where(target > 0, torch.tensor(20.0), torch.tensor(-4.0))  # right, with faint noise elsewhere
    batch = SegmentationLoss("dice", batch=True)(logits, target).item()
    per_slice = SegmentationLoss("dice", batch=False)(logits, target).item()
    # per-slice Dice: each empty slice costs ~1 whatever the (near-empty) prediction
    assert per_slice > 0.7
    assert batch < 0.15
    perfect = SegmentationLoss("dicebce", batch=True)((target * 2 - 1) * 20, target).item()
    assert perfect < 1e-3


def test_validation_logs_expected_calibration_error_per_region() -> None:
    """val_ece_<region> is the binned |mean truth - mean probability| over each case's voxels."""
    from types import SimpleNamespace

    import numpy as np
    from torch import nn

    from segan.validation import validate

    class Constant(nn.Module):  # logits whose sigmoid is 0.8 everywhere for region 0, 0.1 for region 1
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logit = torch.logit(torch.tensor([0.8, 0.1]))
            return logit.view(1, 2, 1, 1).expand(x.shape[0], 2, *x.shape[2:]).clone()

    target = np.zeros((2, 8, 8, 4), dtype=np.float32)
    target[0, :4] = 1.0  # half of region 0 is foreground: |0.5 - 0.8| = 0.3; region 1 empty: |0 - 0.1|
    case = SimpleNamespace(name="c", image=np.zeros((1, 8, 8, 4), np.float32), target=target)
    metrics = validate(Constant(), [case], ["a", "b"], 2, [8, 8], torch.device("cpu")).metrics
    assert metrics["val_ece_a"] == pytest.approx(0.3, abs=1e-5)
    assert metrics["val_ece_b"] == pytest.approx(0.1, abs=1e-5)
