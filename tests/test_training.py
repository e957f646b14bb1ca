"""The training engine: every method trains in 2D and 3D, resume is exact, guards hold."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segan.config import load_config
from segan.errors import UserError
from segan.methods import METHODS
from segan.runtime import DistContext
from segan.train_run import run_training
from segan.methods.adversarial import AdversarialSchedule
from segan.training import Trainer
from tests.conftest import SMOKE, make_phantoms, smoke_config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_phantoms(tmp_path_factory, "ph", size=40, seed=3)


_cfg = smoke_config


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_a_few_steps(phantoms, tmp_path, method, dims):
    patch = "[32, 32]" if dims == 2 else "[24, 24, 24]"
    # Only the method is switched: its family brings the critic, the critic norm and the clamp.
    cfg = _cfg(phantoms, tmp_path, f"method.name={method}", f"data.spatial_dims={dims}", f"data.patch_size={patch}",
               "train.epochs=1", "train.steps_per_epoch=3", "train.batch_size=2", "train.val_max_cases=1")
    trainer = Trainer(cfg, tmp_path / "run", DistContext())
    seg_before = _params(trainer.segmentor)
    critic_before = _params(trainer.critic) if trainer.critic is not None else None
    assert trainer.fit(None) == "epochs"
    record = trainer.history[-1]
    for name in ("loss_seg", "loss_adv", "loss_critic", "val_dice_mean"):
        assert torch.isfinite(torch.tensor(record[name])), (name, record)
    assert any(not torch.equal(a, b) for a, b in zip(seg_before, _params(trainer.segmentor)))
    if critic_before is not None:
        assert record["loss_adv"] != 0.0
        assert any(not torch.equal(a, b) for a, b in zip(critic_before, _params(trainer.critic)))
    assert (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "run" / "best.pt").is_file()
    assert set(k for k in record if k.startswith("val_dice_")) == {
        "val_dice_mean", "val_dice_whole_tumour", "val_dice_tumour_core", "val_dice_enhancing"}


def test_segan_critic_weights_clamped(phantoms, tmp_path):
    cfg = _cfg(phantoms, tmp_path, "train.epochs=1", "train.steps_per_epoch=2", "method.clamp=0.01")
    trainer = Trainer(cfg, tmp_path / "run", DistContext())
    trainer.fit(None)
    assert max(p.abs().max().item() for p in trainer.critic.parameters()) <= 0.01 + 1e-7


def test_bf16_autocast_on_cpu_only_when_asked(phantoms, tmp_path):
    image = torch.randn(2, 4, 32, 32)
    default = Trainer(_cfg(phantoms, tmp_path), tmp_path / "fp32", DistContext())
    with default._autocast():
        assert not default.amp and default.segmentor(image).dtype == torch.float32
    cfg = _cfg(phantoms, tmp_path, "train.amp_cpu=true", "train.epochs=1", "train.steps_per_epoch=2",
               "method.adv_warmup_epochs=0")
    trainer = Trainer(cfg, tmp_path / "bf16", DistContext())
    with trainer._autocast():
        assert trainer.amp and trainer.segmentor(image).dtype == torch.bfloat16
    trainer.fit(None)
    record = trainer.history[-1]
    assert all(torch.isfinite(torch.tensor(record[k])) for k in ("loss_seg", "loss_adv", "val_dice_mean"))
    assert all(p.dtype == torch.float32 for p in trainer.segmentor.parameters())  # autocast, not a cast


def test_adversarial_weight_warmup_and_ramp(phantoms, tmp_path):
    cfg = _cfg(phantoms, tmp_path, "method.w_adv=0.2", "method.adv_warmup_epochs=2", "method.adv_ramp_epochs=4")
    weight = AdversarialSchedule(cfg.method).weight   # adv_start: epoch (the default)
    assert [weight(e) for e in (0, 1.9, 2, 4, 6, 9)] == pytest.approx([0, 0, 0, 0.1, 0.2, 0.2])


def _default_sigint():
    # A job started in the background by a non-interactive shell (as CI may be) inherits
    # SIGINT as ignored; give the child the terminal's default so Ctrl-C can be simulated.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _train_cli(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "segan", "train", "-c", str(SMOKE), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_default_sigint)


def sigkill_and_resume(common: list[str], tmp_path: Path) -> tuple[dict, dict]:
    """Train ``common`` uninterrupted (``tmp_path/full``) and again SIGKILLed right after epoch 1's
    checkpoint, then resumed; returns both final ``last.pt`` states (full, resumed)."""
    full = _train_cli(*common, "--out", str(tmp_path / "full"))
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err

    killed = _train_cli(*common, "--out", str(tmp_path / "killed"))
    ckpt = tmp_path / "killed" / "last.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1, "kill landed after epoch 2's checkpoint; the test needs a slower epoch 2"

    resumed = _train_cli(*common, "--resume", str(ckpt))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    return a, b


def test_resume_after_sigkill_matches_uninterrupted_run(phantoms, tmp_path):
    common = [f"--set=data.root={phantoms}", f"--set=preprocess.cache_dir={tmp_path / 'cache'}",
              "--set=tracking.enabled=false", "--set=train.deterministic=true", "--set=train.epochs=2",
              "--set=train.steps_per_epoch=12", "--set=train.threads=1"]
    a, b = sigkill_and_resume(common, tmp_path)
    for key in ("segmentor", "critic"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"


def test_time_budget_validates_saves_and_ends_normally(phantoms, tmp_path):
    cfg = _cfg(phantoms, tmp_path, "train.epochs=50", "train.max_minutes=0.0001", "train.steps_per_epoch=4")
    result = run_training(cfg, out_dir=tmp_path / "run")
    assert result.exit_code == 0 and result.status == "FINISHED"
    assert result.epochs_done == 1 and "time budget" in result.message
    summary = result.summary().splitlines()  # the stop reason is on the FINISHED line, not after it
    assert len(summary) == 1 and summary[0].startswith("FINISHED (stopped: time budget): 1 epochs, best val_dice_mean")
    assert "val_dice_mean" in result.metrics and (tmp_path / "run" / "best.pt").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()


@pytest.mark.slow
def test_nan_guard_exits_3_keeping_last_good_checkpoint(phantoms, tmp_path):
    # Epoch 1 trains at the normal rate; the step schedule then multiplies it by 1e30, so
    # epoch 2 diverges: the guard must keep epoch 1's checkpoint, intact and usable.
    run = tmp_path / "run"
    proc = _train_cli(f"--set=data.root={phantoms}", f"--set=preprocess.cache_dir={tmp_path / 'cache'}",
                      "--set=tracking.enabled=false", "--set=optim.schedule=step", "--set=optim.step_epochs=1",
                      "--set=optim.gamma=1e30", "--set=train.epochs=3", "--set=train.threads=1", "--out", str(run))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, (out, err)
    assert "training diverged at epoch 2" in out + err and "Traceback" not in err
    last = torch.load(run / "last.pt", weights_only=True)
    steps = 16 // 4  # smoke: samples_per_epoch / batch_size
    assert (last["epoch"], last["step"], len(last["history"])) == (1, steps, 1)  # epoch 1's, not a NaN state
    best = torch.load(run / "best.pt", weights_only=True)
    for key in ("segmentor", "critic"):
        for name, tensor in last[key].items():
            assert torch.isfinite(tensor.float()).all(), f"{key}.{name}"
            assert torch.equal(tensor, best[key][name]), f"{key}.{name} is not epoch 1's"
    image = sorted((phantoms / "imagesTs").glob("*.nii.gz"))[0]
    pred = subprocess.run([sys.executable, "-m", "segan", "predict", "-m", str(run / "last.pt"), "-i", str(image),
                           "-o", str(tmp_path / "pred"), "--probabilities"], capture_output=True, text=True,
                          timeout=300)
    assert pred.returncode == 0, pred.stderr
    stem = image.name.removesuffix(".nii.gz")
    prob = np.asarray(nib.load(tmp_path / "pred" / f"{stem}_prob.nii.gz").dataobj)
    assert prob.shape[:3] == nib.load(image).shape[:3] and np.isfinite(prob).all()
    assert 0.0 <= prob.min() and prob.max() <= 1.0


def test_missing_data_folder_is_a_user_error(tmp_path):
    cfg = load_config(SMOKE, [f"data.root={tmp_path / 'nope'}", "tracking.enabled=false"])
    with pytest.raises(UserError, match="nope"):
        run_training(cfg, out_dir=tmp_path / "run")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_state_and_exits_cleanly(phantoms, tmp_path, sig):
    # Short steps, long epochs: the signal (0.3 s after epoch 1) must land inside epoch 2. With 40
    # steps a quiet 2-core machine finished epoch 2 within those 0.3 s (saved at step 80, flaky).
    steps = 200
    common = [f"--set=data.root={phantoms}", f"--set=preprocess.cache_dir={tmp_path / 'cache'}",
              "--set=tracking.enabled=false", f"--set=train.steps_per_epoch={steps}", "--set=train.batch_size=2",
              "--set=data.patch_size=[32, 32]", "--set=train.val_every=100", "--set=train.threads=1"]
    proc = _train_cli(*common, "--set=train.epochs=50", "--out", str(tmp_path / "run"))
    ckpt = tmp_path / "run" / "last.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    epoch_end = torch.load(ckpt, weights_only=True)  # epoch 1's checkpoint, before the signal
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and f"--resume {ckpt}" in out + err
    saved = torch.load(ckpt, weights_only=True)
    # The interrupt saved the state it stopped in, not the last epoch's: steps beyond the
    # epoch boundary, other weights.
    assert epoch_end["step"] == epoch_end["epoch"] * steps
    assert saved["step"] > epoch_end["step"] and saved["step"] % steps != 0, (epoch_end["step"], saved["step"])
    assert saved["epoch"] == saved["step"] // steps
    assert any(not torch.equal(t, epoch_end["segmentor"][n]) for n, t in saved["segmentor"].items())
    if sig != signal.SIGINT:
        return
    # Resume continues from the interrupt's state: one more (whole) epoch on top of its step count.
    resumed = _train_cli(*common, f"--set=train.epochs={saved['epoch'] + 1}", "--resume", str(ckpt))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    final = torch.load(ckpt, weights_only=True)
    assert (final["epoch"], final["step"]) == (saved["epoch"] + 1, saved["step"] + steps)
    assert final["train_seconds"] > saved["train_seconds"] > epoch_end["train_seconds"] > 0


def test_time_budget_drives_warmup_and_schedule(phantoms, tmp_path):
    cfg = _cfg(phantoms, tmp_path, "train.epochs=40", "method.adv_warmup_epochs=20", "method.w_adv=0.1")
    trainer = Trainer(cfg, tmp_path / "run", DistContext())
    assert trainer.schedule_epoch(3.0) == 3.0  # no budget: epochs only
    trainer.clock.start(time.monotonic() + 30.0, 100.0)  # 70 % of the budget used
    assert trainer.schedule_epoch(3.0) == pytest.approx(28.0, abs=0.5)
    assert trainer.method.schedule.weight(trainer.schedule_epoch(3.0)) == pytest.approx(0.1)
    # Under DDP the schedules read the share of the budget agreed at the last sync, not this
    # process's clock, so every rank decides the critic step and the unlabelled draw alike.
    from segan.run_clock import RunClock

    clock = RunClock()
    clock.start(time.monotonic() + 30.0, 100.0, agreed=True)
    assert clock.schedule_epoch(3.0, 40) == 3.0 and clock.used() == pytest.approx(0.7, abs=0.01)
    clock.agreed_used = 0.5
    assert clock.schedule_epoch(3.0, 40) == 20.0
