"""Loss functions against independently re-computed worked values (BCE-with-logits, cross-entropy,
the GAN objectives, the PatchGAN receptive field)."""

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


def test_bce_with_logits_equals_bce_of_sigmoid():
    assert F.binary_cross_entropy_with_logits(LOGITS_3X3, TARGET_3X3).item() == pytest.approx(0.8000, abs=1e-4)
    assert F.binary_cross_entropy(torch.sigmoid(LOGITS_3X3), TARGET_3X3).item() == pytest.approx(0.8000, abs=1e-4)


def test_bce_with_logits_pos_weight():
    loss = F.binary_cross_entropy_with_logits(torch.full((10, 64), 1.5), torch.ones(10, 64), pos_weight=torch.ones(64))
    assert loss.item() == pytest.approx(0.2014, abs=1e-4)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))), abs=1e-6)


def test_cross_entropy_vs_bce_on_one_hot():
    assert F.cross_entropy(LOGITS_2X3, CLASSES).item() == pytest.approx(0.9833, abs=1e-4)
    one_hot = F.one_hot(CLASSES, 3).float()
    assert F.binary_cross_entropy(torch.softmax(LOGITS_2X3, 1), one_hot).item() == pytest.approx(0.5649, abs=1e-4)
    assert F.binary_cross_entropy_with_logits(LOGITS_2X3, one_hot).item() == pytest.approx(0.6378, abs=1e-4)


def test_vanilla_generator_and_critic_targets():
    gan = GAN_OBJECTIVES["vanilla"]()
    fake = torch.tensor([1.2, -0.5])
    # discriminator's fake half: both fake samples labelled 0
    assert F.binary_cross_entropy_with_logits(fake, torch.zeros(2)).item() == pytest.approx(0.9687, abs=1e-4)
    real = torch.tensor([2.0, 0.3])
    expected = (F.binary_cross_entropy_with_logits(real, torch.ones(2)) + 0.9687) / 2
    assert gan.critic(real, fake).item() == pytest.approx(expected.item(), abs=1e-4)
    # targets expand to a patch map
    patch = torch.randn(2, 1, 30, 30)
    assert gan.generator(patch).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(patch, torch.ones_like(patch)).item(), abs=1e-6)


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
