"""Optimizers and learning-rate schedules the README advertises: ``adam``, ``adamw``, ``rmsprop``;
``none``, ``step``, ``cosine``, ``poly``, ``wsd``: the classes, their hyper-parameters, the learning rate
at given progress, and the rate the training loop actually sets epoch by epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segan.config import OptimConfig, load_config
from segan.optim import ProgressSchedule, build_optimizer
from segan.runtime import DistContext
from segan.training import Trainer

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
CPU = torch.device("cpu")


def _schedule(**kwargs) -> tuple[torch.optim.Optimizer, ProgressSchedule]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    return opt, ProgressSchedule(opt, OptimConfig(**kwargs), epochs=40)


@pytest.mark.parametrize("kwargs, progress_to_factor", [
    # step: x gamma every step_epochs of the 40 epochs (progress 0.625 = epoch 25)
    ({"schedule": "step", "step_epochs": 25, "gamma": 0.5}, {0.0: 1.0, 0.6: 1.0, 0.625: 0.5, 1.0: 0.5}),
    ({"schedule": "step", "step_epochs": 10, "gamma": 0.1}, {0.24: 1.0, 0.25: 0.1, 0.5: 0.01, 0.99: 0.001}),
    # poly: (1 - t)^0.9 (nnU-Net's)
    ({"schedule": "poly"}, {0.0: 1.0, 0.5: 0.5 ** 0.9, 0.75: 0.25 ** 0.9, 1.0: 0.0}),
    # cosine: to 2 % of the base rate
    ({"schedule": "cosine"}, {0.0: 1.0, 0.5: 0.51, 1.0: 0.02}),
    ({"schedule": "none"}, {0.0: 1.0, 0.7: 1.0, 1.0: 1.0}),
    # wsd: constant for 80 %, then cosine to 2 % over the last 20 %
    ({"schedule": "wsd"}, {0.0: 1.0, 0.5: 1.0, 0.8: 1.0, 0.9: 0.51, 1.0: 0.02}),
])
def test_schedule_learning_rate_at_given_progress(kwargs, progress_to_factor):
    opt, sched = _schedule(**kwargs)
    for progress, factor in progress_to_factor.items():
        sched.step(progress)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * factor, abs=1e-12), progress
    sched.step(1.0)
    at_end = opt.param_groups[0]["lr"]
    sched.step(1.7)  # progress is clamped to [0, 1]
    assert opt.param_groups[0]["lr"] == at_end
    state = sched.state_dict()
    opt2, again = _schedule(**kwargs)
    again.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]  # resume restores the rate


def _trainer(phantoms, tmp_path, *sets) -> Trainer:
    cfg = load_config(SMOKE, [f"data.root={phantoms}", f"preprocess.cache_dir={tmp_path / 'cache'}",
                              "tracking.enabled=false", "train.steps_per_epoch=1", "train.batch_size=2",
                              "train.val_max_cases=1", "train.val_every=100", "data.patch_size=[32, 32]",
                              "model.channels=[4, 8]", "model.strides=[2]", "model.critic_channels=[4, 8]",
                              *sets])
    return Trainer(cfg, tmp_path / "run", DistContext())


@pytest.mark.parametrize("schedule, factors", [
    ("step", [0.5, 0.25, 0.125, 0.0625]),  # step_epochs 1, gamma 0.5: halved after every epoch
    ("poly", [0.75 ** 0.9, 0.5 ** 0.9, 0.25 ** 0.9, 0.0]),
])
def test_training_loop_sets_the_scheduled_rate_each_epoch(phantoms_small, tmp_path, schedule, factors):
    trainer = _trainer(phantoms_small, tmp_path, "train.epochs=4", f"optim.schedule={schedule}",
                       "optim.step_epochs=1", "optim.gamma=0.5", "optim.lr=0.01", "optim.critic_lr=0.002")
    trainer.fit(None)
    assert [h["lr"] for h in trainer.history] == pytest.approx([0.01 * f for f in factors])
    assert trainer.opt_critic.param_groups[0]["lr"] == pytest.approx(0.002 * factors[-1])  # the critic's too


def test_build_optimizer_classes_and_hyper_parameters():
    params = [torch.nn.Parameter(torch.ones(3))]
    adamw = build_optimizer(params, OptimConfig(name="adamw", weight_decay=0.05, betas=[0.8, 0.9]), 3e-4, CPU)
    assert type(adamw) is torch.optim.AdamW
    group = adamw.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["foreach"]) == (3e-4, (0.8, 0.9), 0.05, True)
    critic = build_optimizer(params, OptimConfig(name="adamw"), 1e-4, CPU, betas=[0.5, 0.999])
    assert critic.param_groups[0]["betas"] == (0.5, 0.999)  # the critic's own betas
    rms = build_optimizer(params, OptimConfig(name="rmsprop", weight_decay=1e-3), 2e-5, CPU)  # the SegAN paper's
    assert type(rms) is torch.optim.RMSprop
    assert (rms.param_groups[0]["lr"], rms.param_groups[0]["weight_decay"]) == (2e-5, 1e-3)
    assert type(build_optimizer(params, OptimConfig(), 1e-3, CPU)) is torch.optim.Adam
    frozen = [torch.nn.Parameter(torch.ones(2), requires_grad=False)]
    assert build_optimizer(params + frozen, OptimConfig(), 1e-3, CPU).param_groups[0]["params"] == params


@pytest.mark.parametrize("name, cls", [("rmsprop", torch.optim.RMSprop), ("adamw", torch.optim.AdamW)])
def test_segmentor_and_critic_train_with_each_optimizer(phantoms_small, tmp_path, name, cls):
    trainer = _trainer(phantoms_small, tmp_path, f"optim.name={name}", "optim.lr=2e-3", "optim.critic_lr=5e-4",
                       "optim.weight_decay=0.01", "train.epochs=1", "train.steps_per_epoch=3",
                       "optim.schedule=none")
    assert type(trainer.opt_seg) is cls and type(trainer.opt_critic) is cls
    assert trainer.opt_seg.param_groups[0]["lr"] == 2e-3 and trainer.opt_critic.param_groups[0]["lr"] == 5e-4
    assert trainer.opt_seg.param_groups[0]["weight_decay"] == 0.01
    if name == "adamw":
        assert trainer.opt_critic.param_groups[0]["betas"] == (0.5, 0.999)  # optim.critic_betas
    before = [p.detach().clone() for p in (*trainer.segmentor.parameters(), *trainer.critic.parameters())]
    trainer.fit(None)
    after = [p.detach() for p in (*trainer.segmentor.parameters(), *trainer.critic.parameters())]
    changed = sum(not torch.equal(a, b) for a, b in zip(before, after))
    assert changed > len(before) // 2  # both networks stepped
    assert all(torch.isfinite(p).all() for p in after)
    state = trainer.opt_seg.state_dict()["state"]
    key = "square_avg" if name == "rmsprop" else "exp_avg_sq"
    assert state and all(key in s for s in state.values())  # the optimizer's own statistics were kept
