"""Issue 12 acceptance with an unlabelled stream: every semi-supervised method in 3D, exact
resume after SIGKILL, and 2-process DDP leaving one checkpoint and one MLflow run."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from segan.config import load_config
from segan.methods import METHODS
from segan.runtime import DistContext
from segan.training import Trainer
from test_ddp import _free_port
from test_training import sigkill_and_resume

SMOKE = REPO / "configs" / "smoke.yaml"
SEMI = sorted(name for name, cls in METHODS.items() if cls.uses_unlabeled)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from data_prep.phantoms import generate

    out = tmp_path_factory.mktemp("semi_acc") / "phantoms"
    generate(out, cases=6, size=32, seed=5, test_fraction=0.34)
    return out


@pytest.mark.parametrize("method", SEMI)
def test_every_semi_method_trains_in_3d_with_finite_losses(phantoms, tmp_path, method):
    cfg = load_config(SMOKE, [f"data.root={phantoms}", f"preprocess.cache_dir={tmp_path / 'cache'}",
                              "tracking.enabled=false", f"method.name={method}", "data.spatial_dims=3",
                              "data.patch_size=[16, 16, 16]", "data.labeled_cases=1", "train.epochs=1",
                              "train.steps_per_epoch=2", "train.batch_size=2", "train.val_max_cases=1",
                              "method.adv_warmup_epochs=0", "method.adv_ramp_epochs=0"])
    trainer = Trainer(cfg, tmp_path / "run", DistContext())
    assert trainer.unlabeled_set is not None and len(trainer.data.datalist["unlabeled"]) >= 1
    before = [p.detach().clone() for p in trainer.segmentor.parameters()]
    assert trainer.fit(None) == "epochs"
    record = trainer.history[-1]
    losses = {k: v for k, v in record.items() if k.startswith("loss_")}
    assert losses and all(np.isfinite(v) for v in losses.values()), losses
    assert np.isfinite(record["val_dice_mean"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.segmentor.parameters()))


def test_resume_after_sigkill_with_unlabelled_stream_is_exact(phantoms, tmp_path):
    # meanteacher: the unlabelled batches and the EMA teacher (method state) must both resume.
    common = [f"--set=data.root={phantoms}", f"--set=preprocess.cache_dir={tmp_path / 'cache'}",
              "--set=tracking.enabled=false", "--set=train.deterministic=true", "--set=train.epochs=2",
              "--set=train.steps_per_epoch=12", "--set=train.threads=1", "--set=method.name=meanteacher",
              "--set=data.labeled_cases=1", "--set=data.patch_size=[32, 32]", "--set=train.progress=false",
              "--set=method.consistency_rampup_epochs=0"]
    a, b = sigkill_and_resume(common, tmp_path)
    assert a["history"][-1]["loss_cons"] > 0  # the unlabelled stream was used
    for name, tensor in a["segmentor"].items():
        assert torch.equal(tensor, b["segmentor"][name]), f"segmentor.{name} differs after resume"
    for name, tensor in a["method"]["teacher"].items():
        assert torch.equal(tensor, b["method"]["teacher"][name]), f"teacher.{name} differs after resume"


def test_torchrun_two_ranks_with_unlabelled_stream_train_once(phantoms_small, tmp_path):
    run, db = tmp_path / "run", tmp_path / "mlflow.db"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{db}", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "segan", "train", "-c", str(SMOKE), "--set", f"data.root={phantoms_small}",
           "--set", f"preprocess.cache_dir={tmp_path / 'cache'}", "--set", "train.device=cpu",
           "--set", "train.epochs=1", "--set", "method.name=bce", "--set", "data.labeled_cases=2",
           "--set", "method.adv_warmup_epochs=0", "--set", "train.progress=false", "--out", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "last.pt"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and np.isfinite(ckpt["history"][-1]["loss_adv"])
    query = ("import mlflow; r = mlflow.search_runs(search_all_experiments=True); print(len(r)); "
             "print(r['status'].iloc[0]); print(r['params.data.n_labeled'].iloc[0]); "
             "print(r['params.data.n_unlabeled'].iloc[0])")
    check = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True, cwd=tmp_path, env=env,
                           timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    count, status, n_labeled, n_unlabeled = check.stdout.split("\n")[:4]
    assert (int(count), status, n_labeled) == (1, "FINISHED", "2") and int(n_unlabeled) >= 1
