"""What the README advertises about the networks: ``segan describe``, the attention critic,
spectral normalisation, and the BasicUNet / DynUNet segmentors, each trained a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from conftest import run_cli
from segan.config import load_config
from segan.config_layers import resolve_config
from segan.errors import UserError
from segan.nets.critic import AttentionCritic, PatchGANDiscriminator, SegANCritic, SelfAttention, build_critic
from segan.nets.describe import describe_models
from segan.nets.segmentor import build_segmentor
from segan.runtime import DistContext
from segan.training import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["train.epochs=1", "train.steps_per_epoch=3", "train.batch_size=2", "train.val_max_cases=1",
        "data.patch_size=[32, 32]", "model.channels=[4, 8]", "model.strides=[2]", "model.critic_channels=[4, 8]",
        "tracking.enabled=false", "train.progress=false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nets_cache")


def _trainer(phantoms, cache, tmp_path, *sets) -> Trainer:
    cfg = load_config(CONFIGS / "smoke.yaml", [f"data.root={phantoms}", f"preprocess.cache_dir={cache}", *TINY,
                                               *sets])
    return Trainer(cfg, tmp_path / "run", DistContext())


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _fit_and_check(trainer: Trainer) -> dict:
    """Train the trainer's few steps; every loss finite, the segmentor and the critic both learned."""
    seg, critic = _params(trainer.segmentor), _params(trainer.critic) if trainer.critic is not None else {}
    assert trainer.fit(None) == "epochs"
    record = trainer.history[-1]
    for name in ("loss_seg", "loss_adv", "loss_critic", "val_dice_mean"):
        assert torch.isfinite(torch.tensor(record[name])), (name, record)
    assert any(not torch.equal(p, _params(trainer.segmentor)[n]) for n, p in seg.items())
    if critic:
        assert record["loss_adv"] != 0.0
        after = _params(trainer.critic)
        assert any(not torch.equal(p, after[n]) for n, p in critic.items())
    return record


# ------------------------------------------------------------------ segan describe
def test_describe_cli_prints_resolved_config_sources_and_layers(tmp_path):
    proc = run_cli("describe", "-c", CONFIGS / "segan_2d.yaml", "--set", "train.epochs=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    config, _, layers = text.partition("\nsegmentor: ")
    entries = {line.split(":")[0].strip(): line for line in config.splitlines()[1:] if ":" in line}
    assert entries["critic"].split("#")[1].strip() == "method" and "segan" in entries["critic"]
    assert entries["clamp"].split("#")[1].strip() == "method"
    assert entries["patch_size"].split("#")[1].strip() == "file" and "[96, 96]" in entries["patch_size"]
    assert entries["epochs"].split("#")[1].strip() == "--set" and ": 3" in entries["epochs"]
    assert "#" not in entries["lr"]  # a default is not marked
    # No data set in the cwd: 4 channels, 3 regions; the SegAN critic sees 4 x 3 masked channels.
    assert layers.startswith("unet 2D, 4 channels -> 3 regions, input [1, 4, 96, 96]")
    assert "critic: segan for method segan, input [1, 12, 96, 96]" in layers
    scales = [line.strip() for line in layers.splitlines() if line.strip().startswith("scale ")]
    assert scales == ["scale 0: shape (1, 12, 96, 96), receptive field 1 (input) voxels",
                      "scale 1: shape (1, 16, 48, 48), receptive field 4 voxels",
                      "scale 2: shape (1, 32, 24, 24), receptive field 10 voxels",
                      "scale 3: shape (1, 64, 12, 12), receptive field 22 voxels"]
    cfg = load_config(CONFIGS / "segan_2d.yaml")
    seg_params = sum(p.numel() for p in build_segmentor(cfg.model, 2, 4, 3).parameters())
    critic_params = sum(p.numel() for p in build_critic(cfg.model, 2, 12).parameters())
    totals = [line.strip() for line in layers.splitlines() if "total parameters" in line]
    assert totals == [f"total parameters: {seg_params:,}", f"total parameters: {critic_params:,}"]


def test_describe_patchgan_receptive_field_and_supervised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data set here: 4 channels, 3 regions
    bce = describe_models(resolve_config(CONFIGS / "bce_2d.yaml").config)
    assert "critic: patchgan for method bce, input [1, 7, 96, 96]" in bce  # image || mask: 4 + 3
    assert "receptive field per conv: [4, 10, 22, 46, 70]" in bce  # the 70x70 PatchGAN
    sup = describe_models(resolve_config(CONFIGS / "supervised_2d.yaml").config)
    assert sup.rstrip().endswith("method supervised: no critic")


# ------------------------------------------------------------------ critics
def test_attention_critic_trains_with_a_gan_objective(phantoms_small, cache, tmp_path):
    trainer = _trainer(phantoms_small, cache, tmp_path, "method.name=bce", "model.critic=attention")
    critic = trainer.critic
    assert isinstance(critic, AttentionCritic)
    (attention,) = [m for m in critic.modules() if isinstance(m, SelfAttention)]
    assert attention.gamma.item() == 0.0  # starts as the identity (SAGAN)
    # The logits map comes last: (N, 1, h, w) for the image || mask input (4 channels + 3 regions).
    outs = critic(torch.zeros(2, 7, 32, 32))
    assert outs[-1].shape[:2] == (2, 1) and outs[-1].dim() == 4
    _fit_and_check(trainer)
    assert attention.gamma.item() != 0.0  # the attention branch was trained


@pytest.mark.parametrize("method, critic_cls", [("bce", PatchGANDiscriminator), ("segan", SegANCritic)])
def test_spectral_norm_constrains_every_critic_conv(phantoms_small, cache, tmp_path, method, critic_cls):
    # Each training forward runs one power iteration; after a few steps the effective weights
    # have spectral norm ~1 (measured 1.00-1.02; without it 0.55-0.75 at initialisation).
    trainer = _trainer(phantoms_small, cache, tmp_path, f"method.name={method}", "model.spectral_norm=true",
                       "train.steps_per_epoch=12")
    assert isinstance(trainer.critic, critic_cls)
    convs = [m for m in trainer.critic.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
    _fit_and_check(trainer)
    trainer.critic.eval()
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2).item()
        assert 0.9 < sigma < 1.05, (conv, sigma)


# ------------------------------------------------------------------ segmentors
@pytest.mark.parametrize("name, monai_cls", [("basicunet", "BasicUNet"), ("dynunet", "DynUNet")])
def test_monai_segmentors_train_and_keep_any_input_size(phantoms_small, cache, tmp_path, name, monai_cls):
    import monai.networks.nets as nets

    levels = ["model.channels=[4, 8, 8]", "model.strides=[2, 2]"]  # DynUNet needs 3 levels or more
    trainer = _trainer(phantoms_small, cache, tmp_path, f"model.segmentor={name}", "method.name=supervised", *levels)
    net = trainer.segmentor.net
    assert isinstance(net, getattr(nets, monai_cls))
    assert any(isinstance(m, nn.InstanceNorm2d) for m in net.modules())  # model.norm: instance
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    record = _fit_and_check(trainer)
    assert 0.0 <= record["val_dice_mean"] <= 1.0  # whole-volume validation ran through the padding wrapper
    # An odd-sized input is padded to the stride the network needs and the logits cropped back.
    for dims, shape in ((2, (37, 29)), (3, (21, 18, 13))):
        seg = build_segmentor(trainer.cfg.model, dims, 4, 3).eval()
        with torch.no_grad():
            assert seg(torch.randn(1, 4, *shape)).shape == (1, 3, *shape)


def test_dynunet_with_too_few_levels_is_a_user_error():
    cfg = load_config(CONFIGS / "smoke.yaml", ["model.segmentor=dynunet", "model.channels=[4, 8]", "model.strides=[2]"])
    with pytest.raises(UserError, match=r"^model.segmentor dynunet needs at least 2 'model.strides' .*got 1 strides"):
        build_segmentor(cfg.model, 2, 4, 3)


def test_pad_to_stride_replicates_the_edge_not_zeros():
    """An odd-sized z-scored slice is padded with its own border values: a zero border would be
    "mean tissue" beside a background of about -4, which training patches never contain."""
    from segan.nets.segmentor import PadToStride

    seen = {}

    class Record(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x.clone()
            return x

    x = torch.full((1, 1, 42, 47), -4.0)
    x[..., 10:30, 10:30] = 1.0
    out = PadToStride(Record(), 8)(x)
    padded = seen["x"]
    assert padded.shape[2:] == (48, 48)
    assert torch.equal(out, x)                               # cropped back exactly
    assert float(padded.max()) == 1.0 and float(padded[..., :3, :].max()) == -4.0  # border = background
    assert not (padded == 0).any()
