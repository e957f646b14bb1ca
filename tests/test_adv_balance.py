"""`method.adv_balance` (VQGAN's adaptive weight) and `method.adv_start` (critic once the loss settled)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segan.config import Config, MethodConfig, load_config
from segan.methods import METHODS, Step, total_loss
from segan.methods.adversarial import AdversarialSchedule, adaptive_weight
from segan.nets.segmentor import build_segmentor, output_layer
from segan.runtime import DistContext
from segan.training import Trainer

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def _tiny(method: str, **m) -> tuple[object, torch.nn.Module, torch.nn.Module, Step]:
    cfg = Config()
    cfg.method.name = method
    for k, v in m.items():
        setattr(cfg.method, k, v)
    cfg.model.channels, cfg.model.strides, cfg.model.critic_channels = [4, 8], [2], [4, 8, 8]
    cfg.model.critic = "segan" if method == "segan" else "patchgan"
    cfg.model.critic_norm = "instance"
    torch.manual_seed(0)
    meth = METHODS[method](cfg, 2, 1)
    seg = build_segmentor(cfg.model, 2, 2, 1)
    critic = meth.build_critic()
    image = torch.randn(2, 2, 64, 64)
    target = (torch.rand(2, 1, 64, 64) > 0.6).float()
    logits = seg(image)
    step = Step(image=image, target=target, logits=logits, prob=torch.sigmoid(logits), segment=seg)
    return meth, seg, critic, step


@pytest.mark.parametrize("method", ["segan", "bce"])
def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer(method):
    meth, seg, critic, step = _tiny(method, adv_balance="adaptive")
    terms = meth.segmentor_terms(critic, step, w_adv=0.3)
    balanced, extra = meth.balance(terms, seg)
    last = output_layer(seg, 1).weight
    g_seg = torch.autograd.grad(terms["loss_seg"].value, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(terms["loss_adv"].value, last, retain_graph=True)[0]
    ratio = (g_seg.norm() / (g_adv.norm() + 1e-4)).item()
    assert ratio > 0 and abs(ratio - 1.0) > 1e-3   # a real ratio, not a trivial one
    assert float(balanced["loss_adv"].weight) == pytest.approx(0.3 * ratio, rel=1e-5)
    assert float(extra["adv_scale"]) == pytest.approx(ratio, rel=1e-5)
    assert not balanced["loss_adv"].weight.requires_grad            # detached, as in VQGAN
    assert balanced["loss_seg"] is terms["loss_seg"]
    # The segmentor's gradient is seg + w_adv * ratio * adv at that layer.
    total = sum(t.weight * t.value for t in balanced.values())
    (g,) = torch.autograd.grad(total, last, retain_graph=True)
    assert torch.allclose(g, g_seg + 0.3 * ratio * g_adv, atol=1e-6)
    # Clamped to [0, adv_balance_max].
    meth.cfg.method.adv_balance_max = 1e-3
    assert float(meth.balance(terms, seg)[0]["loss_adv"].weight) == pytest.approx(0.3 * 1e-3)
    assert float(adaptive_weight(terms["loss_seg"].value, terms["loss_adv"].value, last, 1e4)) == pytest.approx(ratio)


def test_fixed_balance_returns_the_terms_untouched():
    meth, seg, critic, step = _tiny("segan")
    assert meth.cfg.method.adv_balance == "fixed" and meth.balance_names == ()
    terms = meth.segmentor_terms(critic, step, w_adv=0.3)
    balanced, extra = meth.balance(terms, seg)
    assert balanced is terms and extra == {} and terms["loss_adv"].weight == 0.3


@pytest.mark.parametrize("segmentor", ["unet", "basicunet", "dynunet"])
def test_output_layer_is_the_logits_convolution(segmentor):
    from segan.config import ModelConfig

    cfg = ModelConfig(segmentor=segmentor, channels=[4, 8, 8], strides=[2, 2])
    net = build_segmentor(cfg, 2, 3, 2)
    layer = output_layer(net, 2)
    assert layer.out_channels == 2
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = net(torch.randn(1, 3, 32, 32))
    assert seen and seen[-1][1] == 2 and tuple(seen[-1][2:]) == tuple(out.shape[2:])   # called last, full size


def test_settled_start_waits_for_the_loss_and_epoch_start_is_unchanged():
    m = MethodConfig(w_adv=0.1, adv_warmup_epochs=1, adv_ramp_epochs=0, adv_start="settled", adv_settle_tol=0.05,
                     adv_settle_epochs=2)
    sched = AdversarialSchedule(m)
    for epoch, loss in enumerate([1.0, 0.7, 0.5, 0.49], start=1):
        sched.end_epoch(float(epoch), loss)
        assert sched.start is None and sched.weight(epoch + 0.5) == 0.0
    sched.end_epoch(5.0, 0.48)   # two improvements in a row under 5 %
    assert sched.start == 5.0 and sched.weight(4.99) == 0.0 and sched.weight(5.0) == 0.1
    again = AdversarialSchedule(m)
    again.load_state_dict(sched.state_dict())
    assert again.start == 5.0 and again.losses == [1.0, 0.7, 0.5, 0.49, 0.48]
    never = AdversarialSchedule(m)
    for epoch, loss in enumerate([1.0, 0.5, 0.25, 0.12], start=1):
        never.end_epoch(float(epoch), loss)
    assert never.start is None
    # A plateau that has not come down to adv_settle_below (0.5) x the first epoch's loss is not settled ...
    plateau = AdversarialSchedule(m)
    for epoch, loss in enumerate([1.8, 1.6, 1.59, 1.58, 1.58, 1.57], start=1):
        plateau.end_epoch(float(epoch), loss)
    assert plateau.start is None
    plateau.end_epoch(7.0, 0.89)   # ... until it has (and has settled again)
    plateau.end_epoch(8.0, 0.88)
    assert plateau.start is None
    plateau.end_epoch(9.0, 0.875)
    assert plateau.start == 9.0
    # adv_start: epoch is the warm-up and ramp as before, with nothing to save.
    cfg = Config()
    cfg.method.w_adv, cfg.method.adv_warmup_epochs, cfg.method.adv_ramp_epochs = 0.2, 2, 4
    sched = AdversarialSchedule(cfg.method)
    assert sched.state_dict() == {}
    # w_adv 0.2 after a 2-epoch warm-up, ramped linearly over 4 epochs
    expected = {0: 0.0, 1.9: 0.0, 2: 0.0, 3.3: 0.2 * 1.3 / 4, 4: 0.1, 6: 0.2, 9: 0.2}
    for e, w in expected.items():
        assert sched.weight(e) == pytest.approx(w)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from data_prep.phantoms import generate

    out = tmp_path_factory.mktemp("ph") / "phantoms"
    generate(out, cases=5, size=32, seed=3, test_fraction=0.2)
    return out


def _cfg(phantoms, tmp_path, *extra):
    return load_config(SMOKE, [f"data.root={phantoms}", f"preprocess.cache_dir={tmp_path / 'cache'}",
                               "tracking.enabled=false", "train.batch_size=2", "data.patch_size=[32, 32]",
                               "train.val_max_cases=1", *extra])


def _reference_step(tr: Trainer, image: torch.Tensor, target: torch.Tensor, w_adv: float) -> None:
    """``Trainer.train_step`` as it was before adv_balance (commit 05e4a36), for the SegAN method."""
    logits = tr.segmentor(image)
    step = Step(image=image, target=target, logits=logits, prob=torch.sigmoid(logits.float()), segment=tr.segmentor,
                epoch=0.0, index=tr.step)
    tr.opt_critic.zero_grad(set_to_none=True)
    tr.method.critic_loss(tr.critic, step).backward()
    tr.opt_critic.step()
    tr.method.after_critic_step(tr.critic)
    tr.critic.requires_grad_(False)
    terms = tr.method.segmentor_terms(tr.critic, step, w_adv)
    tr.opt_seg.zero_grad(set_to_none=True)
    total_loss(terms).backward()
    tr.opt_seg.step()
    tr.critic.requires_grad_(True)


def test_fixed_mode_is_bit_identical_to_the_loop_before(phantoms, tmp_path):
    cfg = _cfg(phantoms, tmp_path, "method.adv_balance=fixed")
    torch.manual_seed(0)
    a = Trainer(cfg, tmp_path / "a", DistContext())
    torch.manual_seed(0)
    b = Trainer(_cfg(phantoms, tmp_path), tmp_path / "b", DistContext())
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        image = torch.randn(2, 4, 32, 32, generator=gen)
        target = (torch.rand(2, 3, 32, 32, generator=gen) > 0.7).float()
        a.train_step(image, target, 0.1)
        _reference_step(b, image, target, 0.1)
    for x, y in zip([*a.segmentor.parameters(), *a.critic.parameters()],
                    [*b.segmentor.parameters(), *b.critic.parameters()]):
        assert torch.equal(x, y)
    assert a.loss_names == ("loss_seg", "loss_adv", "loss_critic")


def test_adaptive_and_settled_train_log_and_resume(phantoms, tmp_path):
    cfg = _cfg(phantoms, tmp_path, "method.adv_balance=adaptive", "method.adv_start=settled",
               "method.adv_warmup_epochs=0", "method.adv_settle_tol=10", "method.adv_settle_epochs=1",
               "method.adv_settle_below=100",
               "method.adv_ramp_epochs=0", "train.epochs=3", "train.steps_per_epoch=2")
    tr = Trainer(cfg, tmp_path / "run", DistContext())
    tr.fit(None)
    h = tr.history
    # tol 10 (and below 100) = any change counts as settled: epoch 1 records a loss, epoch 2's end starts the critic,
    # which trains in epoch 3 (w_adv is logged as it stood in the epoch's last step).
    assert [r["w_adv"] for r in h] == [0.0, 0.0, cfg.method.w_adv]
    assert h[0]["adv_scale"] == 0.0 and h[1]["adv_scale"] == 0.0 and h[2]["adv_scale"] > 0
    assert h[2]["loss_adv"] > 0 and tr.method.schedule.start == 2.0
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["adv_schedule"]["start"] == 2.0
    again = Trainer(cfg, tmp_path / "run2", DistContext())
    again.load_state_dict(ckpt)
    assert again.method.schedule.start == 2.0 and again.method.schedule.weight(2.5) == cfg.method.w_adv


def test_a_run_whose_critic_never_trained_says_so(phantoms, tmp_path, capsys):
    from segan.train_run import run_training

    never = _cfg(phantoms, tmp_path, "method.adv_start=settled", "method.adv_settle_below=0.001",
                 "train.epochs=2", "train.steps_per_epoch=1")
    result = run_training(never, out_dir=tmp_path / "never")
    assert result.exit_code == 0, result.message
    err = capsys.readouterr().err
    assert "warning: the segan critic never trained in 2 epochs: loss_seg never settled" in err
    assert "method.adv_start=epoch" in err
    trained = _cfg(phantoms, tmp_path, "method.adv_warmup_epochs=1", "method.adv_ramp_epochs=0",
                   "train.epochs=2", "train.steps_per_epoch=1")
    result = run_training(trained, out_dir=tmp_path / "trained")
    assert result.exit_code == 0, result.message
    assert "critic never trained" not in capsys.readouterr().err
