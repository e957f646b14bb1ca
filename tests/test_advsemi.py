"""Adversarial semi-supervised methods: ``advsemi`` (Hung et al. 2018) and ``segan``'s feature matching."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from segan.config import from_dict
from segan.config_layers import resolve_config
from segan.errors import UserError
from segan.losses import feature_matching, multiscale_l1
from segan.methods import METHODS, Step
from segan.nets.critic import FCDiscriminator, build_critic
from segan.runtime import DistContext, seed_everything
from segan.training import Trainer
from tests.conftest import REPO, SMOKE, make_phantoms, run_cli, smoke_config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_phantoms(tmp_path_factory, "advsemi", size=32, seed=7)


def _method(name: str, dims: int = 2, **method):
    """The method with its family (as ``--set method.name=NAME``), tiny critics; ``method`` keys on top."""
    sets = [f"method.name={name}", f"data.spatial_dims={dims}", f"data.patch_size={[16] * dims}",
            "model.critic_channels=[4, 8]", *(f"method.{k}={v}" for k, v in method.items())]
    cfg = resolve_config(None, sets).config
    torch.manual_seed(0)
    m = METHODS[name](cfg, 1, 2)
    return cfg, m, m.build_critic()


def _step(dims: int = 2, size: int = 30, n: int = 3, m: int = 2, epoch: float = 0.0, unlabelled: bool = True):
    g = torch.Generator().manual_seed(1)
    s = (size,) * dims
    logits = torch.randn(n, 2, *s, generator=g, requires_grad=True)
    logits_u = torch.randn(m, 2, *s, generator=g, requires_grad=True) if unlabelled else None
    return Step(image=torch.randn(n, 1, *s, generator=g), target=(torch.rand(n, 2, *s, generator=g) > 0.5).float(),
                logits=logits, prob=torch.sigmoid(logits), segment=None, epoch=epoch,
                image_u=torch.randn(m, 1, *s, generator=g) if unlabelled else None, logits_u=logits_u,
                prob_u=torch.sigmoid(logits_u) if unlabelled else None)


def _constant_confidence(critic: nn.Module, logit: float) -> None:
    """Make the critic's last conv output ``logit`` everywhere (zero weights, that bias)."""
    last = [mod for mod in critic.modules() if isinstance(mod, (nn.Conv2d, nn.Conv3d))][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(logit)


# ------------------------------------------------------------------ advsemi
@pytest.mark.parametrize("dims, size, critic", [(2, 30, "fcn"), (2, 32, "patchgan"), (3, 18, "fcn")])
def test_confidence_map_has_the_masks_spatial_shape(dims, size, critic):
    cfg = from_dict({"method": {"name": "advsemi"}, "data": {"spatial_dims": dims, "patch_size": [size] * dims},
                     "model": {"critic": critic, "critic_norm": "none", "critic_channels": [4, 8]}})
    method = METHODS["advsemi"](cfg, 1, 2)
    critic_net = method.build_critic()
    step = _step(dims, size)
    raw = critic_net(method.critic_input(step.image, step.prob))[-1]
    assert raw.shape[1] == 1 and raw.shape[2:] != step.prob.shape[2:]  # the network's own map is coarser
    conf = method.confidence(critic_net, step.image, step.prob)
    assert conf.shape == (step.prob.shape[0], 1, *step.prob.shape[2:]) and conf.dtype == torch.float32
    assert torch.isfinite(conf).all()


def test_fc_discriminator_is_hung_et_al_s_layout():
    net = FCDiscriminator(2, 3, [4, 8, 16, 32])  # the paper's widths are 64..512
    outs = net(torch.zeros(2, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs] == [(4, 32, 32), (8, 16, 16), (16, 8, 8), (32, 4, 4), (1, 2, 2)]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) for m in net.modules())  # no norm
    assert isinstance(build_critic(resolve_config(None, ["method.name=advsemi"]).config.model, 3, 2), FCDiscriminator)


def test_critic_image_adds_the_image_channels():
    _, plain, c_plain = _method("advsemi")
    _, cond, c_cond = _method("advsemi", critic_image=True)
    step = _step()
    assert plain.critic_input(step.image, step.prob).shape[1] == 2 == plain.critic_in_channels
    assert cond.critic_input(step.image, step.prob).shape[1] == 3 == cond.critic_in_channels
    assert c_cond(cond.critic_input(step.image, step.prob))[-1].shape[1] == 1


def test_discriminator_loss_is_bce_of_truth_real_and_both_streams_fake():
    _, method, critic = _method("advsemi")
    _constant_confidence(critic, 1.5)
    loss = method.critic_loss(critic, _step())
    expected = 0.5 * (math.log1p(math.exp(1.5)) + math.log1p(math.exp(-1.5)))  # fake -> 0, real -> 1
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_semi_term_only_after_warm_up_and_where_confident():
    cfg, method, critic = _method("advsemi", semi_warmup_epochs=2.0)
    _constant_confidence(critic, 3.0)  # confidence sigmoid(3) = 0.95 > T = 0.2 everywhere
    before = method.segmentor_terms(critic, _step(epoch=1.9), 0.01)
    assert "loss_semi" not in before  # logged as 0 by the loop
    assert set(before) == {"loss_seg", "loss_adv", "loss_adv_u"}
    assert before["loss_adv"].weight == 0.01 and before["loss_adv_u"].weight == pytest.approx(0.001)
    step = _step(epoch=2.0)
    after = method.segmentor_terms(critic, step, 0.01)
    assert after["loss_semi"].weight == 0.1 and after["loss_semi"].value.item() > 0
    assert after["semi_fraction"].value.item() == 1.0 and after["semi_fraction"].weight == 0.0
    # All voxels kept: the BCE of the logits towards their own thresholded prediction.
    own = torch.nn.functional.binary_cross_entropy_with_logits(step.logits_u, (step.prob_u > 0.5).float())
    assert after["loss_semi"].value.item() == pytest.approx(own.item(), rel=1e-5)
    after["loss_semi"].value.backward()
    assert step.logits_u.grad is not None and step.logits_u.grad.abs().sum() > 0
    # Nowhere confident (sigmoid(-3) = 0.05 < 0.2): the term is zero.
    _constant_confidence(critic, -3.0)
    none = method.segmentor_terms(critic, _step(epoch=5.0), 0.01)
    assert none["loss_semi"].value.item() == 0.0 and none["semi_fraction"].value.item() == 0.0
    # No critic yet (an adversarial warm-up): segmentation only.
    assert set(method.segmentor_terms(None, _step(epoch=5.0), 0.0)) == {"loss_seg"}


def test_advsemi_family_is_the_papers_recipe_and_the_shipped_recipe_starts_at_half_time():
    family = resolve_config(None, ["method.name=advsemi"]).config
    m = family.method
    assert (family.model.critic, family.model.critic_norm, m.clamp) == ("fcn", "none", None)
    assert (m.w_adv, m.w_adv_unlabeled, m.w_semi, m.semi_threshold, m.semi_warmup_epochs, m.adv_warmup_epochs) == (
        0.01, 0.001, 0.1, 0.2, 10.0, 0)
    cfg = resolve_config(REPO / "configs" / "advsemi_2d.yaml").config
    m = cfg.method
    assert (m.w_semi, m.semi_warmup_epochs, m.adv_warmup_epochs) == (0.1, 20.0, 20)  # README, Label efficiency
    assert cfg.data.labeled_cases == 2
    out = run_cli("describe", "-c", REPO / "configs" / "advsemi_2d.yaml")
    assert out.returncode == 0, out.stderr
    lines: dict[str, str] = {}
    for line in out.stdout.splitlines():  # the resolved config comes first (the networks' summary after it)
        lines.setdefault(line.split(":")[0].strip(), line)
    for key, value, source in [("critic", "fcn", "method"), ("w_adv", "0.01", "method"),
                               ("w_adv_unlabeled", "0.001", "method"), ("semi_threshold", "0.2", "method"),
                               ("w_semi", "0.1", "method"), ("semi_warmup_epochs", "20", "file"),
                               ("adv_warmup_epochs", "20", "file")]:
        assert value in lines[key] and lines[key].rstrip().endswith(f"# {source}"), lines[key]


def test_semi_threshold_outside_0_1_is_a_user_error():
    with pytest.raises(UserError, match="'method.semi_threshold'"):
        resolve_config(None, ["method.name=advsemi", "method.semi_threshold=1.5"])
    with pytest.raises(UserError, match="'model.critic'"):  # advsemi needs a logits map
        resolve_config(None, ["method.name=advsemi", "model.critic=segan"])


# ------------------------------------------------------------------ segan feature matching
def test_feature_matching_compares_batch_statistics():
    torch.manual_seed(0)
    fake = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)]
    real = [torch.randn(4, 3, 8, 8), torch.randn(4, 5, 4, 4)]
    assert feature_matching(real, real).item() == 0.0
    value = feature_matching(fake, real)
    expected = np.mean([(f.mean((0, 2, 3)) - r.mean((0, 2, 3))).abs().mean().item() for f, r in zip(fake, real)])
    assert value.item() == pytest.approx(expected, rel=1e-5)
    keep = torch.tensor([True, False, True, False])
    assert feature_matching(fake, real, real_weight=keep).item() == pytest.approx(
        feature_matching(fake, [r[keep] for r in real]).item(), rel=1e-5)
    assert feature_matching(fake, real, real_weight=torch.zeros(4, dtype=torch.bool)).item() == pytest.approx(
        value.item(), rel=1e-5)  # no item marked: all of them
    assert 0 <= feature_matching(fake, real, feature_norm=True).item() <= 1


def test_segan_adds_feature_matching_only_with_an_unlabelled_batch():
    cfg, method, critic = _method("segan")
    assert cfg.method.w_semi_fm == 0.1 and method.uses_unlabeled  # the family's
    semi = method.segmentor_terms(critic, _step(), 0.05)
    assert semi["loss_semi_fm"].value.item() > 0
    assert semi["loss_semi_fm"].weight == pytest.approx(0.1 * 0.05 / cfg.method.w_adv)  # ramped with w_adv
    step = _step(unlabelled=False)
    plain = method.segmentor_terms(critic, step, 0.05)
    assert set(plain) == {"loss_seg", "loss_adv"}
    # The old SegAN formula, bit for bit.
    fake = critic(method.critic_input(step.image, step.prob))
    real = critic(method.critic_input(step.image, step.target))
    assert torch.equal(plain["loss_adv"].value, multiscale_l1(fake, real, "paper", True))
    assert torch.equal(plain["loss_seg"].value, method.seg_loss(step.logits, step.target))
    cfg.method.w_semi_fm = 0.0
    assert not method.uses_unlabeled


def test_segan_family_logs_feature_matching_only_with_an_unlabelled_stream():
    with_u = METHODS["segan"](resolve_config(REPO / "configs" / "segan_semi_2d.yaml").config, 1, 2)
    assert with_u.cfg.method.w_semi_fm == 0.1 and with_u.loss_names == ("loss_seg", "loss_adv", "loss_semi_fm")
    without = METHODS["segan"](resolve_config(REPO / "configs" / "segan_2d.yaml").config, 1, 2)
    assert without.loss_names == ("loss_seg", "loss_adv")


def test_segan_without_unlabelled_data_trains_exactly_as_before(phantoms, tmp_path):
    """w_semi_fm on or off: without an unlabelled stream every loss and weight is the same."""
    runs = []
    for w in (0.1, 0.0):
        cfg = smoke_config(phantoms, tmp_path, "data.patch_size=[32, 32]", "train.epochs=1", "train.val_max_cases=1",
                           "train.steps_per_epoch=3", "train.batch_size=2", f"method.w_semi_fm={w}")
        seed_everything(cfg.seed)
        trainer = Trainer(cfg, tmp_path / f"run{w}", DistContext())
        assert trainer.unlabeled_set is None
        trainer.fit(None)
        runs.append(trainer)
    a, b = runs
    keys = ("loss_seg", "loss_adv", "loss_critic")
    assert [a.history[-1][k] for k in keys] == [b.history[-1][k] for k in keys]
    assert "loss_semi_fm" not in a.history[-1]
    assert all(torch.equal(p, q) for p, q in zip(a.segmentor.parameters(), b.segmentor.parameters()))


# ------------------------------------------------------------------ training with an unlabelled stream
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method, term", [("advsemi", "loss_semi"), ("segan", "loss_semi_fm")])
def test_trains_with_the_unlabelled_stream(phantoms, tmp_path, method, term, dims):
    patch = "[32, 32]" if dims == 2 else "[16, 16, 16]"
    cfg = smoke_config(phantoms, tmp_path, f"method.name={method}", "data.labeled_cases=1",
                       f"data.spatial_dims={dims}", f"data.patch_size={patch}", "train.epochs=1",
                       "train.steps_per_epoch=2", "train.batch_size=2", "train.val_max_cases=1",
                       "method.semi_warmup_epochs=0")
    trainer = Trainer(cfg, tmp_path / "run", DistContext())
    assert trainer.unlabeled_set is not None
    assert trainer.fit(None) == "epochs"
    record = trainer.history[-1]
    assert term in trainer.loss_names
    assert all(np.isfinite(record[k]) for k in trainer.loss_names), record
    assert record[term] > 0 and record["loss_adv"] != 0


@pytest.fixture(scope="module")
def cli_phantoms(tmp_path_factory):
    data = tmp_path_factory.mktemp("cli") / "phantoms"
    made = run_cli("prepare", "phantoms", "--out", data, "--cases", 8, "--size", 32)
    assert made.returncode == 0, made.stderr
    return data


@pytest.mark.parametrize("config, term", [("advsemi_2d.yaml", "loss_semi"), ("segan_semi_2d.yaml", "loss_semi_fm")])
def test_cli_trains_one_epoch_with_two_labelled_cases(cli_phantoms, tmp_path, config, term):
    data = cli_phantoms
    # The shipped config's method and family, on the smoke config's tiny networks.
    method = resolve_config(REPO / "configs" / config).config.method.name
    sets = [f"data.root={data}", f"preprocess.cache_dir={tmp_path / 'cache'}", "tracking.enabled=false",
            f"method.name={method}", "data.labeled_cases=2", "data.patch_size=[32, 32]", "train.epochs=1",
            "train.steps_per_epoch=2", "train.batch_size=2", "train.val_max_cases=1", "train.threads=1",
            "method.semi_warmup_epochs=0"]
    out = run_cli("train", "-c", SMOKE, *[a for s in sets for a in ("--set", s)], "--out", tmp_path / "run",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    record = ckpt["history"][-1]
    assert np.isfinite(record["loss_seg"]) and record[term] > 0
